"""Argument checks shared by every public function and command (issue 22).

Three rules, each enforced here once so that new code inherits them:

* **A scalar is checked in the precision it is used in.** ``1e39`` is a finite float64 but
  ``inf`` in float32; a kernel that takes ``alpha`` as float32 must refuse it before
  anything is touched (:func:`check_real` with ``dtype=np.float32``).
* **numpy scalars are numbers** (``np.float32(0.5)``, ``np.int64(3)``) and **bool is not a
  number** (``True`` is refused where an int or a float is meant, and an int where a bool
  is meant).
* **A dataclass holds the types it is annotated with** (:func:`check_fields`):
  ``Format(inf="no")``, ``Format(subnormals=2)``, a sweep cell with ``seed = true`` are
  refused when constructed, naming the field, instead of failing later with an unrelated
  message or being recorded as given. numpy scalars in such fields are turned into the
  Python type, so the object serializes to JSON.

Errors are :class:`ArgumentError` (a ``TypeError`` and a ``ValueError`` at once, so callers
that catch either keep working) naming the argument and what it got.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = ["ArgumentError", "is_real", "is_int", "check_real", "check_int", "check_bool",
           "check_fields", "check_float32_tensor", "renamed_keyword"]


class ArgumentError(TypeError, ValueError):
    """An argument of the wrong type or out of range (names the argument)."""


def is_real(v: Any) -> bool:
    """A real number: Python or numpy int/float, not bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_int(v: Any) -> bool:
    """An integer: Python or numpy int, not bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


_DTYPE_NAMES = {np.float16: "float16", np.float32: "float32", np.float64: "float64"}


def check_real(v: Any, name: str, *, dtype=np.float64, lo: Optional[float] = None,
               hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False,
               finite: bool = True) -> float:
    """``v`` as a Python float, after checking that it is a real number, finite once
    converted to ``dtype`` (the precision it is used in) and within ``[lo, hi]`` (open
    ends with ``lo_open``/``hi_open``); the range is checked on the converted value."""
    if not is_real(v):
        raise ArgumentError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    try:
        x = float(v)
    except OverflowError:
        raise ArgumentError(f"{name}={v!r} does not fit in a float64") from None
    with np.errstate(over="ignore"):
        used = float(dtype(x))
    dname = _DTYPE_NAMES.get(dtype, str(dtype))
    if finite and not math.isfinite(used):
        extra = ""
        if math.isfinite(x):
            extra = (f" (it is used as {dname}, whose largest finite value is "
                     f"{float(np.finfo(dtype).max):.8g})")
        raise ArgumentError(f"{name} must be finite, got {v!r}{extra}")
    if lo is not None and (used < lo or (lo_open and used == lo)):
        raise ArgumentError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (used > hi or (hi_open and used == hi)):
        raise ArgumentError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return x


def check_int(v: Any, name: str, *, lo: Optional[int] = None,
              hi: Optional[int] = None) -> int:
    """``v`` as a Python int, after checking that it is an integer (not bool) in
    ``[lo, hi]``."""
    if not is_int(v):
        raise ArgumentError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    x = int(v)
    if lo is not None and x < lo:
        raise ArgumentError(f"{name} must be >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise ArgumentError(f"{name} must be <= {hi}, got {x}")
    return x


def check_bool(v: Any, name: str) -> bool:
    """``v`` as a Python bool; only ``True``/``False`` (or numpy bools) are accepted."""
    if not isinstance(v, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return bool(v)


def check_float32_tensor(x: Any, name: str, like: Optional[torch.Tensor] = None,
                         likename: str = "") -> torch.Tensor:
    """``x`` after checking that it is a contiguous float32 tensor (of ``like``'s shape and
    device, when given): the operand rule of the precision ops and the fused update."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, {likename} has "
                             f"{tuple(like.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, {likename} on {like.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call {name}.contiguous()")
    return x


def renamed_keyword(old: str, new: str) -> Callable:
    """Decorator: the keyword argument ``old`` of the decorated function is now ``new``.
    Calls that still pass ``old`` keep working, with a ``DeprecationWarning``; passing both
    is a ``TypeError``."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; {old}= is "
                                    f"the old name of {new}=")
                warnings.warn(f"{fn.__name__}({old}=...) is deprecated; use {new}=...",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap


def _describe(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(v: Any, tp, name: str) -> Any:
    """``v`` checked against annotation ``tp`` (int, float, bool, str, tuple, list, dict,
    Optional[...] of those; anything else is not checked)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(v, inner[0], name)
        return v
    if origin is not None:
        tp = origin
    if tp is bool:
        return check_bool(v, name)
    if tp is int:
        return check_int(v, name)
    if tp is float:
        if not is_real(v):
            raise ArgumentError(f"{name} must be a real number, got {type(v).__name__} "
                                f"{v!r}")
        return v if isinstance(v, (int, float)) else float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ArgumentError(f"{name} must be a string, got {type(v).__name__} {v!r}")
        return v
    if tp in (tuple, list):
        if not isinstance(v, (tuple, list)):
            raise ArgumentError(f"{name} must be a list, got {type(v).__name__} {v!r}")
        return v
    if tp is dict:
        if not isinstance(v, dict):
            raise ArgumentError(f"{name} must be a mapping, got {type(v).__name__} {v!r}")
        return v
    return v


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """Checks every field of the dataclass instance ``obj`` against its annotation (module
    docstring) and replaces numpy scalars by Python ones (works on frozen dataclasses).
    Raises :class:`ArgumentError` naming ``Class.field``."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        nv = _coerce(v, hints.get(f.name, Any), f"{cls.__name__}.{f.name}")
        if nv is not v:
            object.__setattr__(obj, f.name, nv)


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_constants(c):
    raise ValueError(f"non-standard JSON constant {c}")


def strict_json_loads(text):
    """``json.loads`` that refuses what a hostile or corrupted file could use to mean two
    things: a key given twice (which value wins is a parser's choice) and the non-standard
    constants ``NaN``, ``Infinity`` and ``-Infinity``. Raises ``ValueError``."""
    import json
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)

