"""Stacking: the frame store, the live stack (demosaiced or drizzled) and its crash state, the
exact final combine, the Bayer drizzle, the disk and memory budgets."""
