"""Across-seed statistics for claims: a mean with its 95% interval, and the verdict rule.

One home for the rule every claim in gatesim uses (the gate simulation's
:mod:`gatesim.claims` and the network lab's claims alike):

* :func:`mean_interval` gives the mean of per-seed values with a two-sided Student-t
  interval (``level`` 0.95 by default). With one seed the interval is infinite: one seed
  cannot support a claim.
* :func:`verdict` compares an interval with a threshold fixed in code before the run:
  ``"holds"`` when the whole interval lies on the claimed side, ``"fails"`` when the whole
  interval lies on the other side, ``"inconclusive"`` when it straddles the threshold (or
  touches it). Thresholds are never tuned to make a claim pass.

For a comparison of two arms measured on the same seeds (RL against SFT, say), pass the
per-seed differences to :func:`mean_interval` and compare with threshold 0 (paired design).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

__all__ = ["Interval", "mean_interval", "verdict", "VERDICTS", "DEFAULT_LEVEL"]

DEFAULT_LEVEL = 0.95
VERDICTS = ("holds", "fails", "inconclusive", "not tested")


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of ``n`` per-seed values with a two-sided Student-t interval ``[lo, hi]``."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    level: float = DEFAULT_LEVEL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.mean:.4g} [{self.lo:.4g}, {self.hi:.4g}] "
                f"({self.level:.0%}, n={self.n})")


def _finite_values(values: Iterable) -> list:
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"per-seed values must be numbers, got {v!r}")
        f = float(v)
        if math.isnan(f):
            continue
        if math.isinf(f):
            raise ValueError(f"per-seed value is infinite: {f}")
        out.append(f)
    return out


def mean_interval(values: Iterable, level: float = DEFAULT_LEVEL) -> Optional[Interval]:
    """Mean and ``level`` Student-t interval of the per-seed ``values`` (None and NaN are
    dropped: a seed that has no value does not count). None when no value is left; with one
    value the interval is ``(-inf, inf)``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    xs = _finite_values(values)
    n = len(xs)
    if n == 0:
        return None
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, math.nan, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    from scipy.stats import t as student_t
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, level)


def verdict(interval: Optional[Interval], threshold: float, side: str) -> str:
    """``"holds"`` if the whole interval is on ``side`` (``"above"`` or ``"below"``) of
    ``threshold``, ``"fails"`` if the whole interval is on the other side, otherwise
    ``"inconclusive"``; ``"not tested"`` when there is no interval (no data)."""
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below', got {side!r}")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    if interval is None:
        return "not tested"
    lo, hi = interval.lo, interval.hi
    if side == "above":
        return "holds" if lo > threshold else "fails" if hi < threshold else "inconclusive"
    return "holds" if hi < threshold else "fails" if lo > threshold else "inconclusive"
