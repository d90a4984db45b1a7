"""Operations timed by the fused-update benchmarks (``gatesim.apply_update`` and the
emulated optimizers).

Shared by ``update_bench.py`` (pytest-benchmark) and ``compare.py --suite update`` (one-shot
table), so both time exactly the same code. Every case is a zero-argument callable that
updates state allocated once up front, in place, exactly as a training loop would: each
call is one more step on the same tensors (the master weights random-walk by about
``DELTA_STD`` per call, which changes neither the work done nor the cost).

Two groups:

* **Replay step** (:class:`ReplayState`): fp32 master weights + fp32 delta -> bf16 stored
  parameter, with :class:`gatesim.UpdateStats`. gatesim's fused kernel is compared against
  the torch code a user writes today to get the same numbers (:func:`eager_replay_step`),
  against ``torch.compile`` of that code, and against plain copies that move as many bytes.
* **Optimizer step** (:class:`OptimizerState`): ``gatesim.optim.EmulatedAdamW.step()``
  (which always computes UpdateStats) against ``torch.optim.AdamW`` on an identical
  parameter with an identical, fixed gradient.

Not collected by ``pytest tests/``: this file lives in ``benchmarks/`` and is not named
``test_*.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import gatesim
from gatesim.optim import EmulatedAdamW, PrecisionPolicy

#: Default problem: one 4096 x 4096 float32 weight matrix.
DEFAULT_SHAPE = (4096, 4096)
INPUT_SEED = 0
#: Master weights ~ N(0, 0.02). The bf16 ULP of such a weight is ~1e-4, so...
MASTER_STD = 0.02
#: ...a delta ~ N(0, 1e-5) is mostly below half an ULP: in one step about 20% of the
#: stored bf16 values change and the other 80% are absorbed (a late-training update).
DELTA_STD = 1e-5
GRAD_STD = 1e-3
SR_SEED = 0
LR = 1e-3
WEIGHT_DECAY = 1e-2

# bf16 and the UpdateStats histogram (gatesim.update.HIST_EDGES_LOG2).
BF16_MANT_BITS = 7
BF16_EMIN = -126
HIST_LO = gatesim.update.HIST_EDGES_LOG2[0]  # -24: bin k >= 1 is [2**(k-25), 2**(k-24))
N_HIST = len(gatesim.update.HIST_EDGES_LOG2) + 1  # 34

# Names of the cases that the targets and ratio columns refer to.
COPY_16B = "torch copy_ fp32, 2N elements (16 B/elem, reference)"
ADD_16B = "torch add_ fp32 in place, 4N/3 elements (16 B/elem)"
EAGER_NO_STATS = "torch eager replay, no stats (add_ + copy_)"
EAGER_STATS = "torch eager replay with stats (reference)"
EAGER_NAIVE = "torch eager replay with stats, naive (.sum(), bool indexing)"
EAGER_PREALLOC = "torch eager replay with stats, preallocated temporaries"
COMPILED_STATS = "torch.compile eager replay with stats"
GS_REPLAY = "gatesim apply_update master RNE, stats"
GS_REPLAY_SR = "gatesim apply_update master stochastic, stats"
GS_REPLAY_NO_STATS = "gatesim apply_update master RNE, stats=False"
COPY_8B = "torch copy_ fp32, N elements (8 B/elem, reference)"
EAGER_STORAGE = "torch eager bf16 param.add_(delta), no stats"
EAGER_KAHAN = "torch eager Kahan bf16 (torch-optimi's four ops), no stats"
GS_STORAGE = "gatesim apply_update bf16 storage RNE, stats"
GS_STORAGE_NO_STATS = "gatesim apply_update bf16 storage RNE, stats=False"
GS_KAHAN = "gatesim apply_update bf16 Kahan RNE, stats"

TORCH_ADAMW_FOREACH = "torch AdamW foreach=True (reference)"
TORCH_ADAMW_SINGLE = "torch AdamW foreach=False"
TORCH_ADAMW_FUSED = "torch AdamW fused=True"
GS_ADAMW_BF16 = "gatesim EmulatedAdamW bf16 + fp32 master, stats"
GS_ADAMW_FP32 = "gatesim EmulatedAdamW fp32 (default policy), stats"

POLICY_BF16_MASTER = PrecisionPolicy(param_format="bf16", master=True)
POLICY_FP32 = PrecisionPolicy()

Case = Callable[[], object]


def _randn(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


# ----- replay step ------------------------------------------------------------------------
@dataclass
class ReplayState:
    """Master weights, delta, the bf16 parameter, and the buffers of the copy references.

    Byte accounting of one replay step per element (N = numel): the kernel reads master
    (4 B) + delta (4 B) + param (2 B) and writes master (4 B) + param (2 B) back in place:
    16 B/element, 16 N bytes in all. ``copy_src``/``copy_dst`` are fp32 with 2N elements:
    ``copy_dst.copy_(copy_src)`` reads 8 B and writes 8 B per original element, the same
    16 N bytes. (A copy also makes the CPU read each destination line before writing it,
    write-allocate, which the in-place kernel does not; the ``add_`` reference is in place
    like the kernel: ``a.add_(b)`` on 4N/3 fp32 elements reads 8 B and writes 4 B per
    element, again 16 N bytes.)
    """

    master: torch.Tensor  # fp32, updated in place
    delta: torch.Tensor  # fp32, read only
    param: torch.Tensor  # bf16 storage, updated in place
    copy_src: torch.Tensor  # fp32, 2N
    copy_dst: torch.Tensor  # fp32, 2N
    add_a: torch.Tensor  # fp32, 4N/3, updated in place
    add_b: torch.Tensor  # fp32, 4N/3
    eager_buffers: "EagerBuffers"
    # storage without master weights: a bf16 parameter of its own, and a Kahan pair
    # (the kernels read param 2 B + delta 4 B and write param 2 B: 8 B/element, the
    # bytes of an N-element fp32 copy; Kahan adds the compensation's 4 B)
    storage_param: torch.Tensor
    kahan_param: torch.Tensor
    kahan_comp: torch.Tensor

    @classmethod
    def allocate(cls, shape=DEFAULT_SHAPE, seed: int = INPUT_SEED) -> "ReplayState":
        gen = torch.Generator().manual_seed(seed)
        master = _randn(shape, MASTER_STD, gen)
        delta = _randn(shape, DELTA_STD, gen)
        n = master.numel()
        n_add = round(n * 4 / 3)
        return cls(master=master, delta=delta, param=master.to(torch.bfloat16),
                   copy_src=torch.randn(2 * n, generator=gen), copy_dst=torch.empty(2 * n),
                   add_a=torch.zeros(n_add), add_b=torch.full((n_add,), 1e-30),
                   eager_buffers=EagerBuffers(delta),
                   storage_param=master.to(torch.bfloat16), kahan_param=master.to(torch.bfloat16),
                   kahan_comp=torch.zeros(shape, dtype=torch.bfloat16))

    def clone(self) -> "ReplayState":
        """Independent copy of master/delta/param (the copy buffers are shared)."""
        return dataclasses.replace(self, master=self.master.clone(), param=self.param.clone())


def eager_replay_step(param: torch.Tensor, delta: torch.Tensor, master: torch.Tensor):
    """What a user writes today for ``apply_update(param, delta, master=master)`` + stats.

    ``param`` bf16, ``delta`` and ``master`` fp32, all updated like gatesim's kernel
    (``alpha=1``, ``decay=1``, nearest_even). Returns tensors
    ``(changed, absorbed, zero, absorbed_mass, hist)`` with UpdateStats' meaning:

    * changed: stored value differs after the step; compared as values, so +0 == -0 and
      NaN never equals, as in UpdateStats (``view(torch.int16) !=`` differs only there);
    * absorbed: ``delta != 0`` but the stored value did not change; absorbed_mass: the fp64
      sum of ``|delta|`` over those elements;
    * hist: 34 bins of ``log2(|delta| / ulp_bf16(param before))`` over non-zero deltas, bin
      0 below 2**-24, bin k in [2**(k-25), 2**(k-24)), bin 33 at or above 2**8.

    The nonfinite_* counts of UpdateStats are not computed (the benchmark input is finite),
    which only makes this reference cheaper. It is the lean spelling, the strongest eager
    reference that still allocates its temporaries as eager code does: counts by
    ``torch.count_nonzero`` (a bool ``.sum()`` is ~20x slower on CPU), masks with
    ``torch.where``/``masked_fill_`` rather than boolean indexing, integer arithmetic in
    place, ``frexp`` directly on the bf16 tensor. :func:`eager_replay_step_naive` is the
    first-draft spelling, :func:`eager_replay_step_prealloc` reuses preallocated buffers.
    """
    master.add_(delta)
    new = master.to(torch.bfloat16)
    changed = new != param
    nonzero = delta != 0
    n_changed = torch.count_nonzero(changed)
    n_zero = delta.numel() - torch.count_nonzero(nonzero)
    absorbed = changed.logical_not_().logical_and_(nonzero)  # reuses changed's buffer
    n_absorbed = torch.count_nonzero(absorbed)
    absorbed_mass = torch.where(absorbed, delta.abs(), 0.0).sum(dtype=torch.float64)
    hist = _eager_hist(param, delta, nonzero)
    param.copy_(new)
    return n_changed, n_absorbed, n_zero, absorbed_mass, hist


def _eager_hist(param: torch.Tensor, delta: torch.Tensor, nonzero: torch.Tensor,
                k: Optional[torch.Tensor] = None, ulp_exp: Optional[torch.Tensor] = None,
                mant: Optional[tuple] = None, is_zero: Optional[torch.Tensor] = None):
    """The 34-bin histogram of log2(|delta| / ulp_bf16(param)) over ``nonzero``; consumes
    ``nonzero``. ``k``, ``ulp_exp``, ``mant`` (fp32, bf16), ``is_zero``: optional buffers.

    |delta| is in [2**(e_u - 1), 2**e_u) with ``e_u`` from frexp; the bf16 ULP of p is
    2**(max(e_p - 1, emin) - 7) for p != 0 (subnormals included) and the smallest
    subnormal for p == 0. Bin = binade(|delta|) - log2(ulp) - HIST_LO + 1, clamped.
    """
    if k is None:
        _, k = torch.frexp(delta)
        _, ulp_exp = torch.frexp(param)
        is_zero = param == 0
    else:
        torch.frexp(delta, out=(mant[0], k))
        torch.frexp(param, out=(mant[1], ulp_exp))
        torch.eq(param, 0, out=is_zero)
    ulp_exp.clamp_(min=BF16_EMIN + 1).sub_(1 + BF16_MANT_BITS)
    ulp_exp.masked_fill_(is_zero, BF16_EMIN - BF16_MANT_BITS)
    k.sub_(ulp_exp).sub_(HIST_LO).clamp_(0, N_HIST - 1)
    k.masked_fill_(nonzero.logical_not_(), N_HIST)  # zero deltas: a spare bin, dropped
    return torch.bincount(k.view(-1), minlength=N_HIST + 1)[:N_HIST]


def eager_replay_step_naive(param: torch.Tensor, delta: torch.Tensor, master: torch.Tensor):
    """:func:`eager_replay_step` as first written (and as the issue sketches it): counts by
    bool ``.sum()``, the mass and the histogram input by boolean indexing, out-of-place
    integer arithmetic. Same outputs."""
    master.add_(delta)
    new = master.to(torch.bfloat16)
    changed = new != param
    nonzero = delta != 0
    absorbed = nonzero & ~changed
    n_changed = changed.sum()
    n_absorbed = absorbed.sum()
    n_zero = delta.numel() - nonzero.sum()
    absorbed_mass = delta.abs()[absorbed].sum(dtype=torch.float64)
    _, e_u = torch.frexp(delta)
    _, e_p = torch.frexp(param.float())
    ulp_exp = torch.where(param == 0, BF16_EMIN - BF16_MANT_BITS,
                          e_p.clamp(min=BF16_EMIN + 1) - 1 - BF16_MANT_BITS)
    k = (e_u - 1 - ulp_exp - HIST_LO + 1).clamp(0, N_HIST - 1)
    hist = torch.bincount(k[nonzero], minlength=N_HIST)
    param.copy_(new)
    return n_changed, n_absorbed, n_zero, absorbed_mass, hist


class EagerBuffers:
    """Temporaries of :func:`eager_replay_step_prealloc`, allocated once."""

    def __init__(self, delta: torch.Tensor):
        shape = delta.shape
        self.new = torch.empty(shape, dtype=torch.bfloat16)
        self.changed = torch.empty(shape, dtype=torch.bool)
        self.nonzero = torch.empty(shape, dtype=torch.bool)
        self.is_zero = torch.empty(shape, dtype=torch.bool)
        self.abs = torch.empty(shape, dtype=torch.float32)
        self.mant = (torch.empty(shape, dtype=torch.float32),
                     torch.empty(shape, dtype=torch.bfloat16))
        self.k = torch.empty(shape, dtype=torch.int32)
        self.ulp_exp = torch.empty(shape, dtype=torch.int32)


def eager_replay_step_prealloc(param: torch.Tensor, delta: torch.Tensor,
                               master: torch.Tensor, b: EagerBuffers):
    """:func:`eager_replay_step` with every large temporary written into ``b`` (``out=``
    and in-place ops): the eager lower bound, without the page faults of fresh 64 MiB
    allocations. Same outputs."""
    master.add_(delta)
    b.new.copy_(master)
    torch.ne(b.new, param, out=b.changed)
    torch.ne(delta, 0, out=b.nonzero)
    n_changed = torch.count_nonzero(b.changed)
    n_zero = delta.numel() - torch.count_nonzero(b.nonzero)
    absorbed = b.changed.logical_not_().logical_and_(b.nonzero)
    n_absorbed = torch.count_nonzero(absorbed)
    absorbed_mass = torch.abs(delta, out=b.abs).mul_(absorbed).sum(dtype=torch.float64)
    hist = _eager_hist(param, delta, b.nonzero, b.k, b.ulp_exp, b.mant, b.is_zero)
    param.copy_(b.new)
    return n_changed, n_absorbed, n_zero, absorbed_mass, hist


def stats_dict(out) -> dict:
    """Python values of :func:`eager_replay_step`'s tensors (what a user would log)."""
    changed, absorbed, zero, mass, hist = out
    return {"changed": int(changed), "absorbed": int(absorbed), "zero": int(zero),
            "absorbed_mass": float(mass), "hist": hist.tolist()}


