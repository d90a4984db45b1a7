"""The diff's reused scratch buffers: one home, :mod:`gatesim.metrics._scratch` (shared with
the metrics' Gram path); this name stays for the diff's callers."""
from gatesim.metrics._scratch import KEEP_BYTES, _BUFS, buffer, release  # noqa: F401

__all__ = ["buffer", "release", "KEEP_BYTES"]
