// nightstack page: the live preview, the per-frame table and charts, the sessions, close.
// Everything comes from this server's API (no outside resources). Data from the journal
// (file names, reasons) only ever reaches the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "nightstack-token";
const NIGHT_KEY = "nightstack-night";
const CROP_SIZES = [128, 256, 512, 768, 1024]; // 1:1 crop sides the server renders

const view = {
  status: null,      // the last /api/status
  sessions: [],      // the last /api/sessions
  session: null,     // the id of the session shown
  follow: true,      // show whichever session is open
  frames: [],        // that session's journal records, in journal order
  loading: null,     // the frames request in flight
  previewVersion: String(Date.now()),
  locked: false,     // reading needs the web token and the page has none that works
  strength: 1,
  linked: true,
  capture: null,     // the last capture status (status.capture), for the countdowns
  lastFrame: false,  // show the last single frame instead of the stack
  objects: false,    // draw the plate solve's objects over the stack
  solve: null,       // the shown session's session.json "solve", or null
  solveKey: "",      // which session.json that was read from (id and its "updated")
};

// --- small helpers ------------------------------------------------------------------------
function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function num(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "";
  if (Number.isInteger(value) && digits === 0) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 0.01 || abs >= 1e5)) return value.toPrecision(3);
  return value.toFixed(digits === undefined ? 2 : digits);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(1) + " GB";
  return (n / 2 ** 20).toFixed(0) + " MB";
}

// Total exposure to the second or minute: "45 s", "2 min 30 s", "3 h 05 min".
function exposureText(seconds) {
  const total = Math.round(seconds || 0);
  const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
  if (h) return h + " h " + String(m).padStart(2, "0") + " min";
  if (m) return m + " min" + (s ? " " + s + " s" : "");
  return s + " s";
}

function basename(path) {
  const s = String(path || "");
  return s.slice(Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\")) + 1);
}

function sessionUrl(id, rest) {
  return "/api/sessions/" + encodeURIComponent(id) + "/" + rest;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + " answered " + response.status);
  return response.json();
}

// --- the numbers a frame contributes to the charts ----------------------------------------
function drift(record) {
  const t = record.transform;
  if (!Array.isArray(t) || t.length !== 2) return null;
  return Math.hypot(t[0][2], t[1][2]);
}

// Each chart's y axis starts from a sensible range in its own unit, not the data's own
// minimum and maximum (FWHM 3.67-3.72 px is a flat line near 4 px, not wild swings):
// ``floor`` is the axis' bottom, ``top`` the least top it has (it grows to a round number
// above the data, with ``room`` to spare). ``scale`` turns the journal's value into the unit.
const METRICS = [
  { key: "fwhm", title: "FWHM", unit: "px", digits: 2, get: (r) => r.fwhm,
    floor: 0, top: 4, room: 1.25 },
  { key: "stars", title: "Stars", unit: "", digits: 0, get: (r) => r.stars,
    floor: 0, top: 10, room: 1.1 },
  { key: "background", title: "Background", unit: "% of full scale", digits: 2,
    get: (r) => r.background, scale: 100, floor: 0, top: 1, room: 1.25 },
  { key: "transparency", title: "Transparency", unit: "%", digits: 0,
    get: (r) => r.transparency, scale: 100, floor: 0, top: 100, room: 1 },
  { key: "drift", title: "Drift", unit: "px", digits: 1, get: drift,
    floor: 0, top: 5, room: 1.1 },
];