def eager_no_stats(param: torch.Tensor, delta: torch.Tensor, master: torch.Tensor) -> None:
    """The same replay step without statistics, in eager torch."""
    master.add_(delta)
    param.copy_(master)


def replay_reference_cases(s: ReplayState) -> Dict[str, Case]:
    """Copies moving the kernel's bytes, and the eager torch replay with/without stats."""
    return {
        COPY_16B: lambda: s.copy_dst.copy_(s.copy_src),
        ADD_16B: lambda: s.add_a.add_(s.add_b),
        EAGER_NO_STATS: lambda: eager_no_stats(s.param, s.delta, s.master),
        EAGER_NAIVE:
            lambda: stats_dict(eager_replay_step_naive(s.param, s.delta, s.master)),
        EAGER_STATS: lambda: stats_dict(eager_replay_step(s.param, s.delta, s.master)),
        EAGER_PREALLOC: lambda: stats_dict(eager_replay_step_prealloc(
            s.param, s.delta, s.master, s.eager_buffers)),
    }


def replay_gatesim_cases(s: ReplayState) -> Dict[str, Case]:
    """gatesim.apply_update with master weights: RNE and stochastic with stats, RNE without."""
    return {
        GS_REPLAY: lambda: gatesim.apply_update(s.param, s.delta, master=s.master),
        GS_REPLAY_SR: lambda: gatesim.apply_update(s.param, s.delta, master=s.master,
                                                   mode="stochastic", seed=SR_SEED),
        GS_REPLAY_NO_STATS: lambda: gatesim.apply_update(s.param, s.delta, master=s.master,
                                                         stats=False),
    }


