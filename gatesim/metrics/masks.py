"""Weight masks and their overlaps, each next to the value chance would give.

Definitions (docs/metrics.md, "Principal and low-magnitude weights", "Cross-run consistency"):

* principal weights ``M_princ = Top_alpha(|W0^(k)|)``: the ``alpha`` fraction of entries
  with the largest magnitude in the rank-``k`` SVD reconstruction
  ``W0^(k) = U_k diag(S_k) V_k^T`` of ``W0`` (:func:`principal_mask`);
* low-magnitude weights ``M_low = Bottom_alpha(|W0|)`` (:func:`low_magnitude_mask`);
* ``Overlap(M_update, M) = |M_update & M| / |M|``, random baseline the update density
  ``p = |M_update| / N`` (:func:`overlap`): a mask drawn uniformly at random with density
  ``p`` has expected overlap ``p`` with any fixed mask;
* the overlap with the principal mask once the low-magnitude mask is removed,
  ``|U & P & ~L| / |P & ~L|``, with the same baseline ``p``, and also the conditional
  baseline ``|U & ~L| / |~L|`` (the update density outside the low-magnitude weights,
  what chance gives if the update is known to avoid ``L``) (:func:`overlap_excluding`);
* Jaccard ``J = |A & B| / |A | B|`` of two update masks against the independent-Bernoulli
  baseline ``E[J] = pq / (p + q - pq)`` (:func:`jaccard`).

**Selection rule of Top/Bottom_alpha** (deterministic): exactly
``c = max(1, floor(alpha * N + 1/2))`` entries are selected (``N`` the number of entries,
``alpha`` in (0, 1]). Entries are ordered by score (descending for Top, ascending for
Bottom); equal scores are ordered by flat row-major index, lower index first. Scores are
compared in float64 (exact for every stored format), so +0 and -0 tie.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from gatesim.metrics._checks import check_alpha, check_k, check_mask, check_matrix
from gatesim.metrics.svd import BaseSVD, base_svd

#: ``buffer(slot, shape, dtype)`` of the cores: where a temporary lives (a fresh tensor by
#: default; the checkpoint diff passes per-process buffers reused between matrices).
Buffer = Callable[[str, tuple, torch.dtype], torch.Tensor]
_TORCH_FLOAT = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}

__all__ = ["select_count", "top_alpha", "bottom_alpha", "principal_mask",
           "low_magnitude_mask", "Overlap", "overlap", "overlap_excluding", "Jaccard",
           "jaccard", "jaccard_baseline", "random_mask",
           "select_core", "principal_mask_core", "low_magnitude_mask_core", "overlap_core",
           "overlap_excluding_core", "Buffer"]


def select_count(alpha: float, n: int) -> int:
    """Entries a Top/Bottom_alpha mask of ``n`` entries selects:
    ``max(1, floor(alpha * n + 1/2))``."""
    alpha = check_alpha(alpha)
    return max(1, min(n, int(math.floor(alpha * n + 0.5))))


def _fresh(slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The default ``buffer`` of the cores: a new uninitialised tensor (``slot`` names the
    temporary, for callers that keep buffers between calls)."""
    return torch.empty(tuple(shape), dtype=dtype)


def select_core(scores: np.ndarray, alpha: float, largest: bool, *,
                buffer: Buffer = _fresh) -> np.ndarray:
    """Core of :func:`top_alpha` (``largest``) / :func:`bottom_alpha`, unchecked: the flat
    bool mask of the ``select_count(alpha, n)`` largest (smallest) of the finite flat numpy
    ``scores`` (float32 or float64), ties to the lower index. The threshold comes from
    numpy's introselect (about 3x ``torch.kthvalue``) on a copy in ``buffer("partition",
    ...)``; ``scores`` is not modified."""
    n = scores.size
    c = select_count(alpha, n)
    if c == n:
        return np.ones(n, dtype=bool)
    kth = n - c if largest else c - 1          # 0-based position in ascending order
    part = buffer("partition", (n,), _TORCH_FLOAT[scores.dtype]).numpy()
    np.copyto(part, scores)
    part.partition(kth)
    t = part[kth]
    out = scores > t if largest else scores < t
    rest = c - int(np.count_nonzero(out))
    if rest > 0:                               # ties at the threshold: lowest indices first
        out[np.flatnonzero(scores == t)[:rest]] = True
    return out


