"""Cosine similarity of two accumulated updates, next to its random baseline.

Consistency of updates across runs (seeds, recipes, data) is measured two ways: by the
Jaccard of the update masks (:func:`gatesim.metrics.masks.jaccard`, baseline
``pq / (p + q - pq)``) and by the cosine of the updates themselves,
``cos = <D1, D2> / (||D1||_F ||D2||_F)``. Two independent updates with uniformly random
directions in ``R^N`` (any norms) have cosine of mean 0 and standard deviation exactly
``1 / sqrt(N)``; :class:`Cosine` reports that as ``baseline`` (0) and ``baseline_sd``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from gatesim.metrics._checks import check_pair

__all__ = ["Cosine", "cosine", "cosine_baseline_sd", "dot64"]


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum(a * b)`` in float64, the same bits whatever torch's thread count: torch's own
    dot splits the sum by thread (a CI run's pool and Ray drivers, at 2 threads and 1,
    disagreed in the last digits of a cosine). The products are exact for float32 inputs;
    numpy adds them by its single-threaded pairwise summation, whose order depends only
    on the length."""
    x = a.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    y = b.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    return float(np.add.reduce(x * y))


def cosine_baseline_sd(n: int) -> float:
    """Standard deviation ``1 / sqrt(n)`` of the cosine of two independent uniformly random
    directions in ``R^n`` (its mean is 0)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1.0 / math.sqrt(n)


@dataclasses.dataclass(frozen=True)
class Cosine:
    """``value = <a, b> / (||a|| ||b||)`` (float64), baseline 0 with ``baseline_sd``."""

    value: float
    baseline: float
    baseline_sd: float
    n: int

    def to_dict(self, prefix: str = "cosine") -> dict:
        return {prefix: self.value, f"{prefix}_baseline": self.baseline,
                f"{prefix}_baseline_sd": self.baseline_sd}


def cosine(a: torch.Tensor, b: torch.Tensor) -> Cosine:
    """Cosine similarity of two updates of the same shape, computed in float64; NaN when
    either is zero."""
    check_pair(a, b, ("a", "b"))
    a64 = a.detach().reshape(-1).to(torch.float64)
    b64 = b.detach().reshape(-1).to(torch.float64)
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ValueError("cosine: the updates must be finite")
    na, nb = math.sqrt(dot64(a64, a64)), math.sqrt(dot64(b64, b64))
    value = dot64(a64, b64) / (na * nb) if na > 0 and nb > 0 else math.nan
    n = a64.numel()
    return Cosine(value, 0.0, cosine_baseline_sd(n), n)
