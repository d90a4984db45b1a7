"""The SVD engine (gatesim.metrics.svd): exactness, caching, the randomized guard and its
justification on real MiniLM matrices."""
import gc
import statistics

import numpy as np
import pytest
import torch

import gatesim.metrics as gm
from gatesim.metrics.svd import SVDCache
from gatesim.weights import load_matrix

# 8 real matrices: attention (384x384), FFN in (1536x384) and out (384x1536), 4 layers
RAND_MATRICES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.1.attention.self.key.weight",
    "encoder.layer.2.attention.self.value.weight",
    "encoder.layer.3.attention.output.dense.weight",
    "encoder.layer.4.intermediate.dense.weight",
    "encoder.layer.5.intermediate.dense.weight",
    "encoder.layer.1.output.dense.weight",
    "encoder.layer.3.output.dense.weight",
]


pytestmark = pytest.mark.usefixtures("one_lapack_thread")  # see conftest.py


def test_exact_svd_reconstructs_and_is_orthonormal():
    W = load_matrix("encoder.layer.0.intermediate.dense.weight")
    s = gm.base_svd(W, cache=False)
    assert s.method == "exact" and s.full_spectrum and s.kept == 384
    A = W.double()
    assert torch.linalg.matrix_norm(A - (s.U * s.S) @ s.Vh) <= 1e-13 * torch.linalg.matrix_norm(A)
    eye = torch.eye(384, dtype=torch.float64)
    assert torch.allclose(s.U.T @ s.U, eye, atol=1e-13)
    assert torch.allclose(s.Vh @ s.Vh.T, eye, atol=1e-13)
    want = np.linalg.svd(A.numpy(), compute_uv=False)
    np.testing.assert_allclose(s.S.numpy(), want, rtol=0, atol=1e-13 * want[0])
    sc = gm.base_svd(W, backend="scipy", cache=False)
    assert sc.backend == "scipy"
    np.testing.assert_allclose(sc.S.numpy(), want, rtol=0, atol=1e-13 * want[0])
    np.testing.assert_allclose(gm.singular_values(W).numpy(), want, rtol=0, atol=1e-13 * want[0])
    R = s.reconstruct(10)
    assert torch.linalg.matrix_rank(R) == 10


def test_cache_identity_version_settings_and_eviction():
    cache = SVDCache(maxsize=2)
    W = torch.randn(30, 20, dtype=torch.float64)
    a = gm.base_svd(W, cache=cache)
    assert gm.base_svd(W, cache=cache) is a and cache.hits == 1
    assert gm.base_svd(W, cache=cache, keep=5) is a            # keeps more than needed
    W2 = W.clone()                                             # equal values, new tensor
    assert gm.base_svd(W2, cache=cache) is not a
    W.mul_(2.0)                                                # in-place change
    b = gm.base_svd(W, cache=cache)
    assert b is not a and torch.allclose(b.S, 2 * a.S)
    r = gm.base_svd(W, method="randomized", k=3, cache=cache)
    assert r is not b and r.method == "randomized"
    assert len(cache) == 2                                     # LRU bound
    del W, W2, a, b, r
    gc.collect()
    assert len(cache) == 0                                     # entries die with tensors
    # keep: a cached truncated result is recomputed when more vectors are asked for
    V = torch.randn(30, 20, dtype=torch.float64)
    t = gm.base_svd(V, cache=cache, keep=3)
    assert t.kept == 3 and t.full_spectrum
    full = gm.base_svd(V, cache=cache)
    assert full is not t and full.kept == 20
    with pytest.raises(ValueError, match="keeps only 3"):
        t.top(4)


def test_metrics_reuse_the_cached_svd():
    gm.clear_svd_cache()
    W0 = torch.randn(40, 30, dtype=torch.float64)
    W1 = W0 + 1e-3 * torch.randn(40, 30, dtype=torch.float64)
    gm.principal_angles(W0, W1, 5)
    misses = gm.DEFAULT_CACHE.misses
    gm.update_energy(W0, W1, 5)
    gm.principal_mask(W0, 5, 0.1)
    gm.principal_angles(W0, W1, 7)
    assert gm.DEFAULT_CACHE.misses == misses
    assert gm.singular_values(W0) is gm.base_svd(W0).S