// The least "round" number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) at or
// above v: a top a little above the data (transparency 100.5 % tops at 120 %, not 200 %).
const ROUND = [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10];
function roundUp(v) {
  if (!(v > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(v));
  for (const step of ROUND) if (step * power >= v * (1 - 1e-9)) return Number((step * power).toPrecision(6));
  return 10 * power;
}

// [bottom, top] of a metric's y axis for these values (in its unit).
function axisRange(metric, values) {
  const hi = values.length ? Math.max(...values) : 0;
  const lo = values.length ? Math.min(...values) : 0;
  const bottom = Math.min(metric.floor, roundDown(lo));
  return [bottom, Math.max(metric.top, roundUp(hi * metric.room))];
}

function roundDown(v) {
  return v >= 0 ? 0 : -roundUp(-v);
}

function value(metric, record) {
  const v = metric.get(record);
  return typeof v === "number" && Number.isFinite(v) ? v * (metric.scale || 1) : null;
}

// --- status --------------------------------------------------------------------------------
function showStatus() {
  const s = view.status;
  const badge = $("state");
  badge.className = "badge " + (s ? s.state : "offline");
  badge.textContent = s ? s.state : "offline";
  if (!s) return;
  $("n-queue").textContent = String(s.queue);
  $("n-disk").textContent = bytes(s.disk_free_bytes);
  $("n-version").textContent = s.version;
  const open = s.session;
  const close = $("close");
  close.hidden = !open || s.state === "closing" || s.state === "stopping";
  if (!close.classList.contains("armed")) close.textContent = "Close session";
  const last = s.last_frame;
  $("last-frame").textContent = last
    ? "Last frame: " + last.file + " — " + (last.reason || last.status) + " (" + last.at + ")"
    : "";
  $("follow").hidden = view.follow || !open;
  if (view.follow && open && open !== view.session) showSession(open, true);
  showCounts();
  showCapture(s.capture);
}

// --- capture (the camera over USB: docs/capture.md) -----------------------------------------
// The status comes with /api/status (and its events) under "capture"; the countdowns tick
// here from its wall-clock times. Actions send the token like the close button.
const ACTIVE = ["starting", "waiting", "exposing", "downloading", "paused", "reconnecting"];

function showCapture(c) {
  $("capture-section").hidden = !c;
  view.capture = c || null;
  if (!c) return;
  const cam = c.camera;
  $("cap-camera").textContent = cam
    ? cam.model + " (serial " + (cam.serial || "?") + ")" + (cam.lens ? ", " + cam.lens : "") +
      (c.connected ? "" : " — not connected")
    : "No camera yet.";
  $("cap-battery").textContent = cam && cam.battery ? cam.battery : "–";
  $("cap-card").textContent = cam && cam.free_bytes != null ? bytes(cam.free_bytes) : "–";
  $("cap-state").textContent = c.state;
  $("cap-frame").textContent = c.count ? c.frame + " of " + c.count : String(c.frame);
  $("cap-reason").textContent = c.reason || "";
  const active = ACTIVE.includes(c.state);
  $("cap-start").hidden = active;
  $("cap-pause").hidden = !active || c.state === "paused";
  $("cap-resume").hidden = c.state !== "paused";
  $("cap-stop").hidden = !active;
  const plan = c.plan;
  const exposure = $("cap-exposure");
  if (plan && !exposure.value && document.activeElement !== exposure) {
    exposure.value = plan.exposure_s;
    $("cap-iso").value = plan.iso === null ? "" : plan.iso;
    $("cap-count").value = plan.count;
    $("cap-interval").value = plan.interval_s;
  }
  tickCapture();
}

function tickCapture() {
  const c = view.capture;
  if (!c) return;
  const left = (t) => (t === null || t === undefined) ? "–"
    : Math.max(0, Math.round(t - Date.now() / 1000)) + " s";
  $("cap-ends").textContent = left(c.exposure_ends);
  $("cap-next").textContent = left(c.next_start);
}

async function captureAction(action, body) {
  const note = $("cap-note");
  note.textContent = "";
  const answer = await postAction("/api/capture/" + action, body, note);
  if (answer) showCapture(answer);
}

// POST an action with the token (JSON ``body`` or none); the answer of a 202, else null with
// the reason in ``note`` (and the token form shown when the token is needed).
async function postAction(path, body, note) {
  const headers = {};
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: body ? JSON.stringify(body) : null });
  } catch (err) {
    note.textContent = "The daemon cannot be reached.";
    return null;
  }
  let answer = {};
  try { answer = await response.json(); } catch (err) { answer = {}; }
  refreshStatus();
  if (response.status === 202) return answer;
  if (response.status === 401) {
    note.textContent = "This needs the web token.";
    $("token-form").hidden = false;
    $("token").focus();
  } else {
    note.textContent = answer.error || ("Refused (" + response.status + ")");
  }
  return null;
}

