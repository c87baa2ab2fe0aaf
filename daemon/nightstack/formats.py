"""The file kinds nightstack reads, by extension (all lowercase with the dot; compare
``path.suffix.lower()``)."""

from __future__ import annotations

CAMERA_RAW_EXTENSIONS = (".cr3", ".cr2", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2", ".pef")
"""The common cameras' raws (LibRaw reads more: :data:`nightstack.io.loaders.RAW_EXTENSIONS`)."""
FITS_EXTENSIONS = (".fit", ".fits", ".fts")
TIFF_EXTENSIONS = (".tif", ".tiff")
CALIBRATION_EXTENSIONS = CAMERA_RAW_EXTENSIONS + FITS_EXTENSIONS
"""Files a calibration folder's frames are read from: mosaics, raw or FITS (a TIFF is an
already demosaiced image)."""
STACK_EXTENSIONS = CALIBRATION_EXTENSIONS + TIFF_EXTENSIONS
"""The ``extensions`` setting's default: the lights a session stacks. All lowercase with the dot;
compare ``path.suffix.lower()``."""
