"""Masks and overlaps (gatesim.metrics.masks) against numpy formulas and the null model.

References: Top/Bottom_alpha by a full ``np.lexsort`` on (score, index); principal masks
from numpy's SVD; overlaps and Jaccard as the set formulas of docs/metrics.md in numpy.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gatesim
import gatesim.metrics as gm
from gatesim.weights import load_matrix

MINILM = ["encoder.layer.0.attention.self.query.weight",
          "encoder.layer.2.attention.self.value.weight",
          "encoder.layer.0.intermediate.dense.weight"]


pytestmark = pytest.mark.usefixtures("one_lapack_thread")  # see conftest.py


def np_select(scores: np.ndarray, alpha: float, largest: bool) -> np.ndarray:
    """Exactly round-half-up(alpha * N) (at least 1) entries, by score then lower index."""
    flat = scores.ravel().astype(np.float64)
    n = flat.size
    c = max(1, min(n, int(math.floor(alpha * n + 0.5))))
    order = np.lexsort((np.arange(n), -flat if largest else flat))
    out = np.zeros(n, dtype=bool)
    out[order[:c]] = True
    return out.reshape(scores.shape)


@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       alpha=st.one_of(st.floats(1e-4, 1.0), st.sampled_from([1.0, 0.5, 0.05])),
       levels=st.integers(1, 1000), seed=st.integers(0, 2 ** 32 - 1),
       signed_zero=st.booleans())
def test_top_bottom_alpha_vs_lexsort(shape, alpha, levels, seed, signed_zero):
    """Heavy ties (few distinct levels), signed zeros: selection and tie order are exact."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, shape).astype(np.float64) / levels
    if signed_zero:
        x[rng.random(shape) < 0.3] = -0.0
    t = torch.from_numpy(x)
    top, bot = gm.top_alpha(t, alpha).numpy(), gm.bottom_alpha(t, alpha).numpy()
    np.testing.assert_array_equal(top, np_select(x, alpha, True))
    np.testing.assert_array_equal(bot, np_select(x, alpha, False))
    assert top.sum() == bot.sum() == gm.select_count(alpha, x.size)


def test_select_count_rule():
    assert gm.select_count(0.05, 100) == 5
    assert gm.select_count(0.025, 100) == 3        # 2.5 rounds half up
    assert gm.select_count(1e-9, 100) == 1         # at least one entry
    assert gm.select_count(1.0, 7) == 7


_NP_SVD: dict = {}


def _np_principal(W: torch.Tensor, k: int, alpha: float, name: str):
    if name not in _NP_SVD:        # numpy's SVD once per matrix
        _NP_SVD[name] = np.linalg.svd(W.double().numpy(), full_matrices=False)
    U, s, Vh = _NP_SVD[name]
    R = np.abs((U[:, :k] * s[:k]) @ Vh[:k])
    return np_select(R, alpha, True), R


@pytest.mark.parametrize("name", MINILM)
@pytest.mark.parametrize("k,alpha", [(1, 0.05), (16, 0.05), (64, 0.1)])
def test_principal_and_low_masks_vs_numpy(name, k, alpha):
    W = load_matrix(name)
    want, R = _np_principal(W, k, alpha, name)
    got = gm.principal_mask(W, k, alpha).numpy()
    bad = np.flatnonzero(got != want)
    if bad.size:   # only float near-ties at the threshold may differ between two LAPACKs
        thr = np.sort(R.ravel())[::-1][int(want.sum()) - 1]
        assert np.all(np.abs(R.ravel()[bad] - thr) <= 1e-12 * R.max()), bad.size
    low = gm.low_magnitude_mask(W.to(torch.bfloat16), alpha).numpy()   # many bf16 ties
    np.testing.assert_array_equal(low, np_select(np.abs(W.to(torch.bfloat16).double()
                                                        .numpy()), alpha, False))


