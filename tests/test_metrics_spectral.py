"""Spectral metrics (gatesim.metrics.spectral) against scipy/numpy and perturbation theory.

References are independent: numpy's LAPACK (OpenBLAS) SVDs, ``scipy.linalg.subspace_angles``
and the formulas of docs/metrics.md written out in numpy. Property tests check the bounds every
update must satisfy (docs/metrics.md, "Bounds"): Weyl, Mirsky and Wedin, on gatesim's own
singular values and angles.

Tolerances: float64 SVDs are backward stable, so singular values carry absolute errors of
a small multiple of ``eps * sigma_1`` (eps = 2.2e-16); the bounds are checked with slack
``TOL = 1e-12 * (||W||_2 + ||D||_2)`` (a few thousand eps for these sizes). Subspaces
from two different LAPACKs differ by about ``eps * sigma_1 / gap_k`` radians, which sets
the angle tolerance.

Wedin: docs/metrics.md states ``sin(theta_max) <= ||D||_2 / gamma_k`` with
``gamma_k = sigma_k - sigma_{k+1}`` of W0. That is the first-order form and it is *false*
for updates comparable to the gap (``test_science_wedin_form_counterexample``: W0 =
diag(1, 0.6), D = diag(-0.21, 0.21) swaps the top singular vector, sin = 1 > 0.21/0.4).
The theorem (Wedin 1972; Stewart & Sun, Thm V.4.4) holds with
``delta = sigma_k(W1) - sigma_{k+1}(W0) > 0``: ``sin(theta_max) <= ||D||_2 / delta``; by
Weyl ``delta >= gamma_k - ||D||_2``, so also ``sin(theta_max) <= ||D||_2 / (gamma_k -
||D||_2)`` when ``||D||_2 < gamma_k``. Both forms are tested.
"""
import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gatesim.metrics as gm
from gatesim.weights import load_matrix

MINILM = ["encoder.layer.0.attention.self.query.weight",
          "encoder.layer.3.attention.output.dense.weight",
          "encoder.layer.0.intermediate.dense.weight",
          "encoder.layer.5.output.dense.weight"]
EPS = np.finfo(np.float64).eps


pytestmark = pytest.mark.usefixtures("one_lapack_thread")  # see conftest.py


def update(W0: torch.Tensor, scale: float, density: float, seed: int) -> torch.Tensor:
    """W0 plus a sparse Gaussian update of relative size ``scale`` (fp32)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(W0.shape, generator=g) * scale * W0.std()
    D *= torch.rand(W0.shape, generator=g) < density
    return W0 + D


def pairs():
    """(label, W0, W1) on random and real MiniLM matrices."""
    g = torch.Generator().manual_seed(0)
    out = [("gauss-60x40", torch.randn(60, 40, generator=g), 1e-2),
           ("gauss-50x90", torch.randn(50, 90, generator=g), 1e-1)]
    out += [(name.split(".", 2)[-1], load_matrix(name), 1e-3) for name in MINILM]
    return [(lab, W0, update(W0, s, 0.3, i)) for i, (lab, W0, s) in enumerate(out)]


PAIRS = pairs()
IDS = [p[0] for p in PAIRS]


_NP_SVD: dict = {}


def np_svd(W: torch.Tensor):
    """numpy's SVD of a module-level matrix, computed once per matrix."""
    key = id(W)
    if key not in _NP_SVD:
        _NP_SVD[key] = (W, np.linalg.svd(W.double().numpy(), full_matrices=False))
    return _NP_SVD[key][1]


@pytest.mark.parametrize("label,W0,W1", PAIRS, ids=IDS)
def test_nss_energy_ranks_vs_numpy(label, W0, W1):
    k = 8
    U0, s0, V0h = np_svd(W0)
    s1 = np_svd(W1)[1]
    want_nss = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    assert gm.nss(W0, W1) == pytest.approx(want_nss, rel=1e-7)
    D = (W1.double() - W0.double()).numpy()
    want_e = np.linalg.norm(U0[:, :k].T @ D @ V0h[:k].T) ** 2 / np.linalg.norm(D) ** 2
    e = gm.update_energy(W0, W1, k)
    assert e.value == pytest.approx(want_e, rel=1e-8)
    assert e.baseline == (k / W0.shape[0]) * (k / W0.shape[1])
    sd = np.linalg.svd(D, compute_uv=False)
    p = sd / sd.sum()
    p = p[p > 0]
    Dt = torch.from_numpy(D)
    assert gm.effective_rank(Dt) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert gm.stable_rank(Dt) == pytest.approx((sd ** 2).sum() / sd[0] ** 2, rel=1e-10)
    r = gm.spectral(W0, W1, k)
    assert r.nss == pytest.approx(want_nss, rel=1e-7)
    assert r.energy.value == pytest.approx(want_e, rel=1e-8)
    assert r.update_norm2 == pytest.approx(sd[0], rel=1e-12)
    assert r.update_normF == pytest.approx(np.linalg.norm(D), rel=1e-12)
    assert r.gap_k == pytest.approx(s0[k - 1] - s0[k], rel=1e-9, abs=1e-12 * s0[0])


