"""All singular values and the top-``k`` singular vectors of one matrix, exactly and fast.

The checkpoint diff needs, per matrix, every singular value (for NSS) and only the leading
``k`` singular triplets (principal angles, energy, principal mask). A full LAPACK SVD
(``gesdd``) computes all ``min(m, n)`` vectors of both sides, and on this project's 2-core
machines it took 11..17 s for one 1536 x 1536 float64 matrix and 18..35 s for 8960 x 1536
(busy machine); a Qwen2-1.5B diff needs about 400 of them. :func:`gram_svd` gets the same
quantities directly, with no sampling and no iteration to a tolerance (1.6 s and 0.13 s
where ``gesdd`` took 22 s and 2.5 s, for 1536 x 1536 and 256 x 1536, same machine):

1. ``G = A^T A`` in float64 for the smaller side (``n = min(m, n)``; ``A = W`` or ``W^T``),
   accumulated over row blocks converted from the stored dtype (``dsyrk``), so no float64
   copy of the whole matrix is made;
2. Householder tridiagonalisation ``G = Q T Q^T`` (LAPACK ``dsytrd``), once;
3. all eigenvalues of ``T`` (``dstemr``, no vectors) give ``sigma_i = sqrt(max(lambda_i, 0))``;
   the top ``k`` eigenvectors of ``T`` (``dstemr``, index range, MRRR) are mapped back with
   the same reflectors (``ormqr``), giving ``V_k``;
4. ``U_k = A V_k diag(1 / sigma_k)``, again over row blocks.

Accuracy. These are direct (non-randomized) LAPACK decompositions; the one approximation
against ``gesdd`` on ``W`` is that forming ``G`` squares the condition number: a singular
value ``sigma_i`` carries an absolute error of about ``eps * sigma_1^2 / sigma_i`` instead of
``eps * sigma_1``. For the leading triplets this is at rounding level; for the smallest
singular values of a square random matrix it was up to 4e-10 relative, which moves NSS by
less than 1e-9 of its value in the tests (``tests/test_diff_gram.py`` compares every output
with ``torch.linalg.svd`` on the same matrices: singular values, angles between the
subspaces, NSS, principal masks). When ``sigma_k < 1e-4 * sigma_1`` (a nearly rank-deficient
matrix, where ``U_k = A V_k / sigma_k`` would lose digits) or the matrix is zero,
:func:`gram_svd` falls back to the full exact SVD of :func:`gatesim.metrics.compute_svd`.

Threads. OpenBLAS (scipy's BLAS/LAPACK) runs on one thread inside :func:`gram_svd` (the
caller's setting is restored afterwards): on the shared 2-core machines its threaded
``dsytrd`` ran 5..40x *slower* than single-threaded. Parallelism comes from running
tensors in several processes (``workers``); the torch parts use the thread count the
executor sets.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from typing import Optional

import numpy as np
import torch

from gatesim.diff._scratch import buffer
from gatesim.metrics.svd import BaseSVD, compute_svd

__all__ = ["gram_svd", "FALLBACK_RATIO"]

#: ``sigma_k / sigma_1`` below which the exact full SVD is used instead.
FALLBACK_RATIO = 1e-4
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


def gram_svd(W: torch.Tensor, k: int, *, name: str = "W") -> BaseSVD:
    """Every singular value and the top-``k`` singular vectors of the finite 2-D ``W``
    (module docstring), as a :class:`gatesim.metrics.BaseSVD` with ``U`` (m x k), ``S``
    (all ``min(m, n)`` values, descending) and ``Vh`` (k x n), float64, ``method="exact"``
    and ``backend="gram"`` (or ``"torch"`` after a fallback). Usable wherever the metrics
    take ``svd0=``/``svd1=``."""
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
        res = compute_svd(W, keep=k, name=name)
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
    return BaseSVD(U, S, Vh, (m, n), "exact", "gram", k=k, seconds=time.perf_counter() - t0)
