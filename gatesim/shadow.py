"""Shadow weights: one precision policy's own copy of a weight tensor, fed updates from
elsewhere (a recorded update stream, a simulated run, the tracker's intended updates).

Used by the gate simulation (:mod:`gatesim.sim`: a run's update stream replayed through each
policy) and by the tracker's what-ifs (:mod:`gatesim.tracking`: the intended updates of a real
run replayed onto other storage).
"""
from __future__ import annotations

from typing import Optional

import torch

from gatesim.formats import FP32, Format, as_format
from gatesim.policy import PrecisionPolicy
from gatesim.precision import quantize, to_dtype
from gatesim.update import UpdateStats, apply_update

__all__ = ["ShadowWeights"]


class ShadowWeights:
    """A policy's storage of one tensor: :attr:`weights` (the stored values), an fp32
    :attr:`master` copy and a Kahan :attr:`compensation` buffer when the policy has them.

    ``apply(delta, alpha, decay, step)`` is one :func:`gatesim.apply_update` with the policy's
    format, rounding mode, sum mode and Philox stream (``seed``, positions from ``offset``,
    ``step``): exactly what :class:`gatesim.optim.EmulatedAdamW` does to a parameter under the
    same policy at offset 0, so a shadow fed a run's stream reproduces that run's stored
    weights bit-for-bit when the policies agree. Every step's :class:`~gatesim.UpdateStats`
    is added to :attr:`total`.

    Args:
        policy: a :class:`~gatesim.policy.PrecisionPolicy` or its name.
        w0: the starting values (any float dtype); rounded to nearest into the storage
            format. A policy without a format stores in ``w0``'s own format.
        seed: Philox seed of stochastic rounding (default: the policy's).
        offset: first Philox stream position of this tensor.
        hold_in_fp32: keep :attr:`weights` as float32 values on the format's grid (the gate
            simulation: its digests are of those fp32 values) instead of the format's torch
            dtype (half the memory for bf16; formats without a torch dtype are held in fp32
            either way).
        keep_initial: keep a copy of the starting storage for :meth:`stored_initial`.
        sum_stats: add every step's statistics to :attr:`total` (the tracker, which keeps
            its own sums, turns it off: the addition would cost on every step).
    """

    __slots__ = ("policy", "fmt", "seed", "offset", "weights", "master", "compensation",
                 "initial", "total")

    def __init__(self, policy, w0: torch.Tensor, *, seed: Optional[int] = None,
                 offset: int = 0, hold_in_fp32: bool = False, keep_initial: bool = False,
                 sum_stats: bool = True):
        self.policy = PrecisionPolicy.parse(policy)
        self.fmt: Format = self.policy.storage_format(as_format(w0.dtype, "w0 dtype"))
        self.seed = self.policy.seed if seed is None else seed
        self.offset = offset
        x = w0.detach().to(torch.float32, copy=True).contiguous()
        if self.fmt == FP32:
            self.weights = x
        elif hold_in_fp32 or self.fmt.torch_dtype is None:
            self.weights = quantize(x, self.fmt)
        else:
            self.weights = to_dtype(x, self.fmt)
        self.master = x.clone() if self.policy.master else None
        self.compensation = torch.zeros_like(self.weights) if self.policy.kahan else None
        self.initial = self.weights.clone() if keep_initial else None
        self.total: Optional[UpdateStats] = UpdateStats() if sum_stats else None

    def apply(self, delta: torch.Tensor, alpha: float = 1.0, decay: float = 1.0,
              step: int = 0) -> UpdateStats:
        """Applies ``alpha * delta`` (and ``decay``) to the storage; returns the step's
        statistics (also added to :attr:`total`, unless built with ``sum_stats=False``)."""
        p = self.policy
        st = apply_update(self.weights, delta, fmt=self.fmt, mode=p.mode, master=self.master,
                          compensation=self.compensation, alpha=alpha, decay=decay, sum_mode=p.sum,
                          seed=self.seed if p.stochastic else None, offset=self.offset,
                          step=step)
        if self.total is not None:
            self.total = self.total + st
        return st

    def _in_dtype(self, t: torch.Tensor) -> torch.Tensor:
        dt: Optional[torch.dtype] = self.fmt.torch_dtype
        return t.to(dt) if dt is not None else t

    def stored(self) -> torch.Tensor:
        """The stored weights in the format's own dtype where torch has one (exact)."""
        return self._in_dtype(self.weights)

    def stored_initial(self) -> torch.Tensor:
        """The starting storage in the format's own dtype (needs ``keep_initial=True``)."""
        if self.initial is None:
            raise RuntimeError("this ShadowWeights was built without keep_initial=True")
        return self._in_dtype(self.initial)
