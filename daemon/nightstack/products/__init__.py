"""Products besides the plain stack: landscape (sky mask, frozen ground), star trails, timelapse;
star photometry for measuring stacks."""
