"""The tracker's records: one per tracked step, parameter (or param group) and policy, and
the sums the summaries and TensorBoard scalars are made of.

What each record means
----------------------
``policy="own"`` (the real parameter, ``mode="observed"``), from the stored bits before and
after the step and ``u``: ``changed`` stored bits differ (+0 == -0, NaN never equal, as in
bitwise sparsity; ``docs/metrics.md``); ``absorbed`` ``u != 0`` but the stored bits did not
change; ``zero`` ``u == 0``; ``nonfinite_delta`` / ``nonfinite_param`` /
``nonfinite_result`` inf or NaN in ``u`` / before / after; ``absorbed_mass`` sum of ``|u|``
over absorbed elements (fp64); ``hist`` ``log2(|u| / ulp(before))`` in the bins of
:data:`gatesim.update.HIST_EDGES_LOG2`; ``sum_differs`` is always 0. These are
:class:`~gatesim.UpdateStats` with the same definitions as :func:`gatesim.apply_update`'s,
except that the value after the step is the one the optimizer stored (computed by
:func:`gatesim.tracking.observed.observed_stats`). A what-if's record (``policy=<label>``) is
the UpdateStats of its :func:`gatesim.apply_update` (:mod:`gatesim.tracking.what_ifs`).

Log
---
JSON lines (the conventions of :mod:`gatesim.optim`'s log: appended to, flushed every step,
non-finite masses written as ``NaN``/``Infinity`` by Python's json), one record per tracked
step per parameter (``granularity="group"``: per param group) per policy, keys in this order
(:data:`RECORD_KEYS`): :class:`RecordHead`'s fields (``step``: optimizer step number,
``start_step`` + steps seen; ``optimizer``: index, 0 unless ``track(model)`` saw several;
``param``, ``group``, ``kind`` (:func:`~gatesim.tracking.options.module_kind`), ``dtype``
(the real parameter's), ``policy``, ``format``, ``mode``, ``master``, ``kahan``,
``intended`` (``fp32`` / ``fp64`` / ``stored``), ``anchored``, ``numel``, ``shape``), then
the UpdateStats fields (``n``, ``changed``, ``absorbed``, ``zero``, ``nonfinite_delta``,
``nonfinite_param``, ``nonfinite_result``, ``sum_differs``, ``absorbed_mass``, ``hist``) and
``absorbed_fraction`` (absorbed over non-zero updates).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from gatesim.update import UpdateStats

__all__ = ["RecordHead", "Sums", "RECORD_KEYS", "SUM_FIELDS"]


@dataclasses.dataclass
class RecordHead:
    """Which step, tensor and policy a record is about (the keys before its UpdateStats)."""

    step: int
    optimizer: int
    param: str
    group: int
    kind: str
    dtype: str
    policy: str
    format: str
    mode: str
    master: bool
    kahan: bool
    intended: str
    anchored: bool
    numel: int
    shape: Optional[list]

    def to_dict(self) -> dict:
        return dict(self.__dict__)  # the fields, in order (shallow: this runs every step)

    def record(self, stats: UpdateStats) -> dict:
        """The log record: these fields, then the stats' (the keys of
        :meth:`UpdateStats.to_dict`)."""
        rec = self.to_dict()
        # UpdateStats.to_dict's keys without its deep copy (dataclasses.asdict costs about
        # 0.2 ms a record here, and the log is written on every step)
        for f in _STATS_FIELDS:
            rec[f] = getattr(stats, f)
        rec["absorbed_fraction"] = stats.absorbed_fraction
        return rec


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(UpdateStats))
#: Keys of a log record, in order.
RECORD_KEYS = tuple(f.name for f in dataclasses.fields(RecordHead)) + tuple(
    UpdateStats().to_dict())


#: The UpdateStats counts the frames and summaries carry, in their column order (the
#: histogram and the rarely non-zero counters stay in the log records).
SUM_FIELDS = ("n", "changed", "absorbed", "zero", "absorbed_mass", "nonfinite_delta",
              "nonfinite_result")


@dataclasses.dataclass
class Sums:
    """The :class:`UpdateStats` of many records added with ``+`` (the frames and summaries);
    ``steps``: records added (the steps a parameter was tracked, for per-parameter totals)."""

    stats: UpdateStats = dataclasses.field(default_factory=UpdateStats)
    steps: int = 0

    def add(self, st: UpdateStats) -> None:
        self.stats = self.stats + st
        self.steps += 1

    @property
    def absorbed_fraction(self) -> float:
        return self.stats.absorbed_fraction

    @property
    def changed_fraction(self) -> float:
        return self.stats.changed / self.stats.n if self.stats.n else 0.0

    def to_dict(self) -> dict:
        """The :data:`SUM_FIELDS` and ``steps``."""
        return {**{f: getattr(self.stats, f) for f in SUM_FIELDS}, "steps": self.steps}