function setupCapture() {
  const number = (id) => { const v = $(id).value; return v === "" ? null : Number(v); };
  $("cap-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const body = { exposure_s: number("cap-exposure"), count: number("cap-count") || 0,
                   interval_s: number("cap-interval") || 0 };
    const iso = number("cap-iso");
    if (iso !== null) body.iso = iso;
    captureAction("start", body);
  });
  for (const action of ["pause", "resume", "stop"]) {
    $("cap-" + action).addEventListener("click", () => captureAction(action));
  }
  setInterval(() => { if (!document.hidden) tickCapture(); }, 1000);
}

function showCounts() {
  const accepted = view.frames.filter((r) => r.status === "accepted");
  const rejected = view.frames.length - accepted.length;
  $("n-accepted").textContent = String(accepted.length);
  $("n-rejected").textContent = String(rejected);
  const exposure = accepted.reduce((sum, r) => sum + (r.exposure_s || 0), 0);
  $("n-exposure").textContent = exposureText(exposure);
  $("ov-count").textContent = accepted.length + (accepted.length === 1 ? " frame" : " frames") +
    " · " + exposureText(exposure);
  $("frames-count").textContent = view.frames.length ? "(" + view.frames.length + ")" : "";
}

// Answers can come back out of order: only the latest request's answer is shown.
const asked = { status: 0, sessions: 0 };

async function refreshStatus() {
  const seq = ++asked.status;
  let status = null;
  try {
    status = await getJSON("/api/status");
  } catch (err) {
    status = null;
  }
  if (seq !== asked.status) return;
  applyStatus(status);
}

// A new status from either source; the session list is re-read when the session, its state
// or its counts changed.
function applyStatus(status) {
  const before = view.status;
  view.status = status;
  showStatus();
  if (status && (!before || before.session !== status.session || before.state !== status.state ||
      before.accepted !== status.accepted || before.rejected !== status.rejected)) {
    refreshSessions();
  }
}

// --- sessions ------------------------------------------------------------------------------
function currentMeta() {
  return view.sessions.find((s) => s.session === view.session) || null;
}

// the server has linear data to stretch (the linear preview, live.fits or the final)
function hasLinear() {
  const meta = currentMeta();
  return !!meta && !!meta.stretch;
}

// ...and at full resolution, for a 1:1 crop (live.fits or the final)
function hasFull() {
  const meta = currentMeta();
  return !!meta && !!meta.crop;
}

function showSessions() {
  const list = $("sessions");
  list.replaceChildren();
  for (const s of view.sessions) {
    const item = el("li", { "data-session": s.session });
    if (s.session === view.session) item.classList.add("viewing");
    const head = el("div");
    const open = el("button", { type: "button", class: "link" }, s.session);
    open.addEventListener("click", () => {
      showSession(s.session, s.session === (view.status && view.status.session));
      window.scrollTo({ top: 0 });
    });
    const live = view.status && view.status.session === s.session ? view.status : s;
    head.append(open, " ", el("span", { class: "muted" },
      s.state + " · " + (live.accepted || 0) + " stacked, " + (live.rejected || 0) + " rejected"));
    item.append(head);
    const downloads = el("div", { class: "downloads" });
    for (const name of s.files) {
      const link = el("a", { href: sessionUrl(s.session, name) }, name);
      if (name !== "preview.jpg") link.setAttribute("download", name);
      downloads.append(link);
    }
    if (s.files.length) item.append(downloads);
    list.append(item);
  }
  const meta = currentMeta();
  $("session-name").textContent = view.session || "no session";
  $("session-state").textContent = meta ? meta.state : "";
  const linear = hasLinear();
  $("stretch").hidden = !linear || view.lastFrame;
  $("stretch-note").hidden = linear || !view.session || view.lastFrame;
  showOverlay(meta);
  showTimelapse(meta);
}

function hasView(name) {
  const meta = currentMeta();
  return !!meta && Array.isArray(meta.views) && meta.views.includes(name);
}

