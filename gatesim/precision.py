"""Bit-exact rounding of float32 tensors into other formats.

Every function here is a thin, checked wrapper around a C++ op (``torch.ops.gatesim``);
the kernels live in ``csrc/`` and share one rounding header with the CUDA backend.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from gatesim._ops import ops
from gatesim.checks import check_float32_tensor, check_int
from gatesim.formats import Format, as_format

__all__ = ["MODES", "quantize", "to_dtype", "ulp", "absorbed", "random_bits"]

#: Rounding modes, in the order of the C++ ``gatesim::Mode`` enum.
MODES = ("nearest_even", "nearest_away", "toward_zero", "up", "down", "odd", "stochastic")
_MODE_ALIASES = {"rne": "nearest_even", "nearest": "nearest_even", "rna": "nearest_away",
                 "rtz": "toward_zero", "truncate": "toward_zero", "ceil": "up",
                 "floor": "down", "sr": "stochastic"}
_MAX_SEED = 2 ** 63 - 1
_MAX_OFFSET = 2 ** 62

FormatLike = Union[Format, str, torch.dtype]


def mode_index(mode: str) -> int:
    """The op-level number of a rounding mode name (aliases accepted)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, got {type(mode).__name__}")
    name = _MODE_ALIASES.get(mode, mode)
    if name not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return MODES.index(name)


def stream_args(mode: int, seed: Optional[int], offset: int, n: int) -> tuple[int, int]:
    """The op-level ``(seed, offset)`` of a call over ``n`` elements in rounding mode number
    ``mode``: checked (``offset + n`` below 2**62; a seed in ``0..2**63-1`` required for
    stochastic rounding) and ``(0, 0)`` for the deterministic modes."""
    offset = check_int(offset, "offset", lo=0)
    if offset + n > _MAX_OFFSET:
        raise ValueError(f"offset + numel must stay below 2**62, got {offset} + {n}")
    if mode != MODES.index("stochastic"):
        return 0, 0
    if seed is None:
        raise ValueError("seed is required for mode='stochastic' (results are a pure "
                         "function of seed, offset and position)")
    seed = check_int(seed, "seed", lo=0, hi=_MAX_SEED)
    return seed, offset


def _rand_bits(rand_bits: Optional[int]) -> int:
    if rand_bits is None:
        return 0
    if isinstance(rand_bits, bool) or not isinstance(rand_bits, int) or not 1 <= rand_bits <= 32:
        raise ValueError(f"rand_bits must be an int in 1..32 or None, got {rand_bits!r}")
    return rand_bits


