"""Per-process scratch buffers: a fresh large allocation costs its page faults every time
(a preallocated bf16 -> float64 copy of 16.7M entries took 8 ms here, an allocating one
94 ms), so the diff's per-matrix temporaries reuse buffers kept by slot name. Buffers above
:data:`KEEP_BYTES` are not kept (a one-off embedding matrix does not pin gigabytes)."""
from __future__ import annotations

import math

import torch

__all__ = ["buffer", "release", "KEEP_BYTES"]

#: Largest buffer kept between calls.
KEEP_BYTES = 512 << 20
_BUFS: dict = {}


def buffer(slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` and ``dtype``, backed by the slot's
    buffer (valid until the next call with the same slot)."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes > KEEP_BYTES:
        _BUFS.pop(slot, None)
        return torch.empty(shape, dtype=dtype)
    buf = _BUFS.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 64), dtype=torch.uint8)
        _BUFS[slot] = buf
    return buf[:nbytes].view(dtype).view(shape)


def release() -> None:
    """Drops every kept buffer."""
    _BUFS.clear()
