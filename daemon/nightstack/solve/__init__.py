"""Plate solving: where a frame points (``solver``), what is there (``targets``), the WCS of the
outputs (``wcs``). Needs only star detections; astrometry.net's solve-field and index files when
present (``deploy/install.sh --solver``), nothing otherwise."""