// The name, the field and the counts written over the image (HTML: the files stay clean).
function showOverlay(meta) {
  const target = meta && meta.target ? meta.target : {};
  let name = target.name || "";
  const field = target.field_deg;
  if (Array.isArray(field) && field.length === 2) {
    const degrees = Math.max(field[0], field[1]) >= 1; // both in one unit: ° or ′
    const size = (deg) => degrees ? deg.toFixed(1) + "°" : (deg * 60).toFixed(0) + "′";
    name = (name ? name + " · " : "") + size(field[0]) + " × " + size(field[1]);
  }
  $("ov-name").textContent = name;
  $("ov-name").hidden = !name;
  $("overlay").hidden = !view.session || $("preview").hidden;
  $("ov-mode").hidden = !view.lastFrame;
  const last = hasView("last.jpg");
  $("last-toggle").hidden = !last;
  if (!last && view.lastFrame) { view.lastFrame = false; $("show-last").checked = false; showPreview(); }
  $("objects-toggle").hidden = !solveObjects().length;
}

function showTimelapse(meta) {
  const name = meta && Array.isArray(meta.views) ? meta.views.find((n) => n.startsWith("timelapse.")) : null;
  const video = $("timelapse");
  $("timelapse-section").hidden = !name;
  const src = name ? sessionUrl(meta.session, name + "?v=" + encodeURIComponent(meta.updated || "")) : "";
  if (!name) {
    if (video.getAttribute("src")) { video.removeAttribute("src"); video.load(); }
  } else if (video.getAttribute("src") !== src) {
    video.setAttribute("src", src);
  }
}

// --- plate-solve objects over the stack -------------------------------------------------------
function solveObjects() {
  const solve = view.solve;
  return solve && Array.isArray(solve.objects) ? solve.objects.filter((o) => o &&
    Number.isFinite(o.x) && Number.isFinite(o.y)) : [];
}

// The objects in the stack's full-resolution pixels (the reference frame's), drawn scaled to
// the preview: its size in those pixels is the solved field over the plate scale.
function showObjects() {
  const box = $("objects");
  const solve = view.solve, objects = solveObjects();
  const W = solve ? solve.field_w_deg * 3600 / solve.scale_arcsec : NaN;
  const H = solve ? solve.field_h_deg * 3600 / solve.scale_arcsec : NaN;
  const on = view.objects && !view.lastFrame && objects.length > 0 && W > 0 && H > 0 &&
    Number.isFinite(W) && Number.isFinite(H) && !$("preview").hidden;
  box.toggleAttribute("hidden", !on); // an SVG element has no .hidden property
  box.replaceChildren();
  if (!on) return;
  box.setAttribute("viewBox", `0 0 ${W} ${H}`);
  box.setAttribute("preserveAspectRatio", "none");
  const least = W / 150, font = W / 40;
  for (const o of objects) {
    const r = Math.max(Number.isFinite(o.radius_px) ? o.radius_px : 0, least);
    const group = svg("g", { "data-name": String(o.name || "") });
    group.append(svg("circle", { cx: o.x, cy: o.y, r }));
    group.append(svg("text", { x: o.x + r * 0.8, y: o.y - r * 0.8, "font-size": font },
      String(o.name || "")));
    box.append(group);
  }
}

async function refreshSessions() {
  const seq = ++asked.sessions;
  let sessions;
  try {
    sessions = await getJSON("/api/sessions");
  } catch (err) {
    return;
  }
  if (seq !== asked.sessions) return;
  view.sessions = sessions;
  if (!view.session && view.sessions.length) {
    // nothing open (the morning after): the newest session with a picture, else the newest
    const shown = view.sessions.find((s) => s.files.includes("preview.jpg")) || view.sessions[0];
    showSession(shown.session, view.follow);
  }
  showSessions();
  loadSolve();
}

// session.json's "solve" (plate solving: docs/web.md), read again when the file changes.
async function loadSolve() {
  const meta = currentMeta();
  const key = meta ? meta.session + "|" + (meta.updated || "") : "";
  if (key === view.solveKey) return;
  view.solveKey = key;
  view.solve = null;
  showObjects();
  if (!meta || !meta.target || !meta.target.field_deg) return; // no solve in session.json
  try {
    const full = await getJSON("/api/sessions/" + encodeURIComponent(meta.session));
    if (key !== view.solveKey) return;
    view.solve = full.solve && typeof full.solve === "object" ? full.solve : null;
  } catch (err) {
    view.solve = null;
  }
  showSessions();
  showObjects();
}