def eager_kahan(param: torch.Tensor, comp: torch.Tensor, delta: torch.Tensor) -> None:
    """torch-optimi's Kahan-compensated update in bf16 (gatesim's sum="fp32" Kahan)."""
    comp.add_(delta)
    t = param.clone()
    param.add_(comp)
    comp.add_(t.sub_(param))


def storage_cases(s: ReplayState) -> Dict[str, Case]:
    """The bf16 parameter updated without master weights: plain and Kahan-compensated."""
    n = s.delta.numel()
    return {
        COPY_8B: lambda: s.copy_dst[:n].copy_(s.copy_src[:n]),
        EAGER_STORAGE: lambda: s.storage_param.add_(s.delta),
        EAGER_KAHAN: lambda: eager_kahan(s.kahan_param, s.kahan_comp, s.delta),
        GS_STORAGE: lambda: gatesim.apply_update(s.storage_param, s.delta),
        GS_STORAGE_NO_STATS: lambda: gatesim.apply_update(s.storage_param, s.delta, stats=False),
        GS_KAHAN: lambda: gatesim.apply_update(s.kahan_param, s.delta, compensation=s.kahan_comp),
    }


def check_storage(s: ReplayState, steps: int = 3) -> None:
    """gatesim's sum="fp32" storage and Kahan steps give the eager torch spellings' bits
    (copies of the state, so the timed tensors are left alone); AssertionError if not."""
    p_t, p_g = s.storage_param.clone(), s.storage_param.clone()
    kp_t, kc_t = s.kahan_param.clone(), s.kahan_comp.clone()
    kp_g, kc_g = s.kahan_param.clone(), s.kahan_comp.clone()
    for _ in range(steps):
        p_t.add_(s.delta)
        gatesim.apply_update(p_g, s.delta, sum_mode="fp32", stats=False)
        eager_kahan(kp_t, kc_t, s.delta)
        gatesim.apply_update(kp_g, s.delta, compensation=kc_g, sum_mode="fp32", stats=False)
    for what, a, b in (("bf16 storage", p_t, p_g), ("Kahan param", kp_t, kp_g),
                       ("Kahan compensation", kc_t, kc_g)):
        if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
            raise AssertionError(f"{what}: gatesim (sum='fp32') and eager torch differ")


