"""Restricted updates: masks over a matrix's entries, and low-rank adapters (LoRA, PiSSA).

The paper's practical claim (arXiv 2511.08567, "The Path Not Taken") is about which weights a
parameter-efficient method lets RLVR move. This module builds the restrictions; the lab runs
them (:mod:`gatesim.lab.arms`) and the gate simulation applies a mask to its matrix
(``gatesim.sim.config.CellConfig.mask``).

**Masks** (bool, True = trainable), built from the starting matrix ``W0`` with the
definitions of :mod:`gatesim.metrics.masks` (docs/metrics.md, "Principal and low-magnitude
weights"; one home, reused here, not re-defined):

* ``principal``: ``M_princ = Top_alpha(|W0^(k)|)`` (:func:`gatesim.metrics.principal_mask`);
* ``low``: ``M_low = Bottom_alpha(|W0|)`` (:func:`gatesim.metrics.low_magnitude_mask`);
* ``safe``: ``M_low & ~M_princ`` at the same ``alpha`` and ``k`` (low-magnitude and not
  principal: at most ``alpha`` of the entries);
* ``random``: exactly as many entries as a Top_alpha mask selects
  (:func:`gatesim.metrics.select_count`), chosen by the same selection rule
  (:func:`gatesim.metrics.top_alpha`) on uniform scores from a ``torch.Generator`` seeded by
  ``seed`` and the tensor's name: deterministic, independent of the weights;
* a user mask: :func:`load_masks` reads a safetensors file of bool (or 0/1 uint8) tensors
  keyed by parameter name.

An optimizer applies a mask with :meth:`gatesim.optim.EmulatedAdam.set_mask` (the update and
the optimizer state of masked-out entries stay zero, their stored bits never change).

**Adapters** (:class:`AdapterLinear`, on an ``nn.Linear`` ``y = x W^T + b``, ``W`` of shape
``(out, in)``), forward ``x W'^T + b + (x A^T) B^T``, ``A`` ``(r, in)``, ``B`` ``(out, r)``,
scale 1 for both (so LoRA and PiSSA differ only in their initialisation):

* ``lora``: ``W' = W`` frozen, ``B = 0``, ``A`` uniform in ``[-1/sqrt(in), 1/sqrt(in)]``
  (torch's default ``nn.Linear`` / PEFT's Kaiming init with ``a = sqrt(5)``), from a seeded
  generator: at initialisation the output is the base model's, bit for bit;
* ``pissa``: the top-``r`` singular triplets of ``W`` (exact SVD in float64):
  ``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r)``, rounded to the storage format when one is
  given, and the frozen residual ``W' = W - B A`` (fp32), so ``W' + B A`` equals ``W``
  within fp32 rounding.

:meth:`AdapterLinear.merged_weight` is ``W' + B A`` in fp32 (for LoRA at initialisation
exactly ``W``); :func:`merge_adapters` puts plain ``nn.Linear`` modules with the merged
weights back, so checkpoints and diffs see an ordinary model. Trainable parameters: a mask
trains its True entries; an adapter ``r (in + out)`` per matrix (:func:`adapter_count`).
:func:`matched_density` gives the mask density of a matrix that trains as many entries as a
rank-``r`` adapter on it.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Mapping, Optional, Sequence, Union

import torch

from gatesim.metrics.masks import (low_magnitude_mask, principal_mask, select_count,
                                   top_alpha)

__all__ = ["MASK_KINDS", "ADAPTER_KINDS", "build_mask", "matched_density", "adapter_count",
           "load_masks", "AdapterLinear", "install_adapters", "merge_adapters"]

MASK_KINDS = ("principal", "low", "safe", "random")
ADAPTER_KINDS = ("lora", "pissa")


def matched_density(m: int, n: int, rank: int) -> float:
    """The density of an ``m x n`` mask that trains as many entries as a rank-``rank``
    adapter on it: ``rank (m + n) / (m n)`` (capped at 1)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got {m}x{n}")
    return min(1.0, rank * (m + n) / (m * n))


