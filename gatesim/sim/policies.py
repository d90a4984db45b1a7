"""Named precision policies of the gate-simulation factorial (Gate III).

A name is ``FORMAT[_sr][+master]``: ``fp32``, ``bf16`` (nearest-even storage), ``bf16_sr``
(stochastic rounding), ``fp16``, ``bf16+master`` (fp32 master weights, stored value
``R(master)``), and so on for any named format (``fp32``, ``tf32``, ``bf16``, ``fp16``,
``e4m3fn``, ``e5m2``). Storage-only policies round ``fl32(p + u)`` the way PyTorch does on
a low-precision tensor (``sum="fp32"``), which is what an optimizer stepping bf16 weights
does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from gatesim.formats import FP32, Format, as_format
from gatesim.optim import PrecisionPolicy
from gatesim.precision import quantize
from gatesim.update import UpdateStats, apply_update

__all__ = ["NamedPolicy", "parse_policy", "DEFAULT_POLICIES", "ShadowWeights"]

#: The Gate III cells: fp32 storage, bf16 nearest, bf16 stochastic, fp16 nearest, each
#: low-precision one with and without fp32 master weights.
DEFAULT_POLICIES = ("fp32", "bf16", "bf16_sr", "fp16", "bf16+master", "bf16_sr+master",
                    "fp16+master")


@dataclasses.dataclass(frozen=True)
class NamedPolicy:
    name: str
    fmt: Format
    mode: str
    master: bool

    def precision_policy(self, seed: int) -> PrecisionPolicy:
        """The same policy for :mod:`gatesim.optim` (training under it)."""
        return PrecisionPolicy(param_format=self.fmt, master=self.master, mode=self.mode,
                               seed=seed)


def parse_policy(name: str) -> NamedPolicy:
    """``"bf16_sr+master"`` -> NamedPolicy(bf16, stochastic, master). Raises ValueError
    naming the part it does not understand."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy name is a non-empty string, got {name!r}")
    base, plus, rest = name.partition("+")
    master = False
    if plus:
        if rest != "master":
            raise ValueError(f"policy {name!r}: only '+master' may follow the format")
        master = True
    mode = "nearest_even"
    if base.endswith("_sr"):
        base, mode = base[:-3], "stochastic"
    try:
        fmt = as_format(base, "policy format")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"policy {name!r}: unknown format {base!r}") from exc
    if master and fmt == FP32:
        raise ValueError(f"policy {name!r}: fp32 storage with an fp32 master is plain fp32")
    return NamedPolicy(name, fmt, mode, master)


class ShadowWeights:
    """One policy's copy of a weight matrix, driven by an update stream.

    ``apply(delta, alpha, decay, step)`` is exactly what :class:`gatesim.optim.EmulatedAdamW`
    does to a parameter under the same policy (same call to :func:`gatesim.apply_update`,
    same Philox stream: offset 0, ``step``), so a shadow fed a run's stream reproduces that
    run's stored weights bit-for-bit when the policies agree. Statistics of every step are
    summed in :attr:`totals` (counts) and :attr:`hist` (the |u|/ulp histogram).
    """

    def __init__(self, policy: NamedPolicy, w0: torch.Tensor, seed: int):
        self.policy = policy
        self.seed = seed
        w0 = w0.detach().to(torch.float32).contiguous()
        self.master = w0.clone() if policy.master else None
        self.weights = quantize(w0, policy.fmt) if policy.fmt != FP32 else w0.clone()
        self.initial = self.weights.clone()
        self.totals = {"n": 0, "changed": 0, "absorbed": 0, "zero": 0, "nonfinite_delta": 0}
        self.hist = [0] * 34
        self.absorbed_mass = 0.0

    def apply(self, delta: torch.Tensor, alpha: float, decay: float, step: int) -> UpdateStats:
        p = self.policy
        st = apply_update(self.weights, delta, fmt=p.fmt, mode=p.mode, master=self.master,
                          alpha=alpha, decay=decay, sum="fp32",
                          seed=self.seed if p.mode == "stochastic" else None, offset=0,
                          step=step)
        for k in self.totals:
            self.totals[k] += int(getattr(st, k))
        for i, c in enumerate(st.hist):
            self.hist[i] += int(c)
        self.absorbed_mass += float(st.absorbed_mass)
        return st

    def stored(self) -> torch.Tensor:
        """The stored weights in the format's own dtype where torch has one (exact)."""
        dt: Optional[torch.dtype] = self.policy.fmt.torch_dtype
        return self.weights.to(dt) if dt is not None else self.weights

    def stored_initial(self) -> torch.Tensor:
        dt: Optional[torch.dtype] = self.policy.fmt.torch_dtype
        return self.initial.to(dt) if dt is not None else self.initial
