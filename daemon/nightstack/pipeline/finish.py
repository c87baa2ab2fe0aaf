"""The end of a stack, the same for ``nightstack stack`` and a session's close: the final
combine, written to its targets in order, then the products (:func:`finish`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nightstack.arrays import FloatArray
from nightstack.config import Settings
from nightstack.formats import FITS_EXTENSIONS, TIFF_EXTENSIONS
from nightstack.pipeline.records import Tally
from nightstack.pipeline.stacker import Stacker


@dataclass(frozen=True)
class Target:
    """One output of the final: its key in the outputs (``"fits"``, ``"tiff"``, ...) and path;
    the format is the path's extension (:func:`write_output`)."""

    key: str
    path: Path
    stretched: bool = False  # a TIFF with the preview's auto-stretch instead of linear data


def finish(
    stacker: Stacker,
    tally: Tally,
    targets: Sequence[Target],
    *,
    progress: Callable[[int, int], None] | None = None,
    keep_frames: bool = False,
    before_header: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The end of a stack, for ``nightstack stack`` and a session's close alike: the final
    combine (with the landscape's frozen ground), written to each target in order, then the
    products. Returns (outputs: key -> path and the products' entries, skipped outputs).

    The first target is the final and must be written (an ``OSError`` propagates); a later one
    that cannot be written (a full disk) is skipped and named in the second list. A FITS of a
    frozen-ground stack holds the composite and, in HDU 2 (``SKY``), the aligned sky.
    ``before_header`` runs between the combine and the header (``nightstack stack`` waits there
    for the reference's plate solve, which runs beside the combine).
    """
    settings = stacker.settings
    outputs: dict[str, Any] = {}
    skipped: list[str] = []
    if targets:
        image = stacker.final(progress)  # releases the live stack
        sky_rows = stacker.landscape.freeze_final(image, progress)  # the frozen ground
        if before_header is not None:
            before_header()
        rows = stacker.reference.shape[0] if stacker.reference is not None else image.shape[0]
        header = stacker.header(tally, scale=max(1, image.shape[0] // rows))  # drizzle 2x: 2
        for n, target in enumerate(targets):
            try:
                write_output(target.path, image, header, settings, stretched=target.stretched,
                             sky_rows=sky_rows)  # fmt: skip
            except OSError as err:
                if n == 0:
                    raise  # no final yet
                skipped.append(f"{target.path.name} ({err.strerror or err})")
                continue
            outputs[target.key] = str(target.path)
        del image
    if stacker.products is not None and tally.accepted >= 1:
        try:
            outputs.update(
                stacker.products.close(
                    preview_width=settings.preview_width,
                    tiff_scale=settings.tiff_scale,
                    keep_frames=keep_frames,
                )
            )
        except OSError as err:
            skipped.append(f"products ({err.strerror or err})")
    return outputs, skipped


def write_output(
    path: Path,
    image: FloatArray,
    header: dict[str, Any],
    settings: Settings,
    *,
    stretched: bool = False,
    sky_rows: FloatArray | None = None,
) -> None:
    """Write a stack in the format its extension names (.tif/.tiff, .fits/.fit/.fts, .jpg/.png).

    ``stretched``: a TIFF gets the preview's auto-stretch instead of linear data. ``sky_rows``
    (a frozen-ground stack: the aligned sky's rows from the ground's top): a FITS gets them as
    its second HDU, ``SKY``.
    """
    from nightstack.io.writers import write_fits, write_preview, write_tiff

    suffix = path.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        write_tiff(path, image, stretched=stretched, scale=settings.tiff_scale)
    elif suffix in FITS_EXTENSIONS:
        if sky_rows is None:
            write_fits(path, image, header)
        else:
            _write_composite_fits(path, image, sky_rows, header)
    elif suffix in (".jpg", ".jpeg", ".png"):
        write_preview(path, image, width=settings.preview_width)
    else:
        raise ValueError(f"unknown output format {suffix!r}: use .tif, .fits, .jpg or .png")


def _write_composite_fits(
    path: Path, image: FloatArray, sky_rows: FloatArray, header: dict[str, Any]
) -> None:
    """The FITS of a frozen-ground stack: the composite, then the aligned sky (HDU ``SKY``)."""
    from nightstack.io.writers import write_fits_extended

    top = image.shape[0] - sky_rows.shape[0]

    def sky(r0: int, r1: int) -> FloatArray:
        if r1 <= top:
            return np.asarray(image[r0:r1])
        if r0 >= top:
            return np.asarray(sky_rows[r0 - top : r1 - top])
        return np.concatenate([image[r0:top], sky_rows[: r1 - top]])

    shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    write_fits_extended(path, shape, lambda r0, r1: image[r0:r1], header, sky, "SKY")