#: Inductor by default keeps the bf16 value of ``master.to(torch.bfloat16)`` in fp32 registers
#: when it fuses the cast into the comparison, so ``new != param`` compares the unrounded
#: master and nearly every element counts as changed (the stored bf16 bits are still
#: right). ``emulate_precision_casts`` makes it round at the cast, as eager does.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


def compile_replay(s: ReplayState, options: Optional[dict] = None) -> Optional[Callable]:
    """``torch.compile(eager_replay_step, options=...)``, compiled by one run on a clone of
    ``s`` (same shapes, so no recompile later; ``s`` itself is not advanced); None, with a
    message, if it fails."""
    try:
        compiled = torch.compile(eager_replay_step, options=options)
        c = s.clone()
        compiled(c.param, c.delta, c.master)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "unavailable"
        print(f"[benchmarks] {COMPILED_STATS}: torch.compile unavailable "
              f"({type(exc).__name__}: {exc})")
        return None
    return compiled


def replay_compiled_cases(s: ReplayState,
                          compiled: Optional[Callable] = None) -> Dict[str, Optional[Case]]:
    """The compiled eager replay (:func:`compile_replay` with :data:`COMPILE_OPTIONS` unless
    given) on ``s``; ``None`` (reported as unavailable) if compilation fails. Dynamo
    guards on shapes and the thread count: warm up again after ``torch.set_num_threads``."""
    compiled = compiled or compile_replay(s, COMPILE_OPTIONS)
    if compiled is None:
        return {COMPILED_STATS: None}
    return {COMPILED_STATS: lambda: stats_dict(compiled(s.param, s.delta, s.master))}


