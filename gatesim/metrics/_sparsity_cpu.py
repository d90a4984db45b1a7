"""One-pass numba kernels for sparsity on CPU tensors (the torch code in ``sparsity.py``
is the portable path and the tests hold the two to identical counts).

Same definitions as :mod:`gatesim.metrics.sparsity`: per element, from the unsigned bit
patterns ``ua``, ``ub`` of a ``width``-bit format and their exact float64 values ``va``,
``vb`` (a decode table for 8- and 16-bit formats, a float32 view for fp32):

* ``nan``: either magnitude ``>= nan_from``; bitwise equal: ``(ua == ub or both
  magnitudes 0) and not nan``;
* relative: ``va == vb or (both finite and |vb - va| <= eta * max(|va|, |vb|))``;
* atol ``t``: ``va == vb or |vb - va| <= t``;
* ULP distance ``|key(ub) - key(ua)|`` with ``key = +-magnitude`` by the sign bit, in the
  bins ``0, 1, 2, 3-4, 5-8, ...`` (bin ``(d - 1).bit_length() + 1`` for ``d >= 1``).

Counts come back as ``[bitwise, relative, inf pairs, nan pairs, atol_0, atol_1, ...]``
and the histogram.

Blocks of ``BLOCK`` elements are counted in parallel (``prange``) and summed in a fixed
order: integer counts, so the result does not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["counts_table", "counts_f32", "changed_table", "changed_f32", "changed_bits",
           "decode_table", "unsigned_numpy", "BLOCK", "PARALLEL_MIN"]

BLOCK = 1 << 16
#: Below this many elements the serial kernels run (a parallel launch costs more).
PARALLEL_MIN = 1 << 18


@njit(inline="always")
def _bin(d):
    """0 for d == 0, else (d - 1).bit_length() + 1 (d < 2**33: exact in float64)."""
    if d <= 1:
        return d
    return math.frexp(np.float64(d - 1))[1] + 1


@njit(inline="always")
def _one(ua, ub, va, vb, width, nan_from, eta, atols, cnt, hist):
    sign = np.int64(1) << (width - 1)
    mask = sign - 1
    ma = ua & mask
    mb = ub & mask
    nan = ma >= nan_from or mb >= nan_from
    if nan:
        cnt[3] += 1
    elif ua == ub or (ma == 0 and mb == 0):
        cnt[0] += 1
    same = va == vb
    d = abs(vb - va)
    fin = np.isfinite(va) and np.isfinite(vb)
    if same or (fin and d <= eta * max(abs(va), abs(vb))):
        cnt[1] += 1
    for j in range(atols.size):
        if same or d <= atols[j]:
            cnt[4 + j] += 1
    if not nan:
        if not fin:
            cnt[2] += 1
        ka = -ma if (ua & sign) != 0 else ma
        kb = -mb if (ub & sign) != 0 else mb
        hist[_bin(abs(kb - ka))] += 1


@njit(cache=True)
def _block_table(a, b, table, width, nan_from, eta, atols, lo, hi, cnt, hist):
    for i in range(lo, hi):
        ua = np.int64(a[i])
        ub = np.int64(b[i])
        _one(ua, ub, table[ua], table[ub], width, nan_from, eta, atols, cnt, hist)


@njit(cache=True)
def _block_f32(a, b, fa, fb, nan_from, eta, atols, lo, hi, cnt, hist):
    for i in range(lo, hi):
        _one(np.int64(a[i]), np.int64(b[i]), np.float64(fa[i]), np.float64(fb[i]), 32,
             nan_from, eta, atols, cnt, hist)


@njit(parallel=True, cache=True)
def _counts_table_par(a, b, table, width, nan_from, eta, atols, cnt, hist):
    n = a.size
    for k in prange(cnt.shape[0]):
        _block_table(a, b, table, width, nan_from, eta, atols, k * BLOCK,
                     min(n, (k + 1) * BLOCK), cnt[k], hist[k])


@njit(parallel=True, cache=True)
def _counts_f32_par(a, b, fa, fb, nan_from, eta, atols, cnt, hist):
    n = a.size
    for k in prange(cnt.shape[0]):
        _block_f32(a, b, fa, fb, nan_from, eta, atols, k * BLOCK, min(n, (k + 1) * BLOCK),
                   cnt[k], hist[k])


def _buffers(n: int, n_atol: int, nbins: int):
    nblk = max(1, (n + BLOCK - 1) // BLOCK)
    return (np.zeros((nblk, 4 + n_atol), np.int64), np.zeros((nblk, nbins), np.int64))


def counts_table(a, b, table, width, nan_from, eta, atols, nbins):
    """Counts for 8/16-bit formats: a, b unsigned patterns, table[pattern] = value."""
    cnt, hist = _buffers(a.size, atols.size, nbins)
    if a.size < PARALLEL_MIN:
        _block_table(a, b, table, width, nan_from, eta, atols, 0, a.size, cnt[0], hist[0])
    else:
        _counts_table_par(a, b, table, width, nan_from, eta, atols, cnt, hist)
    return cnt.sum(axis=0), hist.sum(axis=0)


def counts_f32(a, b, fa, fb, nan_from, eta, atols, nbins):
    """Counts for fp32: a, b uint32 patterns, fa, fb the same data as float32."""
    cnt, hist = _buffers(a.size, atols.size, nbins)
    if a.size < PARALLEL_MIN:
        _block_f32(a, b, fa, fb, nan_from, eta, atols, 0, a.size, cnt[0], hist[0])
    else:
        _counts_f32_par(a, b, fa, fb, nan_from, eta, atols, cnt, hist)
    return cnt.sum(axis=0), hist.sum(axis=0)


@njit(inline="always")
def _changed(ua, ub, va, vb, width, nan_from, rule, eta, atol):
    if rule == 0:
        mask = (np.int64(1) << (width - 1)) - 1
        ma = ua & mask
        mb = ub & mask
        if ma >= nan_from or mb >= nan_from:
            return True
        return not (ua == ub or (ma == 0 and mb == 0))
    if va == vb:
        return False
    d = abs(vb - va)
    if rule == 1:
        return not (np.isfinite(va) and np.isfinite(vb) and d <= eta * max(abs(va), abs(vb)))
    return not (d <= atol)


@njit(cache=True)
def _changed_table_ser(a, b, table, width, nan_from, rule, eta, atol, out):
    for i in range(a.size):
        ua = np.int64(a[i])
        ub = np.int64(b[i])
        out[i] = _changed(ua, ub, table[ua], table[ub], width, nan_from, rule, eta, atol)


@njit(parallel=True, cache=True)
def _changed_table_par(a, b, table, width, nan_from, rule, eta, atol, out):
    for i in prange(a.size):
        ua = np.int64(a[i])
        ub = np.int64(b[i])
        out[i] = _changed(ua, ub, table[ua], table[ub], width, nan_from, rule, eta, atol)


@njit(cache=True)
def _changed_f32_ser(a, b, fa, fb, nan_from, rule, eta, atol, out):
    for i in range(a.size):
        out[i] = _changed(np.int64(a[i]), np.int64(b[i]), np.float64(fa[i]),
                          np.float64(fb[i]), 32, nan_from, rule, eta, atol)


@njit(parallel=True, cache=True)
def _changed_f32_par(a, b, fa, fb, nan_from, rule, eta, atol, out):
    for i in prange(a.size):
        out[i] = _changed(np.int64(a[i]), np.int64(b[i]), np.float64(fa[i]),
                          np.float64(fb[i]), 32, nan_from, rule, eta, atol)


def changed_table(a, b, table, width, nan_from, rule, eta, atol, out):
    f = _changed_table_ser if a.size < PARALLEL_MIN else _changed_table_par
    f(a, b, table, width, nan_from, rule, eta, atol, out)


def changed_f32(a, b, fa, fb, nan_from, rule, eta, atol, out):
    f = _changed_f32_ser if a.size < PARALLEL_MIN else _changed_f32_par
    f(a, b, fa, fb, nan_from, rule, eta, atol, out)


@njit(cache=True, nogil=True)
def changed_bits(a, b, magmask, nan_from, out):
    """The bitwise rule from the integer views alone (no decode table, no values): changed
    when the bits differ and not both are zeros (+0 == -0), or either side is NaN
    (magnitude ``>= nan_from``). ``a``, ``b`` signed or unsigned views of one width."""
    for i in range(a.size):
        x = np.int64(a[i])
        y = np.int64(b[i])
        mx = x & magmask
        my = y & magmask
        out[i] = ((x != y) & ((mx | my) != 0)) | (mx >= nan_from) | (my >= nan_from)


_TABLES: dict = {}


def decode_table(dtype, view_dtype, width: int) -> np.ndarray:
    """float64 value of every bit pattern of an 8/16-bit torch dtype (decoded by torch)."""
    import torch

    t = _TABLES.get(dtype)
    if t is None:
        pats = torch.arange(1 << width, dtype=torch.int64)
        # signed view: wrap the upper half to negative values, same bits
        raw = torch.where(pats >= (1 << (width - 1)), pats - (1 << width), pats).to(view_dtype)
        t = raw.view(dtype).to(torch.float64).numpy()
        _TABLES[dtype] = t
    return t


def unsigned_numpy(x, view_dtype, width: int) -> np.ndarray:
    """The unsigned bit patterns of a contiguous CPU tensor as a numpy array (no copy)."""
    a = x.reshape(-1).view(view_dtype).numpy()
    return a.view(np.dtype(f"uint{width}"))

