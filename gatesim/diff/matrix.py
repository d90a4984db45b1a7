"""The spectral and mask metrics of one matrix pair, at checkpoint scale.

Definitions are those of :mod:`gatesim.metrics` (docs/metrics.md); this module feeds the
metrics' unchecked cores the decompositions of :func:`gatesim.metrics.gram.gram_svd` (NSS
through its guard :func:`gatesim.metrics.gram.nss_checked`) and the
diff's reused scratch buffers. The cores skip the per-call checks of the public metric
functions (the diff checked finiteness once, in its scan), select masks with
``numpy.partition`` and count with ``numpy.count_nonzero``: on a 16384 x 1024 bf16 pair,
1 thread, the generic code had spent masks 3.4 s, overlaps 1.1 s, update mask 0.55 s and
input checks 0.8 s, against 2.8 s for both decompositions. ``tests/test_diff_scan.py``
checks that the cores give the public functions' numbers exactly.

The energy of the update in the top-``k`` subspace and ``||Delta||_F`` are accumulated
over row blocks in float64 by :func:`gatesim.metrics.update_energy_core` (the body of
:func:`gatesim.metrics.update_energy`), here with the diff's reused row buffers.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from gatesim.diff._scratch import buffer
from gatesim.metrics.masks import (low_magnitude_mask_core, overlap_core,
                                   overlap_excluding_core, principal_mask_core)
from gatesim.metrics.sparsity import update_mask_core
from gatesim.metrics.spectral import (energy_baseline, principal_angles_core,
                                      update_energy_core)
from gatesim.metrics.svd import BaseSVD, compute_svd

__all__ = ["overlaps", "matrix_metrics"]

def overlaps(upd: np.ndarray, princ: np.ndarray, low: np.ndarray) -> dict:
    """The three overlap columns of a diff row (those of :func:`gatesim.metrics.compare`):
    principal, low, and principal without low (with the conditional baseline)."""
    return {"overlap_principal": overlap_core(upd, princ),
            "overlap_low": overlap_core(upd, low),
            "overlap_principal_not_low": overlap_excluding_core(upd, princ, low)}


def matrix_metrics(W0: torch.Tensor, W1: torch.Tensor, k: int, alpha: float, *,
                   svd: str = "gram") -> dict:
    """Every spectral and mask column of a diff row for the finite matrices ``W0, W1``."""
    t0 = time.perf_counter()
    if svd == "gram":
        from gatesim.metrics.gram import gram_svd
        s0, s1 = gram_svd(W0, k, name="W0"), gram_svd(W1, k, name="W1")
    else:
        # --svd full: the full gesdd, never the Gram path that compute_svd now defaults to
        s0 = compute_svd(W0, keep=k, name="W0", backend="torch")
        s1 = compute_svd(W1, keep=k, name="W1", backend="torch")
    tsvd = time.perf_counter() - t0
    m, n = W0.shape
    ang = principal_angles_core(s0, s1, k)
    from gatesim.metrics.gram import _rows64, nss_checked
    energy, normF = update_energy_core(W0, W1, s0, k, rows64=_rows64)
    nss, _, _, _ = nss_checked(W0, W1, s0, s1)     # gesdd values where the Gram bound is loose
    row = dict(spectral="ok", k=k, alpha=alpha, nss=nss,
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