def compiled_default_agrees(s: ReplayState) -> Optional[bool]:
    """Whether torch.compile with inductor's *default* options gives eager's statistics on
    ``s`` (None if it does not compile). Informational; see :data:`COMPILE_OPTIONS`."""
    compiled = compile_replay(s, None)
    if compiled is None:
        return None
    a, b = s.clone(), s.clone()
    got = stats_dict(compiled(a.param, a.delta, a.master))
    want = stats_dict(eager_replay_step(b.param, b.delta, b.master))
    return got == want


def check_replay(s: ReplayState, compiled: Optional[Case] = None) -> Dict[str, object]:
    """Asserts that gatesim, the eager reference and (if given) the compiled reference give
    the same master bits, bf16 bits and statistics on clones of ``s``; returns the stats.

    ``compiled`` is a compiled :func:`eager_replay_step` (:func:`compile_replay`); masses
    are compared to 1e-12 relative (fp64 sums in different orders), everything else exactly.
    """
    g = s.clone()
    st = gatesim.apply_update(g.param, g.delta, master=g.master)
    variants = {"eager": eager_replay_step, "naive eager": eager_replay_step_naive,
                "preallocated eager": lambda p, d, m: eager_replay_step_prealloc(
                    p, d, m, EagerBuffers(d))}
    for what, fn in variants.items():
        e = s.clone()
        _assert_stats_equal(st, stats_dict(fn(e.param, e.delta, e.master)), what)
        assert torch.equal(g.master.view(torch.int32), e.master.view(torch.int32)), \
            f"gatesim master != {what} master.add_(delta)"
        assert torch.equal(g.param.view(torch.int16), e.param.view(torch.int16)), \
            f"gatesim bf16 param != {what} master.to(bfloat16)"
    assert st.n == s.param.numel() and st.nonfinite_delta == st.nonfinite_param == \
        st.nonfinite_result == 0, f"unexpected UpdateStats {st}"
    if compiled is not None:
        c = s.clone()
        _assert_stats_equal(st, stats_dict(compiled(c.param, c.delta, c.master)), "compiled")
        assert torch.equal(c.param.view(torch.int16), g.param.view(torch.int16)), \
            "torch.compile bf16 param != gatesim"
        assert torch.equal(c.master.view(torch.int32), g.master.view(torch.int32)), \
            "torch.compile master != gatesim"
    # stats=False: same bits; stochastic: same master, same histogram (it depends only on
    # delta and the param before the step), and every element is changed or absorbed.
    n = s.clone()
    assert gatesim.apply_update(n.param, n.delta, master=n.master, stats=False) is None
    assert torch.equal(n.param.view(torch.int16), g.param.view(torch.int16)), \
        "stats=False gives other bf16 bits"
    r = s.clone()
    sr = gatesim.apply_update(r.param, r.delta, master=r.master, mode="stochastic",
                              seed=SR_SEED)
    assert torch.equal(r.master.view(torch.int32), g.master.view(torch.int32))
    assert sr.hist == st.hist and sr.zero == st.zero
    assert sr.changed + sr.absorbed + sr.zero == sr.n
    return {"nearest_even": st, "stochastic": sr}


