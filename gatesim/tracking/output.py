"""Where a tracker's observations go: the JSON-lines log (:mod:`gatesim.tracking.records`),
TensorBoard scalars, ``last_stats`` and the sums behind :meth:`Tracker.frame` and
:meth:`Tracker.summary`."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from gatesim.formats import as_format
from gatesim.tracking.options import TrackOptions
from gatesim.tracking.records import RecordHead, Sums
from gatesim.update import UpdateStats

__all__ = ["RecordSink"]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class RecordSink:
    """Receives each tracked step's observations (:class:`~gatesim.tracking.replay.Observation`)
    of every hooked optimizer.

    Attributes:
        last_stats: {(name, policy): UpdateStats} of each parameter's last tracked step.
        steps: {(optimizer, step, kind, policy): :class:`Sums`}.
        totals: {(optimizer, param, kind, policy): :class:`Sums`} over all tracked steps.
    """

    def __init__(self, options: TrackOptions, what_ifs: dict):
        self.granularity = options.granularity
        self.kind = options.kind
        self.what_ifs = what_ifs
        self._kinds: dict[str, str] = {}
        self.last_stats: dict[tuple, UpdateStats] = {}
        self.steps: dict[tuple, Sums] = {}
        self.totals: dict[tuple, Sums] = {}
        self.log_path = os.fspath(options.log) if options.log is not None else None
        self._log = open(options.log, "a", encoding="utf-8") if options.log is not None else None
        self._tb, self._tb_owned = _open_tensorboard(options.tensorboard)

    def _kind_of(self, name: str) -> str:
        k = self._kinds.get(name)
        if k is None:
            k = self._kinds[name] = str(self.kind(name))
        return k

    def _heads(self, opt_index: int, step: int, observations: list):
        """(RecordHead, UpdateStats) per record of the step (summed per param group with
        ``granularity="group"``)."""
        if self.granularity == "group":
            grouped: dict[tuple, list] = {}
            for o in observations:
                g = grouped.get((o.group, o.policy))
                if g is None:
                    grouped[(o.group, o.policy)] = [o.stats, {_dtype_name(o.param.dtype)},
                                                    o.anchored, o.intended]
                else:
                    g[0] = g[0] + o.stats
                    g[1].add(_dtype_name(o.param.dtype))
                    g[2] = g[2] or o.anchored
            for (gi, policy), (st, dtypes, anchored, intended) in grouped.items():
                mode, master, kahan, fmt = self._describe(policy, None, "+".join(sorted(dtypes)))
                yield RecordHead(step, opt_index, f"group{gi}", gi, "group",
                                 "+".join(sorted(dtypes)), policy, fmt, mode, master, kahan,
                                 intended, bool(anchored), st.n, None), st
            return
        for o in observations:
            mode, master, kahan, fmt = self._describe(o.policy, o.param, None)
            yield RecordHead(step, opt_index, o.name, o.group, self._kind_of(o.name),
                             _dtype_name(o.param.dtype), o.policy, fmt, mode, master, kahan,
                             o.intended, bool(o.anchored), o.param.numel(),
                             list(o.param.shape)), o.stats

    def _describe(self, policy: str, p, group_dtype: Optional[str]) -> tuple:
        """(mode, master, kahan, format) of a record; a group's own format is its dtypes."""
        if policy == "own":
            return "observed", False, False, (str(as_format(p.dtype)) if p is not None
                                              else group_dtype)
        w = self.what_ifs[policy]
        f = w.param_format or (as_format(p.dtype) if p is not None else None)
        return w.mode, w.master, w.kahan, (str(f) if f is not None else "own")

    def emit(self, opt_index: int, step: int, observations: list) -> None:
        lines = []
        step_keys = []
        for head, st in self._heads(opt_index, step, observations):
            name, kind, policy = head.param, head.kind, head.policy
            self.last_stats[(name if opt_index == 0 else f"{opt_index}:{name}", policy)] = st
            if self._log is not None:
                lines.append(json.dumps(head.record(st)))
            key = (opt_index, step, kind, policy)
            sums = self.steps.get(key)
            if sums is None:
                step_keys.append(key)
                sums = self.steps[key] = Sums()
            sums.add(st)
            tkey = (opt_index, name, kind, policy)
            tot = self.totals.get(tkey)
            if tot is None:
                tot = self.totals[tkey] = Sums()
            tot.add(st)
        if self._log is not None and lines:
            self._log.write("\n".join(lines) + "\n")
            self._log.flush()  # a crashed run keeps every finished step
        if self._tb is not None:
            root = "gatesim" if opt_index == 0 else f"gatesim/opt{opt_index}"
            for key in sorted(step_keys, key=lambda k: (k[3], k[2])):
                kind, policy = key[2], key[3]
                sums = self.steps[key]
                self._tb.add_scalar(f"{root}/{policy}/absorbed_fraction/{kind}",
                                    sums.absorbed_fraction, step)
                self._tb.add_scalar(f"{root}/{policy}/changed_fraction/{kind}",
                                    sums.changed_fraction, step)

    def close(self) -> None:
        """Flushes and closes the log (and a TensorBoard writer opened here)."""
        if self._log is not None:
            self._log.flush()
            self._log.close()
            self._log = None
        if self._tb is not None:
            try:
                if hasattr(self._tb, "flush"):
                    self._tb.flush()
            finally:
                if self._tb_owned:
                    self._tb.close()
                self._tb = None


def _open_tensorboard(tb):
    """(writer, whether it was opened here) for :attr:`TrackOptions.tensorboard`."""
    if tb is None or tb is False:
        return None, False
    if hasattr(tb, "add_scalar"):
        return tb, False
    if not isinstance(tb, (str, os.PathLike)):
        raise TypeError("tensorboard must be None, a log directory or an object with "
                        "add_scalar (a SummaryWriter)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # tensorboard is an optional dependency
        warnings.warn(f"gatesim.track: TensorBoard scalars disabled ({exc}); install "
                      "tensorboard to get them", RuntimeWarning, stacklevel=5)
        return None, False
    return SummaryWriter(os.fspath(tb)), True