function showSession(id, follow) {
  const changed = id !== view.session;
  view.session = id;
  view.follow = follow;
  $("follow").hidden = follow || !(view.status && view.status.session);
  if (changed) {
    view.frames = [];
    $("frames").tBodies[0].replaceChildren();
    view.previewVersion = String(Date.now());
    showCharts();
    loadFrames();
  }
  showSessions();
  showPreview();
  loadSolve();
}

// --- frames: table and charts --------------------------------------------------------------
async function loadFrames() {
  const id = view.session;
  if (!id) return;
  if (view.loading) return view.loading;
  const since = view.frames.length;
  view.loading = (async () => {
    try {
      const records = await getJSON(sessionUrl(id, "frames?since=" + since));
      if (id === view.session && since === view.frames.length) addFrames(records);
    } catch (err) {
      // the next event or the periodic refresh tries again
    } finally {
      view.loading = null;
    }
    if (id === view.session && since !== view.frames.length) loadFrames();
  })();
  return view.loading;
}

function addFrames(records) {
  if (!records.length) return;
  const body = $("frames").tBodies[0];
  const start = view.frames.length;
  records.forEach((record, offset) => {
    view.frames.push(record);
    body.prepend(frameRow(record, start + offset));
  });
  showCounts();
  showCharts();
  if (view.lastFrame) showPreview();
}

function frameRow(r, index) {
  const row = el("tr", { "data-index": String(index) });
  row.className = r.status === "accepted" ? "accepted" : "rejected";
  const time = typeof r.capture_time === "string" ? r.capture_time.slice(11, 19) : "";
  const result = r.status === "accepted" ? (r.reference ? "accepted (reference)" : "accepted")
    : (r.reason || "rejected");
  const cells = [
    [String(index + 1), "n"],
    [time, "time"],
    [basename(r.file), "file"],
    [result, "result"],
    [num(r.stars, 0), "stars"],
    [num(r.fwhm, 2), "fwhm"],
    [num(r.background, 4), "background"],
    [num(r.transparency, 3), "transparency"],
    [num(r.residual_px, 3), "residual"],
  ];
  for (const [text, cls] of cells) row.append(el("td", { class: cls }, text));
  row.cells[2].title = String(r.file || "");
  return row;
}

function showCharts() {
  const box = $("charts");
  box.replaceChildren(...METRICS.map((m) => chart(m, view.frames)));
}

