"""The one configuration model: a TOML file, ``NIGHTSTACK_*`` environment variables, CLI flags.

Precedence, lowest to highest: built-in defaults, the TOML file, the environment, CLI flags.
Nothing else in nightstack reads ``os.environ`` for settings. Test hooks (the decoder child's
decode function, a stalled worker) are not settings: tests pass them to ``Daemon`` / ``Decoder``
(``service.Hooks``).

Why one module of this size: the one settings model: a description per field (the configuration
reference is generated from them), its validators and the reference generator.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
import tomllib
from contextvars import ContextVar
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from nightstack.errors import ConfigError
from nightstack.formats import STACK_EXTENSIONS

log = logging.getLogger("nightstack")

SYSTEM_CONFIG = Path("/etc/nightstack/nightstack.toml")

SECRET_SETTINGS = frozenset(
    {"web_token", "notify_ntfy_url", "notify_mqtt_url", "notify_webhook_url"}
)
"""Settings never written to a file the daemon makes (``session.json``) nor served."""

CREDENTIAL = "web_token"
"""The systemd credential (``LoadCredential=web_token:/path``) read as the web token:
``$CREDENTIALS_DIRECTORY/web_token``."""

MAX_SECONDS = 1e6
"""Upper bound of every ``*_s`` setting (11.6 days): longer waits overflow thread timeouts."""

# The TOML file for the Settings being built; a ContextVar because pydantic-settings builds its
# sources in a classmethod with no per-call arguments.
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("_toml_data", default=None)

Demosaic = Literal[
    "mhc-sharp", "mhc", "bilinear", "edge-aware", "AHD", "LINEAR", "VNG", "PPG", "DCB", "DHT",
    "AAHD",
]
StackMethod = Literal["sigma_clip", "mean", "median", "winsorized"]


class Settings(BaseSettings):
    """Every setting nightstack has. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(
        env_prefix="NIGHTSTACK_",
        extra="forbid",
        validate_default=True,
        frozen=True,
        allow_inf_nan=False,  # every float finite: `poll_interval_s = inf` is refused
    )

    # --- watching ---
    watch_dir: Path | None = Field(None, description="Folder the camera writes frames into.")
    output_dir: Path | None = Field(
        None, description="Where session folders (journal, preview, stack) are written."
    )
    recursive: bool = Field(False, description="Also watch sub-folders (cameras write DCIM/...).")
    polling: bool = Field(
        False, description="Poll instead of inotify (network shares, FUSE, MTP mounts)."
    )
    poll_interval_s: float = Field(1.0, gt=0, description="Polling period in seconds.")
    stable_s: float = Field(
        2.0,
        ge=0,
        description="Polling: a file is complete when size+mtime are unchanged this long.",
    )
    ignore_existing: bool = Field(False, description="Skip files already present at start.")
    extensions: list[str] = Field(
        default=list(STACK_EXTENSIONS),
        description="File extensions to stack, case-insensitive.",
    )
    follow_symlinks: bool = Field(
        False, description="Follow symlinks that point outside the watch folder."
    )

    # --- decoding ---
    demosaic: Demosaic = Field(
        "mhc-sharp",
        description="Every 2x2 Bayer source (raws and Bayer FITS), on its calibrated mosaic: "
        "'mhc-sharp' (Malvar-He-Cutler's filters, every gradient correction at gain 3/4: the "
        "sharpest stars), 'mhc' (Malvar-He-Cutler's published gains), 'bilinear' or "
        "'edge-aware' (OpenCV). Or a LibRaw "
        "algorithm (AHD, LINEAR, ...): LibRaw's full decode, raws only (a Bayer FITS is then "
        "rejected, named). Other sensors (X-Trans, mono, RGB files) are decoded as they are.",
    )
    white_balance: str = Field(
        "camera", description="'camera', 'daylight', 'auto' or four comma-separated multipliers."
    )
    decode_timeout_s: float = Field(
        60.0, gt=0, description="A decode taking longer is abandoned and the frame rejected."
    )
    max_frame_pixels: int = Field(
        120_000_000, ge=1, description="A frame whose header claims more pixels is rejected "
        "before decoding (a decompression bomb); also sizes the decoder's memory limit."
    )
    bin: int = Field(
        2, ge=1, le=8, description="Binning of the detection luminance (2 = CFA superpixel)."
    )

    # --- detection (the batch script's DAOStarFinder settings) ---
    landscape_mask_ratio: float = Field(
        0.9, gt=0, le=1, description="Top fraction of the frame that is sky; below is landscape."
    )
    sky_mask: Literal["auto"] | Path | None = Field(
        None,
        description="Optional mask image, white = sky, same size as the frames; or 'auto': "
        "found from the first frames (the ground stays put while the stars move), the ratio "
        "until then and when the night gives no clear answer.",
    )
    star_fwhm_px: float = Field(4.0, gt=0, description="DAOStarFinder FWHM, full-resolution px.")
    star_threshold_sigma: float = Field(
        6.0, gt=0, description="DAOStarFinder detection threshold in background sigma."
    )
    detection_sigma_clip: float = Field(
        3.0, gt=0, description="Sigma of the clipped background statistics for detection."
    )
    max_stars: int = Field(500, ge=10, description="Brightest stars kept per frame.")

    # --- alignment and quality gates ---
    transform_model: Literal["similarity", "affine"] = Field(
        "similarity", description="Registration model: similarity (rotation+shift+scale) or affine."
    )
    interpolation: Literal["bilinear", "cubic", "lanczos4"] = Field(
        "cubic",
        description="Resampling of each frame onto the reference grid: cubic (sharp; clamped to "
        "the four nearest samples, so no ringing around bright stars), lanczos4 (as sharp, "
        "slower, a little noisier at aperture scale) or bilinear (fast; widens stars ~5 %).",
    )
    min_inliers: int = Field(8, ge=3, description="Matched stars needed to accept an alignment.")
    min_stars: int = Field(15, ge=3, description="Reject frames with fewer stars (cloud, dawn).")
    min_star_fraction: float = Field(
        0.3, gt=0, le=1, description="Reject frames with fewer stars than this x the reference's."
    )
    max_fwhm_ratio: float = Field(
        1.5, gt=1, description="Reject frames whose FWHM exceeds this times the reference's."
    )
    max_elongation: float = Field(
        2.0, gt=1, description="Reject frames whose stars' a/b ratio exceeds this (backstop)."
    )
    max_trail_ratio: float = Field(
        1.6,
        gt=1,
        description="Reject frames whose stars are stretched (a/b - 1) more than this x the "
        "session's median and stand 3 robust sigma above it: trailing judged against the "
        "camera's own star shapes.",
    )
    max_background_ratio: float = Field(
        3.0, gt=1, description="Reject frames whose sky is this much brighter than the reference."
    )
    max_residual_px: float = Field(1.0, gt=0, description="Reject alignments with a larger RMS.")
    min_transparency: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Reject frames letting through less starlight than this x the reference's "
        "(haze, thin cloud, dew; measured on matched stars, whatever the star density; 0 = off).",
    )

    # --- stacking ---
    stack_method: StackMethod = Field("sigma_clip", description="Final combine method.")
    stack_sigma: float = Field(3.0, gt=0, description="Sigma of the final sigma clip.")
    stack_maxiters: int = Field(5, ge=1, description="Iterations of the final sigma clip.")
    live_kappa: float = Field(3.0, gt=0, description="Live rejection threshold in running sigma.")
    live_warmup: int = Field(
        5, ge=3, description="Frames clipped as a batch before live rejection."
    )
    normalize: Literal["add", "addscale", "none", "gradient"] = Field(
        "add",
        description="Match each frame's sky to the reference's before rejection and stacking: "
        "'add' (offset), 'addscale' (offset and 1/transparency), 'gradient' (a smooth surface: "
        "moving moon glow), 'none'.",
    )
    ram_cap_mb: int = Field(
        256,
        ge=16,
        description="RAM cap of the final band-by-band combine (its float32 cube is 5 bytes a "
        "sample: 256 MB holds bands of 64 rows of 12 x 24 MP frames, enough for its speed).",
    )
    final: Literal["exact", "live"] = Field(
        "exact",
        description="The final stack: 'exact' (sigma clip of the stored frames; needs the frame "
        "store's disk) or 'live' (the live stack; no frame store, for a small box).",
    )
    min_free_frames: int = Field(
        20,
        ge=0,
        description="Warn (log, journal, status) when the free disk holds fewer frames than this.",
    )
    weights: Literal["none", "fwhm", "noise"] = Field(
        "none",
        description="Per-frame weights in the combine, instead of rejecting by degrees: 'fwhm' "
        "(1 / FWHM^2: sharper frames count more) or 'noise' (1 / sky sigma^2 after "
        "normalization: deeper frames count more); recorded per frame in the journal.",
    )
    drizzle: Literal["off", "1x", "2x"] = Field(
        "off",
        description="Bayer drizzle (Bayer sensors), live and final: each frame's sensor sites "
        "dropped onto the output grid, no demosaic; '2x' doubles the resolution (4x the "
        "pixels: the final's memory and disk, and the live state, 6.67 bytes a sample: 1.9 GB at "
        "24 MP; a live state that does not fit in memory demosaics, said in the log). Needs a "
        "drifting or dithered night.",
    )
    drizzle_drop: float = Field(
        1.0, gt=0, le=1, description="Side of a site's drop in sensor pixels (drizzle's pixfrac)."
    )

    # --- calibration ---
    bias: Path | None = Field(
        None, description="Master bias (a 'nightstack master' FITS) or a folder of bias frames."
    )
    dark: Path | None = Field(
        None, description="Master dark for every light, or a folder of dark frames."
    )
    flat: Path | None = Field(
        None, description="Master flat for every light, or a folder of flat frames."
    )
    darkflat: Path | None = Field(
        None, description="Master dark-flat, or a folder of them: removed from a flat folder."
    )
    calibration_dir: Path | None = Field(
        None,
        description="Calibration library: masters and folders of raw calibration frames "
        "(bias, darks, flats, darkflats...), matched to each light by camera, size, CFA "
        "pattern, ISO, exposure and temperature; explicit bias/dark/flat win.",
    )
    dark_scaling: bool = Field(
        False,
        description="Subtract bias + (dark - bias) x light/dark exposure (needs a bias) instead "
        "of a dark of the light's own exposure.",
    )
    temperature_tolerance_c: float = Field(
        2.0, ge=0, description="A dark or bias matches lights this many degrees C away at most."
    )
    cosmetic: bool = Field(
        True, description="Repair the hot and cold pixels of the master dark in every light."
    )
    cosmetic_from_lights: bool = Field(
        False,
        description="Without a dark, repair the pixels that stand out at the same place in "
        "the first 3 lights (off by default: a session resumed after a crash learns them "
        "again, so its stack differs a little from a batch stack of the same files).",
    )
    cosmetic_kappa: float = Field(
        6.0, gt=0, description="Hot/cold pixel threshold, robust sigmas from the local median."
    )
    # --- landscape and products ---
    landscape: Literal["blur", "freeze"] = Field(
        "blur",
        description="'blur': the ground is stacked aligned with the sky (smeared); 'freeze': "
        "the ground is stacked in the camera frame and blended in along the horizon.",
    )
    landscape_feather_px: float = Field(
        12.0, gt=0, le=200, description="Width of the blend on the sky side of the horizon, px."
    )
    products: list[Literal["stack", "trails", "timelapse"]] = Field(
        default=["stack"],
        description="What a session makes: 'stack' (stack.tif/.fits), 'trails' "
        "(trails.tif/.jpg, the lighten blend) and 'timelapse' (timelapse.mp4).",
    )
    trails_gap_fill: bool = Field(
        False, description="Star trails: fill the gaps between frames along the sky's motion."
    )
    timelapse_width: int = Field(1920, ge=64, le=7680, description="Timelapse width in px.")
    timelapse_fps: float = Field(24.0, gt=0, le=120, description="Timelapse frames per second.")

    # --- outputs and session ---
    preview_every_frames: int = Field(1, ge=1, description="Rewrite the preview every K frames...")
    preview_every_s: float = Field(30.0, ge=0, description="...or when this many seconds passed.")
    preview_width: int = Field(1600, ge=64, description="Preview width in pixels.")
    write_fits: bool = Field(True, description="Also write stack.fits at session close.")
    tiff_scale: Literal["fixed", "range"] = Field(
        "fixed",
        description="Linear TIFF scale: 'fixed' (the camera's white level after black "
        "subtraction = 65535, comparable between sessions) or 'range' (the data range).",
    )
    live_fits_every_s: float = Field(
        60.0,
        ge=0,
        description="Rewrite live.fits (the linear live stack) with a preview at most this "
        "often (0 = with every preview): it is 12 bytes a pixel (288 MB at 24 MP), a lot "
        "for an SD card every frame.",
    )
    live_fits_write_ratio: float = Field(
        0.5,
        ge=0,
        description="...and only once the frame store has written 1/ratio times live.fits' "
        "bytes since the last one (live.fits then writes at most ratio x the store's bytes: SD "
        "card wear; 0 = by time only).",
    )
    snapshot_every_frames: int = Field(
        0,
        ge=0,
        description="Also keep snapshots/live-NNNN.fits every K accepted frames (0 = off); "
        "live.fits is rewritten with every preview whatever this says.",
    )
    checkpoint_every_frames: int = Field(
        10,
        ge=1,
        description="Checkpoint the live stack every K accepted frames (a resume re-adds at most "
        "K-1 frames from the frame store; a checkpoint writes 6.67 bytes per pixel and channel).",
    )
    checkpoint_min_interval_s: float = Field(
        60.0,
        ge=0,
        description="...and at most once this often (a backlog does not rewrite the checkpoint "
        "every few seconds; a resume replays the frames since from the frame store).",
    )
    checkpoint_write_ratio: float = Field(
        0.5,
        ge=0,
        description="...and only once the frame store has written 1/ratio times a checkpoint's "
        "bytes since the last (checkpoints then write at most ratio x the store's bytes: SD "
        "card wear; 0 = by frames and time only).",
    )
    idle_timeout_s: float = Field(
        1800.0, gt=0, description="Close the session after this long without a new frame."
    )
    split_enabled: bool = Field(
        True,
        description="Start a new session by itself when the night changes: the pointing moves "
        "(split_move_deg), the exposure, ISO/gain or filter changes, or after a gap "
        "(split_gap_s) between frames (docs/sessions.md).",
    )
    split_move_deg: float | None = Field(
        None,
        gt=0,
        description="A move of the pointing beyond this starts a new session (degrees; "
        "judged on frames a plate solver locates). Unset: half the field's short side, "
        "judged in pixels from the alignment (a frame whose centre jumps more than half the "
        "frame's short side from the last frame's: a slow drift never splits), and 0.5 "
        "degrees for located frames.",
    )
    split_gap_s: float = Field(
        1200.0,
        ge=0,
        description="A gap longer than this between two frames (capture times from the files, "
        "else their modification times) starts a new session; 0 = never. 20 min: longer than "
        "a long sub plus a meridian flip with refocus and re-centring.",
    )
    split_unaligned_frames: int = Field(
        3,
        ge=2,
        description="Without a plate solver: this many frames in a row that fail to align with "
        "the reference but align with each other are a new target; the session splits at the "
        "first of them (frames that also fail among themselves, e.g. clouds, stay rejected).",
    )
    keep_frame_store: bool = Field(
        False, description="Keep the aligned-frame store after the final stack is written."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )

    # --- plate solving (docs/solving.md) ---
    solve_enabled: Literal["auto"] | bool = Field(
        "auto",
        description="Plate-solve each session's reference frame in the background (its centre, "
        "scale, target name, a WCS in stack.fits and live.fits): 'auto' when astrometry.net's "
        "solve-field and index files are found (`deploy/install.sh --solver`), true, false.",
    )
    solve_index_dir: Path | None = Field(
        None,
        description="Folder of astrometry.net index files (index-*.fits); unset: "
        "/usr/share/astrometry, then /usr/local/astrometry/data.",
    )
    solve_every_s: float = Field(
        600.0, ge=0, description="Also solve one accepted frame this often (its pointing, in the "
        "log and session.json); 0: the reference only."
    )
    solve_timeout_s: float = Field(
        30.0, gt=0, description="A solve taking longer is given up (the session goes on "
        "unsolved). Real frames solved in 0.5-1 s with a scale hint, 1-15 s blind; an unsolvable "
        "field costs this much of one core once (`nightstack stack` combines meanwhile and waits "
        "only for what is left of it before writing the final).",
    )
    solve_focal_mm: float | None = Field(
        None, gt=0, description="Focal length for the solver's scale hint, when the frames' "
        "headers do not say (FITS FOCALLEN)."
    )
    solve_pixel_um: float | None = Field(
        None, gt=0, description="Pixel size (micrometres, as binned) for the scale hint, when the "
        "headers do not say (FITS XPIXSZ / PIXSIZE1)."
    )
    solve_scale_arcsec: float | None = Field(
        None, gt=0, description="Image scale (arcsec per pixel) for the hint; wins over focal "
        "length and pixel size. Nothing known: a blind solve (slower)."
    )

    # --- web ---
    web_enabled: bool = Field(
        True, description="Serve the web page and JSON API from `nightstack watch`."
    )
    web_listen: str = Field(
        "127.0.0.1:8080",
        description="HOST:PORT of the web page; 0.0.0.0:8080 opens it to the LAN (set web_token).",
    )
    web_token: str | None = Field(
        None,
        description="Bearer token the web page needs, for reading and for actions (close); "
        "without one, reading is open and actions are taken only from this machine (loopback). "
        "Better kept out of this file: web_token_file, or systemd's LoadCredential=web_token.",
    )
    web_token_file: Path | None = Field(
        None,
        description="A file holding the web token (its first line; mode 0600 or 0640), read at "
        "start and on SIGHUP; else $CREDENTIALS_DIRECTORY/web_token when systemd passes one.",
    )
    web_hosts: list[str] = Field(
        default=[],
        description="Host names the page is reached by besides this machine's own name, "
        "name.local, localhost and IP addresses (e.g. 'nightstack.lan'); a request naming "
        "another host is refused (DNS rebinding).",
    )

    # --- capture (tethered, over USB; issue 22) ---
    capture_exposure_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="Tethered capture from `nightstack watch`: shoot frames of this many seconds "
        "over USB (gphoto2) into watch_dir, and stack them (unset = off; above the camera's "
        "longest timed speed: bulb). See docs/capture.md.",
    )
    capture_count: int = Field(0, ge=0, description="Capture: frames to take (0 = until stopped).")
    capture_iso: int | None = Field(
        None, ge=1, description="Capture: ISO (unset = as the camera is set)."
    )
    capture_interval_s: float = Field(
        0.0, ge=0, description="Capture: seconds from an exposure's start to the next's, at least."
    )
    capture_delay_s: float = Field(
        0.0, ge=0, description="Capture: seconds before the first frame."
    )
    capture_raw: bool = Field(True, description="Capture: set the camera's RAW image format.")
    capture_target: Literal["ram", "card"] = Field(
        "ram", description="Capture: where the camera keeps a frame until it is downloaded."
    )
    capture_keep_on_card: bool = Field(
        False, description="Capture: leave each frame on the camera's card after the download."
    )
    capture_model: str | None = Field(
        None, description="Capture: the camera's model (unset = the first camera found)."
    )
    capture_serial: str | None = Field(None, description="Capture: the camera's serial number.")
    capture_reconnect_s: float = Field(
        600.0, gt=0, description="Capture: give up finding a lost camera again after this long."
    )
    # --- end capture ---

    # --- notifications (issue 24; docs/notifications.md) ---
    notify_ntfy_url: str | None = Field(
        None,
        description="ntfy: the server and topic to publish to, e.g. http://ntfy.lan/nightstack "
        "(user:password@ or :token@ allowed; unset = off). A secret: never logged or served.",
    )
    notify_mqtt_url: str | None = Field(
        None,
        description="MQTT broker: mqtt://user:password@host:1883 or mqtts://... (TLS); retained "
        "state topics, events and Home Assistant discovery (unset = off). A secret.",
    )
    notify_webhook_url: str | None = Field(
        None,
        description="Webhook: each event as a JSON POST to this URL (unset = off). A secret.",
    )
    notify_mqtt_topic: str | None = Field(
        None, description="MQTT topic prefix (unset = nightstack/<hostname>)."
    )
    notify_mqtt_ca: Path | None = Field(
        None, description="mqtts: a CA certificate file (PEM) to trust (unset = the system's)."
    )
    notify_mqtt_discovery: bool = Field(
        True, description="MQTT: publish Home Assistant discovery configs (sensors appear)."
    )
    notify_page_url: str | None = Field(
        None,
        description="The web page's address as a phone reaches it (ntfy's click action, the "
        "webhook's 'page'); unset = none.",
    )
    notify_rejected_in_row: int = Field(
        5, ge=1, description="Notify when this many frames in a row are rejected (clouds, dew)."
    )
    notify_fwhm_ratio: float = Field(
        1.3,
        gt=1,
        description="Notify when the FWHM of the last 5 frames (median) exceeds this times the "
        "reference's (focus drift, seeing), and again once it is back below.",
    )
    notify_transparency_below: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Notify when the transparency of the last 5 frames (median, starlight "
        "relative to the reference) falls below this (haze, dew), and once it recovers.",
    )
    notify_disk_low_gb: float = Field(
        2.0, ge=0, description="Notify when the output disk has less free space than this (GB)."
    )
    notify_min_interval_s: float = Field(
        300.0,
        ge=0,
        description="Rate limit: one event of a kind (errors, rejections, trends, camera) at "
        "most this often; session opened/closed are always sent.",
    )
    notify_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Timeout of one delivery (connect, send, answer)."
    )
    # --- end notifications ---

    @field_validator("web_listen")
    @classmethod
    def _check_web_listen(cls, value: str) -> str:
        from nightstack.address import parse_listen  # the one parser, shared with the server

        parse_listen(value)
        return value

    @field_validator("notify_ntfy_url", "notify_webhook_url", "notify_mqtt_url")
    @classmethod
    def _check_notify_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "":
            return None
        from urllib.parse import urlsplit  # the value is a secret: never echoed in the error

        mqtt = info.field_name == "notify_mqtt_url"
        schemes = ("mqtt", "mqtts") if mqtt else ("http", "https")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected {' or '.join(s + '://host...' for s in schemes)}")
        return value

    @field_validator("web_token")
    @classmethod
    def _check_web_token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        _check_token(value)
        return value

    @field_validator("web_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return sorted({h.strip().lower().rstrip(".") for h in value if h.strip()})

    # --- end web ---

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        found = sorted({("." + e.strip().lower().lstrip(".")) for e in value if e.strip()})
        if not found or "." in found:
            raise ValueError(
                f"expected a list of file extensions such as ['.cr3', '.dng'], not {value}"
            )
        return found

    @field_validator("sky_mask", mode="before")
    @classmethod
    def _auto_sky_mask(cls, value: Any) -> Any:
        return "auto" if str(value) == "auto" else value

    @field_validator("sky_mask")
    @classmethod
    def _sky_mask_exists(cls, value: Any) -> Any:
        if isinstance(value, Path) and not value.is_file():
            raise ValueError(f"no mask image at {value}")
        return value

    @field_validator(
        "watch_dir", "output_dir", "bias", "dark", "flat", "darkflat", "calibration_dir",
        "web_token_file", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: give a path or leave the setting out (not '.')")
        return value

    @field_validator("*")
    @classmethod
    def _bounded_seconds(cls, value: Any, info: ValidationInfo) -> Any:
        is_seconds = str(info.field_name).endswith("_s") and isinstance(value, float)
        if is_seconds and value > MAX_SECONDS:
            raise ValueError(f"at most {MAX_SECONDS:g} s, not {value:g}")
        return value

    @model_validator(mode="after")
    def _drizzle_and_frozen_ground(self) -> Settings:
        if self.drizzle == "2x" and self.landscape == "freeze":
            raise ValueError(
                "drizzle = '2x' and landscape = 'freeze' do not mix: the frozen ground is on "
                "the sensor's grid (use drizzle = '1x')"
            )
        return self

    @field_validator("products")
    @classmethod
    def _unique_products(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=["stack", "trails", "timelapse"].index)

    @field_validator("white_balance")
    @classmethod
    def _check_white_balance(cls, value: str) -> str:
        if value in ("camera", "daylight", "auto"):
            return value
        parts = value.split(",")
        try:
            ok = len(parts) == 4 and all(float(p) > 0 for p in parts)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("expected 'camera', 'daylight', 'auto' or four positive numbers")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _TomlSource(settings_cls))


def _check_token(value: str) -> None:
    if len(value) < 8 or not all(33 <= ord(ch) <= 126 for ch in value):
        raise ValueError("expected at least 8 printable ASCII characters without spaces")


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready values with the secrets (:data:`SECRET_SETTINGS`) as None:
    what ``session.json`` stores and the web page may serve."""
    values: dict[str, Any] = json.loads(settings.model_dump_json())
    return {k: (None if k in SECRET_SETTINGS else v) for k, v in values.items()}


def web_token(settings: Settings, environ: dict[str, str] | None = None) -> str | None:
    """The web token in force: ``web_token``, else ``web_token_file``'s first line, else the
    systemd credential ``$CREDENTIALS_DIRECTORY/web_token`` (``LoadCredential=``), else None.

    Raises ConfigError naming the setting or file when a file cannot be read or holds no
    valid token.
    """
    env = os.environ if environ is None else environ
    if settings.web_token is not None:
        if settings.web_token_file is not None:
            raise ConfigError("set web_token or web_token_file, not both")
        return settings.web_token
    path, what = settings.web_token_file, "web_token_file"
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        path, what = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL, "the systemd credential"
        if not path.exists():
            return None
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"invalid setting '{what}': cannot read {path}: {err}") from err
    token = lines[0].strip() if lines else ""
    try:
        _check_token(token)
    except ValueError as err:
        raise ConfigError(f"invalid setting '{what}': the token in {path}: {err}") from err
    return token


class _EnvSource(EnvSettingsSource):
    """``NIGHTSTACK_*`` variables; a list setting also takes a plain comma-separated string
    (``NIGHTSTACK_EXTENSIONS=.dng,.cr3``), not only JSON (``'[".dng"]'``)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
            return [part.strip() for part in value.split(",") if part.strip()]
        return super().decode_complex_value(field_name, field, value)


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """``NIGHTSTACK_*`` variables that name no setting (a typo), sorted; the tests' own
    ``NIGHTSTACK_TEST_*`` apart."""
    env = os.environ if environ is None else environ
    return sorted(
        name
        for name in env
        if name.startswith("NIGHTSTACK_")
        and not name.startswith("NIGHTSTACK_TEST_")
        and name[len("NIGHTSTACK_") :].lower() not in Settings.model_fields
    )


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file's values (flat keys; ``[section]`` tables are flattened)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_toml_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get() or {})


def default_config_path() -> Path | None:
    """/etc/nightstack/nightstack.toml, else $XDG_CONFIG_HOME/nightstack/nightstack.toml."""
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    user = xdg / "nightstack" / "nightstack.toml"
    return user if user.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    flat: dict[str, Any] = {}
    for key, value in data.items():  # sections only group settings for the reader
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_settings(
    config: Path | None = None, overrides: dict[str, Any] | None = None, *, use_default: bool = True
) -> Settings:
    """Build the effective Settings.

    ``config``: a TOML file (None: the default path, if ``use_default`` and it exists).
    ``overrides``: CLI flags; ``None`` values are ignored (flag not given).
    Raises ConfigError whose reason names the offending setting.
    """
    path = config if config is not None else (default_config_path() if use_default else None)
    for name in unknown_environment():
        log.warning("environment variable %s names no setting (a typo?): ignored", name)
    token = _toml_data.set(_read_toml(path) if path is not None else {})
    where = f" (in {path})" if path is not None else ""
    try:
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        settings = Settings(**flags)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting '{name}'{where}: {first['msg']}") from err
    except SettingsError as err:  # an environment value that cannot be parsed at all
        raise ConfigError(f"{str(err).splitlines()[0]}{where}") from err
    finally:
        _toml_data.reset(token)
    web_token(settings)  # a token file that cannot be read fails here, not at the first request
    return settings


def describe(settings: Settings) -> str:
    """The effective configuration as commented TOML (``nightstack config show``)."""
    lines = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        lines.append(f"# {field.description}")
        if name in SECRET_SETTINGS and value is not None:
            lines.append(f"# {name} = (set; not shown)")
        else:
            lines.append(f"{name} = {_toml_value(value)}" if value is not None else f"# {name} =")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the configuration reference, docs/configuration.md ---

REFERENCE_MARK = (
    "<!-- Generated from the settings' descriptions in daemon/nightstack/config.py by\n"
    "     .venv/bin/python -m nightstack.config docs/configuration.md\n"
    "     Edit the descriptions there, not the text below. -->"
)


def reference() -> str:
    """Every setting as Markdown tables, one per section of :class:`Settings` (the
    ``# --- name ---`` comments in its body): name, environment variable, type, default and
    description."""
    lines = []
    for section, names in _sections():
        lines += [f"## {section[0].upper()}{section[1:]}", ""]
        lines += ["| setting | environment | type | default | description |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for name in names:
            field = Settings.model_fields[name]
            default = field.get_default(call_default_factory=True)
            cells = [
                f"`{name}`",
                f"`NIGHTSTACK_{name.upper()}`",
                _type_text(field.annotation),
                "unset" if default is None else f"`{_toml_value(default)}`",
                str(field.description),
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def reference_document(current: str) -> str:
    """``current`` (the page) with everything below :data:`REFERENCE_MARK` rendered again."""
    head, mark, _ = current.partition(REFERENCE_MARK)
    if not mark:
        raise ValueError("the page has no generated part (its marker comment is missing)")
    return f"{head}{REFERENCE_MARK}\n\n{reference()}"


def _sections() -> list[tuple[str, list[str]]]:
    """The settings in the order and sections of the class body; a setting declared before
    the first section comment is under "general"."""
    sections: list[tuple[str, list[str]]] = [("general", [])]
    for line in inspect.getsource(Settings).splitlines():
        heading = re.fullmatch(r"\s*# --- (.+) ---", line)
        setting = re.match(r" {4}(\w+):", line)
        if heading and not heading[1].startswith("end "):
            sections.append((heading[1], []))
        elif setting and setting[1] in Settings.model_fields:
            sections[-1][1].append(setting[1])
    return [(title, names) for title, names in sections if names]


def _type_text(annotation: Any) -> str:
    """A type as a reader says it: ``Path | None`` is "path", a Literal its values."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_text(a) for a in args if a is not type(None))
    if get_origin(annotation) is list:
        return f"list of {_type_text(args[0])}"
    return "path" if annotation is Path else str(annotation.__name__)


if __name__ == "__main__":  # python -m nightstack.config docs/configuration.md
    for page in map(Path, sys.argv[1:]):
        page.write_text(reference_document(page.read_text(encoding="utf-8")), encoding="utf-8")
