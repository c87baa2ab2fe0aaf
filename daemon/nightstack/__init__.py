"""nightstack: a live-stacking daemon for astrophotography."""

__version__ = "0.1.0"
