"""The tracker: :func:`track` hooks a training loop's optimizer(s) and returns a
:class:`Tracker`, which holds what was recorded.

:func:`track` registers a step pre-hook and a step post-hook on a ``torch.optim`` optimizer
(``track(model)`` instead hooks every optimizer that steps the model's parameters, through
torch's global optimizer hooks; only the model's parameters are tracked; each optimizer has
its own step count and index in the log). The hooks (:mod:`gatesim.tracking.replay`) find the
intended update of each tracked parameter and its statistics; the records go to the log,
TensorBoard and the tracker's summaries (:mod:`gatesim.tracking.output`). NaN or inf in
gradients are counted (``nonfinite_*``), never raised. ``close()`` twice is a no-op. The log
is flushed after every step. An error inside the tracker (``on_error="warn"``, default) skips
that step's tracking with a warning and never stops the training; ``on_error="raise"``
raises.

Cost and memory: per tracked element, an fp32 snapshot and the fp32 ``u`` (8 bytes), plus the
what-ifs' storage; the replay's scratch is the size of the largest tracked parameter. Tracking
a subset (``include``/``exclude`` name patterns) or every N-th step (``every``) cuts both.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from gatesim.tracking.logs import plot_absorbed, summarize, write_table
from gatesim.tracking.options import NameFilter, TrackOptions
from gatesim.tracking.output import RecordSink
from gatesim.tracking.params import ParamRegistry
from gatesim.tracking.records import SUM_FIELDS
from gatesim.tracking.replay import Attachment, replaying
from gatesim.tracking.what_ifs import parse_what_ifs

__all__ = ["track", "Tracker"]


class Tracker:
    """Handle returned by :func:`track`; a context manager.

    Attributes: ``options`` (:class:`TrackOptions`), ``what_ifs`` (label ->
    :class:`~gatesim.policy.PrecisionPolicy`), ``last_stats`` ({(name, policy): UpdateStats}
    of each parameter's last tracked step; names of the i-th optimizer seen by
    ``track(model)`` are prefixed ``"i:"`` for i > 0; ``"group<g>"`` with
    ``granularity="group"``), ``steps_seen`` / ``steps_tracked``, ``errors`` (steps skipped
    by ``on_error="warn"``), ``log_path``."""

    def __init__(self, target, options: Optional[TrackOptions] = None, **kw):
        if options is None:
            options = TrackOptions(**kw)
        elif kw:
            options = dataclasses.replace(options, **kw)
        self.options = options
        if not isinstance(target, (torch.optim.Optimizer, torch.nn.Module)):
            raise TypeError("track() takes a torch.optim.Optimizer or a torch.nn.Module, got "
                            f"{type(target).__name__}")
        model_only = isinstance(target, torch.nn.Module)
        if model_only and options.model is not None and options.model is not target:
            raise ValueError("track(model) takes no second model")
        self.what_ifs = parse_what_ifs(options.what_if)
        self._registry = ParamRegistry(target if model_only else options.model, model_only,
                                       NameFilter(options.include, options.exclude))
        self._handles: list = []
        self._attachments: dict[int, Attachment] = {}
        self._attach_refs = torch.utils.weak.WeakIdKeyDictionary()
        self.steps_seen = 0
        self.steps_tracked = 0
        self.errors = 0
        self._closed = False
        self._sink = RecordSink(options, self.what_ifs)
        self.last_stats = self._sink.last_stats
        self.log_path = self._sink.log_path

        if not model_only:
            att = self._attach(target)
            self._handles.append(target.register_step_pre_hook(
                lambda opt, a, k: self._guard(att, "pre", a, k)))
            self._handles.append(target.register_step_post_hook(
                lambda opt, a, k: self._guard(att, "post", a, k)))
        else:
            from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                               register_optimizer_step_pre_hook)
            self._handles.append(register_optimizer_step_pre_hook(self._global_pre))
            self._handles.append(register_optimizer_step_post_hook(self._global_post))

    # -- hooks -----------------------------------------------------------------------
    def _attach(self, opt: torch.optim.Optimizer) -> Attachment:
        att = Attachment(opt, len(self._attachments), self.options, self._registry,
                         self.what_ifs, self._emit)
        self._attachments[id(opt)] = att
        self._attach_refs[opt] = att
        return att

    def _emit(self, att: Attachment, step: int, observations: list) -> None:
        self._sink.emit(att.index, step, observations)
        self.steps_tracked += 1

    def _guard(self, att: Attachment, which: str, args, kwargs) -> None:
        if self._closed:
            return
        try:
            if which == "pre":
                att.pre(args, kwargs)
            else:
                att.post(args, kwargs)
        except Exception as exc:
            att.pending = None
            if self.options.on_error == "raise":
                if which == "post":
                    att.finish()
                    self.steps_seen += 1
                raise
            self.errors += 1
            warnings.warn(f"gatesim.track: tracking of this step skipped ({which}-step): "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
        if which == "post":
            att.finish()
            self.steps_seen += 1

    def _global_pre(self, opt, args, kwargs):
        if self._closed or replaying():
            return None
        self._registry.new_step()
        att = self._attach_refs.get(opt)
        if att is None:
            if not self._registry.holds_model_params(opt):
                return None
            att = self._attach(opt)
        self._guard(att, "pre", args, kwargs)
        return None

    def _global_post(self, opt, args, kwargs):
        if self._closed or replaying():
            return None
        att = self._attach_refs.get(opt)
        if att is not None:
            self._guard(att, "post", args, kwargs)
        return None

    # -- public ----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def step(self) -> int:
        """Steps seen by the first hooked optimizer (the next record's step - start_step)."""
        atts = sorted(self._attachments.values(), key=lambda a: a.index)
        return atts[0].count if atts else 0

    def close(self) -> None:
        """Removes the hooks, flushes and closes the log (and a TensorBoard writer the tracker
        opened), frees the snapshots and replay scratch. What-if weights, ``last_stats`` and
        the summaries stay available. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sink.close()
        self._registry.free_buffers()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def last_update(self, name: str, optimizer: int = 0) -> torch.Tensor:
        """A copy of the intended update ``u`` of ``name`` at its last tracked step (before
        close())."""
        pt = self._registry.tracked(name, optimizer)
        if pt.u is None:
            raise RuntimeError("the tracker is closed; updates are freed by close()")
        return pt.u.clone()

    def what_if_weights(self, name: str, policy: str, optimizer: int = 0) -> dict:
        """Copies of a what-if's storage for ``name``: ``param`` (stored, in the policy's
        dtype), ``master`` and ``compensation`` (None when the policy has none)."""
        pt = self._registry.tracked(name, optimizer)
        if policy not in pt.what_ifs:
            raise KeyError(f"no what-if {policy!r} for {name!r}; known: {sorted(pt.what_ifs)}")
        ws = pt.what_ifs[policy]
        c = (lambda t: None if t is None else t.clone())
        return {"param": c(ws.weights), "master": c(ws.master),
                "compensation": c(ws.compensation)}

    def frame(self):
        """Per-step aggregates as a pandas DataFrame: one row per (optimizer, step, kind,
        policy) with summed ``n``, ``changed``, ``absorbed``, ``zero``, ``absorbed_mass``,
        ``nonfinite_delta``, ``nonfinite_result``."""
        import pandas as pd
        keys = ("optimizer", "step", "kind", "policy")
        rows = [dict(zip(keys, k), **{f: getattr(v.stats, f) for f in SUM_FIELDS})
                for k, v in self._sink.steps.items()]
        return pd.DataFrame(rows, columns=list(keys + SUM_FIELDS))

    def summary(self, by: str = "kind"):
        """Summary table (pandas DataFrame) over all tracked steps, one row per ``by``
        (``"kind"`` or ``"param"``) and policy; see :func:`summarize` for the columns."""
        import pandas as pd
        if by == "kind":
            return summarize(self.frame(), by="kind")
        if by != "param":
            raise ValueError(f"by must be 'kind' or 'param', got {by!r}")
        keys = ("optimizer", "param", "kind", "policy")
        rows = [dict(zip(keys, k), **v.to_dict()) for k, v in self._sink.totals.items()]
        return summarize(pd.DataFrame(rows), by="param", steps_column="steps")

    def save_tables(self, directory: Union[str, os.PathLike]) -> dict:
        """Writes the per-step aggregates (``steps``: :meth:`frame`), the per-tensor summary
        (``per_param``: :meth:`summary` by param) and the per-kind summary (``per_kind``)
        into ``directory``, each as CSV and as Parquet. Returns {table: {"csv": path,
        "parquet": path}}."""
        d = Path(directory)
        tables = {"steps": self.frame(), "per_param": self.summary(by="param"),
                  "per_kind": self.summary(by="kind")}
        return {name: write_table(df, d / name) for name, df in tables.items()}

    def plot(self, path: Union[str, os.PathLike], **kw) -> str:
        """PNG of the absorbed fraction over steps per module kind; see
        :func:`plot_absorbed`."""
        return plot_absorbed(self.frame(), path, **kw)

    def __repr__(self) -> str:
        return (f"<gatesim Tracker {'closed' if self._closed else 'open'}: "
                f"{self.steps_tracked}/{self.steps_seen} steps tracked, "
                f"{len(self._registry.tracks)} parameters, what-ifs {list(self.what_ifs)}>")


def track(target, options: Optional[TrackOptions] = None, **kw) -> Tracker:
    """Tracks what the number format absorbs at every step of a real training loop.

    Args:
        target: a ``torch.optim.Optimizer`` (its step is hooked), or a ``torch.nn.Module``
            (every optimizer that steps any of its parameters is hooked, through torch's
            global optimizer-step hooks; only the module's parameters are tracked; each
            optimizer has its own step count and index in the log).
        options: a :class:`TrackOptions`; keyword arguments build one (or replace its
            fields): ``model``, ``include``, ``exclude``, ``every``, ``window``, ``what_if``,
            ``intended``, ``log``, ``granularity``, ``tensorboard``, ``start_step``,
            ``kind``, ``on_error``, ``stats_backend``, ``replay`` (documented there).

    Returns:
        a :class:`Tracker` (a context manager; ``close()`` removes the hooks).
    """
    return Tracker(target, options, **kw)
