"""Emulated optimizers: SGD and Adam/AdamW under a precision policy, counting what the
number format absorbs at every step.

Each optimizer is a ``torch.optim.Optimizer``. The fp32 arithmetic of a step repeats
PyTorch's single-tensor implementation op for op (``foreach=False``), so under the all-fp32
policy the parameters are bit-identical to ``torch.optim.SGD`` / ``torch.optim.AdamW``.
The policy then decides how the result is *stored*: parameter format and rounding mode,
fp32 master weights or none, Kahan compensation, and the format of the optimizer state.
The parameter write goes through :func:`gatesim.apply_update`, so after every ``step()``
``optimizer.last_stats[name]`` holds that parameter's :class:`gatesim.UpdateStats`; with
``log=path`` every step appends one JSON line per parameter (schema: ``step``, ``param``,
``numel``, ``shape``, then the UpdateStats fields and ``absorbed_fraction``).

Example::

    policy = PrecisionPolicy(param_format="bf16", mode="stochastic", seed=0)
    opt = EmulatedAdamW(model.named_parameters(), lr=1e-4, policy=policy, log="steps.jsonl")
    ...
    opt.step()
    print(opt.last_stats["layer.weight"].absorbed_fraction)
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from gatesim._ops import ops
from gatesim.formats import FP32, Format, as_format
from gatesim.policy import PrecisionPolicy
from gatesim.precision import mode_index, quantize
from gatesim.update import SUM_MODES, UpdateStats, apply_update

# PrecisionPolicy is defined in gatesim.policy; it stays importable from here, where the
# optimizers that take it live.
__all__ = ["PrecisionPolicy", "EmulatedSGD", "EmulatedAdam", "EmulatedAdamW", "adam_variant",
           "adam_probe"]


def _sqrt(x: torch.Tensor, torch_math: bool, out: torch.Tensor) -> torch.Tensor:
    if torch_math:
        return torch.sqrt(x, out=out)
    # correctly rounded: sqrt in fp64 then one rounding to fp32 (53 >= 2 * 24 + 2)
    return out.copy_(x.double().sqrt_())


def _direction(exp_avg: torch.Tensor, root: torch.Tensor, bc2_sqrt: float, eps: float,
               step_size: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (exp_avg * -step_size) / (root / bc2_sqrt + eps)``, every operation rounded
    to fp32 as torch's single-tensor Adam does it (``addcdiv``'s ``(v * t1) / t2``). On the
    CPU one fused pass instead of four (the same bits); on other devices torch's own ops,
    whose bits differ there (CUDA divides by a scalar through its reciprocal)."""
    if out.device.type == "cpu":
        ops.adam_direction_out(exp_avg, root, bc2_sqrt, eps, -step_size, out)
        return out
    root.div_(bc2_sqrt).add_(eps)
    return torch.mul(exp_avg, -step_size, out=out).div_(root)


_ADAM_VARIANTS: dict = {}
_ADAM_TORCH_SQRT = 32  # variant bit: sqrt by torch's own op (csrc/gatesim/adam.h)


def _adam_reference(grad, m, v, coef, step_size, bc2_sqrt, eps):
    """Adam's moments and direction with torch's own ops, as EmulatedAdam.step does them."""
    w1, beta2, a2 = coef[0], coef[1], coef[2]
    m.lerp_(grad, w1)
    v.mul_(beta2).addcmul_(grad, grad, value=a2)
    return _direction(m, torch.sqrt(v), bc2_sqrt, eps, step_size, out=torch.empty_like(v))


def _adam_candidates(device: torch.device) -> list[int]:
    """The variants (csrc/gatesim/adam.h) worth trying on a device: CUDA divides by a scalar
    in one of three ways and its sqrt is IEEE; torch's CPU kernels divide, and their sqrt
    may be MKL's (bit 5: the fused step calls torch's sqrt on each chunk)."""
    if device.type == "cuda":
        return list(range(24))
    return [v for v in range(64) if (v >> 3) & 3 == 0]


