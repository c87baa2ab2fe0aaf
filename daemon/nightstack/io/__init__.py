"""Frames in and out: raw, FITS and TIFF decoding (in an isolated process), the demosaic, careful
file reads, atomic writes."""
