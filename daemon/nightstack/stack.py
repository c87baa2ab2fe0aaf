"""Compatibility: the stack engine's public names, now in one module per job.

- :mod:`nightstack.store`: :class:`FrameStore` (the frames on disk);
- :mod:`nightstack.live`: :class:`LiveStack` (running k-sigma stack);
- :mod:`nightstack.checkpoint`: the live stack's crash state;
- :mod:`nightstack.combine`: :func:`combine` (the exact final).
"""

from nightstack.combine import Method, combine
from nightstack.live import LiveStack, LiveState
from nightstack.store import QUANT_MAX, FrameStore, MosaicLayout, StoredFrame

__all__ = [
    "QUANT_MAX",
    "FrameStore",
    "LiveStack",
    "LiveState",
    "Method",
    "MosaicLayout",
    "StoredFrame",
    "combine",
]
