"""Stacking: the frame store, the live stack and its crash state, the exact final combine, the
Bayer drizzle, the disk budget."""
