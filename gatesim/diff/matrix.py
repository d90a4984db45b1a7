"""The spectral and mask metrics of one matrix pair, at checkpoint scale.

Definitions are SCIENCE.md's, as implemented in :mod:`gatesim.metrics`; this module feeds
them the decompositions of :func:`gatesim.diff.gram.gram_svd` and replaces four metric
steps whose generic code dominated the time of a model-sized diff (measured on a 16384 x
1024 bf16 pair, 1 thread: masks 3.4 s, overlaps 1.1 s, update mask 0.55 s, input checks
0.8 s, against 2.8 s for both decompositions). Each replacement gives the same numbers as
the metric it stands for, on the same decompositions, which ``tests/test_diff_scan.py``
checks exactly:

* NSS, ``||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2``, and the principal angles
  (:func:`gatesim.metrics.subspace_angles` of the top-``k`` singular vectors) are
  :func:`gatesim.metrics.nss` / :func:`gatesim.metrics.principal_angles` without their
  per-call finiteness checks (the diff checked finiteness once, in its scan);
* the masks ``M_princ = Top_alpha(|W0^(k)|)`` and ``M_low = Bottom_alpha(|W0|)`` use the
  selection rule of :mod:`gatesim.metrics.masks` (exactly ``max(1, floor(alpha * N + 1/2))``
  entries; ties to the lower flat index) with ``numpy.partition`` for the threshold instead
  of ``torch.kthvalue``;
* the bitwise update mask comes from the integer views (+0 == -0; the matrices are finite);
* overlap counts use ``numpy.count_nonzero`` (a torch ``bool.sum()`` ran at 0.13 G
  elements/s here) and are returned as :class:`gatesim.metrics.Overlap`.

The energy of the update in the top-``k`` subspace and ``||Delta||_F`` are accumulated
over row blocks in float64, so no full-size float64 ``Delta`` exists.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

import gatesim.metrics as gm
from gatesim.diff._scratch import buffer

_TORCH = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}

__all__ = ["select_mask", "principal_mask", "low_magnitude_mask", "update_mask_bits",
           "overlaps", "energy_normF", "nss", "principal_angles", "matrix_metrics"]

_BLOCK = 1 << 21


def select_mask(scores: np.ndarray, alpha: float, largest: bool) -> np.ndarray:
    """Top (``largest``) or Bottom_alpha of finite flat ``scores``: the rule of
    :func:`gatesim.metrics.top_alpha` / :func:`~gatesim.metrics.bottom_alpha` (module
    docstring). Returns a flat bool array."""
    n = scores.size
    c = gm.select_count(alpha, n)
    if c == n:
        return np.ones(n, dtype=bool)
    kth = n - c if largest else c - 1
    part = buffer("partition", (n,), _TORCH[scores.dtype]).numpy()
    np.copyto(part, scores)
    part.partition(kth)
    t = part[kth]
    out = scores > t if largest else scores < t
    rest = c - int(np.count_nonzero(out))
    if rest > 0:
        out[np.flatnonzero(scores == t)[:rest]] = True
    return out


def principal_mask(svd0: gm.BaseSVD, k: int, alpha: float) -> np.ndarray:
    """``Top_alpha(|W0^(k)|)`` as a flat bool array, ``W0^(k) = U_k diag(S_k) V_k^T``
    computed in float64 like :meth:`gatesim.metrics.BaseSVD.reconstruct`."""
    U, S, Vh = svd0.top(k)
    rec = buffer("magnitude", svd0.shape, torch.float64)
    torch.mm(U * S, Vh, out=rec)
    return select_mask(rec.abs_().reshape(-1).numpy(), alpha, True)


def low_magnitude_mask(W0: torch.Tensor, alpha: float) -> np.ndarray:
    """``Bottom_alpha(|W0|)`` as a flat bool array. The magnitudes are compared in float32
    for formats of at most 32 bits (exact, so the same order and ties as the metrics'
    float64), in float64 otherwise."""
    dt = torch.float64 if W0.element_size() > 4 else torch.float32
    mag = buffer("magnitude", (W0.numel(),), dt)
    mag.copy_(W0.reshape(-1)).abs_()
    return select_mask(mag.numpy(), alpha, False)


def update_mask_bits(W0: torch.Tensor, W1: torch.Tensor) -> np.ndarray:
    """Flat bool mask of entries whose stored bits differ, +0 == -0 (the bitwise
    ``M_update`` of :func:`gatesim.metrics.update_mask` for finite matrices)."""
    from gatesim.diff.scan import update_mask_flat
    return update_mask_flat(W0, W1)


def _count(x: np.ndarray) -> int:
    return int(np.count_nonzero(x))


def overlaps(upd: np.ndarray, princ: np.ndarray, low: np.ndarray) -> dict:
    """The three overlaps of :func:`gatesim.metrics.compare` (principal, low, principal
    without low, with the conditional baseline), as :class:`gatesim.metrics.Overlap`."""
    n = upd.size
    p = _count(upd) / n

    def ov(mask):
        size = _count(mask)
        cnt = _count(upd & mask)
        return gm.Overlap(cnt / size if size else math.nan, p, cnt, size)

    keep = princ & ~low
    pl = ov(keep)
    out_low = ~low
    nx = _count(out_low)
    pl.cond_baseline = _count(upd & out_low) / nx if nx else math.nan
    return {"overlap_principal": ov(princ), "overlap_low": ov(low),
            "overlap_principal_not_low": pl}


def energy_normF(W0: torch.Tensor, W1: torch.Tensor, svd0: gm.BaseSVD, k: int):
    """``(||U0_k^T Delta V0_k||_F^2 / ||Delta||_F^2, ||Delta||_F)`` (SCIENCE.md, "Energy of
    an update in the top-k subspace"; NaN energy for a zero update)."""
    from gatesim.diff.gram import _rows64
    U, _, Vh = svd0.top(k)
    m, n = W0.shape
    step = max(1, _BLOCK // n)
    P = torch.zeros(k, k, dtype=torch.float64)
    V = Vh.T.contiguous()
    tot = 0.0
    for s in range(0, m, step):
        e = min(m, s + step)
        D = _rows64(W1, s, e, "rows64").sub_(_rows64(W0, s, e, "rows64b"))
        tot += float(torch.linalg.vector_norm(D).square())
        P += U[s:e].T @ (D @ V)
    val = float(P.square().sum()) / tot if tot > 0 else math.nan
    return val, math.sqrt(tot)


def nss(svd0: gm.BaseSVD, svd1: gm.BaseSVD) -> float:
    """:func:`gatesim.metrics.nss` on full spectra (same operations, same result)."""
    r = min(svd0.S.numel(), svd1.S.numel())
    s0, s1 = svd0.S[:r], svd1.S[:r]
    den = torch.linalg.vector_norm(s0)
    if den == 0:
        raise ValueError("W0 is the zero matrix; NSS divides by ||sigma(W0)|| = 0")
    return float(torch.linalg.vector_norm(s1 - s0) / den)


def principal_angles(svd0: gm.BaseSVD, svd1: gm.BaseSVD, k: int) -> gm.PrincipalAngles:
    """:func:`gatesim.metrics.principal_angles` from the two decompositions."""
    U0, _, V0h = svd0.top(k)
    U1, _, V1h = svd1.top(k)
    return gm.PrincipalAngles(k, gm.subspace_angles(U0, U1).cpu(),
                              gm.subspace_angles(V0h.T, V1h.T).cpu())


def matrix_metrics(W0: torch.Tensor, W1: torch.Tensor, k: int, alpha: float, *,
                   svd: str = "gram") -> dict:
    """Every spectral and mask column of a diff row for the finite matrices ``W0, W1``."""
    t0 = time.perf_counter()
    if svd == "gram":
        from gatesim.diff.gram import gram_svd
        s0, s1 = gram_svd(W0, k, name="W0"), gram_svd(W1, k, name="W1")
    else:
        s0 = gm.compute_svd(W0, keep=k, name="W0")
        s1 = gm.compute_svd(W1, keep=k, name="W1")
    tsvd = time.perf_counter() - t0
    m, n = W0.shape
    ang = principal_angles(s0, s1, k)
    energy, normF = energy_normF(W0, W1, s0, k)
    row = dict(spectral="ok", k=k, alpha=alpha, nss=nss(s0, s1),
               angle_left_max_deg=ang.left_max, angle_right_max_deg=ang.right_max,
               angles_left_deg=_angles_json(ang.left),
               angles_right_deg=_angles_json(ang.right),
               energy_topk=energy, energy_topk_baseline=gm.energy_baseline(k, m, n),
               update_normF=normF, svd=f"{s0.backend}/{s1.backend}", svd_seconds=tsvd)
    upd = update_mask_bits(W0, W1)
    princ = principal_mask(s0, k, alpha)
    low = low_magnitude_mask(W0, alpha)
    for name, ov in overlaps(upd, princ, low).items():
        row.update(ov.to_dict(name))
    return row


def _angles_json(a: torch.Tensor) -> str:
    import json
    return json.dumps([float(x) for x in a])
