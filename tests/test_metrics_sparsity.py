"""Sparsity and ULP distances (gatesim.metrics.sparsity) against independent references.

References: bit comparisons in numpy on uint views; value order from sorting every bit
pattern of a format by its value (ml_dtypes / numpy decoding); the probe and atol formulas
evaluated in numpy float64. Both implementations (the one-pass numba kernel used for CPU
tensors and the chunked torch path used for CUDA) are checked, and against each other.
"""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gatesim
import gatesim.metrics as gm
from gatesim.metrics.sparsity import RULES
from gatesim.testing import float32_arrays

# dtype -> (bit width, uint dtype, ml_dtypes / numpy value dtype)
FORMATS = {
    torch.float32: (32, np.uint32, np.float32),
    torch.bfloat16: (16, np.uint16, ml_dtypes.bfloat16),
    torch.float16: (16, np.uint16, np.float16),
    torch.float8_e4m3fn: (8, np.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (8, np.uint8, ml_dtypes.float8_e5m2),
}
_SIGNED = {32: torch.int32, 16: torch.int16, 8: torch.uint8}
_NP_SIGNED = {32: np.int32, 16: np.int16, 8: np.uint8}


def from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    w, ut, _ = FORMATS[dtype]
    b = np.ascontiguousarray(bits, dtype=ut).view(_NP_SIGNED[w])
    return torch.from_numpy(b.copy()).view(dtype)


def values(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    w, ut, vt = FORMATS[dtype]
    with np.errstate(invalid="ignore"):
        return np.ascontiguousarray(bits, dtype=ut).view(vt).astype(np.float64)


def ref_bitwise_equal(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    va, vb = values(a, dtype), values(b, dtype)
    nan = np.isnan(va) | np.isnan(vb)
    w = FORMATS[dtype][0]
    mag = (1 << (w - 1)) - 1
    zero = ((a & mag) == 0) & ((b & mag) == 0)
    return ((a == b) | zero) & ~nan


@st.composite
def bit_pairs(draw, dtype):
    """Two bit-pattern arrays, uniform over all patterns, with a share of equal entries
    and of +0/-0 pairs."""
    w, ut, _ = FORMATS[dtype]
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << w, n, dtype=np.uint64).astype(ut)
    b = rng.integers(0, 1 << w, n, dtype=np.uint64).astype(ut)
    same = rng.random(n) < draw(st.floats(0, 1))
    b[same] = a[same]
    zeros = rng.random(n) < 0.05
    a[zeros] = 0
    b[zeros] = ut(1 << (w - 1))
    near = rng.random(n) < 0.3
    b[near] = (a[near].astype(np.int64) + rng.integers(-3, 4, int(near.sum()))).astype(ut)
    return a, b


@pytest.mark.parametrize("dtype", list(FORMATS))
@given(data=st.data())
def test_bitwise_matches_numpy(dtype, data):
    a, b = data.draw(bit_pairs(dtype))
    w0, w1 = from_bits(a, dtype), from_bits(b, dtype)
    want = ref_bitwise_equal(a, b, dtype)
    r = gm.sparsity(w0, w1)                                   # numba (CPU default)
    assert gm.sparsity(w0, w1, chunk=97, backend="torch") == r
    np.testing.assert_array_equal(gm.update_mask(w0, w1, backend="torch").numpy(), ~want)
    assert r.counts["bitwise"] == int(want.sum())
    assert r.bitwise == want.mean()
    assert r.ulp_hist[0] == int(want.sum())        # distance 0 <=> bitwise equal
    np.testing.assert_array_equal(gm.update_mask(w0, w1).numpy(), ~want)
    va, vb = values(a, dtype), values(b, dtype)
    assert r.nan_pairs == int((np.isnan(va) | np.isnan(vb)).sum())


@pytest.mark.parametrize("dtype", list(FORMATS))
@given(data=st.data())
def test_relative_and_atol_match_numpy(dtype, data):
    a, b = data.draw(bit_pairs(dtype))
    eta = data.draw(st.sampled_from([1e-3, 2.0 ** -8, 1e-2, 0.5]))
    atols = data.draw(st.lists(st.sampled_from([0.0, 1e-6, 1e-5, 1e-3, 1.0]), max_size=3,
                               unique=True))
    w0, w1 = from_bits(a, dtype), from_bits(b, dtype)
    va, vb = values(a, dtype), values(b, dtype)
    with np.errstate(invalid="ignore"):
        d = np.abs(vb - va)
        same = va == vb
        fin = np.isfinite(va) & np.isfinite(vb)
        rel = same | (fin & (d <= eta * np.maximum(np.abs(va), np.abs(vb))))
        for backend in ("numba", "torch"):
            r = gm.sparsity(w0, w1, eta=eta, atol=atols, backend=backend)
            assert r.counts["relative"] == int(rel.sum())
            for t in atols:
                assert r.counts[f"atol={t:g}"] == int((same | (d <= t)).sum())
            np.testing.assert_array_equal(
                gm.update_mask(w0, w1, "relative", eta=eta, backend=backend).numpy(), ~rel)
            if atols:
                np.testing.assert_array_equal(
                    gm.update_mask(w0, w1, "atol", atol=atols[0], backend=backend).numpy(),
                    ~(same | (d <= atols[0])))


@given(x=float32_arrays(min_size=1, max_size=200),
       scale=st.sampled_from([0.0, 1e-9, 1e-6, 1e-3, 1.0]),
       share=st.floats(0, 1), seed=st.integers(0, 2 ** 32 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       atol=st.sampled_from([0.0, 1e-7, 1e-5, 1e-2]))
def test_atol_and_relative_never_below_bitwise(x, scale, share, seed, dtype, atol):
    """Every bitwise-equal pair is equal under the probe and under any atol >= 0, so both
    sparsities are >= the bitwise one (Mukherjee et al.'s atol over-reports, never under)."""
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(x)
    upd = torch.from_numpy((rng.standard_normal(x.size) * scale).astype(np.float32))
    upd[torch.from_numpy(rng.random(x.size) > share)] = 0
    w1 = gatesim.to_dtype(w0 + upd, dtype) if dtype != torch.float32 else w0 + upd
    w0 = gatesim.to_dtype(w0, dtype) if dtype != torch.float32 else w0
    r = gm.sparsity(w0, w1, atol=[atol])
    assert r.atol[atol] >= r.bitwise
    assert r.relative >= r.bitwise
    changed = gm.update_mask(w0, w1)
    assert not (gm.update_mask(w0, w1, "atol", atol=atol) & ~changed).any()
    assert not (gm.update_mask(w0, w1, "relative") & ~changed).any()


def _value_rank(dtype) -> np.ndarray:
    """Rank of every bit pattern in the sorted list of distinct values (+0 and -0 one
    value); -1 for NaN. Independent of gatesim's sign-magnitude keys."""
    w, ut, _ = FORMATS[dtype]
    bits = np.arange(1 << w, dtype=np.uint64).astype(ut)
    v = values(bits, dtype)
    ok = ~np.isnan(v)
    distinct = np.unique(v[ok])               # -0.0 == 0.0: one entry
    rank = np.full(bits.size, -1, dtype=np.int64)
    rank[ok] = np.searchsorted(distinct, v[ok])
    return rank


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_ulp_distance_is_value_rank_difference(dtype):
    w = FORMATS[dtype][0]
    rank = _value_rank(dtype)
    rng = np.random.default_rng(1)
    n = 1 << w
    a = np.concatenate([np.arange(n), rng.integers(0, n, 100_000)]) if w == 8 else \
        rng.integers(0, n, 200_000)
    b = rng.integers(0, n, a.size)
    b[: a.size // 2] = (a[: a.size // 2] + rng.integers(-5, 6, a.size // 2)) % n
    ut = FORMATS[dtype][1]
    a, b = a.astype(ut), b.astype(ut)
    got = gm.ulp_distance(from_bits(a, dtype), from_bits(b, dtype)).numpy()
    ra, rb = rank[a.astype(np.int64)], rank[b.astype(np.int64)]
    want = np.where((ra < 0) | (rb < 0), -1, np.abs(ra - rb))
    np.testing.assert_array_equal(got, want)
    if w == 8:   # all 256 x 256 pairs of the 8-bit formats
        A, B = np.repeat(np.arange(n), n).astype(ut), np.tile(np.arange(n), n).astype(ut)
        got = gm.ulp_distance(from_bits(A, dtype), from_bits(B, dtype)).numpy()
        ra, rb = rank[A.astype(np.int64)], rank[B.astype(np.int64)]
        np.testing.assert_array_equal(got, np.where((ra < 0) | (rb < 0), -1,
                                                    np.abs(ra - rb)))


@given(x=float32_arrays(min_size=3, max_size=3, allow_nan=False))
def test_fp32_ulp_distance_is_a_metric_on_the_value_order(x):
    """fp32 has too many patterns to rank; check the defining properties instead:
    one step to np.nextafter, additivity along the value order, +0 == -0."""
    a, b, c = np.sort(x.astype(np.float32))
    t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    d = lambda u, v: int(gm.ulp_distance(t(u), t(v)))  # noqa: E731
    assert d(a, c) == d(a, b) + d(b, c)
    if a != np.inf:
        assert d(a, np.nextafter(a, np.float32(np.inf))) == 1
    assert d(0.0, -0.0) == 0
    tiny = np.float32(2.0 ** -149)
    assert d(tiny, -tiny) == 2


def test_ulp_histogram_bins_and_labels():
    """Pairs at chosen distances land in bin 0 for d = 0 and bin (d-1).bit_length() + 1
    otherwise: 0 | 1 | 2 | 3-4 | 5-8 | ... (written independently of the code)."""
    dists = [0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 1000, 2 ** 20, 2 ** 22 + 1]
    base = np.uint32(0x3F800000)                                   # 1.0f
    a = np.full(len(dists), base, np.uint32)
    b = (a.astype(np.int64) + np.array(dists)).astype(np.uint32)   # same sign, up
    w0, w1 = from_bits(a, torch.float32), from_bits(b, torch.float32)
    h = gm.ulp_histogram(w0, w1)
    assert gm.sparsity(w0, w1, backend="torch").ulp_hist == list(h.values())[:-1]
    labels = gm.ulp_bin_labels(32)
    assert labels[:6] == ("0", "1", "2", "3-4", "5-8", "9-16")
    assert len(labels) == 34 and labels[-1] == f"{2 ** 31 + 1}-{2 ** 32}"
    want = {lab: 0 for lab in labels}
    for d in dists:
        want[labels[0 if d == 0 else (d - 1).bit_length() + 1]] += 1
    want["nan"] = 0
    assert h == want
    assert gm.ulp_bin_edges(8) == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def test_specials():
    """+0/-0 equal under every rule; NaN never, not even with the same bits; inf == inf."""
    inf, nan = float("inf"), float("nan")
    w0 = torch.tensor([0.0, -0.0, nan, inf, -inf, inf, 1.0, 6.0e4], dtype=torch.float32)
    w1 = torch.tensor([-0.0, 0.0, nan, inf, -inf, -inf, inf, inf], dtype=torch.float32)
    w1[2] = w0[2]                                  # same NaN bits
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a, b = w0.to(dt), w1.to(dt)
        for rule in ("bitwise", "relative", "atol"):
            got = gm.update_mask(a, b, rule).tolist()
            assert got == [False, False, True, False, False, True, True, True], (dt, rule)
        r = gm.sparsity(a, b)
        assert r.nan_pairs == 1 and r.inf_pairs == 5


def test_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, 257, generator=g).to(torch.bfloat16)
    w1 = (w0.float() + 1e-2 * torch.randn(300, 257, generator=g)
          * (torch.rand(300, 257, generator=g) < 0.3)).to(torch.bfloat16)
    ref = gm.sparsity(w0, w1, atol=[1e-5, 1e-3])
    for chunk in (1000, 4096, 10 ** 9):
        assert gm.sparsity(w0, w1, atol=[1e-5, 1e-3], chunk=chunk, backend="torch") == ref
    assert gm.sparsity(w0[:2], w1[:2], chunk=1, backend="torch") == gm.sparsity(w0[:2], w1[:2])
    for rule in RULES:
        assert torch.equal(gm.update_mask(w0, w1, rule, chunk=1001, backend="torch"),
                           gm.update_mask(w0, w1, rule))
    # non-contiguous input: a transposed view
    assert gm.sparsity(w0.T, w1.T) == gm.sparsity(w0.T.contiguous(), w1.T.contiguous())
    assert ref.counts["bitwise"] + sum(ref.ulp_hist[1:]) == ref.n
    d = gm.ulp_distance(w0, w1)
    assert ref.ulp_hist[1] == int((d == 1).sum()) and ref.ulp_hist[0] == int((d == 0).sum())


def test_to_dict_is_flat_and_plain():
    w0 = torch.randn(50, 40)
    r = gm.sparsity(w0, w0 * 1.0001, atol=[1e-5, 1e-4])
    d = r.to_dict()
    assert d["sparsity_bitwise"] == r.bitwise and d["update_density"] == 1 - r.bitwise
    assert "sparsity_atol=0.0001" in d and "ulp_0" in d and d["numel"] == 2000
    assert all(isinstance(v, (int, float)) for v in d.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    for dtype in FORMATS:
        w = FORMATS[dtype][0]
        a = rng.integers(0, 1 << w, 100_000, dtype=np.uint64).astype(FORMATS[dtype][1])
        b = a.copy()
        b[::3] = rng.integers(0, 1 << w, b[::3].size, dtype=np.uint64)
        w0, w1 = from_bits(a, dtype), from_bits(b, dtype)
        cpu = gm.sparsity(w0, w1, atol=[1e-5, 1e-2])
        gpu = gm.sparsity(w0.cuda(), w1.cuda(), atol=[1e-5, 1e-2], chunk=7777)
        assert cpu == gpu
        assert torch.equal(gm.update_mask(w0.cuda(), w1.cuda(), "relative").cpu(),
                           gm.update_mask(w0, w1, "relative"))
