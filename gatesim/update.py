"""Apply an update in emulated precision in one pass, and count what rounding absorbed.

Gate III in one sentence: a weight stored in bf16 changes only if the update reaches half
an ULP. :func:`apply_update` applies an update the way a given precision policy would and
returns :class:`UpdateStats` from the same pass over memory.

Policies (``u`` is the step's intended update, ``R`` rounding to the storage format):

* storage-only: ``p <- R(p * decay + alpha * delta)``;
* fp32 master weights (``master=``): ``m <- fl32(fl32(m * decay) + alpha * delta)`` (the add
  is one rounding, as ``torch.Tensor.add_(x, alpha=a)`` is an fma), then ``p <- R(m)``;
* Kahan-compensated storage (``compensation=``, torch-optimi's scheme): ``c <- c + u``,
  ``p' <- p + c``, ``c <- c + (p - p')``, every result rounded to the storage format.

``sum_mode="exact"`` (default) rounds the exact result of each step once (TwoSum, then
round-to-odd in fp64), so an update far below half an fp32 ULP of the weight still gets its
proper chance under stochastic rounding. ``sum_mode="fp32"`` reproduces what PyTorch does on
low-precision tensors: compute in fp32 (``p.mul_(decay)``, then ``p.add_(delta,
alpha=alpha)``), then round; for stochastic rounding this is the usual
fp32-sum-then-round behaviour of every other library. For storage-only updates the stats
count the elements where the two would store different bits (``sum_differs``). (The
keyword was called ``sum``, shadowing the builtin; ``sum=`` is still accepted, with a
``DeprecationWarning``.)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

import numpy as np
import torch

from gatesim._ops import ops
from gatesim.checks import check_float32_tensor, check_int, check_real, renamed_keyword
from gatesim.formats import STORAGE_DTYPES, Format, as_format
from gatesim.precision import mode_index, stream_args
from gatesim.stat_layout import HIST_BINS, HIST_EDGES_LOG2, STAT_FIELDS

__all__ = ["UpdateStats", "apply_update", "HIST_EDGES_LOG2", "SUM_MODES"]

SUM_MODES = ("exact", "fp32")
# HIST_EDGES_LOG2 (gatesim.stat_layout): log2 edges of the |u| / ulp(p) histogram: bin 0 is
# below 2**-24, bin j (1..32) is [2**(j-25), 2**(j-24)), bin 33 is at or above 2**8. Zero
# and non-finite updates are not in the histogram (see UpdateStats.zero and the nonfinite
# counts).


def _stats_to_host(counts: torch.Tensor, mass: torch.Tensor) -> tuple:
    """The op's two statistics tensors on the host with one device-to-host copy (and one
    synchronization) instead of two: the mass's fp64 bits ride along as one more int64."""
    both = torch.cat((counts, mass.view(torch.int64))).cpu()
    return both[:-1], both[-1:].view(torch.float64)


