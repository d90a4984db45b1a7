"""Binary floating-point formats, each described completely by one frozen dataclass.

A :class:`Format` is (exponent bits, mantissa bits, bias, subnormals?, infinities?,
NaN encoding). Everything else - range, spacing, largest finite value - is derived
here in plain Python, independently of the C++ derivation in ``csrc/gatesim/rounding.h``;
the tests hold the two against each other.

Values of every format are emulated in float32, so a format must fit inside fp32: its
largest exponent at most 127 and its smallest normal at least 2**-126 (bias <= 127; every
standard bias satisfies this). Subnormals below 2**-126 are then fp32 subnormals.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from gatesim.checks import check_fields

__all__ = ["Format", "FP32", "TF32", "BF16", "FP16", "E4M3FN", "E5M2", "FORMATS", "as_format",
           "STORAGE_DTYPES", "int_view_dtype"]

_NAN_KINDS = ("ieee", "fn")


@dataclasses.dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Args:
        ebits: exponent field width, 1..8.
        mbits: stored mantissa (fraction) bits, 0..23.
        bias: exponent bias; default ``2**(ebits-1) - 1``.
        subnormals: the format has subnormal numbers. Without them, values between 0
            and the smallest normal round (per mode) to one of those two.
        inf: the format encodes infinities.
        nan: ``"ieee"`` - the all-ones exponent is reserved for infinities and NaNs;
            ``"fn"`` - OCP "finite" formats (E4M3FN): the all-ones exponent holds finite
            values, only the all-ones pattern is NaN, and there is no infinity.
        name: a label for reports.

    Every field is checked against its type on construction
    (:func:`gatesim.checks.check_fields`): ``inf="no"`` or ``subnormals=2`` are refused.

    Raises:
        ValueError: naming the offending parameter when the format is impossible or
            does not fit in float32.
    """

    ebits: int
    mbits: int
    bias: Optional[int] = None
    subnormals: bool = True
    inf: bool = True
    nan: str = "ieee"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        check_fields(self)   # ints are ints, bools are bools, nan and name are strings
        if not 1 <= self.ebits <= 8:
            raise ValueError(f"ebits must be in 1..8, got {self.ebits}")
        if not 0 <= self.mbits <= 23:
            raise ValueError(f"mbits must be in 0..23, got {self.mbits}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.ebits - 1) - 1)
        if self.nan not in _NAN_KINDS:
            raise ValueError(f"nan must be one of {_NAN_KINDS}, got {self.nan!r}")
        if self.nan == "fn" and self.inf:
            raise ValueError("inf must be False for nan='fn' (such formats have no infinity)")
        if self.nan == "ieee" and self.mbits == 0:
            raise ValueError("mbits must be >= 1 for nan='ieee' (NaN needs a non-zero mantissa)")
        if self.emax < self.emin:
            raise ValueError(
                f"ebits={self.ebits} with nan={self.nan!r} leaves no normal binade")
        if self.emax > 127:
            raise ValueError(
                f"bias={self.bias} is too small: largest exponent {self.emax} exceeds fp32's 127")
        if self.emin < -126:
            raise ValueError(
                f"bias={self.bias} is too large: smallest normal 2**{self.emin} is below "
                "fp32's 2**-126 (gatesim emulates formats inside fp32's normal range)")
        if self.name is None:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        tail = "" if self.bias == 2 ** (self.ebits - 1) - 1 else f"b{self.bias}"
        tail += "fn" if self.nan == "fn" else ("" if self.inf else "noinf")
        tail += "" if self.subnormals else "ftz"
        return f"e{self.ebits}m{self.mbits}{tail}"

    # ----- derived quantities -------------------------------------------------
    @property
    def bits(self) -> int:
        """Storage width: sign + exponent + mantissa."""
        return 1 + self.ebits + self.mbits

    @property
    def precision(self) -> int:
        """Significand bits including the implicit one."""
        return self.mbits + 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = 2 ** self.ebits - 1
        if self.nan == "fn":
            return (top if self.mbits > 0 else top - 1) - self.bias
        return top - 1 - self.bias

    @property
    def max_finite(self) -> float:
        """Largest finite value."""
        if self.nan == "fn" and self.mbits > 0:
            frac = (2 ** self.mbits - 2) / 2 ** self.mbits  # all-ones mantissa is NaN
        else:
            frac = (2 ** self.mbits - 1) / 2 ** self.mbits
        return math.ldexp(1.0 + frac, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when there are no subnormals)."""
        return math.ldexp(1.0, self.emin - (self.mbits if self.subnormals else 0))

    @property
    def epsilon(self) -> float:
        """Spacing just above 1.0."""
        return math.ldexp(1.0, -self.mbits)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """The torch storage dtype with exactly this format, if there is one."""
        return _TORCH_DTYPES.get(self._key())

    # ----- bit facts ----------------------------------------------------------
    # Codes are bit patterns of this format's own layout (sign, exponent, mantissa from the
    # top bit down) with the sign bit cleared; they apply to a tensor's bits when the
    # tensor's dtype is this format's torch_dtype.
    @property
    def sign_bit(self) -> int:
        """The sign bit: ``1 << (bits - 1)``."""
        return 1 << (self.bits - 1)

    @property
    def magnitude_mask(self) -> int:
        """The bits below the sign (exponent and mantissa)."""
        return self.sign_bit - 1

    @property
    def inf_code(self) -> Optional[int]:
        """Magnitude code of infinity (all-ones exponent, zero mantissa); None when the
        format has no infinity."""
        return ((1 << self.ebits) - 1) << self.mbits if self.inf else None

    @property
    def nan_code(self) -> int:
        """Smallest NaN magnitude code: every magnitude at or above it is NaN, every one
        below it is finite or infinity. IEEE: the all-ones exponent with a non-zero
        mantissa (with the whole all-ones exponent when there is no infinity, as it then
        holds neither a finite value nor infinity); ``"fn"``: only the all-ones pattern."""
        if self.nan == "fn":
            return self.magnitude_mask
        top = ((1 << self.ebits) - 1) << self.mbits
        return top + 1 if self.inf else top

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of a tensor holding values of this format: :attr:`torch_dtype`, or
        float32 for formats without one (they are emulated inside fp32)."""
        return self.torch_dtype or torch.float32

    @property
    def view_dtype(self) -> torch.dtype:
        """The signed integer dtype of :attr:`storage_dtype`'s width, to view stored values
        as bit patterns (``x.view(fmt.view_dtype)``)."""
        return int_view_dtype(self.storage_dtype.itemsize)

    def _key(self) -> tuple:
        return (self.ebits, self.mbits, self.bias, self.subnormals, self.inf, self.nan)

    def op_args(self, saturate: bool = False, rand_bits: int = 0) -> list[int]:
        """The ``int[] fmt`` argument of the gatesim ops."""
        return [self.ebits, self.mbits, self.bias, int(self.subnormals), int(self.inf),
                int(self.nan == "fn"), int(saturate), int(rand_bits)]

    def __eq__(self, other: object) -> bool:  # names are labels, not part of the format
        return isinstance(other, Format) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.name or self._default_name()


FP32 = Format(8, 23, name="fp32")
TF32 = Format(8, 10, name="tf32")
BF16 = Format(8, 7, name="bf16")
FP16 = Format(5, 10, name="fp16")
E4M3FN = Format(4, 3, inf=False, nan="fn", name="e4m3fn")
E5M2 = Format(5, 2, name="e5m2")

FORMATS = {f.name: f for f in (FP32, TF32, BF16, FP16, E4M3FN, E5M2)}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "float8_e4m3fn": "e4m3fn", "float8_e5m2": "e5m2"}
_TORCH_DTYPES = {
    FP32._key(): torch.float32,
    BF16._key(): torch.bfloat16,
    FP16._key(): torch.float16,
    E4M3FN._key(): torch.float8_e4m3fn,
    E5M2._key(): torch.float8_e5m2,
}
_FROM_DTYPE = {v: k for k, v in _TORCH_DTYPES.items()}
#: Signed integer dtypes by byte width (bit views of stored values).
_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: The torch dtypes that store a gatesim format exactly (fp32 also holds every other
#: format), in the order of :data:`FORMATS`.
STORAGE_DTYPES = tuple(f.torch_dtype for f in FORMATS.values() if f.torch_dtype is not None)


def as_format(fmt: Union[Format, str, torch.dtype], argname: str = "fmt") -> Format:
    """Accepts a Format, a name ("bf16", "e4m3fn", ...) or a torch dtype."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        key = _FROM_DTYPE.get(fmt)
        if key is None:
            raise TypeError(f"{argname}: torch dtype {fmt} is not a floating-point format "
                            f"gatesim emulates (use one of {sorted(map(str, _FROM_DTYPE))})")
        return next(f for f in FORMATS.values() if f._key() == key)
    if isinstance(fmt, str):
        name = _ALIASES.get(fmt.lower(), fmt.lower())
        if name in FORMATS:
            return FORMATS[name]
        raise ValueError(f"{argname}: unknown format name {fmt!r}; known: {sorted(FORMATS)}")
    raise TypeError(f"{argname} must be a gatesim.Format, a format name or a torch dtype, "
                    f"got {type(fmt).__name__}")


def int_view_dtype(itemsize: int) -> torch.dtype:
    """The signed integer dtype of ``itemsize`` bytes (bit views of any stored tensor,
    integer and float64 ones included)."""
    view = _INT_VIEWS.get(itemsize)
    if view is None:
        raise TypeError(f"no integer dtype of {itemsize} bytes to view bit patterns in")
    return view