def adapter_count(shape: Sequence[int], rank: int) -> int:
    """Trainable entries of a rank-``rank`` adapter on a ``(out, in)`` matrix:
    ``rank (out + in)``."""
    out_f, in_f = int(shape[0]), int(shape[1])
    matched_density(out_f, in_f, rank)  # validates
    return rank * (out_f + in_f)


def _name_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2 ** 63)


def build_mask(kind: str, W0: torch.Tensor, alpha: float, *, k: Optional[int] = None,
               seed: int = 0, name: str = "") -> torch.Tensor:
    """The restriction mask ``kind`` (:data:`MASK_KINDS`, module docstring) of the matrix
    ``W0``: True where an entry may be updated. ``k`` (the rank of the reconstruction) is
    needed by ``principal`` and ``safe``; ``seed`` and ``name`` seed ``random``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if not isinstance(W0, torch.Tensor) or W0.dim() != 2:
        raise ValueError(f"W0 must be a 2-D tensor, got "
                         f"{getattr(W0, 'shape', type(W0).__name__)}")
    W0 = W0.detach()
    if kind in ("principal", "safe") and k is None:
        raise ValueError(f"the {kind} mask needs k (rank of the SVD reconstruction)")
    if kind == "principal":
        return principal_mask(W0, k, alpha)
    if kind == "low":
        return low_magnitude_mask(W0, alpha)
    if kind == "safe":
        return low_magnitude_mask(W0, alpha) & ~principal_mask(W0, k, alpha)
    select_count(alpha, W0.numel())  # validates alpha
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    scores = torch.rand(tuple(W0.shape), generator=gen, dtype=torch.float64)
    return top_alpha(scores, alpha).to(W0.device)


def load_masks(path: Union[str, os.PathLike], shapes: Mapping[str, Sequence[int]]) -> dict:
    """Reads a user mask file: a safetensors file of bool (or uint8 holding only 0 and 1)
    tensors keyed by parameter name, each of that parameter's shape (``shapes``: name ->
    shape of the parameters that may be masked). Returns ``{name: bool tensor}``; anything
    else (missing or unreadable file, no tensors, an unknown name, a wrong shape or dtype,
    a uint8 value other than 0/1) raises ValueError."""
    from safetensors import SafetensorError, safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"mask file {path!r} does not exist")
    out = {}
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError(f"mask file {path!r} holds no tensors")
            for key in keys:
                if key not in shapes:
                    raise ValueError(f"mask file {path!r}: {key!r} is not a maskable "
                                     f"parameter of the model (e.g. {sorted(shapes)[:3]})")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(shapes[key]):
                    raise ValueError(f"mask file {path!r}: {key!r} has shape "
                                     f"{tuple(t.shape)}, the parameter {tuple(shapes[key])}")
                if t.dtype == torch.uint8:
                    if bool(((t != 0) & (t != 1)).any()):
                        raise ValueError(f"mask file {path!r}: {key!r} is uint8 with values "
                                         "other than 0 and 1")
                    t = t.bool()
                elif t.dtype != torch.bool:
                    raise ValueError(f"mask file {path!r}: {key!r} is {t.dtype}; masks must "
                                     "be bool (or uint8 0/1)")
                out[key] = t.contiguous()
    except ValueError:
        raise
    except (SafetensorError, OSError, RuntimeError, TypeError) as exc:
        raise ValueError(f"mask file {path!r} is not a readable safetensors file "
                         f"({type(exc).__name__}: {exc})") from None
    return out


class AdapterLinear(torch.nn.Module):
    """An ``nn.Linear`` with a rank-``r`` adapter (module docstring). ``weight`` (frozen: the
    base weight for LoRA, the residual for PiSSA) and ``bias`` keep the wrapped module's
    parameter names, so the model's other names do not change; ``lora_A`` / ``lora_B`` are
    the trainable parameters."""

    def __init__(self, linear: torch.nn.Linear, rank: int, kind: str, *, seed: int = 0,
                 name: str = "", fmt=None):
        super().__init__()
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name or 'module'}: adapters wrap nn.Linear, got "
                            f"{type(linear).__name__}")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        W = linear.weight.detach()
        if W.dtype != torch.float32:
            raise TypeError(f"{name or 'module'}: adapters need a float32 weight, got {W.dtype}")
        out_f, in_f = W.shape
        if rank > min(out_f, in_f):
            raise ValueError(f"{name or 'module'}: rank {rank} exceeds min{tuple(W.shape)}")
        adapter_count(W.shape, rank)
        self.kind, self.rank, self.in_features, self.out_features = kind, rank, in_f, out_f
        if kind == "lora":
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            bound = 1.0 / math.sqrt(in_f)
            A = (torch.rand((rank, in_f), generator=gen, dtype=torch.float32) * 2 - 1) * bound
            B = torch.zeros((out_f, rank), dtype=torch.float32)
        else:
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            root = S[:rank].sqrt()
            A = (root[:, None] * Vh[:rank]).float().contiguous()
            B = (U[:, :rank] * root[None, :]).float().contiguous()
        if fmt is not None:
            from gatesim.precision import quantize
            quantize(A, fmt, out=A)
            quantize(B, fmt, out=B)
        self.lora_A = torch.nn.Parameter(A.to(W.device))
        self.lora_B = torch.nn.Parameter(B.to(W.device))
        base = W.clone() if kind == "lora" else (W - self.delta()).contiguous()
        self.weight = torch.nn.Parameter(base, requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def delta(self, A: Optional[torch.Tensor] = None,
              B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B A`` in fp32 (the given factors, or the module's own)."""
        A = self.lora_A if A is None else A
        B = self.lora_B if B is None else B
        return torch.mm(B.detach().float(), A.detach().float())

    def merged_weight(self, A: Optional[torch.Tensor] = None,
                      B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W' + B A`` in fp32: the weight of an ordinary ``nn.Linear`` computing the same
        function (up to fp32 rounding)."""
        return self.weight.detach() + self.delta(A, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A),
                                              self.lora_B)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind} rank {self.rank}"


def _parent(model: torch.nn.Module, module_name: str):
    parent_name, _, leaf = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def install_adapters(model: torch.nn.Module, weight_names: Sequence[str], rank: int,
                     kind: str, *, seed: int = 0, fmt=None) -> dict:
    """Replaces the ``nn.Linear`` of every ``<module>.weight`` in ``weight_names`` by an
    :class:`AdapterLinear` (``fmt``: round the adapter factors to this storage format);
    returns ``{weight name: adapter}``."""
    out = {}
    for wname in weight_names:
        if not wname.endswith(".weight"):
            raise ValueError(f"{wname!r} is not the weight of a module")
        mname = wname[: -len(".weight")]
        parent, leaf = _parent(model, mname)
        lin = getattr(parent, leaf)
        ad = AdapterLinear(lin, rank, kind, seed=seed, name=wname, fmt=fmt)
        setattr(parent, leaf, ad)
        out[wname] = ad
    return out


def merge_adapters(model: torch.nn.Module, adapters: Mapping[str, AdapterLinear],
                   weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Puts plain ``nn.Linear`` modules back in place of ``adapters`` (from
    :func:`install_adapters`), with weight ``weights[name]`` when given (say, the merge
    rounded to a storage format) or the adapter's :meth:`~AdapterLinear.merged_weight`."""
    for wname, ad in adapters.items():
        mname = wname[: -len(".weight")]
        parent, leaf = _parent(model, mname)
        W = ad.merged_weight() if weights is None or wname not in weights else weights[wname]
        lin = torch.nn.Linear(ad.in_features, ad.out_features, bias=ad.bias is not None,
                              device=W.device, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(W)
            if ad.bias is not None:
                lin.bias.copy_(ad.bias)
        setattr(parent, leaf, lin)
