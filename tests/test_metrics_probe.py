"""The paper's relative probe against bitwise equality, for every pair of bf16 values.

docs/metrics.md ("Update sparsity"): the probe ``|w1 - w0| <= eta * max(|w0|, |w1|)``
with ``eta = 1e-3`` is equivalent to bitwise equality for bf16 values.

``test_probe_equals_bitwise_all_bf16_pairs`` checks that claim **exhaustively**: all
65536**2 = 2**32 ordered pairs of bf16 bit patterns (NaN payloads, infinities, signed
zeros, subnormals included) in one numba pass (``parallel=True``, ``prange`` over the first
operand, one row of 65536 pairs per iteration; on the project's 2-core machine the loop
takes 1.5 s on 2 numba threads plus about 5 s of compilation when the machine is quiet,
7 s + 14 s when other jobs load it). Values are decoded by ml_dtypes (independently of
gatesim) into float64. The margin is part of the pass: the minimum is established by
counting pairs below and at ``2**-8`` relative, not by a division. Findings:

* gatesim's probe (exactly equal values count as equal; otherwise the formula on finite
  values) agrees with bitwise equality on all 2**32 pairs;
* the bare formula agrees on every pair of *finite* values (the smallest
  ``|w1 - w0| / max(|w0|, |w1|)`` over distinct finite bf16 pairs is exactly ``2**-8``, at
  a power of two and its lower neighbour; subnormal neighbours differ by at least 1/128),
  so the equivalence holds for any ``eta < 2**-8``;
* the bare formula disagrees on exactly ``4 * n_finite + 4`` pairs, all involving an
  infinity: finite vs +-inf and +inf vs -inf give ``inf <= eta * inf`` (true: "unchanged"
  though the bits differ), and +inf vs +inf (-inf vs -inf) gives ``NaN <= ...`` (false:
  "changed" though the bits are equal). The test asserts that count, computed from
  ml_dtypes' ``isfinite`` table, not hard-coded.

``test_library_probe_matches_reference_on_dense_sample`` ties gatesim's two
implementations (numba and torch paths of :func:`gatesim.metrics.update_mask` and
:func:`gatesim.metrics.sparsity`) to the same reference predicate on every bf16 pattern
against its neighbours (+-1, +-2 bit patterns), its negation, the specials and random
partners.
"""
import time

import ml_dtypes
import numba
import numpy as np
import pytest
import torch
from numba import njit, prange

import gatesim.metrics as gm

ETA = 1e-3


def _bf16_values() -> np.ndarray:
    """float64 value of each of the 65536 bf16 bit patterns, decoded by ml_dtypes."""
    with np.errstate(invalid="ignore"):   # NaN patterns
        return np.arange(65536, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)


@njit(inline="always")
def _lib_probe(va, vb, eta):
    """gatesim's probe: exactly equal values, else the formula on finite values."""
    if va == vb:
        return True
    return np.isfinite(va) and np.isfinite(vb) and abs(vb - va) <= eta * max(abs(va), abs(vb))


@njit(parallel=True)
def _exhaustive(vals, eta):
    """Counts over all ordered pairs (a, b) of bf16 patterns, branch-free in the inner
    loop so it vectorizes: [gatesim probe != bitwise, bare formula != bitwise, the same on
    finite pairs, bitwise-equal pairs, distinct finite pairs with |b-a| < 2**-8 max,
    ... with |b-a| <= 2**-8 max]."""
    n = vals.size
    fin = np.isfinite(vals).astype(np.int64)
    nan = np.isnan(vals).astype(np.int64)
    absv = np.abs(vals)
    zero = np.zeros(n, np.int64)
    for i in range(n):
        zero[i] = (i & 0x7FFF) == 0
    out = np.zeros((n, 6), np.int64)
    for a in prange(n):
        va = vals[a]
        fa = fin[a]
        na = nan[a]
        aa = absv[a]
        za = zero[a]
        c0 = c1 = c2 = c3 = c4 = c5 = 0
        for b in range(n):
            vb = vals[b]
            # bitwise: same bits or both +-0, and neither is NaN
            be = (1 - na) * (1 - nan[b]) * (np.int64(a == b) | (za & zero[b]))
            d = abs(vb - va)
            mx = max(aa, absv[b])
            ff = fa & fin[b]
            raw = np.int64(d <= eta * mx)                   # NaN compares false
            lib = np.int64(va == vb) | (ff & raw)
            x = raw ^ be
            dist = ff & np.int64(va != vb)
            c0 += lib ^ be
            c1 += x
            c2 += ff & x
            c3 += be
            c4 += dist & np.int64(d < 0.00390625 * mx)      # 2**-8, exact scaling
            c5 += dist & np.int64(d <= 0.00390625 * mx)
        out[a, 0] = c0
        out[a, 1] = c1
        out[a, 2] = c2
        out[a, 3] = c3
        out[a, 4] = c4
        out[a, 5] = c5
    return out.sum(axis=0)


@njit
def _reference_changed(a_bits, b_bits, vals, eta):
    out = np.empty(a_bits.size, np.bool_)
    for i in range(a_bits.size):
        out[i] = not _lib_probe(vals[a_bits[i]], vals[b_bits[i]], eta)
    return out


