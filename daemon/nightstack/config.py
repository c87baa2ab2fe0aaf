"""The one configuration model: a TOML file, ``NIGHTSTACK_*`` environment variables, CLI flags.

Precedence, lowest to highest: built-in defaults, the TOML file, the environment, CLI flags.
Nothing else in nightstack reads ``os.environ`` for settings. Test hooks (the decoder child's
decode function, a stalled worker) are not settings: tests pass them to ``Daemon`` / ``Decoder``
(``service.Hooks``).
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError

SYSTEM_CONFIG = Path("/etc/nightstack/nightstack.toml")

# The TOML file for the Settings being built; a ContextVar because pydantic-settings builds its
# sources in a classmethod with no per-call arguments.
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("_toml_data", default=None)

Demosaic = Literal["bilinear", "edge-aware", "AHD", "LINEAR", "VNG", "PPG", "DCB", "DHT", "AAHD"]
StackMethod = Literal["sigma_clip", "mean", "median", "winsorized"]


class Settings(BaseSettings):
    """Every setting nightstack has. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(
        env_prefix="NIGHTSTACK_", extra="forbid", validate_default=True, frozen=True
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
        default=[
            ".cr3",
            ".cr2",
            ".nef",
            ".arw",
            ".dng",
            ".raf",
            ".orf",
            ".rw2",
            ".pef",
            ".fit",
            ".fits",
            ".fts",
            ".tif",
            ".tiff",
        ],
        description="File extensions to stack, case-insensitive.",
    )
    follow_symlinks: bool = Field(
        False, description="Follow symlinks that point outside the watch folder."
    )

    # --- decoding ---
    demosaic: Demosaic = Field(
        "bilinear",
        description="'bilinear' or 'edge-aware' (OpenCV, on the calibrated mosaic of a Bayer "
        "sensor); or a LibRaw algorithm (AHD, LINEAR, ...) for LibRaw's full decode instead.",
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
        "bilinear",
        description="Resampling of each frame onto the reference grid: bilinear (smooths: the "
        "stack's stars ~3 % wider than a single frame's, its noise lower) or cubic / lanczos4 "
        "(sharper, ~1.5x the final combine's time).",
    )
    min_inliers: int = Field(8, ge=3, description="Matched stars needed to accept an alignment.")
    min_stars: int = Field(15, ge=3, description="Reject frames with fewer stars (cloud, dawn).")
    min_star_fraction: float = Field(
        0.3, gt=0, le=1, description="Reject frames with fewer stars than this x the reference's."
    )
    max_fwhm_ratio: float = Field(
        1.5, gt=1, description="Reject frames whose FWHM exceeds this times the reference's."
    )
    max_elongation: float = Field(1.6, gt=1, description="Reject trailed frames (star a/b ratio).")
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
    weights: Literal["none", "fwhm"] = Field(
        "none", description="Per-frame weights in the combine."
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
    keep_frame_store: bool = Field(
        False, description="Keep the aligned-frame store after the final stack is written."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
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
        description="Bearer token the web page's actions (close) need; without one, actions are "
        "taken only from this machine (loopback).",
    )

    @field_validator("web_listen")
    @classmethod
    def _check_web_listen(cls, value: str) -> str:
        from .web.address import parse_listen  # the one parser, shared with the server

        parse_listen(value)
        return value

    @field_validator("web_token")
    @classmethod
    def _check_web_token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if len(value) < 8 or not all(33 <= ord(ch) <= 126 for ch in value):
            raise ValueError("expected at least 8 printable ASCII characters without spaces")
        return value

    # --- end web ---

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        return sorted({("." + e.lower().lstrip(".")) for e in value if e.strip()})

    @field_validator("sky_mask", mode="before")
    @classmethod
    def _auto_sky_mask(cls, value: Any) -> Any:
        return "auto" if str(value) == "auto" else value

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
        return (init_settings, env_settings, _TomlSource(settings_cls))


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
    token = _toml_data.set(_read_toml(path) if path is not None else {})
    try:
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        return Settings(**flags)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "settings"
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"invalid setting '{name}'{where}: {first['msg']}") from err
    finally:
        _toml_data.reset(token)


def describe(settings: Settings) -> str:
    """The effective configuration as commented TOML (``nightstack config show``)."""
    lines = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        lines.append(f"# {field.description}")
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
