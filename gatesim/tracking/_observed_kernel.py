"""CPU kernel of :func:`gatesim.tracking.observed.observed_stats`: one pass over memory.

The statistics of one observed optimizer step (stored value before, stored value after, the
intended update ``u``) in the layout of :class:`gatesim.UpdateStats`, computed from bit
patterns exactly as ``csrc/gatesim/update.h`` computes them for :func:`gatesim.apply_update`
(``element_flags``, ``element_bin32``), except that the value after the step is the one the
real optimizer stored, not one the kernel computes. The torch implementation in
``gatesim.tracking.observed`` (used on GPUs) computes the same numbers with tensor ops; the
tests hold the two against each other and against apply_update's histogram.

Single-threaded on purpose: numba's parallel pools spin and slow torch down (see
BENCHMARKS.md), and the pass is memory-bound.
"""
from __future__ import annotations


import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from gatesim.stat_layout import HIST_BINS as _HIST_BINS
from gatesim.stat_layout import HIST_LO_LOG2 as _HIST_LO
from gatesim.stat_layout import N_STATS as N_COUNTS  # UpdateStats counters, then the histogram

#: after_kind: how the stored "after" bits encode a value.
KIND_FP32, KIND_BF16, KIND_FP16 = 0, 1, 2


@intrinsic
def _f32_bits(typingctx, x):
    """The uint32 bit pattern of a float32 value (an LLVM bitcast: no memory round trip)."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(x), codegen


@numba.njit(cache=True, inline="always")
def _floor_log2(x):
    """floor(log2(x)) of an integer 1 <= x < 2**32, without branches or calls."""
    r = 0
    t = np.int64(x >= 65536) << 4
    x >>= t
    r += t
    t = np.int64(x >= 256) << 3
    x >>= t
    r += t
    t = np.int64(x >= 16) << 2
    x >>= t
    r += t
    t = np.int64(x >= 4) << 1
    x >>= t
    r += t
    return r + np.int64(x >= 2)


@numba.njit(cache=True, inline="always")
def _f16_to_f32_bits(h):
    """fp32 bit pattern of the fp16 value with bits h (exact, NaN payload kept)."""
    s = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        return s | 0x7F800000 | (m << 13)
    if e == 0:
        if m == 0:
            return s
        k = _floor_log2(m)  # value m * 2**-24 = 2**(k - 24) * (m / 2**k)
        return s | ((k - 24 + 127) << 23) | ((m ^ (1 << k)) << (23 - k))
    return s | ((e - 15 + 127) << 23) | (m << 13)


@numba.njit(cache=True, inline="always")
def _after32(x, kind):
    if kind == KIND_FP32:
        return np.int64(x)
    if kind == KIND_BF16:
        return np.int64(x) << 16
    return _f16_to_f32_bits(np.int64(x))


@numba.njit(cache=True, inline="always")
def _ulp_exp(b, emin, mbits):
    """log2 of the spacing of a format (emin, mbits, with subnormals) at the fp32 value with
    bits b (``ulp_exp_of`` in csrc/gatesim/update.h). Zero and fp32 subnormals lie below
    the smallest normal of every format inside fp32 (emin >= -126)."""
    E = (b & 0x7FFFFFFF) >> 23
    if E == 0:
        return emin - mbits
    e = E - 127
    return e - mbits if e >= emin else emin - mbits


@numba.njit(cache=True, inline="always")
def _element(b, a, ub, uf, emin, mbits):
    """One element: (changed, zero, absorbed, nonfinite u, nonfinite before, nonfinite
    after, |u| if absorbed else 0, histogram bin, 1 if the bin counts). Conditions are 0/1
    integers and selects, so data-dependent branches do not mispredict; only the rare
    subnormal cases branch."""
    ua = ub & 0x7FFFFFFF
    # changed: bits differ (+0 == -0), and a NaN never equals anything
    same = np.int64(b == a) | np.int64(((b | a) & 0x7FFFFFFF) == 0)
    ch = (same ^ 1) | np.int64((b & 0x7FFFFFFF) > 0x7F800000)
    z = np.int64(ua == 0)
    u_nf = np.int64((ub & 0x7F800000) == 0x7F800000)
    p_nf = np.int64((b & 0x7F800000) == 0x7F800000)
    a_nf = np.int64((a & 0x7F800000) == 0x7F800000)
    ab = (z ^ 1) & (ch ^ 1)  # a NaN update counts as non-zero, as in apply_update
    au = abs(np.float64(uf))
    m = au if ab else 0.0
    E = ua >> 23
    if E == 0:
        ue = _floor_log2(ua | 1) - 149
    else:
        ue = E - 127
    k = min(max(ue - _ulp_exp(b, emin, mbits) - _HIST_LO + 1, 0), _HIST_BINS - 1)
    valid = (z ^ 1) & (u_nf ^ 1) & (p_nf ^ 1)
    return ch, z, ab, u_nf, p_nf, a_nf, m, k, valid


@numba.njit(cache=True, inline="always")
def _u_at(i, before_f, src, u, u_bits, compute_u):
    """The bits and value of u[i]; with compute_u, u[i] is first set to fl32(src[i] -
    before[i]) (bits taken from the register, not read back through the aliasing view)."""
    if compute_u:
        uf = np.float32(src[i] - before_f[i])  # float32 arithmetic: one rounding
        u[i] = uf
        return np.int64(_f32_bits(uf)), uf
    return np.int64(u_bits[i]), u[i]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def observed_pass(before_bits, before_f, after_bits, after_kind, src, u, u_bits, compute_u,
                  emin, mbits):
    """Statistics of one observed step.

    Args:
        before_bits, before_f: the stored values before the step as fp32 (the exact upcast of
            the parameter's own format): uint32 bit patterns and the same memory as float32.
        after_bits: the stored values after the step: uint32 fp32 bits (after_kind 0) or
            uint16 bf16 / fp16 bits (after_kind 1 / 2).
        src: float32; with compute_u, the update is first computed as
            ``u = fl32(src - before)`` (src may be u itself: in place).
        u, u_bits: the fp32 intended update, and the same memory viewed as uint32.
        emin, mbits: the parameter format's smallest normal exponent and mantissa bits.

    Returns:
        (counts, mass): int64 array in UpdateStats order (n, changed, absorbed, zero,
        nonfinite_delta, nonfinite_param, nonfinite_result, sum_differs, hist[34]) and the
        absorbed mass (sum of |u| over absorbed elements, fp64: lane ``i % 4`` summed in
        index order, then ``(l0 + l1) + (l2 + l3)``).
    """
    # Four lanes (element i in lane i % 4), each with its own partial mass and histogram:
    # breaks the add-latency and store-to-load chains of one accumulator.
    hist = np.zeros((4, _HIST_BINS), dtype=np.int64)
    n = before_bits.size
    changed = 0
    zero = 0
    absorbed = 0
    nfd = 0
    nfp = 0
    nfr = 0
    m0 = 0.0
    m1 = 0.0
    m2 = 0.0
    m3 = 0.0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        ub, uf = _u_at(i, before_f, src, u, u_bits, compute_u)
        ch, z, ab, ud, pd, ad, m, k, v = _element(
            np.int64(before_bits[i]), _after32(after_bits[i], after_kind),
            ub, uf, emin, mbits)
        changed += ch
        zero += z
        absorbed += ab
        nfd += ud
        nfp += pd
        nfr += ad
        m0 += m
        hist[0, k] += v
        ub, uf = _u_at(i + 1, before_f, src, u, u_bits, compute_u)
        ch, z, ab, ud, pd, ad, m, k, v = _element(
            np.int64(before_bits[i + 1]), _after32(after_bits[i + 1], after_kind),
            ub, uf, emin, mbits)
        changed += ch
        zero += z
        absorbed += ab
        nfd += ud
        nfp += pd
        nfr += ad
        m1 += m
        hist[1, k] += v
        ub, uf = _u_at(i + 2, before_f, src, u, u_bits, compute_u)
        ch, z, ab, ud, pd, ad, m, k, v = _element(
            np.int64(before_bits[i + 2]), _after32(after_bits[i + 2], after_kind),
            ub, uf, emin, mbits)
        changed += ch
        zero += z
        absorbed += ab
        nfd += ud
        nfp += pd
        nfr += ad
        m2 += m
        hist[2, k] += v
        ub, uf = _u_at(i + 3, before_f, src, u, u_bits, compute_u)
        ch, z, ab, ud, pd, ad, m, k, v = _element(
            np.int64(before_bits[i + 3]), _after32(after_bits[i + 3], after_kind),
            ub, uf, emin, mbits)
        changed += ch
        zero += z
        absorbed += ab
        nfd += ud
        nfp += pd
        nfr += ad
        m3 += m
        hist[3, k] += v
    for i in range(n4, n):
        ub, uf = _u_at(i, before_f, src, u, u_bits, compute_u)
        ch, z, ab, ud, pd, ad, m, k, v = _element(
            np.int64(before_bits[i]), _after32(after_bits[i], after_kind), ub, uf, emin, mbits)
        changed += ch
        zero += z
        absorbed += ab
        nfd += ud
        nfp += pd
        nfr += ad
        if i % 4 == 0:
            m0 += m
        elif i % 4 == 1:
            m1 += m
        else:
            m2 += m
        hist[i % 4, k] += v
    counts = np.zeros(N_COUNTS, dtype=np.int64)
    counts[0] = n
    counts[1] = changed
    counts[2] = absorbed
    counts[3] = zero
    counts[4] = nfd
    counts[5] = nfp
    counts[6] = nfr
    for k in range(_HIST_BINS):
        counts[8 + k] = (hist[0, k] + hist[1, k]) + (hist[2, k] + hist[3, k])
    return counts, (m0 + m1) + (m2 + m3)