def test_randomized_guard():
    W = torch.randn(100, 80, dtype=torch.float64)
    s = gm.base_svd(W, method="randomized", k=10, cache=False)
    assert (s.q, s.niter) == (20, 8)                           # defaults: q = 2k, niter = 8
    with pytest.raises(ValueError, match=r"q=19 < 2k=20"):
        gm.base_svd(W, method="randomized", k=10, q=19, cache=False)
    with pytest.raises(ValueError, match=r"niter=7 < 8"):
        gm.base_svd(W, method="randomized", k=10, niter=7, cache=False)
    loose = gm.base_svd(W, method="randomized", k=10, q=20 - 10 + 10, niter=2, unsafe=True,
                        cache=False)
    assert loose.niter == 2
    with pytest.raises(ValueError, match="q=81 exceeds"):
        gm.base_svd(W, method="randomized", k=10, q=81, unsafe=True, cache=False)
    with pytest.raises(ValueError, match="needs k"):
        gm.base_svd(W, method="randomized", cache=False)
    with pytest.raises(ValueError, match="q=5 is below k=10"):
        gm.base_svd(W, method="randomized", k=10, q=5, unsafe=True, cache=False)
    with pytest.raises(ValueError, match="method"):
        gm.base_svd(W, method="lanczos", cache=False)


def test_randomized_error_estimates():
    """On an exactly rank-r matrix with q >= r the sketch captures everything (errors at
    rounding level); on a full-rank matrix both estimates are reported and positive, and
    the sketch error equals ||A - U_q S_q V_q^T||_F / ||A||_F."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, 150, generator=g, dtype=torch.float64)
    s = gm.base_svd(A, method="randomized", k=6, cache=False)
    assert s.sketch_error < 1e-6 and s.residual < 1e-12
    B = torch.randn(200, 150, generator=g, dtype=torch.float64)
    r = gm.base_svd(B, method="randomized", k=6, cache=False)
    approx = (r.U * r.S) @ r.Vh
    want = float(torch.linalg.matrix_norm(B - approx) / torch.linalg.matrix_norm(B))
    assert r.sketch_error == pytest.approx(want, rel=1e-6)
    U, S, Vh = r.top(6)
    res = torch.linalg.vector_norm(B @ Vh.T - U * S, dim=0).max() / r.S[0]
    assert r.residual == pytest.approx(float(res), rel=1e-9) and r.residual > 0
    d = r.to_dict()
    assert d["svd_sketch_error"] == r.sketch_error and d["svd_q"] == 12


def test_randomized_is_deterministic_per_seed():
    W = torch.randn(60, 50, dtype=torch.float64)
    a = gm.base_svd(W, method="randomized", k=5, seed=3, cache=False)
    b = gm.base_svd(W, method="randomized", k=5, seed=3, cache=False)
    c = gm.base_svd(W, method="randomized", k=5, seed=4, cache=False)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    assert not torch.equal(a.U, c.U)


def test_randomized_principal_masks_on_minilm():
    """docs/metrics.md, "SVD engine". On 8 real MiniLM matrices (384x384, 1536x384,
    384x1536) at k = 64 (1/6 of the smaller dimension) and alpha = 0.05 and 0.1, the
    principal-weight mask from a randomized SVD agrees with the exact one
    (|M_rand & M_exact| / |M_exact|) at a median >= 0.98 with the enforced settings
    (q = 2k, niter = 8), while the loose settings (q = k + 10, niter = 2) stay below 0.98
    (measured over all 36 encoder matrices: enforced median 0.9996, min 0.989; loose median
    0.72, max 0.83). The guard is necessary, not sufficient: at k = 16 the enforced settings
    reach only a median of 0.971 (README, "Metrics"), and the reported residual says so.
    """
    k = 64
    agree = {(lab, a): [] for lab in ("enforced", "loose") for a in (0.05, 0.1)}
    resid = {"enforced": [], "loose": []}
    for name in RAND_MATRICES:
        W = load_matrix(name)
        exact = gm.base_svd(W, cache=False)
        runs = {"enforced": gm.base_svd(W, method="randomized", k=k, cache=False),
                "loose": gm.base_svd(W, method="randomized", k=k, q=k + 10, niter=2,
                                     unsafe=True, cache=False)}
        for lab, r in runs.items():
            resid[lab].append(r.residual)
            for a in (0.05, 0.1):
                me = gm.principal_mask(W, k, a, svd0=exact)
                mr = gm.principal_mask(W, k, a, svd0=r)
                agree[lab, a].append(int((me & mr).sum()) / int(me.sum()))
    for a in (0.05, 0.1):
        assert statistics.median(agree["enforced", a]) >= 0.98, agree["enforced", a]
        assert statistics.median(agree["loose", a]) < 0.98, agree["loose", a]
    # the error estimate tells the two apart
    assert statistics.median(resid["loose"]) > 3 * statistics.median(resid["enforced"])
