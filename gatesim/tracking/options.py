"""What a tracker is told: :class:`TrackOptions` (every option of :func:`gatesim.track`, checked
once) and how parameter names are matched and grouped into module kinds."""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["TrackOptions", "INTENDED_MODES", "GENERIC_NAMES", "module_kind", "NameFilter"]

INTENDED_MODES = ("fp32", "fp64", "stored")

#: Module names that say nothing about what a layer does; dropped by :func:`module_kind`.
GENERIC_NAMES = frozenset({"self", "dense", "linear", "module", "_orig_mod", "base_layer",
                           "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def module_kind(name: str) -> str:
    """The kind of module a parameter belongs to, from its name: the module path after the
    last numeric component (the layer index), without generic names (:data:`GENERIC_NAMES`).

    ``encoder.layer.3.attention.self.query.weight`` -> ``attention.query``;
    ``encoder.layer.0.output.dense.bias`` -> ``output``;
    ``model.layers.7.mlp.down_proj.weight`` -> ``mlp.down_proj``;
    ``embeddings.word_embeddings.weight`` -> ``embeddings.word_embeddings`` (no index: the
    whole module path); a parameter directly on an indexed module (``layers.3.weight``) gets
    the name before the index (``layers``), a bare one (``weight``, ``0.weight``) its own
    attribute name.
    """
    parts = name.split(".")
    mods, attr = parts[:-1], parts[-1]
    idx = [i for i, p in enumerate(mods) if p.isdigit()]
    if idx:
        tail = mods[idx[-1] + 1:]
        if not tail:
            before = [p for p in mods[:idx[-1]] if not p.isdigit()]
            return before[-1] if before else attr
        mods = tail
    kept = [p for p in mods if p not in GENERIC_NAMES]
    if not kept:
        return mods[-1] if mods else attr
    return ".".join(kept)


def _int_at_least(name: str, v, low: int, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be {what}, got {v!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class TrackOptions:
    """Every option of :func:`gatesim.track` (checked when built; ValueError / TypeError).

    Attributes:
        model: with an optimizer as the target: the module whose ``named_parameters()`` name
            the parameters (else the optimizer's ``param_names``, when it was built from
            named parameters, else ``group<g>.param<i>``).
        include, exclude: name patterns: fnmatch strings (``"encoder.layer.*.query.*"``) or
            compiled regular expressions (``re.search``); a parameter is tracked if it matches
            any include (default: all) and no exclude.
        every, window: track steps whose count ``c`` (from 0) has ``c % every < window``.
        what_if: policies to replay next to the real storage: names (``"bf16"``,
            ``"bf16_sr"``, ``"fp16"``, ``"master"``, ``"bf16+master"``, ...; the grammar of
            :mod:`gatesim.policy`), :class:`gatesim.policy.PrecisionPolicy` objects, or a
            dict label -> policy. Records are labelled by the policy's canonical name (or the
            dict's label).
        intended: how the intended update is obtained: ``"fp32"``, ``"fp64"`` or
            ``"stored"`` (:mod:`gatesim.tracking.replay`).
        log: JSON-lines file to append to (schema in :mod:`gatesim.tracking.records`).
        granularity: ``"param"`` (one record per parameter) or ``"group"`` (per param group,
            UpdateStats summed).
        tensorboard: a log directory (used if ``torch.utils.tensorboard`` imports; otherwise
            a warning and no scalars) or any object with ``add_scalar(tag, value, step)``.
            Scalars ``gatesim/<policy>/absorbed_fraction/<kind>`` and
            ``gatesim/<policy>/changed_fraction/<kind>`` per tracked step
            (``gatesim/opt<i>/...`` for the i-th optimizer after the first).
        start_step: step number of the first step seen (when attaching mid-run).
        kind: parameter name -> module kind, for summaries, plots and TensorBoard.
        on_error: ``"warn"`` (default: an error inside the tracker skips that step's tracking
            with a RuntimeWarning; training goes on) or ``"raise"``.
        stats_backend: ``"auto"`` (numba kernel on CPU, tensor ops elsewhere), ``"numba"`` or
            ``"torch"``; all give the same counts.
        replay: ``"auto"`` (default): the replay uses torch's fused kernel (``fused=True``)
            when the param group has a ``fused`` setting (Adam, AdamW, SGD, Adagrad), falling
            back to the group's own settings where it fails; ``"same"``: exactly the group's
            settings (foreach / for-loop / fused as the real optimizer).
    """

    model: Optional[torch.nn.Module] = None
    include: Any = None
    exclude: Any = None
    every: int = 1
    window: int = 1
    what_if: Any = ()
    intended: str = "fp32"
    log: Optional[Union[str, os.PathLike]] = None
    granularity: str = "param"
    tensorboard: Any = None
    start_step: int = 0
    kind: Callable[[str], str] = module_kind
    on_error: str = "warn"
    stats_backend: str = "auto"
    replay: str = "auto"

    def __post_init__(self) -> None:
        _int_at_least("every", self.every, 1, "an int >= 1")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or \
                not 1 <= self.window <= self.every:
            raise ValueError(f"window must be an int in 1..every ({self.every}), got "
                             f"{self.window!r}")
        for name, allowed in (("intended", INTENDED_MODES), ("granularity", ("param", "group")),
                              ("on_error", ("warn", "raise")), ("replay", ("auto", "same")),
                              ("stats_backend", ("auto", "numba", "torch"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        _int_at_least("start_step", self.start_step, 0, "a non-negative int")
        if not callable(self.kind):
            raise TypeError("kind must be a callable name -> kind")
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        NameFilter(self.include, self.exclude)  # pattern types checked here, once

    def tracks_step(self, count: int) -> bool:
        """Whether the step with this count (from 0) is tracked."""
        return count % self.every < self.window


class NameFilter:
    """The include / exclude patterns of :class:`TrackOptions` as one predicate."""

    def __init__(self, include, exclude):
        self._include = self._compile(include, "include")
        self._exclude = self._compile(exclude, "exclude")

    @staticmethod
    def _compile(patterns, what: str):
        if patterns is None:
            return None
        if isinstance(patterns, (str, re.Pattern)):
            patterns = [patterns]
        out = []
        for p in patterns:
            if isinstance(p, re.Pattern):
                out.append(p.search)
            elif isinstance(p, str):
                out.append(lambda name, _p=p: fnmatch.fnmatchcase(name, _p))
            else:
                raise TypeError(f"{what} patterns must be strings (fnmatch) or compiled "
                                f"regular expressions, got {type(p).__name__}")
        return out

    def __call__(self, name: str) -> bool:
        if self._include is not None and not any(f(name) for f in self._include):
            return False
        if self._exclude is not None and any(f(name) for f in self._exclude):
            return False
        return True