def _assert_stats_equal(st: gatesim.UpdateStats, ref: dict, what: str) -> None:
    got = {"changed": st.changed, "absorbed": st.absorbed, "zero": st.zero, "hist": st.hist}
    want = {k: ref[k] for k in got}
    assert got == want, f"gatesim UpdateStats != {what}: {got} vs {want}"
    m, rm = st.absorbed_mass, ref["absorbed_mass"]
    assert abs(m - rm) <= 1e-12 * abs(rm), f"absorbed_mass {m!r} != {what} {rm!r}"


# ----- optimizer step ---------------------------------------------------------------------
@dataclass
class OptimizerState:
    """One optimizer per case, each on its own copy of the same parameter and gradient.

    Every optimizer has taken one step at construction, so its state exists and timing
    starts at steady state.
    """

    optimizers: Dict[str, Optional[torch.optim.Optimizer]]

    @classmethod
    def allocate(cls, shape=DEFAULT_SHAPE, seed: int = INPUT_SEED) -> "OptimizerState":
        weight, grad = make_weight_and_grad(shape, seed)
        opts = {name: make_optimizer(name, weight, grad) for name in OPTIMIZER_NAMES}
        for opt in opts.values():
            if opt is not None:
                opt.step()
        return cls(opts)


OPTIMIZER_NAMES = (TORCH_ADAMW_FOREACH, TORCH_ADAMW_SINGLE, TORCH_ADAMW_FUSED,
                   GS_ADAMW_BF16, GS_ADAMW_FP32)


