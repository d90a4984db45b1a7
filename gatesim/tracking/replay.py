"""The hooks of one tracked optimizer and the replay that finds the intended update.

At a tracked step:

* pre-step: each tracked parameter (one with a dense gradient) is copied, exactly, into an
  fp32 snapshot; then the *intended update* ``u`` is computed (below);
* post-step: the stored values after the step are compared with the snapshot, bit by bit,
  giving the parameter's own :class:`~gatesim.UpdateStats` (``policy="own"``,
  :mod:`gatesim.tracking.observed`); then ``u`` is applied to the storage of every what-if
  policy (:mod:`gatesim.tracking.what_ifs`).

Nothing of the optimizer is touched: parameters, gradients and optimizer state are only read
(``optimizer.state.get``, never ``optimizer.state[p]``, which would insert entries), every copy
the replay works on is a new tensor, stochastic rounding uses gatesim's seeded Philox stream
(never torch's global RNG), and the replay runs the optimizer's undecorated ``step`` on a
shallow copy of the optimizer object, so no hook fires. A tracked run and an untracked run
give bit-identical weights (``tests/test_track.py``).


The intended update ``u`` (``intended=``)
-----------------------------------------
A bf16 parameter whose update was swallowed has ``after == before``, so the stored difference
cannot tell an absorbed update from no update. ``u`` is therefore what the optimizer *meant*
to add, obtained by replaying its step at higher precision:

* ``"fp32"`` (default): a bf16 / fp16 parameter's step is replayed in fp32: the same optimizer
  class with the same param-group settings (lr and schedule included) steps an fp32 copy of
  the parameter, fed an fp32 copy of its gradient and an fp32 copy of its current optimizer
  state (state tensors of the parameter's dtype are upcast exactly; an entry named ``step`` and
  every other entry are copied as they are). ``u = fl32(replayed - before)``. The replay
  restarts from the real run's state at every tracked step, so it never drifts from the real
  training. With ``replay="auto"`` (default) the replay runs torch's fused kernel of the same
  algorithm where the optimizer has one (Adam, AdamW, SGD, Adagrad: ``fused=True``, about 10x
  faster on CPU than the for-loop implementation); it rounds differently from the unfused
  kernels (a few fp32 ULPs of the weight; e.g. the for-loop applies the decay as a product
  with ``fl32(1 - lr * wd)``), far below what bf16/fp16 storage resolves. ``replay="same"``
  uses exactly the group's settings. For an fp32 parameter the real step already is the fp32
  computation, so ``u = fl32(after - before)`` (no replay; the own record then has
  ``absorbed == 0``).
* ``"fp64"``: every parameter, fp32 ones included, is replayed in fp64 and
  ``u = fl32(replayed - before)``: this also shows updates that fp32 storage absorbs. About
  twice the replay cost.
* ``"stored"``: no replay; ``u = fl32(after - before)`` for every parameter. The own records
  then never count anything absorbed (``u == 0`` exactly where the bits did not change); the
  what-ifs show what other storage would have made of the updates the run did store. Steps
  called with a closure (``optimizer.step(closure)``, LBFGS) always use this: the closure
  computes the gradients inside the step, after the pre-hook ran; so does an optimizer whose
  step fails on the replay's copy (e.g. gatesim's emulated optimizers, which look parameters
  up by identity): one RuntimeWarning, then ``intended="stored"`` in its records.

The replay assumes the optimizer updates each parameter independently of the others (true of
SGD, Adam(W), RMSprop, Adagrad, Adamax, NAdam, RAdam, Lion-type and most others); it runs one
parameter at a time, so its scratch memory is that of the largest parameter. With bf16 state,
the real optimizer rounds its moments to bf16 inside the step while the replay keeps them in
fp32, so ``u`` can differ from the real step's unrounded update by about one bf16 rounding of
the state (relative 2**-9); that changes which updates count as non-zero only if ``u`` is
exactly zero in one computation and not in the other.

Parameters without a gradient at a step (``.grad is None``) are skipped by torch's optimizers
and are not recorded at that step (no record is written; their what-if weights stay as they
were). Parameters with a zero gradient are recorded (AdamW still decays them). With
``every > 1`` the what-if weights restart from the real weights at the first step of each
tracked window (``anchored=true``): a window of ``window`` consecutive steps out of every
``every``. They also restart when a parameter is new to the tracker, replaced, or changed
shape or dtype, and after a step whose tracking failed (``on_error="warn"``).
"""
from __future__ import annotations

import collections
import copy
import threading
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from gatesim.formats import as_format
from gatesim.tracking import observed
from gatesim.tracking.options import TrackOptions
from gatesim.tracking.params import ParamRegistry, ParamTrack
from gatesim.tracking.what_ifs import what_if_storage
from gatesim.update import UpdateStats