def quantize(x: torch.Tensor, fmt: FormatLike, mode: str = "nearest_even", *,
             saturate: bool = False, seed: Optional[int] = None, offset: int = 0,
             rand_bits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rounds every element of a float32 tensor to the nearest value of ``fmt`` per ``mode``.

    Returns float32 values that are all representable in ``fmt``.

    Args:
        x: contiguous float32 tensor.
        fmt: a :class:`gatesim.Format`, a format name or a torch dtype.
        mode: ``nearest_even`` (IEEE default), ``nearest_away``, ``toward_zero``,
            ``up``, ``down``, ``odd`` (round to odd: truncate, then set the last bit if
            inexact) or ``stochastic``.
        saturate: overflow, and infinite inputs, go to +-largest finite value instead of
            what the mode prescribes (IEEE: nearest modes overflow to inf, toward_zero and
            odd to the largest finite, up/down by sign; stochastic overflows to inf).
            A format without infinity gives NaN where infinity would be due.
        seed: key of the Philox4x32-10 stream; required for ``stochastic``.
        offset: stream position of element 0. Element ``i`` (flat index) uses the random
            word at position ``offset + i``, so a tensor processed in pieces with matching
            offsets gives the same bits as processed whole.
        rand_bits: random bits per stochastic decision. Rounding is away from zero with
            probability ``floor(f * 2**r) / 2**r``, ``f`` the exact fraction of the gap.
            ``None`` uses every dropped bit (up to 32): 16 for fp32 -> bf16, which
            reproduces the "add 16 random bits, truncate" trick bit-for-bit when the trick
            adds ``random_bits(...) >> 16``.
        out: optional preallocated contiguous float32 tensor of x's shape (may be ``x``).

    NaN stays NaN (canonical quiet NaN, sign kept); signed zeros are kept; subnormals are
    exact, and a format without subnormals rounds values below its smallest normal to 0 or
    that normal per mode (there is no blind flush).
    """
    fmt = as_format(fmt)
    check_float32_tensor(x, "x")
    m = mode_index(mode)
    seed_, offset_ = stream_args(m, seed, offset, x.numel())
    args = fmt.op_args(saturate=bool(saturate), rand_bits=_rand_bits(rand_bits))
    if out is None:
        return ops.quantize(x, args, m, seed_, offset_, torch.float32)
    _check_out(out, x, torch.float32)
    ops.quantize_out(x, args, m, seed_, offset_, out)
    return out


def _check_out(out, x: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must be {dtype}, got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def to_dtype(x: torch.Tensor, dtype: Union[torch.dtype, Format, str], mode: str = "nearest_even",
             *, saturate: bool = False, seed: Optional[int] = None, offset: int = 0,
             rand_bits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Like :func:`quantize`, but returns the real torch storage tensor.

    ``dtype`` is one of ``torch.bfloat16``, ``torch.float16``, ``torch.float8_e4m3fn``,
    ``torch.float8_e5m2`` or ``torch.float32`` (or the matching Format). The result is
    bit-identical to ``quantize(x, ...)`` stored in that dtype; NaNs are the format's
    canonical quiet NaN with the input's sign (0x7FC0 bf16, 0x7E00 fp16, 0x7F e4m3fn,
    0x7E e5m2).
    """
    fmt = as_format(dtype, "dtype")
    tdtype = fmt.torch_dtype
    if tdtype is None:
        raise TypeError(f"dtype: format {fmt} has no torch storage dtype; use quantize()")
    check_float32_tensor(x, "x")
    m = mode_index(mode)
    seed_, offset_ = stream_args(m, seed, offset, x.numel())
    args = fmt.op_args(saturate=bool(saturate), rand_bits=_rand_bits(rand_bits))
    if out is None:
        return ops.quantize(x, args, m, seed_, offset_, tdtype)
    _check_out(out, x, tdtype)
    ops.quantize_out(x, args, m, seed_, offset_, out)
    return out


def ulp(x: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """Spacing of ``fmt`` at each element of ``x`` (float32 in, float32 out).

    For ``|x|`` in ``[2**e, 2**(e+1))`` with ``e >= emin`` the ULP is ``2**(e - mbits)``
    (docs/metrics.md, "ULP and Gate III": ULP_bf16(w) = 2**(e-7)); at zero and below the smallest
    normal it is the smallest spacing (``min_subnormal``); inf gives inf and NaN gives
    NaN. ``x`` need not be representable in ``fmt``: its own binade decides.
    """
    fmt = as_format(fmt)
    check_float32_tensor(x, "x")
    return ops.ulp(x, fmt.op_args())


def absorbed(w: torch.Tensor, delta: torch.Tensor, fmt: FormatLike, mode: str = "nearest_even",
             *, seed: Optional[int] = None, offset: int = 0, check: bool = True) -> torch.Tensor:
    """Mask of the updates that rounding swallows: ``delta != 0`` but the stored value
    ``round(w + delta)`` equals ``w``.

    The sum is exact (TwoSum, then round-to-odd into fp64), so no intermediate fp32
    rounding hides or invents an update. Equality follows bitwise sparsity: +0 and -0 are
    equal, a NaN ``w`` is never absorbed. For ``stochastic`` the mask is one random draw
    (seed/offset as in :func:`quantize`, 32 random bits, 28 for an fp32 target).

    Args:
        w: float32 tensor of values representable in ``fmt`` (checked unless
            ``check=False``; quantize first if needed).
        delta: float32 tensor of w's shape.
    """
    fmt = as_format(fmt)
    check_float32_tensor(w, "w")
    check_float32_tensor(delta, "delta", like=w, likename="w")
    m = mode_index(mode)
    seed_, offset_ = stream_args(m, seed, offset, w.numel())
    if check:
        q = ops.quantize(w, fmt.op_args(), 0, 0, 0, torch.float32)
        bad = (q.view(torch.int32) != w.view(torch.int32)) & ~torch.isnan(w)
        nbad = int(bad.sum())
        if nbad:
            raise ValueError(f"w holds {nbad} values not representable in {fmt}; "
                             "quantize w first (or pass check=False)")
    return ops.absorbed(w, delta, fmt.op_args(), m, seed_, offset_)


def random_bits(n: int, seed: int, offset: int = 0, *,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The 32-bit random words that stochastic rounding uses at stream positions
    ``offset .. offset + n - 1``, as an int64 tensor of values in ``[0, 2**32)``.

    Position p takes word ``(p // 16) % 4`` of Philox4x32-10 at counter
    ``(p // 64) * 16 + p % 16`` with the 64-bit ``seed`` as key. A stochastic decision
    with ``r`` random bits uses the top ``r`` bits of the word (``word >> (32 - r)``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    seed_, offset_ = stream_args(MODES.index("stochastic"), seed, offset, n)
    out = torch.empty(n, dtype=torch.int32, device=device)
    ops.random_bits_out(out, seed_, offset_)
    return out.to(torch.int64) & 0xFFFFFFFF