def make_weight_and_grad(shape=DEFAULT_SHAPE, seed: int = INPUT_SEED):
    gen = torch.Generator().manual_seed(seed + 1)
    return _randn(shape, MASTER_STD, gen), _randn(shape, GRAD_STD, gen)


def make_optimizer(name: str, weight: torch.Tensor,
                   grad: torch.Tensor) -> Optional[torch.optim.Optimizer]:
    """A fresh fp32 parameter (copy of ``weight``, ``.grad`` a copy of ``grad``) and the
    optimizer ``name`` on it; None if torch does not offer that variant here."""
    p = torch.nn.Parameter(weight.clone())
    p.grad = grad.clone()
    kw = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    if name == TORCH_ADAMW_FOREACH:
        return torch.optim.AdamW([p], foreach=True, **kw)
    if name == TORCH_ADAMW_SINGLE:
        return torch.optim.AdamW([p], foreach=False, **kw)
    if name == TORCH_ADAMW_FUSED:
        try:
            opt = torch.optim.AdamW([p], fused=True, **kw)
            opt.step()  # fails here if this build has no fused CPU kernel
        except (RuntimeError, ValueError) as exc:
            print(f"[benchmarks] {name}: unavailable ({type(exc).__name__}: {exc})")
            return None
        p.data.copy_(weight)  # undo the probe step
        opt.state.clear()
        return opt
    if name == GS_ADAMW_BF16:
        return EmulatedAdamW([p], policy=POLICY_BF16_MASTER, **kw)
    if name == GS_ADAMW_FP32:
        return EmulatedAdamW([p], policy=POLICY_FP32, **kw)
    raise KeyError(name)


def optimizer_cases(o: OptimizerState) -> Dict[str, Optional[Case]]:
    return {name: (None if opt is None else opt.step) for name, opt in o.optimizers.items()}


def _param(opt: torch.optim.Optimizer) -> torch.Tensor:
    return opt.param_groups[0]["params"][0]


def check_optimizers(shape=DEFAULT_SHAPE, seed: int = INPUT_SEED, steps: int = 3) -> Dict[str, bool]:
    """Runs every optimizer ``steps`` times from the same start and asserts:

    * EmulatedAdamW under the fp32 policy is bit-identical to torch AdamW(foreach=False)
      (gatesim's documented guarantee);
    * under the bf16 + master policy, the master weights are bit-identical to that too, the
      stored parameter is the master rounded to nearest bf16, and ``last_stats`` is set.

    Returns whether torch's foreach and fused AdamW match the single-tensor one bit for bit
    (informational: torch does not promise it).
    """
    weight, grad = make_weight_and_grad(shape, seed)
    opts = {name: make_optimizer(name, weight, grad) for name in OPTIMIZER_NAMES}
    for _ in range(steps):
        for opt in opts.values():
            if opt is not None:
                opt.step()
    want = _param(opts[TORCH_ADAMW_SINGLE]).detach()
    bits = lambda t: t.detach().view(torch.int32)  # noqa: E731
    assert torch.equal(bits(_param(opts[GS_ADAMW_FP32])), bits(want)), \
        "EmulatedAdamW (fp32 policy) != torch AdamW(foreach=False)"
    bf = opts[GS_ADAMW_BF16]
    p_bf = _param(bf)
    master = bf.state[p_bf]["master"]
    assert torch.equal(bits(master), bits(want)), \
        "EmulatedAdamW (bf16 + master) master weights != torch AdamW(foreach=False)"
    assert torch.equal(bits(p_bf), bits(master.to(torch.bfloat16).float())), \
        "EmulatedAdamW (bf16 + master) param != master rounded to bf16"
    for opt in (bf, opts[GS_ADAMW_FP32]):
        st = next(iter(opt.last_stats.values()))
        assert st.n == weight.numel() and st.changed + st.absorbed + st.zero == st.n
    same = {}
    for name in (TORCH_ADAMW_FOREACH, TORCH_ADAMW_FUSED):
        if opts[name] is not None:
            same[name] = torch.equal(bits(_param(opts[name])), bits(want))
    return same


def set_threads(n: int) -> None:
    """Intra-op thread count for torch and the gatesim ops (which use torch's pool)."""
    torch.set_num_threads(n)
