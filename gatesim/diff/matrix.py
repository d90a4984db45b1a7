"""The spectral and mask metrics of one matrix pair, at checkpoint scale.

Definitions are those of :mod:`gatesim.metrics` (docs/metrics.md); this module feeds the
metrics' unchecked cores the decompositions of :func:`gatesim.diff.gram.gram_svd` and the
diff's reused scratch buffers. The cores skip the per-call checks of the public metric
functions (the diff checked finiteness once, in its scan), select masks with
``numpy.partition`` and count with ``numpy.count_nonzero``: on a 16384 x 1024 bf16 pair,
1 thread, the generic code had spent masks 3.4 s, overlaps 1.1 s, update mask 0.55 s and
input checks 0.8 s, against 2.8 s for both decompositions. ``tests/test_diff_scan.py``
checks that the cores give the public functions' numbers exactly.

The energy of the update in the top-``k`` subspace and ``||Delta||_F`` are accumulated
over row blocks in float64 (:func:`energy_normF`), so no full-size float64 ``Delta``
exists; they match :func:`gatesim.metrics.update_energy` to rounding.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from gatesim.diff._scratch import buffer
from gatesim.metrics.masks import (low_magnitude_mask_core, overlap_core,
                                   overlap_excluding_core, principal_mask_core)
from gatesim.metrics.sparsity import update_mask_core
from gatesim.metrics.spectral import energy_baseline, nss_core, principal_angles_core
from gatesim.metrics.svd import BaseSVD, compute_svd

__all__ = ["overlaps", "energy_normF", "matrix_metrics"]

_BLOCK = 1 << 21


def overlaps(upd: np.ndarray, princ: np.ndarray, low: np.ndarray) -> dict:
    """The three overlap columns of a diff row (those of :func:`gatesim.metrics.compare`):
    principal, low, and principal without low (with the conditional baseline)."""
    return {"overlap_principal": overlap_core(upd, princ),
            "overlap_low": overlap_core(upd, low),
            "overlap_principal_not_low": overlap_excluding_core(upd, princ, low)}


def energy_normF(W0: torch.Tensor, W1: torch.Tensor, svd0: BaseSVD, k: int):
    """``(||U0_k^T Delta V0_k||_F^2 / ||Delta||_F^2, ||Delta||_F)`` (docs/metrics.md, "Energy
    in the top-k subspace"; NaN energy for a zero update)."""
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


def matrix_metrics(W0: torch.Tensor, W1: torch.Tensor, k: int, alpha: float, *,
                   svd: str = "gram") -> dict:
    """Every spectral and mask column of a diff row for the finite matrices ``W0, W1``."""
    t0 = time.perf_counter()
    if svd == "gram":
        from gatesim.diff.gram import gram_svd
        s0, s1 = gram_svd(W0, k, name="W0"), gram_svd(W1, k, name="W1")
    else:
        s0 = compute_svd(W0, keep=k, name="W0")
        s1 = compute_svd(W1, keep=k, name="W1")
    tsvd = time.perf_counter() - t0
    m, n = W0.shape
    ang = principal_angles_core(s0, s1, k)
    energy, normF = energy_normF(W0, W1, s0, k)
    row = dict(spectral="ok", k=k, alpha=alpha, nss=nss_core(s0.S, s1.S),
               angle_left_max_deg=ang.left_max, angle_right_max_deg=ang.right_max,
               angles_left_deg=_angles_json(ang.left),
               angles_right_deg=_angles_json(ang.right),
               energy_topk=energy, energy_topk_baseline=energy_baseline(k, m, n),
               update_normF=normF, svd=f"{s0.backend}/{s1.backend}", svd_seconds=tsvd)
    upd = update_mask_core(W0, W1)
    princ = principal_mask_core(s0, k, alpha, buffer=buffer)
    low = low_magnitude_mask_core(W0, alpha, buffer=buffer)
    for name, ov in overlaps(upd, princ, low).items():
        row.update(ov.to_dict(name))
    return row


def _angles_json(a: torch.Tensor) -> str:
    import json
    return json.dumps([float(x) for x in a])
