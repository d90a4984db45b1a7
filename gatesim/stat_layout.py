"""Layout of the statistics vector the update ops return (``csrc/gatesim/update.h``,
``enum Stat``): the counters of :class:`gatesim.UpdateStats`, then the ``|u| / ulp``
histogram. Plain Python, no torch: the numpy reference (:mod:`gatesim.reference`) and the
fake kernels (:mod:`gatesim._ops`) read it too.
"""
from __future__ import annotations

__all__ = ["STAT_FIELDS", "HIST_LO_LOG2", "HIST_BINS", "HIST_EDGES_LOG2", "N_STATS"]

#: The counters, in the order of ``enum Stat``.
STAT_FIELDS = ("n", "changed", "absorbed", "zero", "nonfinite_delta", "nonfinite_param",
               "nonfinite_result", "sum_differs")
#: log2 of the upper edge of histogram bin 0 (``kHistLo``).
HIST_LO_LOG2 = -24
#: Bins of the ``log2(|u| / ulp)`` histogram (``kHistBins``): bin 0 below ``2**-24``,
#: bins 1..32 one binade each, the last at or above ``2**8``.
HIST_BINS = 34
#: log2 edges between the bins: ``-24, -23, ..., 8``.
HIST_EDGES_LOG2 = tuple(range(HIST_LO_LOG2, HIST_LO_LOG2 + HIST_BINS - 1))
#: Length of the statistics vector: the counters, then the histogram.
N_STATS = len(STAT_FIELDS) + HIST_BINS
