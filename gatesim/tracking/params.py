"""The tracker's parameters: their names, which are tracked, and what is kept per name
(snapshot, intended update, what-if storage) between the hooks of a step.

Hostile use: a parameter replaced mid-run is tracked under its name (from ``model`` or the
optimizer's ``param_names``) from its first step in the optimizer, with its what-ifs restarted
(``anchored=true``); if only the model's attribute was replaced and the optimizer still steps
the old tensor, that old tensor is what is tracked (it keeps its name; should two tensors in
the optimizer share a name, the second is logged as ``name#2``). Parameters added with
``add_param_group`` are picked up at the next step; parameters that left the optimizer are
dropped (their buffers and what-if weights freed).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional

import torch

from gatesim.shadow import ShadowWeights

__all__ = ["ParamTrack", "ParamRegistry", "Scratch"]


class ParamTrack:
    """What the tracker keeps for one parameter name."""

    def __init__(self, name: str, offset: int):
        self.name = name
        self.offset = offset  # first Philox stream position of its what-ifs
        self.ref: Optional[Callable[[], Optional[torch.Tensor]]] = None
        self.sig: Optional[tuple] = None
        self.snap: Optional[torch.Tensor] = None  # fp32 copy of the stored value before
        self.u: Optional[torch.Tensor] = None  # fp32 intended update
        self.what_ifs: dict[str, ShadowWeights] = {}
        self.last_step: Optional[int] = None

    def bind(self, p: torch.Tensor) -> bool:
        """Points this entry at tensor p; True if it is a different tensor, or p changed
        shape, dtype or device since the last step (buffers and what-ifs then restart)."""
        sig = (tuple(p.shape), p.dtype, p.device)
        same = self.ref is not None and self.ref() is p and self.sig == sig
        if not same:
            self.ref = weakref.ref(p)
            self.sig = sig
            self.snap = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            self.u = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            self.what_ifs = {}
        return not same

    def free(self) -> None:
        self.snap = None
        self.u = None


class Scratch:
    """Flat buffers reused by every parameter's replay (sized by the largest)."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        k = (key, dtype, like.device)
        buf = self._bufs.get(k)
        n = like.numel()
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=like.device)
            self._bufs[k] = buf
        return buf[:n].view(like.shape)

    def clear(self) -> None:
        self._bufs.clear()


class ParamRegistry:
    """Names and per-name state of the parameters one tracker sees.

    Args:
        model: the module naming the parameters (None: the optimizers' names).
        model_only: track only the model's parameters (``track(model)``).
        selected: name -> tracked? (the include / exclude patterns).
    """

    def __init__(self, model: Optional[torch.nn.Module], model_only: bool,
                 selected: Callable[[str], bool]):
        self.model = model
        self.selected = selected
        self._model_params = torch.utils.weak.WeakIdKeyDictionary() if model_only else None
        self._name_cache = torch.utils.weak.WeakIdKeyDictionary()
        self._names_fresh = False
        self.tracks: dict[tuple, ParamTrack] = {}
        self._next_offset = 0
        self.scratch = Scratch()
        #: optimizer classes whose fused replay failed (replayed as configured since)
        self.fused_failed: set = set()
        self._warned: set = set()
        if model_only:
            self.refresh_names()

    # -- names -----------------------------------------------------------------------
    def new_step(self) -> None:
        """A step begins: the model's names may be re-read once on a miss."""
        self._names_fresh = False

    def refresh_names(self, force: bool = True) -> None:
        """Re-reads the model's parameter names (on a miss: at most once per step)."""
        if self.model is None or (not force and self._names_fresh):
            return
        self._names_fresh = True
        for n, p in self.model.named_parameters():
            self._name_cache[p] = n
            if self._model_params is not None:
                self._model_params[p] = True

    def model_name(self, p: torch.Tensor) -> Optional[str]:
        if self.model is None:
            return None
        name = self._name_cache.get(p)
        if name is None or (self._model_params is not None and p not in self._model_params):
            self.refresh_names(force=False)
            name = self._name_cache.get(p)
        return name

    def in_scope(self, p: torch.Tensor) -> bool:
        """Whether p may be tracked: any parameter, or with ``model_only`` the model's."""
        if self._model_params is None:
            return True
        if p not in self._model_params:
            self.refresh_names(force=False)
        return p in self._model_params

    def holds_model_params(self, opt: torch.optim.Optimizer) -> bool:
        """Whether ``opt`` steps any of the model's parameters (``model_only``)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        if any(p in self._model_params for p in params):
            return True
        self.refresh_names(force=False)
        return any(p in self._model_params for p in params)

    # -- per-name state --------------------------------------------------------------
    def track_of(self, opt_index: int, name: str, p: torch.Tensor) -> ParamTrack:
        """The entry of ``name`` (created at its first step, with fresh stream positions)."""
        key = (opt_index, name)
        pt = self.tracks.get(key)
        if pt is None:
            pt = ParamTrack(name, self._next_offset)
            self._next_offset += p.numel()
            self.tracks[key] = pt
        elif pt.sig is not None and pt.sig[0] != tuple(p.shape):
            pt.offset = self._next_offset  # a new tensor: fresh random streams
            self._next_offset += p.numel()
        return pt

    def tracked(self, name: str, optimizer: int = 0) -> ParamTrack:
        pt = self.tracks.get((optimizer, name))
        if pt is None:
            raise KeyError(f"parameter {name!r} has not been tracked"
                           f"{'' if not optimizer else f' in optimizer {optimizer}'}")
        return pt

    def drop_removed(self, opt_index: int, opt: torch.optim.Optimizer) -> None:
        """Frees the buffers and what-ifs of parameters that left the optimizer."""
        present = {id(p) for g in opt.param_groups for p in g["params"]}
        for key in [k for k, pt in self.tracks.items() if k[0] == opt_index and (
                pt.ref is None or pt.ref() is None or id(pt.ref()) not in present)]:
            del self.tracks[key]

    def free_buffers(self) -> None:
        """Drops snapshots, intended updates and scratch (what-if storage stays)."""
        self.scratch.clear()
        for pt in self.tracks.values():
            pt.free()

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=5)
