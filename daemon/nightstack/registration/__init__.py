"""Registration: star detection, alignment, frame quality, sky normalization and the warp onto the
reference grid."""