@pytest.mark.parametrize("label,W0,W1", PAIRS, ids=IDS)
@pytest.mark.parametrize("k", [1, 8, 32])
def test_principal_angles_vs_scipy(label, W0, W1, k):
    U0, s0, V0h = np_svd(W0)
    U1, s1, V1h = np_svd(W1)
    a = gm.principal_angles(W0, W1, k)
    assert a.k == k and a.left.numel() == k and a.right.numel() == k
    want_l = np.sort(np.rad2deg(sl.subspace_angles(U0[:, :k], U1[:, :k])))
    want_r = np.sort(np.rad2deg(sl.subspace_angles(V0h[:k].T, V1h[:k].T)))
    gap = min(s0[k - 1] - s0[k], s1[k - 1] - s1[k])
    tol = np.rad2deg(1e3 * EPS * s0[0] / gap) + 1e-9
    tol += 2e-6   # scipy's own floor for small angles (see the next test)
    np.testing.assert_allclose(a.left.numpy(), want_l, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(a.right.numpy(), want_r, rtol=1e-6, atol=tol)
    assert a.left_max == a.left.max() and a.right_max == a.right.max()
    assert np.all(np.diff(a.left.numpy()) >= 0)


@given(m=st.integers(2, 40), k=st.integers(1, 40), seed=st.integers(0, 2 ** 32 - 1),
       log_t=st.floats(-9, 0.2))
def test_subspace_angles_vs_scipy_same_bases(m, k, seed, log_t):
    """On identical orthonormal bases gatesim's angles match scipy's. Tolerance 2e-6
    degrees: scipy.linalg.subspace_angles (1.17) chooses arcsin or arccos per angle with a
    mask computed in the opposite order to the angles, so when the subspaces also have an
    angle above 45 degrees its small angles come from arccos, good to only ~2e-8 rad
    (the next test uses an exact construction instead)."""
    k = min(k, m)
    rng = np.random.default_rng(seed)
    Q0 = np.linalg.qr(rng.standard_normal((m, k)))[0]
    Q1 = np.linalg.qr(Q0 + 10 ** log_t * rng.standard_normal((m, k)))[0]
    got = gm.subspace_angles(torch.from_numpy(Q0), torch.from_numpy(Q1)).numpy()
    want = np.sort(np.rad2deg(sl.subspace_angles(Q0, Q1)))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=2e-6)


@given(m=st.integers(2, 30), k=st.integers(1, 15), seed=st.integers(0, 2 ** 32 - 1),
       log_theta=st.lists(st.floats(-12, math.log10(math.pi / 2)), min_size=15,
                          max_size=15))