def adam_probe(device: torch.device, large_weight: bool, variants=None):
    """Torch's ops and the fused step on the same 69635 values; returns the inputs, torch's
    (exp_avg, exp_avg_sq, direction) and, per variant, the fused step's (also used by
    benchmarks/cuda/cuda_report.py to show which part differs when no variant matches)."""
    g = torch.Generator().manual_seed(0)
    n = (1 << 16) + 4099  # several CPU chunks and a partial statistics block

    def wide(scale):
        mag = 10.0 ** torch.randint(-6, 3, (n,), generator=g).float()
        return torch.randn(n, generator=g) * mag * scale

    grad, m0 = wide(1e-2), wide(1e-2)
    v0 = wide(1e-3) ** 2
    beta1, beta2, lr, eps, step = (0.3 if large_weight else 0.9), 0.999, 1e-3, 1e-8, 3
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    coef = [1 - beta1, beta2, 1 - beta2, bc2_sqrt, eps, -step_size]
    grad, m0, v0 = grad.to(device), m0.to(device), v0.to(device)
    m_ref, v_ref = m0.clone(), v0.clone()
    d_ref = _adam_reference(grad, m_ref, v_ref, coef, step_size, bc2_sqrt, eps)
    fused = {}
    for variant in (_adam_candidates(device) if variants is None else variants):
        p, m, v = torch.zeros_like(grad), m0.clone(), v0.clone()
        # fp32 storage of p = 0 with decay 1 stores the direction itself
        ops.adam_step(p, grad, m, v, None, None, FP32.op_args(), [], 0, 1, coef, variant,
                      1.0, 0, 0, 0, False)
        fused[variant] = (m, v, p)
    return (grad, m0, v0), (m_ref, v_ref, d_ref), fused


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def adam_variant(device: torch.device, large_weight: bool = False) -> Optional[int]:
    """Which of torch's equivalent fp32 formulas of ``lerp_``, ``addcmul_``, ``sqrt`` and the
    division by a scalar the fused Adam step (``torch.ops.gatesim.adam_step``) must use to
    give the bits of torch's own ops on ``device`` (whether the compiler contracted
    ``a + w * b`` into an fma in this build of torch, how it forms a scalar divisor's
    reciprocal, whether its CPU sqrt is MKL's). Found once per device by running the
    candidate variants and torch's ops on a probe of 69635 values of many magnitudes;
    ``None`` when no variant matches, and the optimizers then keep torch's ops.
    ``large_weight``: probe lerp's branch for weights ``1 - beta1 >= 0.5``."""
    device = torch.device(device)
    key = (device.type, device.index, bool(large_weight))
    if key in _ADAM_VARIANTS:
        return _ADAM_VARIANTS[key]
    found = None
    if device.type in ("cpu", "cuda") and torch._C._dispatch_has_kernel_for_dispatch_key(
            "gatesim::adam_step", "CUDA" if device.type == "cuda" else "CPU"):
        _, (m_ref, v_ref, d_ref), fused = adam_probe(device, large_weight)
        for variant, (m, v, p) in fused.items():
            # p == d_ref as values: the stored direction of an exact zero may be +0
            if _same(m, m_ref) and _same(v, v_ref) and torch.equal(p, d_ref):
                found = variant
                break
    _ADAM_VARIANTS[key] = found
    return found


