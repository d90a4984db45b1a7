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
    tracker.plot("absorbed.png")

How it works
------------
:func:`track` registers a step pre-hook and a step post-hook on a ``torch.optim`` optimizer
(``track(model)`` instead hooks every optimizer that steps the model's parameters, through
torch's global optimizer hooks). At a tracked step:

* pre-step: each tracked parameter (one with a dense gradient) is copied, exactly, into an
  fp32 snapshot; then the *intended update* ``u`` is computed (below);
* post-step: the stored values after the step are compared with the snapshot, bit by bit,
  giving the parameter's own :class:`~gatesim.UpdateStats` (``policy="own"``); then ``u`` is
  applied, with :func:`gatesim.apply_update`, to the shadow storage of every what-if policy.

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

What each record means
----------------------
``policy="own"`` (the real parameter, ``mode="observed"``), from the stored bits before and
after the step and ``u``: ``changed`` stored bits differ (+0 == -0, NaN never equal, as in
bitwise sparsity; SCIENCE.md); ``absorbed`` ``u != 0`` but the stored bits did not change;
``zero`` ``u == 0``; ``nonfinite_delta`` / ``nonfinite_param`` / ``nonfinite_result`` inf or
NaN in ``u`` / before / after; ``absorbed_mass`` sum of ``|u|`` over absorbed elements (fp64);
``hist`` ``log2(|u| / ulp(before))`` in the bins of :data:`gatesim.update.HIST_EDGES_LOG2`;
``sum_differs`` is always 0. These are :class:`~gatesim.UpdateStats` with the same
definitions as :func:`gatesim.apply_update`'s, except that the value after the step is the one
the optimizer stored (computed by :func:`observed_stats`).

A what-if policy (``policy=<name>``) is an *open-loop replay*: its own shadow weights (stored
in the policy's format, plus fp32 master weights or a Kahan buffer if the policy has them)
start as a copy of the real weights (rounded to the policy's format, to nearest) and then
receive, at every tracked step, the same ``u`` through :func:`gatesim.apply_update` with the
policy's rounding mode and sum mode; its record is that call's UpdateStats. The gradients stay
those of the real run (the what-if weights never feed the model), so a what-if answers "what
would this storage have kept of the updates this run intended", not "how would training have
gone". With ``every > 1`` the what-if weights restart from the real weights at the first step
of each tracked window (``anchored=true``): a window of ``window`` consecutive steps out of
every ``every``. They also restart when a parameter is new to the tracker, replaced, or
changed shape or dtype, and after a step whose tracking failed (``on_error="warn"``).

Parameters without a gradient at a step (``.grad is None``) are skipped by torch's optimizers
and are not recorded at that step (no record is written; their what-if weights stay as they
were). Parameters with a zero gradient are recorded (AdamW still decays them).

Hostile use: a parameter replaced mid-run is tracked under its name (from ``model`` or the
optimizer's ``param_names``) from its first step in the optimizer, with its what-ifs restarted
(``anchored=true``); if only the model's attribute was replaced and the optimizer still steps
the old tensor, that old tensor is what is tracked (it keeps its name; should two tensors in
the optimizer share a name, the second is logged as ``name#2``). Parameters added with
``add_param_group`` are picked up at the next step; parameters that left the optimizer are
dropped (their buffers and what-if weights freed). NaN or inf in gradients are counted
(``nonfinite_*``), never raised. ``close()`` twice is a no-op. The log is flushed after every
step. An error inside the tracker (``on_error="warn"``, default) skips that step's tracking
with a warning and never stops the training; ``on_error="raise"`` raises.

Log
---
JSON lines (the conventions of :mod:`gatesim.optim`'s log: appended to, flushed every step,
non-finite masses written as ``NaN``/``Infinity`` by Python's json), one record per tracked
step per parameter (``granularity="group"``: per param group) per policy, keys in this order:
``step`` (optimizer step number, ``start_step`` + steps seen), ``optimizer`` (index; 0 unless
``track(model)`` saw several), ``param``, ``group``, ``kind`` (:func:`module_kind`), ``dtype``
(the real parameter's), ``policy``, ``format``, ``mode``, ``master``, ``kahan``, ``intended``
(``fp32`` / ``fp64`` / ``stored``), ``anchored``, ``numel``, ``shape``, then the UpdateStats
fields (``n``, ``changed``, ``absorbed``, ``zero``, ``nonfinite_delta``, ``nonfinite_param``,
``nonfinite_result``, ``sum_differs``, ``absorbed_mass``, ``hist``) and ``absorbed_fraction``
(absorbed over non-zero updates).

Cost and memory: per tracked element, an fp32 snapshot and the fp32 ``u`` (8 bytes), plus the
what-ifs' storage; the replay's scratch is the size of the largest tracked parameter. Tracking
a subset (``include``/``exclude`` name patterns) or every N-th step (``every``) cuts both.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import fnmatch
import json
import os
import re
import threading
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from gatesim.formats import FORMATS, FP32, Format, as_format
from gatesim.optim import PrecisionPolicy
from gatesim.precision import mode_index, quantize, to_dtype
from gatesim.update import UpdateStats, _N_HIST, apply_update

__all__ = ["track", "Tracker", "WhatIf", "observed_stats", "module_kind", "read_log",
           "summarize", "plot_absorbed", "INTENDED_MODES", "RECORD_KEYS"]

INTENDED_MODES = ("fp32", "fp64", "stored")
#: Keys of a log record, in order.
RECORD_KEYS = ("step", "optimizer", "param", "group", "kind", "dtype", "policy", "format",
               "mode", "master", "kahan", "intended", "anchored", "numel", "shape", "n",
               "changed", "absorbed", "zero", "nonfinite_delta", "nonfinite_param",
               "nonfinite_result", "sum_differs", "absorbed_mass", "hist",
               "absorbed_fraction")
_TRACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SR = mode_index("stochastic")
_STATE = threading.local()  # _STATE.replaying: inside a shadow step (global hooks ignore it)


# ----------------------------------------------------------------------------------------
# module kinds
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# what-if policies
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WhatIf:
    """A storage policy replayed next to the real parameter.

    Attributes:
        name: label in the log and summaries.
        fmt: storage format (None: the real parameter's own format). Formats with a torch
            dtype are stored in it; others (tf32, custom) as fp32 values on the format's grid.
        mode: rounding mode of the stored value (``nearest_even``, ``stochastic``, ...).
        master: keep fp32 master weights (the stored value is ``R(master)``).
        kahan: Kahan-compensated storage (not with master).
        sum: ``"fp32"`` or ``"exact"``, as in :func:`gatesim.apply_update`.
        seed: Philox seed of stochastic rounding; parameter ``i`` (in the order the tracker
            first saw them) uses stream positions from the total size of the ones before it,
            and step ``s`` streams ``2s`` / ``2s+1``, so results do not depend on torch's RNG.
    """

    name: str
    fmt: Optional[Format] = None
    mode: str = "nearest_even"
    master: bool = False
    kahan: bool = False
    sum: str = "fp32"
    seed: int = 0

    @classmethod
    def parse(cls, spec: Union[str, PrecisionPolicy, "WhatIf"],
              name: Optional[str] = None) -> "WhatIf":
        """From a :class:`WhatIf`, a :class:`gatesim.optim.PrecisionPolicy` (its
        ``param_format``, ``master``, ``mode``, ``kahan``, ``sum``, ``seed``; the state format
        does not apply) or a string ``FORMAT[_FLAG...]``: FORMAT one of gatesim's format names
        (``bf16``, ``fp16``, ``fp32``, ``tf32``, ``e4m3fn``, ``e5m2``) or ``own``; flags ``sr``
        (stochastic rounding), ``master`` (fp32 master weights), ``kahan``, ``exact`` (sum
        mode). A string made only of flags (``"master"``, ``"sr"``) means the own format.
        Examples: ``"bf16"``, ``"bf16_sr"``, ``"fp16"``, ``"master"``, ``"bf16_master"``."""
        if isinstance(spec, WhatIf):
            return spec if name is None else dataclasses.replace(spec, name=name)
        if isinstance(spec, PrecisionPolicy):
            return cls(name=name or _policy_name(spec), fmt=spec.param_format, mode=spec.mode,
                       master=spec.master, kahan=spec.kahan, sum=spec.sum, seed=spec.seed)
        if not isinstance(spec, str):
            raise TypeError("a what-if policy is a string, a gatesim.optim.PrecisionPolicy or a "
                            f"gatesim.tracking.WhatIf, got {type(spec).__name__}")
        tokens = [t for t in re.split(r"[_+:\s]+", spec.strip().lower()) if t]
        if not tokens:
            raise ValueError("empty what-if policy")
        flags = {"sr", "stochastic", "master", "kahan", "exact", "rne", "nearest"}
        fmt: Optional[Format] = None
        if tokens[0] not in flags:
            head = tokens.pop(0)
            if head != "own":
                try:
                    fmt = as_format(head, "what-if format")
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"what-if {spec!r}: unknown format {head!r}; known: "
                                     f"{sorted(FORMATS)} or 'own'") from exc
        bad = [t for t in tokens if t not in flags]
        if bad:
            raise ValueError(f"what-if {spec!r}: unknown flag(s) {bad}; flags: sr, master, "
                             "kahan, exact")
        pol = PrecisionPolicy(param_format=fmt,
                              mode="stochastic" if {"sr", "stochastic"} & set(tokens)
                              else "nearest_even",
                              master="master" in tokens, kahan="kahan" in tokens,
                              sum="exact" if "exact" in tokens else "fp32")
        return cls.parse(pol, name=name or spec)

    def storage_format(self, own: Format) -> Format:
        return self.fmt or own

    def describe(self) -> dict:
        return {"format": str(self.fmt) if self.fmt is not None else "own", "mode": self.mode,
                "master": self.master, "kahan": self.kahan, "sum": self.sum}


def _policy_name(p: PrecisionPolicy) -> str:
    parts = [str(p.param_format) if p.param_format is not None else "own"]
    if p.mode != "nearest_even":
        parts.append("sr" if p.mode == "stochastic" else p.mode)
    if p.master:
        parts.append("master")
    if p.kahan:
        parts.append("kahan")
    if p.sum != "fp32":
        parts.append(p.sum)
    return "_".join(parts)


def _parse_what_ifs(what_if) -> list[WhatIf]:
    if what_if is None:
        return []
    if isinstance(what_if, (str, PrecisionPolicy, WhatIf)):
        what_if = [what_if]
    if isinstance(what_if, dict):
        out = [WhatIf.parse(v, name=k) for k, v in what_if.items()]
    else:
        out = [WhatIf.parse(v) for v in what_if]
    names = [w.name for w in out]
    if len(set(names)) != len(names) or "own" in names:
        raise ValueError(f"what-if names must be unique and not 'own', got {names}")
    for w in out:
        mode_index(w.mode)
    return out


# ----------------------------------------------------------------------------------------
# observed statistics
# ----------------------------------------------------------------------------------------
def _stats_from_counts(counts: Sequence[int], mass: float) -> UpdateStats:
    c = [int(x) for x in counts]
    return UpdateStats(n=c[0], changed=c[1], absorbed=c[2], zero=c[3], nonfinite_delta=c[4],
                       nonfinite_param=c[5], nonfinite_result=c[6], sum_differs=0,
                       absorbed_mass=float(mass), hist=c[8:8 + _N_HIST])


#: Elements per chunk of the CPU pass: chunks run on torch.get_num_threads() threads and
#: their results are combined in chunk order, so the absorbed mass has the same bits for
#: any thread count.
CPU_CHUNK = 1 << 16
_POOLS: dict = {}


def _cpu_pool(workers: int):
    pool = _POOLS.get(workers)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="gatesim-track")
    return pool


def _observed_numba(before32: torch.Tensor, after: torch.Tensor, u: torch.Tensor,
                    fmt: Format, src: Optional[torch.Tensor] = None) -> UpdateStats:
    from gatesim import _tracking_kernels as K

    after = after.detach()
    if not after.is_contiguous():
        after = after.contiguous()
    kind = {torch.float32: K.KIND_FP32, torch.bfloat16: K.KIND_BF16,
            torch.float16: K.KIND_FP16}[after.dtype]
    ab = after.view(torch.int32 if kind == K.KIND_FP32 else torch.int16).reshape(-1).numpy()
    ab = ab.view(np.uint32 if kind == K.KIND_FP32 else np.uint16)
    bf = before32.reshape(-1).numpy()
    bb = bf.view(np.uint32)
    un = u.reshape(-1).numpy()
    ubits = un.view(np.uint32)
    sn = un if src is None else src.detach().reshape(-1).numpy()
    n = un.size
    cu = src is not None
    run = lambda lo, hi: K.observed_pass(bb[lo:hi], bf[lo:hi], ab[lo:hi], kind,  # noqa: E731
                                         sn[lo:hi], un[lo:hi], ubits[lo:hi], cu, fmt.emin,
                                         fmt.mbits)
    if n <= CPU_CHUNK:
        counts, mass = run(0, n)
        return _stats_from_counts(counts, mass)
    bounds = [(lo, min(lo + CPU_CHUNK, n)) for lo in range(0, n, CPU_CHUNK)]
    workers = max(1, torch.get_num_threads())
    if workers == 1:
        parts = [run(lo, hi) for lo, hi in bounds]
    else:
        parts = list(_cpu_pool(workers).map(lambda b: run(*b), bounds))
    counts = np.zeros(K.N_COUNTS, dtype=np.int64)
    mass = 0.0
    for c, m in parts:  # chunk order: the same bits for any thread count
        counts += c
        mass += m
    counts[0] = n
    return _stats_from_counts(counts, mass)


def _observed_torch(before32: torch.Tensor, after: torch.Tensor, u: torch.Tensor,
                    fmt: Format, scratch: Optional[torch.Tensor] = None,
                    src: Optional[torch.Tensor] = None) -> UpdateStats:
    """Tensor-op version (any device). Destroys before32 (the last thing it reads)."""
    if src is not None:
        torch.sub(src, before32, out=u)
    n = before32.numel()
    after = after.detach()
    same = before32 == after  # +0 == -0; NaN never equal: exactly "bits unchanged"
    absorbed_mask = same & (u != 0)
    mass = torch.where(absorbed_mask, u, torch.zeros((), dtype=u.dtype, device=u.device))
    counts = torch.stack([same.sum(), absorbed_mask.sum(),
                          torch.isfinite(after).sum()]).tolist()
    mass = float(mass.abs().sum(dtype=torch.float64))
    # zero / non-finite inputs / histogram depend only on (before, u): the fused kernel
    # computes them in the master policy, whose result is discarded.
    if scratch is None:
        scratch = torch.empty_like(u)
    k = apply_update(before32, u, fmt=fmt, master=scratch)
    return UpdateStats(n=n, changed=n - counts[0], absorbed=counts[1], zero=k.zero,
                       nonfinite_delta=k.nonfinite_delta, nonfinite_param=k.nonfinite_param,
                       nonfinite_result=n - counts[2], sum_differs=0, absorbed_mass=mass,
                       hist=list(k.hist))


def observed_stats(before: torch.Tensor, after: torch.Tensor, update: torch.Tensor, *,
                   backend: str = "auto") -> UpdateStats:
    """:class:`~gatesim.UpdateStats` of an optimizer step that stored ``after`` over
    ``before`` while it intended ``update``: what the ``own`` records of :func:`track` hold.

    ``changed``: stored bits differ (+0 == -0, NaN never equal); ``absorbed``: ``update != 0``
    (NaN counts as non-zero) and bits unchanged; ``zero``; ``nonfinite_delta`` /
    ``nonfinite_param`` / ``nonfinite_result`` for update / before / after; ``absorbed_mass``
    sum of ``|update|`` over absorbed elements in fp64 (summation order is the backend's:
    numba on CPU sums in index order, torch in its own; they agree to rounding);
    ``hist``: ``log2(|update| / ulp(before))`` in :data:`gatesim.update.HIST_EDGES_LOG2` bins
    over non-zero finite updates on finite values, exactly as :func:`gatesim.apply_update`;
    ``sum_differs`` 0.

    Args:
        before, after: stored values (float32, bfloat16 or float16, same dtype and shape).
        update: float32 intended update of the same shape.
        backend: ``"numba"`` (CPU only), ``"torch"`` (any device) or ``"auto"``.
    """
    for name, t in (("before", before), ("after", after), ("update", update)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if before.dtype not in _TRACKED_DTYPES or after.dtype != before.dtype:
        raise TypeError(f"before and after must share one of {_TRACKED_DTYPES}, got "
                        f"{before.dtype} and {after.dtype}")
    if update.dtype != torch.float32:
        raise TypeError(f"update must be float32, got {update.dtype}")
    if not (before.shape == after.shape == update.shape):
        raise ValueError(f"shapes differ: {tuple(before.shape)}, {tuple(after.shape)}, "
                         f"{tuple(update.shape)}")
    if not (before.device == after.device == update.device):
        raise ValueError("before, after and update must be on one device")
    fmt = as_format(before.dtype)
    b32 = before.detach().to(torch.float32, copy=True).contiguous()
    u = update.detach().contiguous()
    return _observed(b32, after, u, fmt, backend)


def _observed(b32, after, u, fmt, backend, scratch=None, src=None) -> UpdateStats:
    """Stats of the step; with src, u is first computed in place as fl32(src - b32) (src an
    fp32 tensor, possibly u itself)."""
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "numba" or (backend == "auto" and u.device.type == "cpu"):
        if u.device.type != "cpu":
            raise ValueError("backend='numba' needs CPU tensors")
        if src is not None and not src.is_contiguous():
            src = src.contiguous()
        return _observed_numba(b32, after, u, fmt, src)
    return _observed_torch(b32, after, u, fmt, scratch, src)


# ----------------------------------------------------------------------------------------
# per-parameter state
# ----------------------------------------------------------------------------------------
class _WhatIfState:
    __slots__ = ("param", "master", "comp", "fmt")

    def __init__(self, w: WhatIf, p: torch.Tensor):
        own = as_format(p.dtype)
        fmt = w.storage_format(own)
        x = p.detach().to(torch.float32, copy=True).contiguous()
        if fmt.torch_dtype is not None:
            self.param = x if fmt == FP32 else to_dtype(x, fmt)
        else:
            self.param = quantize(x, fmt)
        self.master = x.clone() if w.master else None
        self.comp = torch.zeros_like(self.param) if w.kahan else None
        self.fmt = fmt


class _ParamTrack:
    """What the tracker keeps for one parameter name."""

    def __init__(self, name: str, offset: int):
        self.name = name
        self.offset = offset
        self.ref: Optional[Callable[[], Optional[torch.Tensor]]] = None
        self.sig: Optional[tuple] = None
        self.snap: Optional[torch.Tensor] = None  # fp32 copy of the stored value before
        self.u: Optional[torch.Tensor] = None  # fp32 intended update
        self.what_ifs: dict[str, _WhatIfState] = {}
        self.last_step: Optional[int] = None

    def bind(self, p: torch.Tensor) -> bool:
        """Points this entry at tensor p; True if it is a different tensor, or p changed
        shape, dtype or device since the last step (buffers and what-ifs then restart)."""
        sig = (tuple(p.shape), p.dtype, p.device)
        same = self.ref is not None and self.ref() is p and self.sig == sig
        if not same:
            self.ref = _weak(p)
            self.sig = sig
            self.snap = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            self.u = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            self.what_ifs = {}
        return not same


def _weak(p: torch.Tensor):
    import weakref
    try:
        return weakref.ref(p)
    except TypeError:  # pragma: no cover - tensors support weak references
        return lambda: p


class _Scratch:
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


# ----------------------------------------------------------------------------------------
# the tracker
# ----------------------------------------------------------------------------------------
def _compile_patterns(patterns, what: str):
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
            raise TypeError(f"{what} patterns must be strings (fnmatch) or compiled regular "
                            f"expressions, got {type(p).__name__}")
    return out


class _Attachment:
    """One hooked optimizer."""

    def __init__(self, tracker: "Tracker", opt: torch.optim.Optimizer, index: int):
        self.tracker = tracker
        self.opt = opt
        self.index = index
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
        t = self.tracker
        pnames = group.get("param_names")
        if pnames is not None and len(pnames) == len(group["params"]):
            name = pnames[pi]
        else:
            name = t._model_name(p)
            if name is None:
                name = self.names.get(p)
            if name is None:
                name = f"group{gi}.param{pi}"
        self.names[p] = name
        return name

    def collect(self, need_grad: bool):
        """(group index, name, param) of the tracked parameters at this step."""
        t = self.tracker
        out = []
        seen = set()
        for gi, group in enumerate(self.opt.param_groups):
            for pi, p in enumerate(group["params"]):
                name = self._name(p, group, gi, pi)
                if t._model_params is not None and not t._in_model(p):
                    continue
                if not t._selected(name):
                    continue
                if name in seen:  # two tensors under one name (e.g. an old and a new one)
                    k = 2
                    while f"{name}#{k}" in seen:
                        k += 1
                    name = f"{name}#{k}"
                if p.dtype not in _TRACKED_DTYPES:
                    t._warn_once(f"dtype:{name}", f"gatesim.track: {name} is {p.dtype}; only "
                                 "float32, bfloat16 and float16 parameters are tracked")
                    continue
                if need_grad:
                    g = p.grad
                    if g is None:
                        continue
                    if g.is_sparse:
                        t._warn_once(f"sparse:{name}", f"gatesim.track: {name} has a sparse "
                                     "gradient; not tracked")
                        continue
                seen.add(name)
                out.append((gi, name, p))
        return out

    # -- hooks -----------------------------------------------------------------------
    def pre(self, args, kwargs) -> None:
        t = self.tracker
        self.pending = None
        step = t.start_step + self.count
        if not t._is_tracked(self.count):
            return
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        intended = "stored" if closure is not None else t.intended
        t._names_fresh = False
        with torch.no_grad():
            entries = self.collect(need_grad=closure is None)
            t._drop_removed(self)
            gap = self.last_tracked is None or self.last_tracked != self.count - 1
            items = []
            for gi, name, p in entries:
                pt = t._param_track(self.index, name, p)
                anchored = pt.bind(p) or gap
                if anchored:
                    pt.what_ifs = {w.name: _WhatIfState(w, p) for w in t.what_ifs}
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

    def _replay(self, p: torch.Tensor, pt: _ParamTrack, gi: int, dtype: torch.dtype) -> bool:
        """Replays p's step in `dtype`. fp32: the replayed value is left in pt.u (the stats
        pass subtracts the snapshot in place; returns True); fp64: pt.u = fl32(replayed -
        before) now (returns False)."""
        t = self.tracker
        sc = t._scratch
        sp = pt.u if dtype == torch.float32 else sc.get("param", p, dtype)
        sp.copy_(pt.snap)
        sg = sc.get("grad", p, dtype)
        sg.copy_(p.grad)
        sp.grad = sg
        group = self.opt.param_groups[gi]
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        fused = (t.replay == "auto" and "fused" in settings and not settings["fused"]
                 and not settings.get("differentiable") and not settings.get("capturable")
                 and type(self.opt) not in t._fused_failed)
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
        prev = getattr(_STATE, "replaying", False)
        _STATE.replaying = True
        try:
            self.raw_step(shadow)
        except Exception:
            if not fused:
                raise
            # no fused kernel for this class, device or dtype: replay it as configured
            t._fused_failed.add(type(self.opt))
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
        t = self.tracker
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
                        t._scratch.get("after", p, torch.float32).copy_(p.detach())
                else:
                    src = None
                own_fmt = as_format(p.dtype)
                scratch = None if p.device.type == "cpu" and t.stats_backend != "torch" else \
                    t._scratch.get("hist", p, torch.float32)
                own = _observed(pt.snap, p, pt.u, own_fmt, t.stats_backend, scratch, src)
                records.append((gi, name, p, "own", own, anchored, how))
                for w in t.what_ifs:
                    ws = pt.what_ifs[w.name]
                    st = apply_update(ws.param, pt.u, fmt=ws.fmt, mode=w.mode, master=ws.master,
                                      compensation=ws.comp, sum=w.sum,
                                      seed=w.seed if mode_index(w.mode) == _SR else None,
                                      offset=pt.offset, step=step)
                    records.append((gi, name, p, w.name, st, anchored, how))
                pt.last_step = step
        self.last_tracked = self.count
        t._emit(self, step, records)

    def finish(self) -> None:
        self.count += 1


class Tracker:
    """Handle returned by :func:`track`; a context manager. See the module docstring for
    what is recorded. Attributes: ``last_stats`` ({(name, policy): UpdateStats} of each
    parameter's last tracked step; names of the i-th optimizer seen by ``track(model)`` are
    prefixed ``"i:"`` for i > 0; ``"group<g>"`` with ``granularity="group"``),
    ``steps_seen`` / ``steps_tracked``, ``errors`` (steps skipped by ``on_error="warn"``),
    ``what_ifs`` (the :class:`WhatIf` list)."""

    def __init__(self, target, *, model=None, include=None, exclude=None, every: int = 1,
                 window: int = 1, what_if=(), intended: str = "fp32",
                 log: Optional[Union[str, os.PathLike]] = None, granularity: str = "param",
                 tensorboard=None, start_step: int = 0,
                 kind: Callable[[str], str] = module_kind, on_error: str = "warn",
                 stats_backend: str = "auto", replay: str = "auto"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= every:
            raise ValueError(f"window must be an int in 1..every ({every}), got {window!r}")
        if intended not in INTENDED_MODES:
            raise ValueError(f"intended must be one of {INTENDED_MODES}, got {intended!r}")
        if granularity not in ("param", "group"):
            raise ValueError(f"granularity must be 'param' or 'group', got {granularity!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if replay not in ("auto", "same"):
            raise ValueError(f"replay must be 'auto' or 'same', got {replay!r}")
        if stats_backend not in ("auto", "numba", "torch"):
            raise ValueError(f"stats_backend must be 'auto', 'numba' or 'torch', got "
                             f"{stats_backend!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        if not callable(kind):
            raise TypeError("kind must be a callable name -> kind")
        self.every, self.window, self.intended = every, window, intended
        self.granularity, self.start_step, self.kind = granularity, start_step, kind
        self.on_error, self.stats_backend, self.replay = on_error, stats_backend, replay
        self._fused_failed: set = set()
        if not isinstance(target, (torch.optim.Optimizer, torch.nn.Module)):
            raise TypeError("track() takes a torch.optim.Optimizer or a torch.nn.Module, got "
                            f"{type(target).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(target, torch.nn.Module) and model is not None and model is not target:
            raise ValueError("track(model) takes no second model")
        self.what_ifs = _parse_what_ifs(what_if)
        self._what_if_by_name = {w.name: w for w in self.what_ifs}
        self._kinds: dict[str, str] = {}
        self._include = _compile_patterns(include, "include")
        self._exclude = _compile_patterns(exclude, "exclude")
        self._model = None
        self._model_params = None  # track(model): only the model's parameters
        self._name_cache = torch.utils.weak.WeakIdKeyDictionary()
        self._names_fresh = False
        self._tracks: dict[tuple, _ParamTrack] = {}
        self._next_offset = 0
        self._scratch = _Scratch()
        self._warned: set = set()
        self._handles: list = []
        self._attachments: dict[int, _Attachment] = {}
        self._attach_refs = torch.utils.weak.WeakIdKeyDictionary()
        self.last_stats: dict[tuple, UpdateStats] = {}
        self.steps_seen = 0
        self.steps_tracked = 0
        self.errors = 0
        self._agg: dict[tuple, list] = {}  # (optimizer, step, kind, policy) -> sums
        self._totals: dict[tuple, list] = {}  # (optimizer, param, kind, policy) -> sums + steps
        self._closed = False
        self._log = open(log, "a", encoding="utf-8") if log is not None else None
        self.log_path = os.fspath(log) if log is not None else None
        self._tb, self._tb_owned = self._open_tensorboard(tensorboard)

        if isinstance(target, torch.optim.Optimizer):
            self._model = model
            att = _Attachment(self, target, 0)
            self._attachments[id(target)] = att
            self._handles.append(target.register_step_pre_hook(
                lambda opt, a, k: self._guard(att, "pre", a, k)))
            self._handles.append(target.register_step_post_hook(
                lambda opt, a, k: self._guard(att, "post", a, k)))
        else:
            self._model = target
            self._model_params = torch.utils.weak.WeakIdKeyDictionary()
            self._refresh_model_names()
            from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                               register_optimizer_step_pre_hook)
            self._handles.append(register_optimizer_step_pre_hook(self._global_pre))
            self._handles.append(register_optimizer_step_post_hook(self._global_post))

    # -- names and selection ---------------------------------------------------------
    def _refresh_model_names(self, force: bool = True) -> None:
        """Re-reads the model's parameter names (on a miss: at most once per step)."""
        if self._model is None or (not force and self._names_fresh):
            return
        self._names_fresh = True
        for n, p in self._model.named_parameters():
            self._name_cache[p] = n
            if self._model_params is not None:
                self._model_params[p] = True

    def _model_name(self, p: torch.Tensor) -> Optional[str]:
        if self._model is None:
            return None
        name = self._name_cache.get(p)
        if name is None or (self._model_params is not None and p not in self._model_params):
            self._refresh_model_names(force=False)
            name = self._name_cache.get(p)
        return name

    def _in_model(self, p: torch.Tensor) -> bool:
        if p not in self._model_params:
            self._refresh_model_names(force=False)
        return p in self._model_params

    def _selected(self, name: str) -> bool:
        if self._include is not None and not any(f(name) for f in self._include):
            return False
        if self._exclude is not None and any(f(name) for f in self._exclude):
            return False
        return True

    def _is_tracked(self, count: int) -> bool:
        return count % self.every < self.window

    def _drop_removed(self, att: "_Attachment") -> None:
        """Frees the buffers and what-ifs of parameters that left the optimizer."""
        present = {id(p) for g in att.opt.param_groups for p in g["params"]}
        for key in [k for k, pt in self._tracks.items() if k[0] == att.index and (
                pt.ref is None or pt.ref() is None or id(pt.ref()) not in present)]:
            del self._tracks[key]

    def _param_track(self, opt_index: int, name: str, p: torch.Tensor) -> _ParamTrack:
        key = (opt_index, name)
        pt = self._tracks.get(key)
        if pt is None:
            pt = _ParamTrack(name, self._next_offset)
            self._next_offset += p.numel()
            self._tracks[key] = pt
        elif pt.sig is not None and pt.sig[0] != tuple(p.shape):
            pt.offset = self._next_offset  # a new tensor: fresh random streams
            self._next_offset += p.numel()
        return pt

    def _kind_of(self, name: str) -> str:
        k = self._kinds.get(name)
        if k is None:
            k = self._kinds[name] = str(self.kind(name))
        return k

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    # -- hooks -----------------------------------------------------------------------
    def _guard(self, att: _Attachment, which: str, args, kwargs) -> None:
        if self._closed:
            return
        try:
            if which == "pre":
                att.pre(args, kwargs)
            else:
                att.post(args, kwargs)
        except Exception as exc:
            att.pending = None
            if self.on_error == "raise":
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

    def _attachment_for(self, opt) -> Optional[_Attachment]:
        att = self._attach_refs.get(opt)
        if att is None:
            att = _Attachment(self, opt, len(self._attachments))
            self._attachments[id(opt)] = att
            self._attach_refs[opt] = att
        return att

    def _holds_model_params(self, opt) -> bool:
        for g in opt.param_groups:
            for p in g["params"]:
                if p in self._model_params:
                    return True
        self._refresh_model_names(force=False)
        return any(p in self._model_params for g in opt.param_groups for p in g["params"])

    def _global_pre(self, opt, args, kwargs):
        if self._closed or getattr(_STATE, "replaying", False):
            return None
        self._names_fresh = False
        att = self._attach_refs.get(opt)
        if att is None:
            if not self._holds_model_params(opt):
                return None
            att = self._attachment_for(opt)
        self._guard(att, "pre", args, kwargs)
        return None

    def _global_post(self, opt, args, kwargs):
        if self._closed or getattr(_STATE, "replaying", False):
            return None
        att = self._attach_refs.get(opt)
        if att is not None:
            self._guard(att, "post", args, kwargs)
        return None

    # -- output ----------------------------------------------------------------------
    def _open_tensorboard(self, tb):
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
                          "tensorboard to get them", RuntimeWarning, stacklevel=4)
            return None, False
        return SummaryWriter(os.fspath(tb)), True

    def _emit(self, att: _Attachment, step: int, records: list) -> None:
        lines = []
        step_keys = []
        if self.granularity == "group":
            grouped: dict[tuple, list] = {}
            for gi, name, p, policy, st, anchored, intended in records:
                dtype = str(p.dtype).replace("torch.", "")
                g = grouped.get((gi, policy))
                if g is None:
                    grouped[(gi, policy)] = [st, {dtype}, anchored, intended]
                else:
                    g[0] = g[0] + st
                    g[1].add(dtype)
                    g[2] = g[2] or anchored
            out = [(gi, f"group{gi}", "group", "+".join(sorted(dtypes)), None, policy, st,
                    anchored, intended, st.n, None)
                   for (gi, policy), (st, dtypes, anchored, intended) in grouped.items()]
        else:
            out = [(gi, name, self._kind_of(name), str(p.dtype).replace("torch.", ""), p,
                    policy, st, anchored, intended, p.numel(), list(p.shape))
                   for gi, name, p, policy, st, anchored, intended in records]
        for gi, name, kind, dtype, p, policy, st, anchored, intended, numel, shape in out:
            key_name = name if att.index == 0 else f"{att.index}:{name}"
            self.last_stats[(key_name, policy)] = st
            if self._log is not None:
                if policy == "own":
                    desc = ("observed", False, False,
                            str(as_format(p.dtype)) if p is not None else dtype)
                else:
                    w = self._what_if_by_name[policy]
                    f = w.fmt or (as_format(p.dtype) if p is not None else None)
                    desc = (w.mode, w.master, w.kahan, str(f) if f is not None else "own")
                rec = {"step": step, "optimizer": att.index, "param": name, "group": gi,
                       "kind": kind, "dtype": dtype, "policy": policy, "format": desc[3],
                       "mode": desc[0], "master": desc[1], "kahan": desc[2],
                       "intended": intended, "anchored": bool(anchored), "numel": numel,
                       "shape": shape, "n": st.n, "changed": st.changed,
                       "absorbed": st.absorbed, "zero": st.zero,
                       "nonfinite_delta": st.nonfinite_delta,
                       "nonfinite_param": st.nonfinite_param,
                       "nonfinite_result": st.nonfinite_result, "sum_differs": st.sum_differs,
                       "absorbed_mass": st.absorbed_mass, "hist": st.hist,
                       "absorbed_fraction": st.absorbed_fraction}
                lines.append(json.dumps(rec))
            vals = (st.n, st.changed, st.absorbed, st.zero, st.absorbed_mass,
                    st.nonfinite_delta, st.nonfinite_result)
            agg_key = (att.index, step, kind, policy)
            a = self._agg.get(agg_key)
            if a is None:
                step_keys.append(agg_key)
                a = self._agg[agg_key] = [0, 0, 0, 0, 0.0, 0, 0]
            tkey = (att.index, name, kind, policy)
            tot = self._totals.get(tkey)
            if tot is None:
                tot = self._totals[tkey] = [0, 0, 0, 0, 0.0, 0, 0, 0]
            for i, v in enumerate(vals):
                a[i] += v
                tot[i] += v
            tot[7] += 1
        if self._log is not None and lines:
            self._log.write("\n".join(lines) + "\n")
            self._log.flush()  # a crashed run keeps every finished step
        if self._tb is not None:
            root = "gatesim" if att.index == 0 else f"gatesim/opt{att.index}"
            for key in sorted(step_keys, key=lambda k: (k[3], k[2])):
                kind, policy = key[2], key[3]
                n, ch, ab, z = self._agg[key][:4]
                nz = n - z
                self._tb.add_scalar(f"{root}/{policy}/absorbed_fraction/{kind}",
                                    ab / nz if nz else 0.0, step)
                self._tb.add_scalar(f"{root}/{policy}/changed_fraction/{kind}",
                                    ch / n if n else 0.0, step)
        self.steps_tracked += 1

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
        self._scratch.clear()
        for pt in self._tracks.values():
            pt.snap = None
            pt.u = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _track_for(self, name: str, optimizer: int = 0) -> _ParamTrack:
        pt = self._tracks.get((optimizer, name))
        if pt is None:
            raise KeyError(f"parameter {name!r} has not been tracked"
                           f"{'' if not optimizer else f' in optimizer {optimizer}'}")
        return pt

    def last_update(self, name: str, optimizer: int = 0) -> torch.Tensor:
        """A copy of the intended update ``u`` of ``name`` at its last tracked step (before
        close())."""
        pt = self._track_for(name, optimizer)
        if pt.u is None:
            raise RuntimeError("the tracker is closed; updates are freed by close()")
        return pt.u.clone()

    def what_if_weights(self, name: str, policy: str, optimizer: int = 0) -> dict:
        """Copies of a what-if's storage for ``name``: ``param`` (stored, in the policy's
        dtype), ``master`` and ``compensation`` (None when the policy has none)."""
        pt = self._track_for(name, optimizer)
        if policy not in pt.what_ifs:
            raise KeyError(f"no what-if {policy!r} for {name!r}; known: {sorted(pt.what_ifs)}")
        ws = pt.what_ifs[policy]
        c = (lambda t: None if t is None else t.clone())
        return {"param": c(ws.param), "master": c(ws.master), "compensation": c(ws.comp)}

    def frame(self):
        """Per-step aggregates as a pandas DataFrame: one row per (optimizer, step, kind,
        policy) with summed ``n``, ``changed``, ``absorbed``, ``zero``, ``absorbed_mass``,
        ``nonfinite_delta``, ``nonfinite_result``."""
        import pandas as pd
        rows = [dict(optimizer=k[0], step=k[1], kind=k[2], policy=k[3], n=v[0], changed=v[1],
                     absorbed=v[2], zero=v[3], absorbed_mass=v[4], nonfinite_delta=v[5],
                     nonfinite_result=v[6]) for k, v in self._agg.items()]
        cols = ["optimizer", "step", "kind", "policy", "n", "changed", "absorbed", "zero",
                "absorbed_mass", "nonfinite_delta", "nonfinite_result"]
        return pd.DataFrame(rows, columns=cols)

    def summary(self, by: str = "kind"):
        """Summary table (pandas DataFrame) over all tracked steps, one row per ``by``
        (``"kind"`` or ``"param"``) and policy; see :func:`summarize` for the columns."""
        import pandas as pd
        if by == "kind":
            return summarize(self.frame(), by="kind")
        if by != "param":
            raise ValueError(f"by must be 'kind' or 'param', got {by!r}")
        rows = [dict(optimizer=k[0], param=k[1], kind=k[2], policy=k[3], steps=v[7], n=v[0],
                     changed=v[1], absorbed=v[2], zero=v[3], absorbed_mass=v[4],
                     nonfinite_delta=v[5], nonfinite_result=v[6])
                for k, v in self._totals.items()]
        return summarize(pd.DataFrame(rows), by="param", steps_column="steps")

    def plot(self, path: Union[str, os.PathLike], **kw) -> str:
        """PNG of the absorbed fraction over steps per module kind; see
        :func:`plot_absorbed`."""
        return plot_absorbed(self.frame(), path, **kw)

    def __repr__(self) -> str:
        return (f"<gatesim Tracker {'closed' if self._closed else 'open'}: "
                f"{self.steps_tracked}/{self.steps_seen} steps tracked, "
                f"{len(self._tracks)} parameters, what-ifs {[w.name for w in self.what_ifs]}>")


def track(target, *, model: Optional[torch.nn.Module] = None,
          include=None, exclude=None, every: int = 1, window: int = 1,
          what_if: Union[str, PrecisionPolicy, WhatIf, Iterable, dict, None] = (),
          intended: str = "fp32", log: Optional[Union[str, os.PathLike]] = None,
          granularity: str = "param", tensorboard=None, start_step: int = 0,
          kind: Callable[[str], str] = module_kind, on_error: str = "warn",
          stats_backend: str = "auto", replay: str = "auto") -> Tracker:
    """Tracks what the number format absorbs at every step of a real training loop.

    Args:
        target: a ``torch.optim.Optimizer`` (its step is hooked), or a ``torch.nn.Module``
            (every optimizer that steps any of its parameters is hooked, through torch's
            global optimizer-step hooks; only the module's parameters are tracked; each
            optimizer has its own step count and index in the log).
        model: with an optimizer: the module whose ``named_parameters()`` name the
            parameters (else the optimizer's ``param_names``, when it was built from named
            parameters, else ``group<g>.param<i>``).
        include, exclude: name patterns: fnmatch strings (``"encoder.layer.*.query.*"``) or
            compiled regular expressions (``re.search``); a parameter is tracked if it matches
            any include (default: all) and no exclude.
        every, window: track steps whose count ``c`` (from 0) has ``c % every < window``.
        what_if: policies to replay next to the real storage: names (``"bf16"``,
            ``"bf16_sr"``, ``"fp16"``, ``"master"``, ``"bf16_master"``, ...; see
            :meth:`WhatIf.parse`), :class:`gatesim.optim.PrecisionPolicy` or :class:`WhatIf`
            objects, or a dict name -> policy.
        intended: how the intended update is obtained: ``"fp32"``, ``"fp64"`` or
            ``"stored"`` (module docstring).
        log: JSON-lines file to append to (schema in the module docstring).
        granularity: ``"param"`` (one record per parameter) or ``"group"`` (per param group,
            UpdateStats summed).
        tensorboard: a log directory (used if ``torch.utils.tensorboard`` imports; otherwise
            a warning and no scalars) or any object with ``add_scalar(tag, value, step)``.
            Scalars ``gatesim/<policy>/absorbed_fraction/<kind>`` and
            ``gatesim/<policy>/changed_fraction/<kind>`` per tracked step (``gatesim/opt<i>/...``
            for the i-th optimizer after the first).
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

    Returns:
        a :class:`Tracker` (a context manager; ``close()`` removes the hooks).
    """
    return Tracker(target, model=model, include=include, exclude=exclude, every=every,
                   window=window, what_if=what_if, intended=intended, log=log,
                   granularity=granularity, tensorboard=tensorboard, start_step=start_step,
                   kind=kind, on_error=on_error, stats_backend=stats_backend, replay=replay)


# ----------------------------------------------------------------------------------------
# reading logs, summaries, plots
# ----------------------------------------------------------------------------------------
def read_log(path: Union[str, os.PathLike]):
    """A tracker log as a pandas DataFrame, one row per record (columns
    :data:`RECORD_KEYS`). Lines that are not complete JSON (a run killed mid-write) are
    skipped with a warning."""
    import pandas as pd
    rows = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        warnings.warn(f"read_log: skipped {bad} incomplete line(s) in {path}", RuntimeWarning,
                      stacklevel=2)
    return pd.DataFrame(rows, columns=list(RECORD_KEYS)) if rows else pd.DataFrame(
        columns=list(RECORD_KEYS))


def summarize(df, by: str = "kind", steps_column: Optional[str] = None):
    """Summary table from records (:func:`read_log`) or aggregates (:meth:`Tracker.frame`):
    one row per ``by`` (``"kind"``, ``"param"`` or any column) and ``policy`` with ``steps``
    (tracked steps), ``elements`` (sum of ``n`` over steps), ``changed_fraction`` (changed /
    elements: mean per-step fraction of stored values that changed), ``absorbed_fraction``
    (absorbed / non-zero updates), ``absorbed``, ``absorbed_mass`` (sum over steps),
    ``nonfinite`` (non-finite updates plus non-finite results)."""
    import pandas as pd
    cols = [by, "policy", "steps", "elements", "changed_fraction", "absorbed_fraction",
            "absorbed", "absorbed_mass", "nonfinite"]
    if len(df) == 0:
        return pd.DataFrame(columns=cols)
    keys = [by, "policy"]
    if "optimizer" in df.columns and df["optimizer"].nunique() > 1:
        keys = ["optimizer"] + keys
        cols = ["optimizer"] + cols
    g = df.groupby(keys, sort=True)
    out = g[["n", "changed", "absorbed", "zero", "absorbed_mass", "nonfinite_delta",
             "nonfinite_result"]].sum()
    steps = g[steps_column].max() if steps_column else g["step"].nunique()
    res = pd.DataFrame({
        "steps": steps,
        "elements": out["n"],
        "changed_fraction": out["changed"] / out["n"].where(out["n"] > 0),
        "absorbed_fraction": out["absorbed"] / (out["n"] - out["zero"]).where(
            out["n"] - out["zero"] > 0),
        "absorbed": out["absorbed"],
        "absorbed_mass": out["absorbed_mass"],
        "nonfinite": out["nonfinite_delta"] + out["nonfinite_result"],
    }).reset_index()
    return res[cols]


def plot_absorbed(df, path: Union[str, os.PathLike], by: str = "kind",
                  title: Optional[str] = None) -> str:
    """Writes a PNG: absorbed fraction (absorbed / non-zero updates) over steps, one line per
    ``by`` value (module kind), one panel per policy. ``df``: records (:func:`read_log`) or
    :meth:`Tracker.frame`. Returns the path. Uses matplotlib's Agg canvas directly (no pyplot,
    no change of the global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(df) == 0:
        raise ValueError("nothing to plot: no records")
    keys = ["policy", by, "step"]
    agg = df.groupby(keys, sort=True)[["n", "zero", "absorbed"]].sum().reset_index()
    agg["fraction"] = agg["absorbed"] / (agg["n"] - agg["zero"]).where(agg["n"] > agg["zero"])
    policies = list(dict.fromkeys(["own"] + sorted(agg["policy"].unique())))
    policies = [p for p in policies if p in set(agg["policy"])]
    import matplotlib

    kinds = sorted(agg[by].astype(str).unique())
    cmap = matplotlib.colormaps["tab20"]
    style = {k: dict(color=cmap(i % 20), ls=("-", "--", ":")[(i // 20) % 3])
             for i, k in enumerate(kinds)}
    fig = Figure(figsize=(10, 2.6 * len(policies) + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(policies), 1, squeeze=False, sharex=True)[:, 0]
    for ax, pol in zip(axes, policies):
        sub = agg[agg["policy"] == pol]
        for k, rows in sub.groupby(by, sort=True):
            ax.plot(rows["step"], rows["fraction"], label=str(k), lw=1.1, **style[str(k)])
        ax.set_ylabel("absorbed fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"policy: {pol}" if pol != "own" else "own storage (observed)",
                     fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=by)
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(os.fspath(path), dpi=110)
    return os.fspath(path)
