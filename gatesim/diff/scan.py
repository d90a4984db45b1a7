"""One pass over a tensor pair's bit patterns: bitwise sparsity, non-finite counts, and the
changed entries gathered for the finer metrics.

:func:`sparsity_fast` gives exactly what :func:`gatesim.metrics.sparsity` gives on the whole
pair (same counts, same ULP histogram; ``tests/test_diff_scan.py`` checks it), at a
fraction of the cost: a numba pass over the integer views counts, per element,

* ``n_diff``: stored bits differ;
* ``zero_diff``: bits differ but both values are zero (+0 vs -0: equal by the definition);
* NaN and infinity on each side;
* ``eq_nan`` / ``eq_inf``: identical bits that are NaN (never equal) / infinite,

(a vectorised first pass counts the differing bits, the sign-only differences and the
largest magnitude; when it finds no sign-only difference and nothing at or above the
infinity/NaN magnitude, which is the normal case, those are all its counts; otherwise the
full per-element pass runs) and copies the pairs whose bits differ into two compact
arrays. Pairs with identical, non-NaN bits are unchanged under every rule (bitwise, relative probe, atol) and sit in ULP
bin 0, so only the gathered pairs go through :func:`gatesim.metrics.sparsity`, and the two
parts are added. With ``bitwise_only`` the gather and the finer metrics are skipped: the
pass then only counts (the fast "bitwise-sparsity-only" mode).

Definitions are those of docs/metrics.md ("Update sparsity"): +0 and -0 are
equal, NaN never equals anything. Integer and bool tensors compare bits only (no zero or
NaN rule); float64 tensors get the bitwise count and the non-finite counts but no
relative/atol/ULP metrics (:mod:`gatesim.metrics` does not take float64).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numba
import numpy as np
import torch

from gatesim.formats import STORAGE_DTYPES, as_format, int_view_dtype
from gatesim.metrics.sparsity import DEFAULT_ATOL, DEFAULT_ETA, sparsity, ulp_bin_labels

__all__ = ["ScanCounts", "scan", "sparsity_fast"]

#: float64 has no :class:`gatesim.Format` (its 11 exponent bits do not fit inside fp32), so
#: its bit facts are given here: (integer view, magnitude mask, infinity magnitude, first
#: NaN magnitude). Every other float dtype takes them from its Format.
_FLOAT64_BITS = (torch.int64, (1 << 63) - 1, 0x7FF0000000000000, 0x7FF0000000000001)
#: Elements per pass of :func:`gatesim.metrics.sparsity`'s chunked torch path (its
#: temporaries are about 100 bytes per element, so 2**19 keeps them near 50 MB); its numba
#: CPU path makes no temporaries.
CHUNK = 1 << 19


@numba.njit(cache=True, nogil=True)
def _scan_quick(a, b, magmask, sign):
    """Vectorisable first pass: bits differing, sign-only differences (+0/-0 candidates)
    and the largest magnitude on either side (NaN/inf candidates)."""
    n_diff = 0
    sign_only = 0
    big = 0
    for i in range(a.size):
        x = a[i]
        y = b[i]
        n_diff += x != y
        sign_only += (x ^ y) == sign
        big = max(big, max(x & magmask, y & magmask))
    return n_diff, sign_only, big


@numba.njit(cache=True, nogil=True)
def _quick_words(wa, wb, lane_bits, block, spec_add):
    """The quick pass over whole 64-bit words, SWAR on ``lane_bits``-wide elements, fused
    with the content checksums of both sides (:mod:`gatesim.integrity`, words from 0):
    ``(n_diff, flags, sum_a, sum_b)``. ``flags`` is non-zero when some element differs by
    the sign bit alone (a +0/-0 candidate) or has a magnitude at or above
    ``2**(lane_bits-1) - spec_add`` (an inf/NaN candidate): then the full count must run.
    Lane counters are summed every ``block`` words (below 2**lane_bits)."""
    one = np.uint64(0)
    for j in range(64 // lane_bits):
        one |= np.uint64(1) << np.uint64(j * lane_bits)
    hi = one << np.uint64(lane_bits - 1)
    lo = ~hi
    sadd = one * np.uint64(spec_add)
    sh = np.uint64(lane_bits - 1)
    k = np.uint64(0x9E3779B97F4A7C15)
    c = np.uint64(0xBF58476D1CE4E5B9)
    s29 = np.uint64(29)
    lane_mask = ~np.uint64(0) if lane_bits == 64 else \
        (np.uint64(1) << np.uint64(lane_bits)) - np.uint64(1)
    pos = np.uint64(0)
    ha = np.uint64(0)
    hb = np.uint64(0)
    flags = np.uint64(0)
    total = 0
    n = wa.size
    for start in range(0, n, block):
        stop = min(start + block, n)
        lanes = np.uint64(0)
        for i in range(start, stop):
            x = wa[i]
            y = wb[i]
            d = x ^ y
            lanes += ((((d & lo) + lo) | d) & hi) >> sh      # 1 per differing element
            e = d ^ hi
            flags |= (~(((e & lo) + lo) | e) & hi) | (((x & lo) + sadd) & hi) \
                | (((y & lo) + sadd) & hi)
            xa = x ^ pos
            ha += (xa ^ (xa >> s29)) * c
            xb = y ^ pos
            hb += (xb ^ (xb >> s29)) * c
            pos += k
        for j in range(64 // lane_bits):
            total += int((lanes >> np.uint64(j * lane_bits)) & lane_mask)
    return total, flags, ha, hb


@numba.njit(cache=True, nogil=True)
def _scan_pass(a, b, magmask, inf_mag, nan_from, is_float, gather, out_a, out_b):
    """The per-element counts (module docstring); with ``gather``, the pairs whose bits
    differ are copied to the front of ``out_a``/``out_b``. Returns ``(n_diff, zero_diff,
    nan_a, inf_a, nan_b, inf_b, eq_nan, eq_inf)``; ``n_diff`` is the number gathered."""
    w = 0
    zero_diff = 0
    nan_a = 0
    inf_a = 0
    nan_b = 0
    inf_b = 0
    eq_nan = 0
    eq_inf = 0
    for i in range(a.size):
        xa = a[i]
        yb = b[i]
        x = np.int64(xa)
        y = np.int64(yb)
        d = x != y
        if gather:             # loop-invariant: compiled as two loops, one without it
            out_a[w] = xa      # branch-free gather: always write, advance when changed
            out_b[w] = yb
        w += d
        if is_float:
            mx = x & magmask
            my = y & magmask
            zero_diff += d & (((x | y) & magmask) == 0)
            na = mx >= nan_from
            ia = mx == inf_mag
            nan_a += na
            inf_a += ia
            nan_b += my >= nan_from
            inf_b += my == inf_mag
            eq_nan += (not d) & na
            eq_inf += (not d) & ia
    return w, zero_diff, nan_a, inf_a, nan_b, inf_b, eq_nan, eq_inf


@dataclasses.dataclass
class ScanCounts:
    """Counts of one pass (module docstring); ``changed_a``/``changed_b`` hold the gathered
    pairs whose bits differ (same dtype as the inputs), or None with ``bitwise_only``."""

    n: int
    n_diff: int
    zero_diff: int
    nan_a: int
    inf_a: int
    nan_b: int
    inf_b: int
    eq_nan: int
    eq_inf: int
    changed_a: Optional[torch.Tensor] = None
    changed_b: Optional[torch.Tensor] = None
    #: ``(checksum of a, checksum of b)`` of the stored bytes when the pass computed them
    #: (``scan(..., checksums=True)`` on the quick path), else None.
    checksums: Optional[tuple] = None

    @property
    def bitwise_equal(self) -> int:
        """Entries with identical stored bits (+0 == -0, NaN never equal)."""
        return self.n - self.n_diff + self.zero_diff - self.eq_nan


def _layout(dtype: torch.dtype, itemsize: int):
    """(integer view, magnitude mask, infinity magnitude (-1: none), first NaN magnitude,
    is a float) of a dtype; integer and bool dtypes compare bits only."""
    if dtype in STORAGE_DTYPES:
        f = as_format(dtype)
        inf = f.inf_code
        return f.view_dtype, f.magnitude_mask, -1 if inf is None else inf, f.nan_code, True
    if dtype == torch.float64:
        return (*_FLOAT64_BITS, True)
    try:
        view = int_view_dtype(itemsize)
    except TypeError:
        raise TypeError(f"cannot compare bit patterns of dtype {dtype}") from None
    return view, 0, -1, 1 << 62, False


def _quick_with_checksums(ia: np.ndarray, ib: np.ndarray, magmask, special: int):
    """The quick pass and both checksums in one read of the data: whole 64-bit words go
    through :func:`_quick_words`, the elements of a last partial word through
    :func:`_scan_quick`. Returns ``(n_diff, settled, (checksum_a, checksum_b))``."""
    from gatesim.integrity import Checksum
    item = ia.itemsize
    bits = 8 * item
    ba, bb = ia.view(np.uint8), ib.view(np.uint8)
    nw = ba.size // 8
    wa, wb = ba[: 8 * nw].view(np.uint64), bb[: 8 * nw].view(np.uint64)
    block = {8: 255, 16: 32767}.get(bits, 1 << 20)
    nd, flags, sa, sb = _quick_words(wa, wb, bits, block, (1 << (bits - 1)) - special)
    settled = flags == 0
    rest = (ba.size - 8 * nw) // item
    if rest:
        sign = -(1 << (bits - 1))
        tnd, sign_only, big = _scan_quick(ia[-rest:], ib[-rest:], magmask, sign)
        nd += tnd
        settled = settled and sign_only == 0 and big < special
    cks = (Checksum.from_word_sum(sa, nw).update(ba[8 * nw:]).hexdigest(),
           Checksum.from_word_sum(sb, nw).update(bb[8 * nw:]).hexdigest())
    return int(nd), settled, cks


def scan(a: torch.Tensor, b: torch.Tensor, *, gather: bool = True,
         out_a: Optional[np.ndarray] = None, out_b: Optional[np.ndarray] = None,
         checksums: bool = False) -> ScanCounts:
    """The counting pass over two CPU tensors of one dtype and shape (module docstring).

    ``out_a``/``out_b``: optional scratch arrays of at least ``numel`` elements of the
    integer view dtype, to gather into (avoids allocating). ``checksums``: with
    ``gather=False`` on floating tensors, also compute both tensors' content checksums
    (:mod:`gatesim.integrity`) in the same pass (:attr:`ScanCounts.checksums`; the fused
    word pass costs no more than the plain count).
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"scan needs one dtype and shape, got {a.dtype}{tuple(a.shape)} "
                         f"and {b.dtype}{tuple(b.shape)}")
    view, magmask, inf_mag, nan_from, is_float = _layout(a.dtype, a.element_size())
    n = a.numel()
    ia = a.contiguous().reshape(-1).view(view).numpy()
    ib = b.contiguous().reshape(-1).view(view).numpy()
    if not gather:
        cks = None
        if is_float:
            # the quick pass settles the common case: no NaN/inf, no +0/-0 swaps
            special = nan_from if inf_mag < 0 else min(inf_mag, nan_from)
            if checksums:
                nd, settled, cks = _quick_with_checksums(ia, ib, magmask, special)
            else:
                sign = -(1 << (8 * a.element_size() - 1))
                nd, sign_only, big = _scan_quick(ia, ib, magmask, sign)
                settled = sign_only == 0 and big < special
            if settled:
                return ScanCounts(n, int(nd), 0, 0, 0, 0, 0, 0, 0, checksums=cks)
        c = _scan_pass(ia, ib, magmask, inf_mag, nan_from, is_float, False, ia[:0], ib[:0])
        return ScanCounts(n, *(int(x) for x in c), checksums=cks)
    npv = ia.dtype
    if out_a is None or out_a.size < n or out_a.dtype != npv:
        out_a = np.empty(max(n, 1), dtype=npv)
    if out_b is None or out_b.size < n or out_b.dtype != npv:
        out_b = np.empty(max(n, 1), dtype=npv)
    c = _scan_pass(ia, ib, magmask, inf_mag, nan_from, is_float, True, out_a, out_b)
    w = int(c[0])
    ca = torch.from_numpy(out_a[:w]).view(a.dtype)
    cb = torch.from_numpy(out_b[:w]).view(a.dtype)
    return ScanCounts(n, w, *(int(x) for x in c[1:]), changed_a=ca, changed_b=cb)


