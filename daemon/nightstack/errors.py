"""Typed errors. Each carries a one-line, human-readable ``reason`` for the log and journal."""


class NightstackError(Exception):
    """Base class: ``str(err)`` and ``err.reason`` are one line, fit for a journal entry."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(self.reason)


class DecodeError(NightstackError):
    """A file could not be decoded: truncated, not an image, unsupported, or timed out."""


class AlignmentError(NightstackError):
    """A frame could not be registered to the reference (too few stars or matches, other field)."""


class ConfigError(NightstackError):
    """The configuration is invalid; the reason names the setting."""


class CalibrationError(NightstackError):
    """A calibration master cannot be built, read or used for a frame (size, pattern, input)."""


class NotMosaicError(DecodeError):
    """The file decodes, but not to a 2x2 Bayer mosaic: an X-Trans, Foveon, 4-colour or linear
    (already demosaiced) raw, a mono or RGB FITS, a TIFF or JPEG. Decode it to a full image with
    :func:`nightstack.io.loaders.load` (LibRaw's own demosaic for raws) instead."""