class _Emulated(torch.optim.Optimizer):
    """Shared machinery: parameter names, storage, state rounding, stats and the log."""

    def __init__(self, params, defaults: dict, policy: Optional[PrecisionPolicy],
                 log: Optional[Union[str, os.PathLike]]):
        self.policy = policy or PrecisionPolicy()
        params = list(params)
        names: dict[int, str] = {}
        if params and isinstance(params[0], tuple):  # named_parameters()
            names = {id(p): n for n, p in params}
            params = [p for _, p in params]
        super().__init__(params, defaults)
        self._names: dict[int, str] = {}
        self._offsets: dict[int, int] = {}
        offset = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._names[id(p)] = names.get(id(p), f"group{gi}.param{pi}")
                self._offsets[id(p)] = offset
                offset += p.numel()
                self._init_storage(p)
        self.last_stats: dict[str, UpdateStats] = {}
        # Two flat fp32 scratch buffers per device, sized to the largest parameter and
        # reused by every step: allocating fresh temporaries of a large tensor costs more
        # than the arithmetic (the CPU allocator returns big blocks to the OS, so each step
        # page-faults them in again).
        self._scratch: dict[tuple, torch.Tensor] = {}
        #: Optional ``hook(name, delta, alpha, decay, step)`` called with every update just
        #: before it is applied (see :meth:`_write`). It may rescale ``delta`` in place (the
        #: gate simulation's norm-matched control does) and may record it (update
        #: streams). For SGD without momentum or weight decay ``delta`` is the gradient
        #: tensor itself, so an in-place change there changes ``p.grad``.
        self.update_hook: Optional[Callable[[str, torch.Tensor, float, float, int], None]] = None
        self._log = open(log, "a", encoding="utf-8") if log is not None else None
        self._steps = 0
        #: Use the fused Adam step where it gives torch's bits (see :func:`adam_variant`);
        #: False keeps torch's separate ops (tests compare the two).
        self.fused = True
        #: Restriction masks (:meth:`set_mask`): id(param) -> (mask, frozen stored values).
        self._masks: dict[int, tuple] = {}

    # -- restriction masks -----------------------------------------------------------
    def set_mask(self, param: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Restricts ``param``'s updates to the entries where ``mask`` is True (None lifts
        the restriction). From then on, at every step, the gradient of a masked-out entry
        is taken as zero after any coupled weight decay, so its optimizer state (momentum,
        ``exp_avg``, ``exp_avg_sq``) stays exactly zero (the state is zeroed there now) and
        its update is zero; and its stored bits, fp32 master value and Kahan compensation
        are put back after the write, so they never change under any policy (decoupled
        weight decay and stochastic rounding from a master copy would otherwise move
        them). The step's :class:`UpdateStats` are those of the write before the put-back:
        they count a masked-out entry only where decay or rounding alone would have moved
        it. ``mask``: a bool tensor of ``param``'s shape on its device."""
        if id(param) not in self._names:
            raise ValueError("set_mask: the tensor is not a parameter of this optimizer")
        name = self._names[id(param)]
        if mask is None:
            self._masks.pop(id(param), None)
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"set_mask({name}): the mask must be a torch.Tensor, got "
                            f"{type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"set_mask({name}): the mask must be torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"set_mask({name}): mask shape {tuple(mask.shape)} != parameter "
                             f"shape {tuple(param.shape)}")
        if mask.device != param.device:
            raise ValueError(f"set_mask({name}): mask on {mask.device}, parameter on "
                             f"{param.device}")
        mask = mask.detach().clone().contiguous()
        keep = ~mask
        st = self.state[param]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in st:
                st[key].masked_fill_(keep, 0.0)
        frozen = {"stored": param.data[keep].clone()}
        for key in ("master", "compensation"):
            if key in st:
                frozen[key] = st[key][keep].clone()
        self._masks[id(param)] = (mask, keep, frozen)

    def mask_of(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The restriction mask of ``param`` (:meth:`set_mask`), or None."""
        m = self._masks.get(id(param))
        return None if m is None else m[0]

    def _masked_grad(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` with the masked-out entries of ``p`` set to zero (a new tensor)."""
        m = self._masks.get(id(p))
        if m is None:
            return grad
        return grad.masked_fill(m[1], 0.0)

    def _restore_masked(self, p: torch.Tensor) -> None:
        """Puts back the stored bits, master and compensation of masked-out entries."""
        m = self._masks.get(id(p))
        if m is None:
            return
        keep, frozen = m[1], m[2]
        st = self.state[p]
        p.data[keep] = frozen["stored"]
        for key in ("master", "compensation"):
            if key in frozen:
                st[key][keep] = frozen[key]

    # -- storage -------------------------------------------------------------------
    def _format(self, p: torch.Tensor) -> Format:
        return self.policy.param_format or as_format(p.dtype, "parameter dtype")

    def _init_storage(self, p: torch.Tensor) -> None:
        pol = self.policy
        fmt = self._format(p)
        if not p.is_contiguous():
            raise ValueError(f"parameter {self._names[id(p)]} must be contiguous")
        if p.dtype != torch.float32 and fmt.torch_dtype != p.dtype:
            raise TypeError(f"parameter {self._names[id(p)]} is {p.dtype} but the policy "
                            f"stores {fmt}; use a float32 parameter or a matching format")
        state = self.state[p]
        with torch.no_grad():
            if pol.master:
                state["master"] = p.detach().float().clone()
            if p.dtype == torch.float32 and fmt != FP32:
                quantize(p.data, fmt, out=p.data)
            if pol.kahan:
                state["compensation"] = torch.zeros_like(p)

    def _round_state(self, t: torch.Tensor) -> torch.Tensor:
        if self.policy.state_format != FP32:
            quantize(t, self.policy.state_format, out=t)
        return t

    def _weights(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 values the optimizer math sees: the master copy or the stored value."""
        st = self.state[p]
        return st["master"] if "master" in st else (p if p.dtype == torch.float32 else p.float())

    def _write(self, p: torch.Tensor, delta: torch.Tensor, alpha: float, decay: float,
               step: int) -> UpdateStats:
        pol = self.policy
        st = self.state[p]
        if self.update_hook is not None:
            self.update_hook(self._names[id(p)], delta, alpha, decay, step)
        return apply_update(
            p.data, delta.contiguous(), fmt=self._format(p), mode=pol.mode,
            master=st.get("master"), compensation=st.get("compensation"), alpha=alpha,
            decay=decay, sum_mode=pol.sum, seed=pol.seed if pol.mode == "stochastic" else None,
            offset=self._offsets[id(p)], step=step)

    def _scratch_pair(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 temporaries shaped like ``p`` (views of the reused scratch buffers)."""
        key = (p.device.type, p.device.index)
        n = p.numel()
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < 2 * n:
            buf = torch.empty(2 * n, dtype=torch.float32, device=p.device)
            self._scratch[key] = buf
        return buf[:n].view(p.shape), buf[n:2 * n].view(p.shape)

    def _record(self, p: torch.Tensor, stats: UpdateStats, step: int) -> None:
        name = self._names[id(p)]
        self.last_stats[name] = stats
        if self._log is not None:
            rec = {"step": step, "param": name, "numel": p.numel(), "shape": list(p.shape)}
            rec.update(stats.to_dict())
            self._log.write(json.dumps(rec) + "\n")

    def _finish_step(self) -> None:
        self._steps += 1
        if self._log is not None:
            self._log.flush()  # a killed run keeps every finished step

    def close(self) -> None:
        """Closes the JSON-lines log (safe to call twice)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def _closure_loss(closure):
        """Re-evaluates the model with gradients enabled, as torch.optim does."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _grad(p: torch.Tensor) -> Optional[torch.Tensor]:
        if p.grad is None:
            return None
        if p.grad.is_sparse:
            raise TypeError("sparse gradients are not supported")
        return p.grad if p.grad.dtype == torch.float32 else p.grad.float()


class EmulatedSGD(_Emulated):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) under a
    :class:`PrecisionPolicy`. Same arithmetic as torch's single-tensor SGD; the final
    ``param.add_(grad, alpha=-lr)`` becomes an :func:`apply_update` with ``alpha=-lr``."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 policy: Optional[PrecisionPolicy] = None, log=None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov), policy, log)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, mom, damp, wd, nest = (group["lr"], group["momentum"], group["dampening"],
                                       group["weight_decay"], group["nesterov"])
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                st = self.state[p]
                step = st.get("step", 0)
                if wd != 0:
                    grad = grad.add(self._weights(p), alpha=wd)
                grad = self._masked_grad(p, grad)
                if mom != 0:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = self._round_state(grad.detach().clone())
                        st["momentum_buffer"] = buf
                    else:
                        self._round_state(buf.mul_(mom).add_(grad, alpha=1 - damp))
                    grad = grad.add(buf, alpha=mom) if nest else buf
                stats = self._write(p, grad, alpha=-lr, decay=1.0, step=step)
                self._restore_masked(p)
                st["step"] = step + 1
                self._record(p, stats, step)
        self._finish_step()
        return loss