@dataclasses.dataclass
class FastSparsity:
    """Sparsity of one pair by every definition (fields as in
    :class:`gatesim.metrics.SparsityResult`, plus the raw counts)."""

    counts: ScanCounts
    bitwise_equal: int
    relative_equal: Optional[int]
    atol_equal: Optional[int]
    nan_pairs: int
    inf_pairs: int
    ulp_hist: Optional[list]
    ulp_labels: Optional[tuple]


def sparsity_fast(a: torch.Tensor, b: torch.Tensor, *, eta: float = DEFAULT_ETA,
                  atol: float = DEFAULT_ATOL[0], bitwise_only: bool = False,
                  out_a: Optional[np.ndarray] = None,
                  out_b: Optional[np.ndarray] = None, checksums: bool = False) -> FastSparsity:
    """Counts equal to :func:`gatesim.metrics.sparsity` on the whole pair (module
    docstring). ``relative_equal``, ``atol_equal`` and ``ulp_hist`` are None with
    ``bitwise_only`` or for dtypes :mod:`gatesim.metrics` does not take. ``checksums``:
    see :func:`scan` (``counts.checksums``; None where the pass could not compute them)."""
    full = not bitwise_only and a.dtype in STORAGE_DTYPES
    c = scan(a, b, gather=full, out_a=out_a, out_b=out_b, checksums=checksums and not full)
    nan_pairs = c.eq_nan
    inf_pairs = c.eq_inf
    if not full:
        if a.is_floating_point():   # NaN/inf pairs among the changed ones (cheap: rare)
            nan_pairs, inf_pairs = _nonfinite_pairs(a, b, c)
        return FastSparsity(c, c.bitwise_equal, None, None, nan_pairs, inf_pairs, None, None)
    same = c.n - c.n_diff - c.eq_nan            # identical, non-NaN bits
    width = a.element_size() * 8
    labels = ulp_bin_labels(width)
    if c.n_diff:
        sub = sparsity(c.changed_a, c.changed_b, eta=eta, atol=(atol,), chunk=CHUNK)
        if sub.counts["bitwise"] != c.zero_diff:   # the two definitions must agree
            raise AssertionError(f"bitwise count of the changed pairs {sub.counts['bitwise']} "
                                 f"!= zero pairs {c.zero_diff}")
        rel = same + sub.counts["relative"]
        at = same + sub.counts[f"atol={atol:g}"]
        hist = list(sub.ulp_hist)
        nan_pairs += sub.nan_pairs
        inf_pairs += sub.inf_pairs
    else:
        rel = at = same
        hist = [0] * len(labels)
    hist[0] += same
    return FastSparsity(c, c.bitwise_equal, rel, at, nan_pairs, inf_pairs, hist, labels)


def _nonfinite_pairs(a: torch.Tensor, b: torch.Tensor, c: ScanCounts) -> tuple[int, int]:
    """(NaN pairs, inf pairs) when the pass did not gather; only looked at when either side
    holds a non-finite value."""
    if not (c.nan_a or c.inf_a or c.nan_b or c.inf_b):
        return 0, 0
    x = a.reshape(-1).to(torch.float64)
    y = b.reshape(-1).to(torch.float64)
    nan = torch.isnan(x) | torch.isnan(y)
    inf = ~nan & (torch.isinf(x) | torch.isinf(y))
    return int(nan.sum()), int(inf.sum())