def _select(scores: torch.Tensor, alpha: float, largest: bool, name: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty")
    flat = scores.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} holds NaN or inf; Top/Bottom_alpha needs finite scores")
    alpha = check_alpha(alpha)
    if flat.device.type == "cpu":
        return torch.from_numpy(select_core(flat.numpy(), alpha, largest)).reshape(scores.shape)
    # CUDA: the same rule with torch ops: the c-th value in selection order, then strict
    # winners, then ties by lowest index
    n = flat.numel()
    c = select_count(alpha, n)
    out = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if c == n:
        return out.fill_(True).reshape(scores.shape)
    pos = n - c if largest else c - 1
    t = torch.kthvalue(flat, pos + 1).values
    strict = flat > t if largest else flat < t
    out |= strict
    rest = c - int(strict.sum())
    if rest > 0:
        ties = torch.nonzero(flat == t).flatten()[:rest]
        out[ties] = True
    return out.reshape(scores.shape)


def top_alpha(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask of the ``alpha`` fraction of largest scores (selection rule: module
    docstring; ties go to the lower flat index)."""
    return _select(scores, alpha, True, "scores")


def bottom_alpha(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask of the ``alpha`` fraction of smallest scores (selection rule: module
    docstring; ties go to the lower flat index)."""
    return _select(scores, alpha, False, "scores")


def principal_mask_core(svd0: BaseSVD, k: int, alpha: float, *,
                        buffer: Buffer = _fresh) -> np.ndarray:
    """Core of :func:`principal_mask`, unchecked, for a CPU decomposition: the flat bool
    ``Top_alpha(|W0^(k)|)``, ``W0^(k) = U_k diag(S_k) V_k^T`` computed in float64 as
    :meth:`BaseSVD.reconstruct` computes it, into ``buffer("magnitude", ...)``."""
    U, S, Vh = svd0.top(k)
    rec = buffer("magnitude", svd0.shape, torch.float64)
    torch.mm(U * S, Vh, out=rec)
    return select_core(rec.abs_().reshape(-1).numpy(), alpha, True, buffer=buffer)


def principal_mask(W0: torch.Tensor, k: int, alpha: float, *,
                   svd0: Optional[BaseSVD] = None) -> torch.Tensor:
    """``M_princ = Top_alpha(|W0^(k)|)``, ``W0^(k)`` the rank-``k`` SVD reconstruction
    (docs/metrics.md, "Principal and low-magnitude weights"); the SVD is ``svd0`` or the cached exact one."""
    check_matrix(W0, "W0")
    check_k(k, *W0.shape)
    alpha = check_alpha(alpha)
    if svd0 is None:
        svd0 = base_svd(W0, name="W0")
    elif not isinstance(svd0, BaseSVD):
        raise TypeError(f"svd0 must be a BaseSVD, got {type(svd0).__name__}")
    elif tuple(svd0.shape) != tuple(W0.shape):
        raise ValueError(f"svd0 is the SVD of a {svd0.shape[0]}x{svd0.shape[1]} matrix, W0 "
                         f"is {W0.shape[0]}x{W0.shape[1]}")
    if svd0.U.device.type == "cpu":
        return torch.from_numpy(principal_mask_core(svd0, k, alpha)).reshape(W0.shape)
    return top_alpha(svd0.reconstruct(k).abs_(), alpha)


def low_magnitude_mask_core(W0: torch.Tensor, alpha: float, *,
                            buffer: Buffer = _fresh) -> np.ndarray:
    """Core of :func:`low_magnitude_mask`, unchecked, for a finite CPU matrix: the flat
    bool ``Bottom_alpha(|W0|)``. Magnitudes are compared in float32 for formats of at most
    32 bits (exact, so the same order and ties as float64), in float64 otherwise, in
    ``buffer("magnitude", ...)``."""
    dt = torch.float64 if W0.element_size() > 4 else torch.float32
    mag = buffer("magnitude", (W0.numel(),), dt)
    mag.copy_(W0.reshape(-1)).abs_()
    return select_core(mag.numpy(), alpha, False, buffer=buffer)


def low_magnitude_mask(W0: torch.Tensor, alpha: float) -> torch.Tensor:
    """``M_low = Bottom_alpha(|W0|)`` (docs/metrics.md, "Principal and low-magnitude weights")."""
    check_matrix(W0, "W0")
    alpha = check_alpha(alpha)
    if W0.device.type == "cpu":
        return torch.from_numpy(low_magnitude_mask_core(W0.detach(), alpha)).reshape(W0.shape)
    return bottom_alpha(W0.detach().to(torch.float64).abs(), alpha)


@dataclasses.dataclass
class Overlap:
    """``value = count / size`` (``|U & M| / |M|``) next to its random ``baseline``.

    Attributes:
        value: the overlap (NaN when ``size == 0``).
        baseline: the update density ``|U| / N``.
        count: ``|U & M|``; size: ``|M|``.
        cond_baseline: for :func:`overlap_excluding`, ``|U & ~X| / |~X|``; else None.
    """

    value: float
    baseline: float
    count: int
    size: int
    cond_baseline: Optional[float] = None

    @property
    def ratio(self) -> float:
        """``value / baseline`` (1 = chance; NaN when the baseline is 0)."""
        return self.value / self.baseline if self.baseline > 0 else math.nan

    def to_dict(self, prefix: str = "overlap") -> dict:
        out = {prefix: self.value, f"{prefix}_baseline": self.baseline,
               f"{prefix}_ratio": self.ratio}
        if self.cond_baseline is not None:
            out[f"{prefix}_cond_baseline"] = self.cond_baseline
        return out


def _count(x) -> int:
    """True entries of a bool numpy array or tensor (``numpy.count_nonzero`` on CPU: a torch
    ``bool.sum()`` ran at 0.13 G elements/s here)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            return int(x.sum())
        x = x.numpy()
    return int(np.count_nonzero(x))


def overlap_core(update, mask) -> Overlap:
    """Core of :func:`overlap`, unchecked: bool numpy arrays or tensors of one shape."""
    n = update.size if isinstance(update, np.ndarray) else update.numel()
    size = _count(mask)
    cnt = _count(update & mask)
    p = _count(update) / n if n else math.nan
    return Overlap(cnt / size if size else math.nan, p, cnt, size)


def overlap_excluding_core(update, mask, exclude) -> Overlap:
    """Core of :func:`overlap_excluding`, unchecked: bool numpy arrays or tensors of one
    shape."""
    r = overlap_core(update, mask & ~exclude)
    out_x = ~exclude
    nx = _count(out_x)
    r.cond_baseline = _count(update & out_x) / nx if nx else math.nan
    return r


def overlap(update: torch.Tensor, mask: torch.Tensor) -> Overlap:
    """``|update & mask| / |mask|`` and its random baseline ``|update| / N``
    (docs/metrics.md, "Overlap")."""
    check_mask(update, "update")
    check_mask(mask, "mask", update, "update")
    return overlap_core(update, mask)


def overlap_excluding(update: torch.Tensor, mask: torch.Tensor,
                      exclude: torch.Tensor) -> Overlap:
    """``|U & M & ~X| / |M & ~X|``: the overlap with ``mask`` once ``exclude`` is removed
    (for the principal mask without the low-magnitude one: ``M = M_princ``,
    ``X = M_low``). ``baseline`` is the update density ``|U| / N``; ``cond_baseline`` is
    ``|U & ~X| / |~X|``, the density outside ``X``."""
    check_mask(update, "update")
    check_mask(mask, "mask", update, "update")
    check_mask(exclude, "exclude", update, "update")
    return overlap_excluding_core(update, mask, exclude)


def jaccard_baseline(p: float, q: float) -> float:
    """``E[J] = pq / (p + q - pq)`` of two independent Bernoulli masks of densities ``p``,
    ``q`` (docs/metrics.md, "Cross-run consistency"); NaN when both are 0."""
    den = p + q - p * q
    return p * q / den if den > 0 else math.nan


@dataclasses.dataclass
class Jaccard:
    """``value = |A & B| / |A | B|`` next to ``baseline = pq / (p + q - pq)``."""

    value: float
    baseline: float
    p: float
    q: float
    intersection: int
    union: int

    def to_dict(self, prefix: str = "jaccard") -> dict:
        return {prefix: self.value, f"{prefix}_baseline": self.baseline,
                f"{prefix}_p": self.p, f"{prefix}_q": self.q}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> Jaccard:
    """Jaccard index of two update masks with its independent-Bernoulli baseline
    (docs/metrics.md, "Cross-run consistency"). NaN when both are empty."""
    check_mask(a, "a")
    check_mask(b, "b", a, "a")
    n = a.numel()
    inter = int((a & b).sum())
    union = int((a | b).sum())
    p, q = int(a.sum()) / n, int(b.sum()) / n
    return Jaccard(inter / union if union else math.nan, jaccard_baseline(p, q), p, q,
                   inter, union)


def random_mask(shape: Sequence[int], density: float, *, seed: int = 0,
                device=None) -> torch.Tensor:
    """A uniformly random mask: independent Bernoulli(``density``) entries from a seeded
    ``torch.Generator`` (the null model behind every baseline here)."""
    density = float(density)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, device=device) < density