__all__ = ["Attachment", "Observation", "replaying"]

_STATE = threading.local()  # _STATE.replaying: inside a shadow step (global hooks ignore it)


def replaying() -> bool:
    """Whether this thread is inside a replayed step (whose hooks must not track it)."""
    return getattr(_STATE, "replaying", False)


class Observation(NamedTuple):
    """One parameter's statistics under one policy at one step (before it becomes a record)."""

    group: int
    name: str
    param: torch.Tensor
    policy: str
    stats: UpdateStats
    anchored: bool
    intended: str


class Attachment:
    """One hooked optimizer: its step count, the tracked parameters of a step between the
    pre-hook and the post-hook, and the replay.

    Args:
        opt: the optimizer.
        index: its number in the tracker's records (0 for the first).
        options: the tracker's options.
        registry: the tracker's parameters (names, selection, per-name state).
        what_ifs: label -> policy of the what-ifs.
        emit: called with ``(attachment, step, observations)`` after each tracked step.
    """

    def __init__(self, opt: torch.optim.Optimizer, index: int, options: TrackOptions,
                 registry: ParamRegistry, what_ifs: dict,
                 emit: Callable[["Attachment", int, list], None]):
        self.opt = opt
        self.index = index
        self.options = options
        self.registry = registry
        self.what_ifs = what_ifs
        self.emit = emit
        self.count = 0  # steps seen
        self.last_tracked: Optional[int] = None
        self.pending = None
        self.names = torch.utils.weak.WeakIdKeyDictionary()  # tensor -> name
        self.replay_failed: Optional[str] = None  # why this optimizer cannot be replayed
        step = type(opt).step
        self.raw_step = step.__wrapped__ if getattr(step, "hooked", False) and hasattr(
            step, "__wrapped__") else step

    # -- which parameters ------------------------------------------------------------
    def _name(self, p: torch.Tensor, group: dict, gi: int, pi: int) -> str:
        pnames = group.get("param_names")
        if pnames is not None and len(pnames) == len(group["params"]):
            name = pnames[pi]
        else:
            name = self.registry.model_name(p)
            if name is None:
                name = self.names.get(p)
            if name is None:
                name = f"group{gi}.param{pi}"
        self.names[p] = name
        return name

    def collect(self, need_grad: bool):
        """(group index, name, param) of the tracked parameters at this step."""
        reg = self.registry
        out = []
        seen = set()
        for gi, group in enumerate(self.opt.param_groups):
            for pi, p in enumerate(group["params"]):
                name = self._name(p, group, gi, pi)
                if not reg.in_scope(p):
                    continue
                if not reg.selected(name):
                    continue
                if name in seen:  # two tensors under one name (e.g. an old and a new one)
                    k = 2
                    while f"{name}#{k}" in seen:
                        k += 1
                    name = f"{name}#{k}"
                if p.dtype not in observed.TRACKED_DTYPES:
                    reg.warn_once(f"dtype:{name}", f"gatesim.track: {name} is {p.dtype}; only "
                                 "float32, bfloat16 and float16 parameters are tracked")
                    continue
                if need_grad:
                    g = p.grad
                    if g is None:
                        continue
                    if g.is_sparse:
                        reg.warn_once(f"sparse:{name}", f"gatesim.track: {name} has a sparse "
                                     "gradient; not tracked")
                        continue
                seen.add(name)
                out.append((gi, name, p))
        return out

    # -- hooks -----------------------------------------------------------------------
    def pre(self, args, kwargs) -> None:
        opts, reg = self.options, self.registry
        self.pending = None
        step = opts.start_step + self.count
        if not opts.tracks_step(self.count):
            return
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        intended = "stored" if closure is not None else opts.intended
        reg.new_step()
        with torch.no_grad():
            entries = self.collect(need_grad=closure is None)
            reg.drop_removed(self.index, self.opt)
            gap = self.last_tracked is None or self.last_tracked != self.count - 1
            items = []
            for gi, name, p in entries:
                pt = reg.track_of(self.index, name, p)
                anchored = pt.bind(p) or gap
                if anchored:
                    pt.what_ifs = what_if_storage(self.what_ifs, p, pt.offset)
                pt.snap.copy_(p.detach())
                replay = intended == "fp64" or (intended == "fp32" and p.dtype != torch.float32)
                # how u is finished after the step: "sub" u -= snap in place (fp32 replay),
                # "done" (fp64 replay), "diff" u = after - snap (no replay)
                finish, how = "diff", intended
                if replay and self.replay_failed is None:
                    try:
                        finish = "sub" if self._replay(
                            p, pt, gi, torch.float64 if intended == "fp64" else torch.float32) \
                            else "done"
                    except Exception as exc:  # e.g. state keyed by the real parameter's id
                        self.replay_failed = f"{type(exc).__name__}: {exc}"
                        warnings.warn(
                            f"gatesim.track: {type(self.opt).__name__}.step cannot be replayed "
                            f"on a copy ({self.replay_failed}); its intended updates are the "
                            "stored ones from now on (intended='stored')", RuntimeWarning,
                            stacklevel=4)
                if replay and self.replay_failed is not None:
                    finish, how = "diff", "stored"
                items.append((gi, name, p, pt, finish, anchored, how))
        self.pending = (step, intended, items)

    def _replay(self, p: torch.Tensor, pt: ParamTrack, gi: int, dtype: torch.dtype) -> bool:
        """Replays p's step in `dtype`. fp32: the replayed value is left in pt.u (the stats
        pass subtracts the snapshot in place; returns True); fp64: pt.u = fl32(replayed -
        before) now (returns False)."""
        sc = self.registry.scratch
        sp = pt.u if dtype == torch.float32 else sc.get("param", p, dtype)
        sp.copy_(pt.snap)
        sg = sc.get("grad", p, dtype)
        sg.copy_(p.grad)
        sp.grad = sg
        group = self.opt.param_groups[gi]
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        fused = (self.options.replay == "auto" and "fused" in settings and not settings["fused"]
                 and not settings.get("differentiable") and not settings.get("capturable")
                 and type(self.opt) not in self.registry.fused_failed)
        if fused:  # torch's fused kernel: the same algorithm in one pass over memory
            settings["fused"] = True
            if settings.get("foreach"):
                settings["foreach"] = False
        real_state = self.opt.state.get(p)  # .get: never insert into the real state
        state = {}
        if real_state:
            for k, v in real_state.items():
                if isinstance(v, torch.Tensor):
                    if (k != "step" and v.is_floating_point() and v.dtype == p.dtype
                            and v.dtype != dtype):
                        buf = sc.get("state:" + str(k), v, dtype)
                        buf.copy_(v)
                        state[k] = buf
                    elif k == "step" and fused and v.is_floating_point():
                        # fused kernels keep the step count as fp32 on the parameter's device
                        state[k] = v.detach().to(device=sp.device, dtype=torch.float32,
                                                 copy=True)
                    else:
                        state[k] = v.detach().clone()
                else:
                    state[k] = copy.deepcopy(v)
        shadow = object.__new__(type(self.opt))
        shadow.__dict__.update(self.opt.__dict__)
        shadow.__dict__.pop("step", None)  # an instance-level wrapper (LR schedulers) of opt
        shadow._optimizer_step_pre_hooks = collections.OrderedDict()
        shadow._optimizer_step_post_hooks = collections.OrderedDict()
        shadow.param_groups = [dict(settings, params=[sp])]
        shadow.state = collections.defaultdict(dict)
        shadow.state[sp] = state
        prev = replaying()
        _STATE.replaying = True
        try:
            self.raw_step(shadow)
        except Exception:
            if not fused:
                raise
            # no fused kernel for this class, device or dtype: replay it as configured
            self.registry.fused_failed.add(type(self.opt))
            _STATE.replaying = prev
            sp.grad = None
            return self._replay(p, pt, gi, dtype)
        finally:
            _STATE.replaying = prev
            sp.grad = None
        if dtype == torch.float32:
            return True
        torch.sub(sp, pt.snap, out=pt.u)
        return False

    def post(self, args, kwargs) -> None:
        backend, scratch_of = self.options.stats_backend, self.registry.scratch.get
        pending, self.pending = self.pending, None
        if pending is None:
            return
        step, intended, items = pending
        records = []
        with torch.no_grad():
            for gi, name, p, pt, finish, anchored, how in items:
                if p.grad is None:  # a closure step that computed no gradient for p
                    continue
                if finish == "sub":
                    src = pt.u
                elif finish == "diff":
                    src = p.detach() if p.dtype == torch.float32 else \
                        scratch_of("after", p, torch.float32).copy_(p.detach())
                else:
                    src = None
                own_fmt = as_format(p.dtype)
                scratch = None if p.device.type == "cpu" and backend != "torch" else \
                    scratch_of("hist", p, torch.float32)
                own = observed.step_stats(pt.snap, p, pt.u, own_fmt, backend, scratch, src)
                records.append(Observation(gi, name, p, "own", own, anchored, how))
                for label, shadow in pt.what_ifs.items():
                    records.append(Observation(gi, name, p, label, shadow.apply(pt.u, step=step),
                                               anchored, how))
                pt.last_step = step
        self.last_tracked = self.count
        self.emit(self, step, records)

    def finish(self) -> None:
        self.count += 1
