"""Argument checks shared by the metric modules: every error names the argument and the
problem (shape, dtype, device, dimension, range, non-finite values)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from gatesim.checks import is_int, is_real  # numpy scalars are numbers, bool is not

#: Dtypes torch.isfinite takes (fp8 does not).
_ISFINITE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_pair(a, b, names: tuple[str, str] = ("w0", "w1"), *, same_dtype: bool = True):
    """Two tensors of the same shape and device (and dtype unless ``same_dtype=False``)."""
    na, nb = names
    check_tensor(a, na)
    check_tensor(b, nb)
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {na} is {a.dtype}, {nb} is {b.dtype} (compare "
                        "tensors of the same format; convert explicitly if you mean to)")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {na} has shape {tuple(a.shape)}, {nb} has "
                         f"{tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"device mismatch: {na} is on {a.device}, {nb} on {b.device}")
    return a, b


def check_matrix(x, name: str, *, finite: bool = True) -> torch.Tensor:
    """A real floating-point 2-D tensor without NaN/inf (``finite=True``)."""
    check_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {x.dim()}-D with shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point matrix, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if finite:
        y = x if x.dtype in _ISFINITE_DTYPES else x.to(torch.float32)  # fp8: no isfinite
        bad = (~torch.isfinite(y)).sum().item()
        if bad:
            nan = torch.isnan(y).sum().item()
            raise ValueError(f"{name} holds {bad} non-finite values ({nan} NaN, "
                             f"{bad - nan} inf); spectral metrics need finite matrices")
    return x


def check_k(k, m: int, n: int, name: str = "k", *, strict: bool = False) -> int:
    """1 <= k <= min(m, n) (``strict``: k < min(m, n), as a gap sigma_k - sigma_{k+1}
    needs a (k+1)-th singular value)."""
    if not is_int(k):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    hi = min(m, n) - (1 if strict else 0)
    if not 1 <= k <= hi:
        raise ValueError(f"{name} must be in 1..{hi} for a {m}x{n} matrix, got {k}")
    return k


def check_alpha(alpha, name: str = "alpha") -> float:
    if not is_real(alpha):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {alpha}")
    return alpha


def check_positive(x, name: str, *, allow_zero: bool = True) -> float:
    if not is_real(x):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {x}")
    return x


def check_mask(m, name: str, like: Optional[torch.Tensor] = None,
               likename: str = "") -> torch.Tensor:
    check_tensor(m, name)
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool mask, got {m.dtype}")
    if like is not None:
        check_pair(m, like, (name, likename), same_dtype=False)
    return m