def test_subspace_angles_exact_construction(m, k, seed, log_theta):
    """Bases with known angles: Q0 = R[:, :k], Q1 = R[:, :k] cos(t) + R[:, k:2k] sin(t)
    (R random orthogonal) have principal angles exactly t. gatesim recovers angles from
    1e-12 rad to 90 degrees to ~1e-13 rad (arccos alone would return 0 below ~1e-8 rad)."""
    k = max(1, min(k, m // 2))
    rng = np.random.default_rng(seed)
    R = np.linalg.qr(rng.standard_normal((m, m)))[0]
    t = np.sort(10.0 ** np.array(log_theta[:k]))
    Q0 = R[:, :k]
    Q1 = R[:, :k] * np.cos(t) + R[:, k:2 * k] * np.sin(t)
    got = np.deg2rad(gm.subspace_angles(torch.from_numpy(Q0), torch.from_numpy(Q1)).numpy())
    np.testing.assert_allclose(got, t, rtol=1e-9, atol=1e-13)


@st.composite
def perturbed(draw):
    """A matrix W (Gaussian, low rank plus noise, or with repeated singular values) and an
    update D of any relative size from 1e-8 to 3."""
    m, n = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["gauss", "lowrank", "repeated"]))
    r = min(m, n)
    if kind == "gauss":
        W = rng.standard_normal((m, n))
    else:
        U = np.linalg.qr(rng.standard_normal((m, r)))[0]
        V = np.linalg.qr(rng.standard_normal((n, r)))[0]
        s = np.sort(rng.uniform(0, 3, r))[::-1]
        if kind == "lowrank":
            s[draw(st.integers(1, r)):] = 0
        else:
            s = np.repeat(s[: (r + 1) // 2], 2)[:r]
        W = (U * s) @ V.T + (rng.standard_normal((m, n)) * 1e-9 if kind == "lowrank" else 0)
    D = rng.standard_normal((m, n)) * 10 ** draw(st.floats(-8, 0.5))
    if draw(st.booleans()):
        D *= rng.random((m, n)) < 0.3
    k = draw(st.integers(1, r - 1)) if r > 1 else 1
    return torch.from_numpy(W), torch.from_numpy(D), k


def _tol(W, D) -> float:
    return 1e-12 * (float(gm.singular_values(W)[0]) + float(gm.singular_values(D)[0]) + 1e-300)


@given(perturbed())
def test_weyl_and_mirsky(case):
    """Weyl: |sigma_i(W+D) - sigma_i(W)| <= ||D||_2 for all i; Mirsky:
    sum_i (sigma_i(W+D) - sigma_i(W))^2 <= ||D||_F^2 (gatesim's singular values)."""
    W, D, _ = case
    s0, s1 = gm.singular_values(W), gm.singular_values(W + D)
    d2 = float(gm.singular_values(D)[0])
    tol = _tol(W, D)
    assert float((s1 - s0).abs().max()) <= d2 + tol
    assert float((s1 - s0).square().sum()) <= float(D.square().sum()) + tol * (d2 + tol)
    if float(s0.norm()) > 0:   # Mirsky, normalized: NSS <= ||D||_F / ||W||_F
        assert gm.nss(W, W + D) <= (float(D.norm()) + tol) / float(s0.norm())


@given(perturbed())
def test_wedin(case):
    """sin(theta_max) <= ||D||_2 / delta, delta = sigma_k(W1) - sigma_{k+1}(W0) > 0, for the
    left and the right top-k subspaces; and the gamma_k - ||D||_2 corollary."""
    W, D, k = case
    W1 = W + D
    s0, s1 = gm.singular_values(W), gm.singular_values(W1)
    d2 = float(gm.singular_values(D)[0])
    tol = _tol(W, D)
    delta = float(s1[k - 1] - s0[k])
    assume(delta > 1e-6 * float(s0[0]))   # well-defined top-k subspaces
    gamma0 = float(s0[k - 1] - s0[k])
    assume(gamma0 > 1e-6 * float(s0[0]))
    a = gm.principal_angles(W, W1, k)
    sin_max = math.sin(math.radians(max(a.left_max, a.right_max)))
    # float slack: the computed subspaces of W and W1 carry ~eps*sigma_1/gap of error each
    slack = 1e3 * EPS * float(s0[0]) * (1 / gamma0 + 1 / delta) + tol / delta
    assert sin_max <= d2 / delta + slack
    if d2 < gamma0:
        assert sin_max <= d2 / (gamma0 - d2) + slack
    r = gm.spectral(W, W1, k)
    assert r.wedin_bound == pytest.approx(d2 / delta, rel=1e-9)


def test_science_wedin_form_counterexample():
    """The first-order form sin(theta_max) <= ||D||_2 / gamma_k fails here; the theorem's
    form with delta = sigma_k(W1) - sigma_{k+1}(W0) holds (with equality)."""
    W = torch.diag(torch.tensor([1.0, 0.6], dtype=torch.float64))
    D = torch.diag(torch.tensor([-0.21, 0.21], dtype=torch.float64))
    a = gm.principal_angles(W, W + D, 1)
    sin_max = math.sin(math.radians(a.left_max))
    assert a.left_max == pytest.approx(90.0) and a.right_max == pytest.approx(90.0)
    assert sin_max > 0.21 / 0.4                         # the first-order form fails
    assert sin_max <= gm.spectral(W, W + D, 1).wedin_bound + 1e-12   # 0.21 / 0.21


def test_zero_update_and_identical_matrices():
    W = load_matrix(MINILM[0])
    r = gm.spectral(W, W.clone(), 4)
    assert r.nss == 0.0 and r.angles.left_max < 1e-6 and r.angles.right_max < 1e-6
    assert math.isnan(r.energy.value) and math.isnan(r.update_erank)
    assert math.isnan(r.update_srank) and r.update_norm2 == 0.0
    D = torch.zeros(5, 4)
    assert math.isnan(gm.effective_rank(D)) and math.isnan(gm.stable_rank(D))
    assert gm.effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert gm.stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.25)


def test_k_equals_min_dim():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    W1 = W0 + 0.1 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    a = gm.principal_angles(W0, W1, 5)
    assert a.right_max < 1e-6             # V_5 spans all of R^5 for both
    want = np.sort(np.rad2deg(sl.subspace_angles(np.linalg.svd(W0.numpy())[0][:, :5],
                                                 np.linalg.svd(W1.numpy())[0][:, :5])))
    np.testing.assert_allclose(a.left.numpy(), want, atol=1e-9)
    assert math.isnan(gm.spectral(W0, W1, 5).gap_k)
