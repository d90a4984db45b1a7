"""All singular values and the top-``k`` singular vectors of one matrix, exactly and fast,
with a stated error bound and a fallback wherever that bound is not good enough.

One implementation for :func:`gatesim.metrics.compare` (the exact default path) and the
checkpoint diff (``gatesim.diff``, ``--svd gram``). NSS needs every singular value, and the
effective rank of the update every singular value of ``Delta``; the angles, energy and
principal mask need only the leading ``k`` triplets. A full LAPACK SVD (``gesdd``) computes
all ``min(m, n)`` vectors of both sides (11..17 s for one 1536 x 1536 float64 matrix on this
project's 2-core machines, where :func:`gram_svd` took 1.6 s). :func:`gram_svd`:

1. ``G = A^T A`` in float64 for the smaller side (``n = min(m, n)``; ``A = W`` or ``W^T``),
   accumulated over row blocks converted from the stored dtype (``dsyrk``), so no float64
   copy of the whole matrix is made;
2. Householder tridiagonalisation ``G = Q T Q^T`` (LAPACK ``dsytrd``), once;
3. all eigenvalues of ``T`` (``dstemr``, no vectors) give ``sigma_i = sqrt(max(lambda_i, 0))``;
   the top ``k`` eigenvectors of ``T`` (``dstemr``, index range, MRRR) are mapped back with
   the same reflectors (``ormqr``), giving ``V_k``;
4. ``U_k = A V_k diag(1 / sigma_k)``, again over row blocks.

:func:`gram_values` gives the singular values alone (``G``, then torch's ``eigvalsh``), for
the spectrum of the update in :func:`gatesim.metrics.compare`.

**Error bound** (:func:`value_bounds`). Forming ``G`` in float64 and the symmetric
eigensolver are backward stable, so each computed eigenvalue ``lambda_i`` of ``G`` is within
``delta = tau * sigma_1^2`` of the exact ``sigma_i^2``, with ``tau = (m + n) u`` (:func:`gram_tau`,
``u = 2^-53``; ``m`` for the sums of ``A^T A``, ``n`` for the eigensolver). Then

    |sigma_i' - sigma_i| <= max(sqrt(lambda_i + delta) - sigma_i',
                                sigma_i' - sqrt(max(lambda_i - delta, 0)))
                          ~ tau sigma_1^2 / (2 sigma_i)   (and at most sqrt(tau) sigma_1),

an absolute error that grows as ``sigma_i`` falls (squaring the matrix squares its
condition number): rounding level for the leading values, ``sqrt(tau) sigma_1`` (about
1.3e-6 sigma_1 at 4096 x 11008) for values near zero. A full ``gesdd`` has
``|sigma_i' - sigma_i| <= tau sigma_1`` for every ``i`` (same ``tau``). The errors measured in
``tests/test_metrics_gram.py`` (random, clustered, tiny, rank-deficient, all-positive; fp32 and
bf16 inputs) stayed below 1/3 of these bounds.

**Guards and fallbacks.** A quantity is taken from the Gram path only where the bound above
keeps it within :data:`RTOL` (relative); otherwise the full SVD is used for it:

* top-``k`` triplets: when ``sigma_k < 1e-4 sigma_1`` (:data:`FALLBACK_RATIO`; ``U_k = A V_k /
  sigma_k`` would lose digits) or ``W = 0``, :func:`gram_svd` returns the full SVD;
* NSS (:func:`nss_checked`, every singular value of ``W0`` and ``W1``): its error bound from
  the per-value bounds (:func:`nss_bound`) must be at most ``RTOL * NSS``; otherwise both
  spectra are taken from ``gesdd`` (values only) and NSS is then within the full SVD's bound
  ``(||e0 + e1|| + NSS ||e0||) / (||sigma(W0)|| - ||e0||)``, ``e = tau sigma_1``;
* the update's effective rank (:func:`gram_values`): when the bound on its relative error
  (Fannes-Audenaert on ``p_i = s_i / sum s``) exceeds :data:`RTOL`, the values come from
  ``gesdd``; the stable rank and ``||Delta||_2`` use ``s_1``, at rounding level.

Threads. OpenBLAS (scipy's BLAS/LAPACK) runs on one thread inside :func:`gram_svd` (the
caller's setting is restored afterwards): on the shared 2-core machines its threaded
``dsytrd`` ran 5..40x *slower* than single-threaded. Parallelism comes from running
tensors in several processes (``workers``); the torch parts use the thread count the
executor sets.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from gatesim.metrics._scratch import buffer

if TYPE_CHECKING:                       # gatesim.metrics.svd imports this module lazily
    from gatesim.metrics.svd import BaseSVD

__all__ = ["gram_svd", "gram_values", "gram_tau", "value_bounds", "nss_bound",
           "nss_checked", "erank_bound", "FALLBACK_RATIO", "RTOL", "UNIT_ROUNDOFF"]

#: ``sigma_k / sigma_1`` below which the exact full SVD is used instead.
FALLBACK_RATIO = 1e-4
#: Largest relative error bound accepted for NSS and the update's effective rank from the
#: Gram path; above it the spectra come from ``gesdd``.
RTOL = 1e-4
#: Unit roundoff of float64.
UNIT_ROUNDOFF = 2.0 ** -53
_BLOCK_ELEMS = 1 << 21          # float64 block of 16 MiB
_OPENBLAS: Optional[list] = None


def _openblas_handles() -> list:
    """(set, get) function pairs of every OpenBLAS loaded in this process (found once)."""
    global _OPENBLAS
    if _OPENBLAS is not None:
        return _OPENBLAS
    _OPENBLAS = []
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower()
                    and line.split()[-1].startswith("/")}
    except OSError:
        return _OPENBLAS
    for lib in sorted(libs):
        try:
            h = ctypes.CDLL(lib)
        except OSError:
            continue
        for pre in ("scipy_openblas", "openblas"):
            for suf in ("64_", ""):
                st = getattr(h, f"{pre}_set_num_threads{suf}", None)
                gt = getattr(h, f"{pre}_get_num_threads{suf}", None)
                if st is not None and gt is not None:
                    st.argtypes, st.restype, gt.restype = [ctypes.c_int], None, ctypes.c_int
                    _OPENBLAS.append((st, gt))
                    break
            else:
                continue
            break
    return _OPENBLAS


@contextlib.contextmanager
def _one_blas_thread():
    """OpenBLAS on one thread inside the block; the caller's setting is restored after."""
    handles = _openblas_handles()
    old = [gt() for _, gt in handles]
    for st, _ in handles:
        st(1)
    try:
        yield
    finally:
        for (st, _), n in zip(handles, old):
            st(n)


