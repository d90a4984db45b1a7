"""The precision policies of the gate-simulation factorial (Gate III).

Policies are :class:`gatesim.policy.PrecisionPolicy` objects written by their names
(grammar in :mod:`gatesim.policy`): ``fp32``, ``bf16`` (nearest-even storage), ``bf16_sr``
(stochastic rounding), ``fp16``, ``bf16+master`` (fp32 master weights, stored value
``R(master)``), and so on for any named format. Storage-only policies round ``fl32(p + u)``
the way PyTorch does on a low-precision tensor (``sum="fp32"``), which is what an optimizer
stepping bf16 weights does. Each policy's copy of the weights is a
:class:`gatesim.shadow.ShadowWeights`.
"""
from __future__ import annotations

import torch

from gatesim.formats import FP32
from gatesim.policy import PrecisionPolicy
from gatesim.shadow import ShadowWeights

__all__ = ["DEFAULT_POLICIES", "sim_policy", "sim_shadow"]

#: The Gate III cells: fp32 storage, bf16 nearest, bf16 stochastic, fp16 nearest, each
#: low-precision one with and without fp32 master weights.
DEFAULT_POLICIES = ("fp32", "bf16", "bf16_sr", "fp16", "bf16+master", "bf16_sr+master",
                    "fp16+master")


def sim_policy(name: str) -> PrecisionPolicy:
    """The policy a simulation cell runs under: :meth:`PrecisionPolicy.parse` of ``name``,
    which must name a storage format (the simulated weights are fp32; "own" would be plain
    fp32) and may not pair fp32 storage with an fp32 master. Raises ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy name is a non-empty string, got {name!r}")
    pol = PrecisionPolicy.parse(name)
    if pol.param_format is None:
        raise ValueError(f"policy {name!r}: a simulation policy names its storage format")
    if pol.master and pol.param_format == FP32:
        raise ValueError(f"policy {name!r}: fp32 storage with an fp32 master is plain fp32")
    return pol


def sim_shadow(policy, w0: torch.Tensor, seed: int) -> ShadowWeights:
    """A policy's shadow of the simulated weights: held as fp32 values on the format's grid
    (the results' digests are of those values), with the start kept for the sparsity and
    rotation measurements."""
    return ShadowWeights(policy, w0, seed=seed, hold_in_fp32=True, keep_initial=True)