def test_probe_equals_bitwise_all_bf16_pairs():
    """Exhaustive: all 2**32 ordered bf16 pairs (see module docstring for the findings)."""
    vals = _bf16_values()
    finite = np.isfinite(vals)
    n_finite = int(finite.sum())
    n_nan = int(np.isnan(vals).sum())
    t0 = time.perf_counter()
    _exhaustive(vals[:2], ETA)                    # compile
    t1 = time.perf_counter()
    lib_bad, raw_bad, raw_bad_finite, equal, below, at_most = _exhaustive(vals, ETA)
    t2 = time.perf_counter()
    print(f"\nexhaustive bf16 probe: 2**32 pairs in {t2 - t1:.1f} s on "
          f"{numba.get_num_threads()} numba threads (+ {t1 - t0:.1f} s compilation)")
    # bitwise-equal pairs: each non-NaN pattern with itself, plus (+0, -0) and (-0, +0)
    assert equal == (65536 - n_nan) + 2
    assert lib_bad == 0, f"gatesim's probe disagrees with bitwise on {lib_bad} pairs"
    assert raw_bad_finite == 0
    # the margin: no distinct finite pair is closer than 2**-8 relative; exactly the pairs
    # (2**e, its lower neighbour 2**e - 2**(e-8)), e = -125..127 (2**-126's lower
    # neighbour is subnormal, 1/128 away), both signs, both orders, reach it
    assert below == 0
    assert at_most == (127 - (-125) + 1) * 2 * 2
    n_inf = int(np.isinf(vals).sum())
    assert n_inf == 2
    # bare formula: (finite, +-inf) both orders -> 4 * n_finite; (+inf, -inf) both
    # orders -> 2; (+inf, +inf), (-inf, -inf) -> 2
    assert raw_bad == 2 * n_inf * n_finite + 4


def _dense_pairs(rng) -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(65536, dtype=np.int64)
    partners = [a, a + 1, a - 1, a + 2, a - 2, a ^ 0x8000, rng.integers(0, 65536, a.size)]
    specials = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F,
                         0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x3F80, 0xBF80])
    A = [np.repeat(a, 1)] * len(partners) + [np.repeat(specials, specials.size)]
    B = partners + [np.tile(specials, specials.size)]
    A = np.concatenate(A) & 0xFFFF
    B = np.concatenate(B) & 0xFFFF
    return A.astype(np.int64), B.astype(np.int64)


def test_library_probe_matches_reference_on_dense_sample():
    """gatesim's torch code gives the reference predicate's answer on ~460k pairs that
    include every bf16 pattern against its nearest patterns, its negation and the specials."""
    rng = np.random.default_rng(0)
    A, B = _dense_pairs(rng)
    vals = _bf16_values()
    want_changed = _reference_changed(A, B, vals, ETA)
    to_bf16 = lambda x: torch.from_numpy(x.astype(np.uint16).view(np.int16)).view(
        torch.bfloat16)  # noqa: E731
    w0, w1 = to_bf16(A), to_bf16(B)
    for backend in ("numba", "torch"):
        got_rel = gm.update_mask(w0, w1, "relative", backend=backend).numpy()
        got_bit = gm.update_mask(w0, w1, "bitwise", backend=backend).numpy()
        np.testing.assert_array_equal(got_rel, want_changed)
        np.testing.assert_array_equal(got_bit, want_changed)  # the equivalence, here
        r = gm.sparsity(w0, w1, chunk=4099, backend=backend)
        assert r.counts["relative"] == r.counts["bitwise"] == int((~want_changed).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e5m2, torch.float8_e4m3fn])
def test_probe_vs_bitwise_other_formats(dtype):
    """The claim is bf16's: for fp16 (10 mantissa bits) neighbours differ by as little as
    about 2**-10 relative < 1e-3, so the probe calls some changed values unchanged; for fp8
    every distinct pair is far apart. gatesim's count matches a numpy evaluation of the
    probe on all pairs of the 8-bit formats and on every fp16 pattern against its two
    neighbours."""
    if dtype == torch.float16:
        a = np.arange(65536, dtype=np.int64)
        A = np.concatenate([a, a]) & 0xFFFF
        B = np.concatenate([a + 1, a - 1]) & 0xFFFF
        vals = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
        w0 = torch.from_numpy(A.astype(np.uint16).view(np.int16)).view(torch.float16)
        w1 = torch.from_numpy(B.astype(np.uint16).view(np.int16)).view(torch.float16)
    else:
        a = np.arange(256, dtype=np.int64)
        A, B = np.repeat(a, 256), np.tile(a, 256)
        mdt = ml_dtypes.float8_e5m2 if dtype == torch.float8_e5m2 else ml_dtypes.float8_e4m3fn
        vals = np.arange(256, dtype=np.uint8).view(mdt).astype(np.float64)
        w0 = torch.from_numpy(A.astype(np.uint8)).view(dtype)
        w1 = torch.from_numpy(B.astype(np.uint8)).view(dtype)
    va, vb = vals[A], vals[B]
    with np.errstate(invalid="ignore"):
        unchanged = (va == vb) | (np.isfinite(va) & np.isfinite(vb) &
                     (np.abs(vb - va) <= ETA * np.maximum(np.abs(va), np.abs(vb))))
    r = gm.sparsity(w0, w1, atol=())
    assert r.counts["relative"] == int(unchanged.sum())
    bit_neq_but_probe_eq = int((gm.update_mask(w0, w1, "bitwise")
                                & ~gm.update_mask(w0, w1, "relative")).sum())
    if dtype == torch.float16:
        # 1 + 2**-10 and 1 differ by 2**-10 / (1 + 2**-10) < 1e-3: "unchanged" to the probe
        assert bit_neq_but_probe_eq > 0
    else:
        assert bit_neq_but_probe_eq == 0