@dataclasses.dataclass
class UpdateStats:
    """What one update did to one tensor, counted in the same pass that applied it.

    Attributes:
        n: elements.
        changed: stored bits differ after the step (+0 and -0 are equal, NaN never equals,
            as in bitwise sparsity).
        absorbed: the intended update ``u`` is non-zero but the stored bits did not change.
        zero: ``u == 0`` exactly.
        nonfinite_delta / nonfinite_param / nonfinite_result: inf or NaN in the update, in
            the stored value before, and after the step. Non-finite updates are applied as
            given (NaN propagates, as in real training) and counted here.
        sum_differs: storage-only policy: elements where the other ``sum_mode`` would have
            stored other bits (0 for the other policies).
        absorbed_mass: sum of ``|u|`` over absorbed elements (fp64, summed by a fixed pairwise
            tree over blocks of 4096 elements and then over blocks: the same bits for any
            thread count, instruction set or device).
        hist: counts of ``log2(|u| / ulp(p_before))`` over non-zero finite updates in the bins
            of :data:`HIST_EDGES_LOG2`; ``u < ulp/2`` is bins 0..23.

    ``u = alpha * delta + (decay - 1) * x`` in fp64, ``x`` the master value (master policy)
    or the stored value (the decay term is 0 when ``decay == 1``, even for infinite x).
    Equality of two UpdateStats treats NaN masses as equal.
    """

    n: int = 0
    changed: int = 0
    absorbed: int = 0
    zero: int = 0
    nonfinite_delta: int = 0
    nonfinite_param: int = 0
    nonfinite_result: int = 0
    sum_differs: int = 0
    absorbed_mass: float = 0.0
    hist: list = dataclasses.field(default_factory=lambda: [0] * HIST_BINS)

    @classmethod
    def from_op(cls, counts: torch.Tensor, mass: torch.Tensor) -> "UpdateStats":
        if counts.device.type != "cpu":
            counts, mass = _stats_to_host(counts, mass)
        c = counts.tolist()
        fields = dict(zip(STAT_FIELDS, c[: len(STAT_FIELDS)]))
        return cls(**fields, absorbed_mass=float(mass.item()), hist=c[len(STAT_FIELDS):])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpdateStats):
            return NotImplemented
        mass_eq = (self.absorbed_mass == other.absorbed_mass or
                   (np.isnan(self.absorbed_mass) and np.isnan(other.absorbed_mass)))
        return mass_eq and all(getattr(self, f) == getattr(other, f) for f in STAT_FIELDS) \
            and list(self.hist) == list(other.hist)

    @property
    def unchanged(self) -> int:
        return self.n - self.changed

    @property
    def absorbed_fraction(self) -> float:
        """Absorbed over non-zero updates (0 when there are none)."""
        nz = self.n - self.zero
        return self.absorbed / nz if nz else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of stored values whose bits did not change (bitwise sparsity)."""
        return self.unchanged / self.n if self.n else 1.0

    def __add__(self, other: "UpdateStats") -> "UpdateStats":
        if not isinstance(other, UpdateStats):
            return NotImplemented
        merged = {f: getattr(self, f) + getattr(other, f) for f in STAT_FIELDS}
        return UpdateStats(**merged, absorbed_mass=self.absorbed_mass + other.absorbed_mass,
                           hist=[a + b for a, b in zip(self.hist, other.hist)])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["absorbed_fraction"] = self.absorbed_fraction
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _check_storage(param: torch.Tensor, fmt: Optional[Union[Format, str]]) -> Format:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a torch.Tensor, got {type(param).__name__}")
    if param.dtype not in STORAGE_DTYPES:
        raise TypeError(f"param must be one of {[str(d) for d in STORAGE_DTYPES]}, got "
                        f"{param.dtype}")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous")
    if fmt is None:
        return as_format(param.dtype)
    fmt = as_format(fmt)
    if param.dtype == torch.float32:
        return fmt  # any format, held in fp32
    if fmt.torch_dtype != param.dtype:
        raise TypeError(f"fmt {fmt} does not match param dtype {param.dtype}; pass fmt=None "
                        "or hold custom formats in a float32 param")
    return fmt


@renamed_keyword("sum", "sum_mode")
def apply_update(param: torch.Tensor, delta: torch.Tensor, *, fmt: Optional[Union[Format, str]] = None,
                 mode: str = "nearest_even", master: Optional[torch.Tensor] = None,
                 compensation: Optional[torch.Tensor] = None, alpha: float = 1.0,
                 decay: float = 1.0, sum_mode: str = "exact", seed: Optional[int] = None,
                 offset: int = 0, step: int = 0, saturate: bool = False,
                 rand_bits: Optional[int] = None, stats: bool = True,
                 check_finite: bool = False) -> Optional[UpdateStats]:
    """Applies ``alpha * delta`` (after a multiplicative ``decay``) to ``param`` in place,
    in emulated precision, in one pass; returns :class:`UpdateStats` (or None if
    ``stats=False``).

    Args:
        param: the stored parameter, in place: bfloat16, float16, float8_e4m3fn,
            float8_e5m2, or float32 (fp32 storage, or a custom ``fmt`` held in fp32).
        delta: float32 update of param's shape.
        fmt: storage format; default: param's dtype.
        mode: rounding mode of the stored value (any of :data:`gatesim.MODES`).
        master: float32 master weights, updated in place; param becomes ``R(master)``.
        compensation: Kahan buffer of param's dtype, updated in place (rounded to nearest).
        alpha: the update is ``alpha * delta`` (alpha is taken as float32, as PyTorch does;
            a value that is not finite in float32, such as 1e39, is refused; numpy
            scalars are accepted).
        decay: multiplicative decay applied first (AdamW: ``1 - lr * weight_decay``),
            float32 like alpha.
        sum_mode: ``"exact"`` or ``"fp32"``; see the module docstring (ignored with master).
            ``sum=`` is its deprecated old name.
        seed, offset, step: the Philox stream of stochastic rounding: element ``i`` uses
            position ``offset + i`` of stream ``2 * step + 1`` (``2 * step`` for the decay's
            own rounding in ``sum_mode="fp32"`` and Kahan policies).
        saturate, rand_bits: as in :func:`gatesim.quantize`.
        check_finite: raise ValueError before touching anything if delta holds inf or NaN
            (otherwise they are applied and counted).
    """
    fmt = _check_storage(param, fmt)
    check_float32_tensor(delta, "delta", like=param, likename="param")
    if master is not None:
        check_float32_tensor(master, "master", like=param, likename="param")
    if compensation is not None:
        if not isinstance(compensation, torch.Tensor) or compensation.dtype != param.dtype:
            raise TypeError(f"compensation must be a tensor of param's dtype {param.dtype}")
        if compensation.shape != param.shape or compensation.device != param.device:
            raise ValueError("compensation must have param's shape and device")
    if master is not None and compensation is not None:
        raise ValueError("use either master weights or a compensation buffer, not both")
    if sum_mode not in SUM_MODES:
        raise ValueError(f"sum_mode must be one of {SUM_MODES}, got {sum_mode!r}")
    m = mode_index(mode)
    seed_, offset_ = stream_args(m, seed, offset, param.numel())
    step = check_int(step, "step", lo=0)
    # the op takes alpha and decay as float32: 1e39 is finite in float64, inf in float32
    alpha = check_real(alpha, "alpha", dtype=np.float32)
    decay = check_real(decay, "decay", dtype=np.float32)
    if rand_bits is not None:
        rand_bits = check_int(rand_bits, "rand_bits", lo=1, hi=32)
    if check_finite and not bool(torch.isfinite(delta).all()):
        raise ValueError("delta holds inf or NaN (check_finite=True); nothing was updated")
    args = fmt.op_args(saturate=bool(saturate), rand_bits=rand_bits or 0)
    counts, mass = ops.apply_update(param, delta, master, compensation, args, m,
                                    SUM_MODES.index(sum_mode), float(np.float32(alpha)),
                                    float(np.float32(decay)), seed_, offset_, step, bool(stats))
    return UpdateStats.from_op(counts, mass) if stats else None