function chart(metric, records) {
  const W = 320, H = 92, L = 40, R = 6, T = 6, B = 16;
  const card = el("div", { class: "chart", "data-metric": metric.key });
  const points = [];
  records.forEach((r, i) => {
    const v = value(metric, r);
    if (v !== null) points.push({ i, v, ok: r.status === "accepted" });
  });
  const latest = points.length ? points[points.length - 1].v : null;
  const head = el("h3", {}, metric.title + (metric.unit ? " (" + metric.unit + ")" : ""));
  head.append(el("span", {}, latest === null ? "" : num(latest, metric.digits)));
  card.append(head);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": metric.title + " per frame", "data-metric": metric.key });
  plot.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  plot.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!points.length) {
    plot.append(svg("text", { class: "empty", x: L + 8, y: H / 2 }, "no data yet"));
    card.append(plot);
    return card;
  }
  const [lo, hi] = axisRange(metric, points.map((p) => p.v));
  plot.dataset.lo = String(lo);
  plot.dataset.hi = String(hi);
  const n = Math.max(records.length - 1, 1);
  const x = (i) => L + (W - L - R) * (records.length === 1 ? 0.5 : i / n);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const mid = (lo + hi) / 2;
  plot.append(svg("line", { class: "grid", x1: L, y1: y(mid), x2: W - R, y2: y(mid) }));
  const tick = (v) => String(Number(v.toPrecision(3)));
  plot.append(svg("text", { class: "label", x: L - 4, y: T + 8, "text-anchor": "end" }, tick(hi)));
  plot.append(svg("text", { class: "label", x: L - 4, y: y(mid) + 3, "text-anchor": "end" }, tick(mid)));
  plot.append(svg("text", { class: "label", x: L - 4, y: H - B, "text-anchor": "end" }, tick(lo)));
  plot.append(svg("text", { class: "label", x: L, y: H - 3 }, "1"));
  plot.append(svg("text", { class: "label", x: W - R, y: H - 3, "text-anchor": "end" }, String(records.length)));
  const accepted = points.filter((p) => p.ok);
  if (accepted.length > 1) {
    plot.append(svg("polyline", { points: accepted.map((p) => x(p.i).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ") }));
  }
  for (const p of points) {
    const dot = svg("circle", { cx: x(p.i).toFixed(1), cy: y(p.v).toFixed(1), r: 2.6, class: p.ok ? "accepted" : "rejected", "data-index": p.i });
    dot.append(svg("title", {}, "#" + (p.i + 1) + ": " + num(p.v, metric.digits) + (metric.unit ? " " + metric.unit : "")));
    plot.append(dot);
  }
  card.append(plot);
  return card;
}

// --- preview, stretch, zoom ----------------------------------------------------------------
function previewSrc() {
  const v = "v=" + encodeURIComponent(view.previewVersion);
  if (view.lastFrame && hasView("last.jpg")) {
    return sessionUrl(view.session, "last.jpg?" + v + "." + view.frames.length);
  }
  if (hasLinear() && (view.strength !== 1 || !view.linked)) {
    return sessionUrl(view.session, "stretch.jpg?strength=" + view.strength + "&linked=" +
      (view.linked ? "1" : "0") + "&" + v);
  }
  return sessionUrl(view.session, "preview.jpg?" + v);
}

function showPreview() {
  const img = $("preview");
  if (!view.session) { img.hidden = true; $("no-preview").hidden = false; return; }
  const src = previewSrc();
  if (img.getAttribute("src") !== src) img.setAttribute("src", src);
}

function setupPreview() {
  const img = $("preview");
  const shown = (ok) => {
    img.hidden = !ok; $("no-preview").hidden = ok; $("overlay").hidden = !ok; showObjects();
  };
  img.addEventListener("load", () => shown(true));
  img.addEventListener("error", () => shown(false));
  $("show-last").addEventListener("change", () => {
    view.lastFrame = $("show-last").checked; showSessions(); showPreview(); showObjects();
  });
  $("show-objects").addEventListener("change", () => {
    view.objects = $("show-objects").checked; showObjects();
  });
  img.addEventListener("click", (event) => {
    const box = img.getBoundingClientRect();
    zoom((event.clientX - box.left) / box.width, (event.clientY - box.top) / box.height);
  });
  const strength = $("stretch-strength"), linked = $("stretch-linked");
  strength.addEventListener("change", () => { view.strength = Number(strength.value); showPreview(); });
  linked.addEventListener("change", () => { view.linked = linked.checked; showPreview(); });
  $("stretch-auto").addEventListener("click", () => {
    view.strength = 1; view.linked = true; strength.value = "1"; linked.checked = true; showPreview();
  });
  $("zoom").addEventListener("click", () => { $("zoom").hidden = true; });
}

function zoom(fx, fy) {
  const box = $("zoom"), img = $("zoom-img"), scroller = $("zoom-box");
  const cx = Math.min(Math.max(fx, 0), 1).toFixed(4), cy = Math.min(Math.max(fy, 0), 1).toFixed(4);
  const ratio = window.devicePixelRatio || 1;
  img.onload = () => {
    img.style.width = (img.naturalWidth / ratio) + "px"; // one stack pixel per screen pixel
    if (!hasFull() || view.lastFrame) {
      scroller.scrollLeft = fx * img.clientWidth - scroller.clientWidth / 2;
      scroller.scrollTop = fy * img.clientHeight - scroller.clientHeight / 2;
    }
  };
  if (hasFull() && !view.lastFrame) {
    const side = Math.min(1024, Math.round(Math.max(window.innerWidth, window.innerHeight) * ratio));
    const size = CROP_SIZES.find((c) => c >= side) || 1024; // the server's list (render.CROPS)
    img.src = sessionUrl(view.session, "crop.jpg?cx=" + cx + "&cy=" + cy + "&size=" + size +
      "&strength=" + view.strength + "&linked=" + (view.linked ? "1" : "0") + "&v=" +
      encodeURIComponent(view.previewVersion));
    $("zoom-note").textContent = "1:1 crop of the live stack · tap to close";
  } else {
    img.src = $("preview").getAttribute("src");
    $("zoom-note").textContent = "The preview at full size · tap to close";
  }
  box.hidden = false;
}

// --- close ---------------------------------------------------------------------------------
function setupClose() {
  const button = $("close"), note = $("close-note");
  let armedUntil = 0;
  button.addEventListener("click", async () => {
    if (Date.now() > armedUntil) {
      armedUntil = Date.now() + 4000;
      button.classList.add("armed");
      button.textContent = "Tap again to close";
      setTimeout(() => { if (Date.now() > armedUntil) { button.classList.remove("armed"); showStatus(); } }, 4100);
      return;
    }
    armedUntil = 0;
    button.classList.remove("armed");
    await requestClose();
  });
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value);
    $("token-form").hidden = true;
    if (view.locked) { // reading needs the token: the page starts again with its cookie
      if (await login()) location.reload();
      else askToken("That token was refused.");
      return;
    }
    await requestClose();
  });
  async function requestClose() {
    note.textContent = "Asking the daemon to close…";
    const answer = await postAction("/api/close", null, note);
    if (answer) {
      note.textContent = "Closing session " + answer.closing + ": the final stack is being written.";
    }
  }
}