def _bf16_update(W: torch.Tensor, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(W.shape, generator=g) * scale
    W0 = gatesim.to_dtype(W, torch.bfloat16)
    W1 = gatesim.to_dtype((W0.float() + D).contiguous(), torch.bfloat16)
    return W0, W1


@pytest.mark.parametrize("name", MINILM)
def test_overlaps_and_jaccard_vs_numpy(name):
    W = load_matrix(name)
    W0, W1 = _bf16_update(W, 2e-4, 0)
    _, W1b = _bf16_update(W, 2e-4, 1)
    U = gm.update_mask(W0, W1)
    Ub = gm.update_mask(W0, W1b)
    P = gm.principal_mask(W0, 16, 0.1)
    L = gm.low_magnitude_mask(W0, 0.1)
    u, ub, p, l = (x.numpy() for x in (U, Ub, P, L))
    n = u.size
    o = gm.overlap(U, P)
    assert o.value == (u & p).sum() / p.sum() and o.baseline == u.sum() / n
    assert o.count == (u & p).sum() and o.size == p.sum()
    assert o.ratio == pytest.approx(o.value / o.baseline)
    ol = gm.overlap(U, L)
    assert ol.value == (u & l).sum() / l.sum()
    ox = gm.overlap_excluding(U, P, L)
    assert ox.value == (u & p & ~l).sum() / (p & ~l).sum()
    assert ox.baseline == u.sum() / n
    assert ox.cond_baseline == (u & ~l).sum() / (~l).sum()
    j = gm.jaccard(U, Ub)
    pa, pb = u.sum() / n, ub.sum() / n
    assert j.value == (u & ub).sum() / (u | ub).sum()
    assert j.baseline == pytest.approx(pa * pb / (pa + pb - pa * pb), rel=1e-15)
    d = {**o.to_dict("overlap_principal"), **j.to_dict()}
    assert d["overlap_principal_baseline"] == o.baseline and d["jaccard"] == j.value


def test_empty_masks_give_nan():
    z = torch.zeros(4, 5, dtype=torch.bool)
    assert math.isnan(gm.overlap(z, z).value) and gm.overlap(z, z).baseline == 0
    assert math.isnan(gm.jaccard(z, z).value) and math.isnan(gm.jaccard(z, z).baseline)
    assert math.isnan(gm.overlap(z, z).ratio)


@st.composite
def any_mask(draw):
    """A fixed mask of any structure: random density, row/column blocks, a stripe, a
    single entry."""
    m, n = draw(st.integers(20, 200)), draw(st.integers(20, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["random", "rows", "cols", "stripe", "one"]))
    M = np.zeros((m, n), dtype=bool)
    if kind == "random":
        M = rng.random((m, n)) < draw(st.floats(0.001, 1.0))
    elif kind == "rows":
        M[: draw(st.integers(1, m))] = True
    elif kind == "cols":
        M[:, draw(st.integers(0, n - 1)):] = True
    elif kind == "stripe":
        M.ravel()[::draw(st.integers(1, 50))] = True
    else:
        M[rng.integers(m), rng.integers(n)] = True
    if not M.any():
        M[0, 0] = True
    return torch.from_numpy(M)


@given(M=any_mask(), p=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 31 - 1))
def test_random_mask_overlap_is_near_its_baseline(M, p, seed):
    """A uniformly random update mask U has E[|U & M| / |M|] = density(U) for any fixed M.
    Given |U|, |U & M| is hypergeometric with variance <= |M| p(1-p) (p the realised
    density), so a 5-sigma band fails with probability < 1e-6 per example."""
    U = gm.random_mask(M.shape, p, seed=seed)
    o = gm.overlap(U, M)
    ph = o.baseline
    assert abs(o.value - ph) <= 5 * math.sqrt(ph * (1 - ph) / o.size) + 1e-12


@pytest.mark.parametrize("p,q", [(0.3, 0.5), (0.05, 0.6), (0.9, 0.9), (0.01, 0.02)])
def test_independent_masks_jaccard_near_baseline(p, q):
    """Given the union's size Y, each union entry is in both masks with probability
    pq / (p + q - pq) independently, so J has standard deviation sqrt(J(1-J)/Y)."""
    A = gm.random_mask((500, 400), p, seed=1)
    B = gm.random_mask((500, 400), q, seed=2)
    j = gm.jaccard(A, B)
    assert abs(j.value - j.baseline) <= 5 * math.sqrt(j.baseline * (1 - j.baseline)
                                                      / j.union)
    assert j.baseline == pytest.approx(gm.jaccard_baseline(j.p, j.q))