def _rows64(W: torch.Tensor, s: int, e: int, slot: str = "rows64") -> torch.Tensor:
    """Rows ``s:e`` of ``W`` as float64, in a reused buffer."""
    out = buffer(slot, (e - s, W.shape[1]), torch.float64)
    return out.copy_(W[s:e])


def _cols64(W: torch.Tensor, s: int, e: int, slot: str = "cols64") -> torch.Tensor:
    """Columns ``s:e`` of ``W`` as a contiguous float64 (m, e - s), in a reused buffer."""
    out = buffer(slot, (W.shape[0], e - s), torch.float64)
    return out.copy_(W[:, s:e])


def _gram(W: torch.Tensor) -> np.ndarray:
    """Lower triangle of ``A^T A`` (Fortran order, n x n), ``A`` the tall orientation."""
    from scipy.linalg.blas import dsyrk
    m, n = W.shape
    if m >= n:
        c = np.zeros((n, n), dtype=np.float64, order="F")
        step = max(1, _BLOCK_ELEMS // n)
        for s in range(0, m, step):
            blk = _rows64(W, s, min(m, s + step)).numpy()   # C (r, n) == F (n, r) = blk^T
            c = dsyrk(1.0, blk.T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
        return c
    c = np.zeros((m, m), dtype=np.float64, order="F")
    step = max(1, _BLOCK_ELEMS // m)
    for s in range(0, n, step):
        blk = _cols64(W, s, min(n, s + step)).numpy()       # C (m, c)
        # as Fortran (c, m) = blk^T; trans=1 gives (blk^T)^T blk^T = blk blk^T
        c = dsyrk(1.0, blk.T, beta=1.0, c=c, trans=1, lower=1, overwrite_c=1)
    return c


def _eig_topk(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (descending) and the top-k eigenvectors of the symmetric ``G``
    (lower triangle, Fortran order; overwritten)."""
    from scipy.linalg.lapack import dstemr, dsytrd
    n = G.shape[0]
    if n == 1:
        return G[0, :1].copy(), np.ones((1, 1))
    c, d, e, tau, info = dsytrd(G, lower=1, overwrite_a=1)
    if info != 0:
        raise torch.linalg.LinAlgError(f"dsytrd failed (info={info})")
    e1 = np.append(e, 0.0)
    _, w, _, info = dstemr(d.copy(), e1.copy(), 0, 0.0, 0.0, 1, n, compute_v=0)
    if info != 0:
        raise torch.linalg.LinAlgError(f"dstemr (values) failed (info={info})")
    mk, _, z, info = dstemr(d.copy(), e1.copy(), 2, 0.0, 0.0, n - k + 1, n, compute_v=1)
    if info != 0 or mk != k:
        raise torch.linalg.LinAlgError(f"dstemr (vectors) failed (info={info}, found {mk} of {k})")
    Z = torch.from_numpy(np.ascontiguousarray(z[:, :k]))
    # lower=1: Q = H(1)...H(n-1), H(i) acting on rows i+1..n with its vector below the
    # subdiagonal of column i: Q = diag(1, Q'), Q' the QR-style product of c[1:, :n-1]
    refl = torch.from_numpy(np.asfortranarray(c[1:, : n - 1]))
    Z[1:] = torch.ormqr(refl, torch.from_numpy(tau), Z[1:].clone())
    vals = np.sort(w)[::-1].copy()
    return vals, Z.flip(1).numpy()


def _apply(W: torch.Tensor, X: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``W @ X`` (or ``W^T @ X``) in float64, over blocks of W converted one at a time."""
    m, n = W.shape
    if not transpose:
        out = torch.empty(m, X.shape[1], dtype=torch.float64)
        step = max(1, _BLOCK_ELEMS // n)
        for s in range(0, m, step):
            e = min(m, s + step)
            torch.mm(_rows64(W, s, e), X, out=out[s:e])
        return out
    out = torch.empty(n, X.shape[1], dtype=torch.float64)
    step = max(1, _BLOCK_ELEMS // m)
    for s in range(0, n, step):
        e = min(n, s + step)
        torch.mm(_cols64(W, s, e).T, X, out=out[s:e])
    return out


def gram_tau(m: int, n: int) -> float:
    """``tau = (m + n) u``: the relative (to ``sigma_1^2``, resp. ``sigma_1``) error bound of
    the eigenvalues of the Gram matrix, resp. of ``gesdd``'s singular values (module
    docstring)."""
    return (m + n) * UNIT_ROUNDOFF


def value_bounds(svd) -> Optional[torch.Tensor]:
    """Per-value absolute error bounds of ``svd.S`` (float64, same length), from how the
    values were computed (``svd.values``): ``"gram"`` the Gram bound, ``"gesdd"``
    ``tau sigma_1``; None for a randomized decomposition (module docstring)."""
    S = svd.S.detach().to(torch.float64).cpu()
    if svd.values == "gram":
        return _gram_bounds(S, *svd.shape)
    if svd.values == "gesdd":
        return torch.full_like(S, gram_tau(*svd.shape) * float(S[0]) if S.numel() else 0.0)
    return None


def _gram_bounds(S: torch.Tensor, m: int, n: int) -> torch.Tensor:
    delta = gram_tau(m, n) * float(S[0]) ** 2 if S.numel() else 0.0
    lam = S * S
    hi = (lam + delta).sqrt() - S
    lo = S - (lam - delta).clamp_min(0.0).sqrt()
    return torch.maximum(hi, lo)


def nss_bound(S0: torch.Tensor, S1: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor) -> float:
    """Bound on ``|NSS' - NSS|`` from the two spectra and their per-value bounds:
    ``(||e0 + e1|| + NSS' ||e0||) / (||sigma(W0)'|| - ||e0||)`` (``inf`` when the
    denominator is not positive)."""
    r = min(S0.numel(), S1.numel())
    S0, S1, e0, e1 = S0[:r].cpu(), S1[:r].cpu(), e0[:r], e1[:r]
    den = float(torch.linalg.vector_norm(S0)) - float(torch.linalg.vector_norm(e0))
    if den <= 0:
        return math.inf
    v = float(torch.linalg.vector_norm(S1 - S0)) / float(torch.linalg.vector_norm(S0))
    return (float(torch.linalg.vector_norm(e0 + e1)) + v * float(torch.linalg.vector_norm(e0))) \
        / den


def _gesdd_values(W: torch.Tensor) -> torch.Tensor:
    from gatesim.metrics.svd import _as64, _exact_values
    return _exact_values(_as64(W), "torch").cpu()


def _with_gesdd_values(svd, W: torch.Tensor):
    return dataclasses.replace(svd, S=_gesdd_values(W).to(svd.S.device), values="gesdd")


def nss_checked(W0: torch.Tensor, W1: torch.Tensor, svd0, svd1) -> tuple:
    """``(nss, bound, svd0, svd1)``: NSS of ``W0 -> W1`` from the two exact decompositions
    and the bound on its absolute error. When a Gram spectrum leaves a bound above
    ``RTOL * nss``, both spectra are taken from ``gesdd`` (values only) and the
    decompositions returned carry them (``values="gesdd"``; vectors unchanged). Raises
    ``ValueError`` for ``W0 = 0`` (as :func:`gatesim.metrics.nss_core`)."""
    from gatesim.metrics.spectral import nss_core
    v = nss_core(svd0.S, svd1.S)
    e0, e1 = value_bounds(svd0), value_bounds(svd1)
    if e0 is None or e1 is None:
        return v, None, svd0, svd1
    b = nss_bound(svd0.S, svd1.S, e0, e1)
    if b > RTOL * v and "gram" in (svd0.values, svd1.values):
        svd0 = svd0 if svd0.values == "gesdd" else _with_gesdd_values(svd0, W0)
        svd1 = svd1 if svd1.values == "gesdd" else _with_gesdd_values(svd1, W1)
        v = nss_core(svd0.S, svd1.S)
        b = nss_bound(svd0.S, svd1.S, value_bounds(svd0), value_bounds(svd1))
    return v, b, svd0, svd1


def erank_bound(S: torch.Tensor, e: torch.Tensor) -> float:
    """Bound on the relative error of the effective rank ``exp(H(p))``, ``p = s / sum s``,
    when every ``s_i`` is within ``e_i``: with ``t = sum e / (sum s - sum e)`` (a bound on
    half the L1 distance of the two ``p``), Fannes-Audenaert gives ``|dH| <= t ln(N - 1) +
    h(t)``, and the relative error of ``exp(H)`` is at most ``exp(|dH|) - 1``."""
    tot, err = float(S.sum()), float(e.sum())
    N = S.numel()
    if tot <= 0 or N < 2:
        return 0.0 if err == 0 else math.inf
    if err >= tot:
        return math.inf
    t = err / (tot - err)
    if t >= 1 - 1 / N:
        return math.inf
    h = 0.0 if t == 0 else -t * math.log(t) - (1 - t) * math.log1p(-t)
    return math.expm1(t * math.log(N - 1) + h)


def gram_values(D: torch.Tensor) -> tuple:
    """``(values, source)``: every singular value of the finite 2-D ``D`` (float64,
    descending), from the eigenvalues of its Gram matrix (torch ``eigvalsh``), or from
    ``gesdd`` (``source="gesdd"``) when the Gram bound leaves the effective rank's relative
    error above :data:`RTOL` (module docstring)."""
    D = D.detach()
    if D.device.type != "cpu":
        return _gesdd_values(D), "gesdd"
    m, n = D.shape
    if min(m, n) < 2:
        return _gesdd_values(D), "gesdd"
    with _one_blas_thread():
        G = torch.from_numpy(_gram(D))
    lam = torch.linalg.eigvalsh(G, UPLO="L").flip(0)
    S = lam.clamp_min(0.0).sqrt()
    if float(S[0]) <= 0:
        return S, "gram"
    if erank_bound(S, _gram_bounds(S, m, n)) > RTOL:
        return _gesdd_values(D), "gesdd"
    return S, "gram"


def gram_svd(W: torch.Tensor, k: int, *, name: str = "W") -> BaseSVD:
    """Every singular value and the top-``k`` singular vectors of the finite 2-D ``W``
    (module docstring), as a :class:`gatesim.metrics.BaseSVD` with ``U`` (m x k), ``S``
    (all ``min(m, n)`` values, descending) and ``Vh`` (k x n), float64, ``method="exact"``,
    ``backend="gram"`` and ``values="gram"`` (or the full SVD, ``backend="torch"``, after a
    fallback). Usable wherever the metrics take ``svd0=``/``svd1=``; its values' error
    bounds are :func:`value_bounds`."""
    from gatesim.metrics.svd import BaseSVD, compute_svd
    t0 = time.perf_counter()
    m, n = W.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in 1..{min(m, n)} for a {m}x{n} matrix, got {k}")
    W = W.detach()
    if W.device.type != "cpu":
        W = W.cpu()
    with _one_blas_thread():
        lam, vecs = _eig_topk(_gram(W), k)
    S = torch.from_numpy(np.sqrt(np.maximum(lam, 0.0)))
    if S[0] <= 0 or S[k - 1] < FALLBACK_RATIO * S[0]:
        res = compute_svd(W, keep=k, name=name, backend="torch")
        res.k = k
        res.seconds = time.perf_counter() - t0
        return res
    V = torch.from_numpy(vecs)                      # small side, (min(m,n), k)
    scale = 1.0 / S[:k]
    if m >= n:                                      # V are right vectors
        U = _apply(W, V, False) * scale
        Vh = V.T.contiguous()
    else:                                           # V are left vectors of W
        U = V.contiguous()
        Vh = (_apply(W, V, True) * scale).T.contiguous()
    return BaseSVD(U, S, Vh, (m, n), "exact", "gram", k=k, seconds=time.perf_counter() - t0,
                   values="gram")