// --- night mode ----------------------------------------------------------------------------
function setupNight() {
  const button = $("night");
  const apply = (on) => {
    document.body.classList.toggle("night", on);
    button.setAttribute("aria-pressed", on ? "true" : "false");
    localStorage.setItem(NIGHT_KEY, on ? "1" : "0");
  };
  apply(localStorage.getItem(NIGHT_KEY) === "1");
  button.addEventListener("click", () => apply(!document.body.classList.contains("night")));
}

// --- the token for reading ------------------------------------------------------------------
// With a web token set, every answer but the page's files needs it: POST /api/login with it
// once sets a cookie (images and the event stream cannot send a header).
async function login() {
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) return false;
  try {
    const response = await fetch("/api/login", {
      method: "POST", headers: { Authorization: "Bearer " + token },
    });
    return response.ok;
  } catch (err) {
    return false;
  }
}

function askToken(text) {
  view.locked = true;
  $("close-note").textContent = text;
  $("token-form").hidden = false;
  $("token").focus();
}

// --- live events ---------------------------------------------------------------------------
// EventSource gives up for good after an answer that is not 200 (a restart, a stream ended
// by the server): then connect again after 2 s, doubling up to a minute while it fails.
const RETRY_MIN_MS = 2000, RETRY_MAX_MS = 60000;
let retryMs = RETRY_MIN_MS;

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => {
    retryMs = RETRY_MIN_MS;
    refreshStatus(); refreshSessions(); loadFrames();
  });
  events.addEventListener("error", () => {
    $("state").className = "badge offline";
    if (events.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    events.close();
    setTimeout(connect, retryMs);
    retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
  });
  events.addEventListener("status", (event) => {
    asked.status++; // an answer still in flight is older than this event
    applyStatus(JSON.parse(event.data));
  });
  events.addEventListener("frame", (event) => {
    const data = JSON.parse(event.data);
    if (data.session !== view.session) return;
    if (data.index === view.frames.length && !view.loading) addFrames([data.record]);
    else if (data.index > view.frames.length) loadFrames();
  });
  events.addEventListener("preview", (event) => {
    const data = JSON.parse(event.data);
    if (data.session !== view.session) return;
    view.previewVersion = data.version;
    showPreview();
  });
}

async function start() {
  setupNight();
  setupPreview();
  setupClose();
  setupCapture();
  $("follow").addEventListener("click", () => {
    if (view.status && view.status.session) showSession(view.status.session, true);
  });
  let probe = await fetch("/api/status", { cache: "no-store" }).catch(() => null);
  if (probe && probe.status === 401 && await login()) {
    probe = await fetch("/api/status", { cache: "no-store" }).catch(() => null);
  }
  if (probe && probe.status === 401) {
    askToken("This page needs the web token.");
    return;
  }
  await refreshStatus();
  if (view.status && view.status.session) showSession(view.status.session, true);
  await refreshSessions();
  connect();
  setInterval(() => { if (!document.hidden) refreshStatus(); }, 10000);
}

document.addEventListener("DOMContentLoaded", start);