class EmulatedAdam(_Emulated):
    """``torch.optim.Adam`` / ``AdamW`` (``decoupled=True``) under a :class:`PrecisionPolicy`.
    Same arithmetic as torch's single-tensor Adam; AdamW's ``param.mul_(1 - lr * wd)`` and
    ``param.addcdiv_(exp_avg, denom, value=-step_size)`` become one :func:`apply_update`
    with ``decay = 1 - lr * wd`` and ``delta = (-step_size * exp_avg) / denom``."""

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, policy: Optional[PrecisionPolicy] = None,
                 log=None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay), policy, log)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        torch_math = self.policy.torch_math
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], \
                group["weight_decay"]
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                step = st["step"]
                decay = 1.0
                if wd != 0:
                    if self._decoupled:
                        decay = 1 - lr * wd
                    else:
                        grad = grad.add(self._weights(p), alpha=wd)
                grad = self._masked_grad(p, grad)
                exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2 ** 0.5
                coef = [1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps, -step_size]
                variant = self._fused_variant(p, grad, abs(1 - beta1) >= 0.5)
                if variant is not None:
                    stats = self._write_adam(p, grad, coef, variant, decay, step - 1)
                    self._restore_masked(p)
                    self._record(p, stats, step - 1)
                    continue
                self._round_state(exp_avg.lerp_(grad, 1 - beta1))
                self._round_state(exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2))
                denom, delta = self._scratch_pair(p)
                _direction(exp_avg, _sqrt(exp_avg_sq, torch_math, out=denom),
                           bias_correction2_sqrt, eps, step_size, out=delta)
                stats = self._write(p, delta, alpha=1.0, decay=decay, step=step - 1)
                self._restore_masked(p)
                self._record(p, stats, step - 1)
        self._finish_step()
        return loss

    def _fused_variant(self, p: torch.Tensor, grad: torch.Tensor,
                       large_weight: bool) -> Optional[int]:
        """The calibrated variant of the fused step, or None for torch's ops (an update hook
        that needs the delta, or no variant reproduces torch's ops on this device)."""
        if not (self.fused and self.update_hook is None and grad.is_contiguous()):
            return None
        variant = adam_variant(p.device, large_weight)
        if variant is not None and not self.policy.torch_math:
            variant &= ~_ADAM_TORCH_SQRT  # the correctly rounded sqrt, as _sqrt does
        return variant

    def _write_adam(self, p: torch.Tensor, grad: torch.Tensor, coef: list, variant: int,
                    decay: float, step: int) -> UpdateStats:
        """The moments, the direction and the parameter write in one pass (CUDA) or chunk
        by chunk in cache (CPU): the same bits as torch's lerp_/mul_/addcmul_, sqrt,
        _direction and apply_update."""
        pol = self.policy
        st = self.state[p]
        stochastic = pol.mode == "stochastic"
        state_fmt = [] if pol.state_format == FP32 else pol.state_format.op_args()
        counts, mass = ops.adam_step(
            p.data, grad, st["exp_avg"], st["exp_avg_sq"], st.get("master"),
            st.get("compensation"), self._format(p).op_args(), state_fmt, mode_index(pol.mode),
            SUM_MODES.index(pol.sum), [float(c) for c in coef], variant,
            float(np.float32(decay)), pol.seed if stochastic else 0,
            self._offsets[id(p)] if stochastic else 0, step, True)
        return UpdateStats.from_op(counts, mass)


class EmulatedAdamW(EmulatedAdam):
    """``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) under a policy."""

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kw):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kw)
