"""The full metric set of one update, and one row per matrix for a whole model.

:func:`compare` computes, for ``W0 -> W1``: every sparsity (bitwise, relative probe, atol)
with the ULP histogram; NSS, principal angles, top-``k`` energy and the update's ranks;
the principal and low-magnitude masks and the update mask's overlaps with them, every
number next to its random baseline. It decomposes ``W0`` and ``W1`` once each and hands
the decompositions to every metric: exact by default, through the checkpoint diff's Gram
path (:mod:`gatesim.metrics.gram`: every singular value and the top-``k`` vectors, with its
stated error bounds and its fallbacks to ``gesdd`` where NSS, the update's effective rank or
the top-``k`` triplets need them); ``method="randomized"`` with the guarded settings of
:func:`base_svd`. :func:`table` does that for many matrices and
returns a pandas DataFrame with one row per matrix, with a tqdm progress bar.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from gatesim.metrics._checks import check_alpha, check_k, check_matrix, check_pair
from gatesim.metrics.masks import (low_magnitude_mask, overlap, overlap_excluding,
                                   principal_mask)
from gatesim.metrics.sparsity import DEFAULT_ATOL, DEFAULT_ETA, RULES, sparsity, update_mask
from gatesim.metrics.spectral import spectral
from gatesim.metrics.svd import compute_svd

__all__ = ["compare", "table"]

Pair = tuple  # (W0, W1)


def compare(W0: torch.Tensor, W1: torch.Tensor, *, k: int = 64, alpha: float = 0.05,
            rule: str = "bitwise", eta: float = DEFAULT_ETA,
            atol: Union[float, Sequence[float]] = DEFAULT_ATOL, method: str = "exact",
            q: Optional[int] = None, niter: Optional[int] = None, seed: int = 0,
            unsafe: bool = False, angles: bool = True) -> dict:
    """Every metric of ``W0 -> W1`` as one flat dict (a table row).

    Args:
        W0, W1: the two checkpoints of one matrix: same shape, dtype, device; finite.
        k: subspace dimension of the angles, the energy and the principal mask
            (reported as column ``k``).
        alpha: fraction of entries in the principal and low-magnitude masks.
        rule: what counts as changed for ``M_update``: ``"bitwise"`` (default),
            ``"relative"`` or ``"atol"`` (the first ``atol``).
        eta, atol: sparsity tolerances (:func:`gatesim.metrics.sparsity`).
        method, q, niter, seed, unsafe: SVD settings (:func:`gatesim.metrics.base_svd`).
        angles: include the full angle lists (``angle_left_deg``, ``angle_right_deg``).

    Columns (besides the settings): ``sparsity_*``, ``update_density``, ``ulp_*`` bins;
    ``nss``, ``angle_left_max_deg``, ``angle_right_max_deg``, ``energy_topk`` and
    ``energy_topk_baseline``, ``update_erank``, ``update_srank``, ``update_norm2``,
    ``update_normF``, ``gap_k``, ``wedin_bound``, ``nss_bound`` (bound on NSS's absolute
    error), ``spectral_values`` (where the values of W0/W1/Delta came from); ``overlap_principal``,
    ``overlap_low``, ``overlap_principal_not_low`` each with ``_baseline`` (the update
    density) and ``_ratio``, plus ``overlap_principal_not_low_cond_baseline``; the SVD
    error estimates ``svd0_*``, ``svd1_*``; wall times ``t_sparsity``, ``t_svd`` (W0 and
    W1), ``t_spectral`` (the update's spectrum, angles, energy), ``t_masks`` and
    ``seconds`` (all).
    """
    t0 = time.perf_counter()
    check_pair(W0, W1, ("W0", "W1"))
    check_matrix(W0, "W0")
    check_matrix(W1, "W1")
    m, n = W0.shape
    check_k(k, m, n)
    alpha = check_alpha(alpha)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    atols = (atol,) if isinstance(atol, (int, float)) else tuple(atol)
    row = {"m": m, "n": n, "dtype": str(W0.dtype).replace("torch.", ""), "k": k,
           "alpha": alpha, "rule": rule}
    sp = sparsity(W0, W1, eta=eta, atol=atols)
    row.update(sp.to_dict())
    t1 = time.perf_counter()
    kw = dict(method=method, k=k, q=q, niter=niter, seed=seed, unsafe=unsafe, keep=k)
    s0 = compute_svd(W0, name="W0", **kw)
    s1 = compute_svd(W1, name="W1", **kw)
    t2 = time.perf_counter()
    spec = spectral(W0, W1, k, method=method, q=q, niter=niter, seed=seed, unsafe=unsafe,
                    svd0=s0, svd1=s1)
    d = spec.to_dict()
    if not angles:
        d.pop("angle_left_deg")
        d.pop("angle_right_deg")
    row.update(d)
    t3 = time.perf_counter()
    upd = update_mask(W0, W1, rule, eta=eta, atol=atols[0] if atols else DEFAULT_ATOL[0])
    princ = principal_mask(W0, k, alpha, svd0=s0)
    low = low_magnitude_mask(W0, alpha)
    row.update(overlap(upd, princ).to_dict("overlap_principal"))
    row.update(overlap(upd, low).to_dict("overlap_low"))
    row.update(overlap_excluding(upd, princ, low).to_dict("overlap_principal_not_low"))
    row["principal_low_intersection"] = int((princ & low).sum())
    t4 = time.perf_counter()
    for tag, s in (("svd0", s0), ("svd1", s1)):
        for key, v in s.to_dict().items():
            row[key.replace("svd", tag, 1)] = v
    row.update({"t_sparsity": t1 - t0, "t_svd": t2 - t1, "t_spectral": t3 - t2,
                "t_masks": t4 - t3, "seconds": time.perf_counter() - t0})
    return row


PairsLike = Union[Mapping[str, Union[Pair, Callable[[], Pair]]],
                  Iterable[tuple]]


def _items(pairs: PairsLike):
    if isinstance(pairs, Mapping):
        yield from pairs.items()
        return
    for item in pairs:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError("pairs must be a mapping name -> (W0, W1) or an iterable of "
                            "(name, W0, W1) / (name, loader) tuples")
        if len(item) == 3:
            yield item[0], (item[1], item[2])
        else:
            yield item


def table(pairs: PairsLike, *, progress: bool = True, **kwargs):
    """One row of :func:`compare` per matrix, as a pandas DataFrame indexed by name.

    Args:
        pairs: ``{name: (W0, W1)}``, or ``{name: loader}`` with ``loader()`` returning
            ``(W0, W1)`` (loads one matrix pair at a time, so a whole model fits in
            memory), or an iterable of ``(name, W0, W1)`` / ``(name, loader)``.
        progress: show a tqdm progress bar (on stderr).
        **kwargs: passed to :func:`compare` (``k``, ``alpha``, ``rule``, ``method``, ...).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    items = list(_items(pairs))
    rows, names = [], []
    for name, val in tqdm(items, desc="gatesim.metrics", unit="matrix",
                          disable=not progress):
        W0, W1 = val() if callable(val) else val
        rows.append(compare(W0, W1, **kwargs))
        names.append(name)
    return pd.DataFrame(rows, index=pd.Index(names, name="name"))
