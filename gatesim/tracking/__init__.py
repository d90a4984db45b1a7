"""Live tracking: what each optimizer step of a real training loop loses to the number format.

Attach to an existing PyTorch loop with one line and see, per step and per parameter, how
many updates the storage format absorbed and what another format or rounding mode would have
kept, without changing the training::

    with gatesim.track(optimizer, model=model, what_if=["bf16_sr", "master"],
                       log="track.jsonl") as tracker:
        for batch in data:
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    print(tracker.summary())
    tracker.save_tables("track_tables")  # CSV and Parquet
    tracker.plot("absorbed.png")

Nothing of the optimizer is touched (a tracked run and an untracked run give bit-identical
weights). The metric definitions (changed, absorbed, the |u|/ulp histogram) are in
``docs/metrics.md``.

Modules:

* :mod:`~gatesim.tracking.tracker`: :func:`track` and :class:`Tracker`;
* :mod:`~gatesim.tracking.options`: :class:`TrackOptions` (every option, checked once),
  :func:`module_kind`;
* :mod:`~gatesim.tracking.replay`: the hooks and the replay that finds the intended update
  (``intended=``);
* :mod:`~gatesim.tracking.params`: parameter names and what is kept per parameter;
* :mod:`~gatesim.tracking.what_ifs`: what-if policies and their storage;
* :mod:`~gatesim.tracking.observed`: :func:`observed_stats` and its numba kernel;
* :mod:`~gatesim.tracking.records`: what a record means, the log's schema;
* :mod:`~gatesim.tracking.output`: log, TensorBoard scalars and sums;
* :mod:`~gatesim.tracking.logs`: :func:`read_log`, :func:`summarize`, :func:`plot_absorbed`,
  :func:`write_table`.
"""
from gatesim.tracking.logs import plot_absorbed, read_log, summarize, write_table
from gatesim.tracking.observed import CPU_CHUNK, observed_stats
from gatesim.tracking.options import (GENERIC_NAMES, INTENDED_MODES, TrackOptions,
                                      module_kind)
from gatesim.tracking.records import RECORD_KEYS
from gatesim.tracking.tracker import Tracker, track
from gatesim.tracking.what_ifs import WhatIf

__all__ = ["track", "Tracker", "TrackOptions", "WhatIf", "observed_stats", "module_kind",
           "read_log", "summarize", "plot_absorbed", "write_table", "INTENDED_MODES",
           "RECORD_KEYS", "GENERIC_NAMES", "CPU_CHUNK"]
