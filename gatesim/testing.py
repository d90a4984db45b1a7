"""Hypothesis strategies for property tests of rounding code (gatesim's and yours).

Plain ``st.floats(width=32)`` almost never produces the values where rounding code
breaks: exact ties between two neighbours of the target format, values one fp32 ulp
either side of a tie, the edges of the subnormal range, values next to overflow, and
signed zeros. These strategies aim at exactly those.

Example::

    from hypothesis import given
    from gatesim.testing import float32_values, float32_arrays, formats
    import gatesim

    @given(float32_arrays(fmt=gatesim.BF16))
    def test_idempotent(x):
        q = gatesim.quantize(torch.from_numpy(x), gatesim.BF16)
        assert torch.equal(gatesim.quantize(q, gatesim.BF16), q)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gatesim.formats import BF16, E4M3FN, E5M2, FP16, FP32, TF32, Format
from gatesim.precision import MODES

__all__ = ["formats", "named_formats", "modes", "float32_values", "float32_arrays",
           "float32_bits", "next_f32", "prev_f32"]

_F32 = np.float32


def _bits_to_f32(b: int) -> float:
    return float(np.array([b & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])


def _f32_to_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def next_f32(x: float) -> float:
    """The next float32 toward +inf."""
    return float(np.nextafter(_F32(x), _F32(np.inf)))


def prev_f32(x: float) -> float:
    """The next float32 toward -inf."""
    return float(np.nextafter(_F32(x), _F32(-np.inf)))


def named_formats() -> st.SearchStrategy[Format]:
    """One of gatesim's named formats."""
    return st.sampled_from([FP32, TF32, BF16, FP16, E4M3FN, E5M2])


@st.composite
def formats(draw, max_ebits: int = 8, allow_fn: bool = True) -> Format:
    """Any valid custom format (exponent bits 1..8, mantissa bits 0..23, any bias,
    with or without subnormals, IEEE or OCP-"fn" specials) that fits in float32."""
    ebits = draw(st.integers(1, max_ebits))
    nan = draw(st.sampled_from(["ieee", "fn"] if allow_fn else ["ieee"]))
    mbits = draw(st.integers(1 if nan == "ieee" else 0, 23))
    if nan == "ieee" and ebits == 1:
        ebits = 2  # one exponent bit with IEEE specials leaves no normal binade
    if nan == "fn" and ebits == 1 and mbits == 0:
        mbits = 1
    inf = nan == "ieee" and draw(st.booleans())
    subnormals = draw(st.booleans())
    top = 2 ** ebits - 1
    top_normal = (top if mbits > 0 else top - 1) if nan == "fn" else top - 1
    # fp32 must hold the format: emax = top_normal - bias <= 127 and
    # emin = 1 - bias >= -126, so the bias lies in [lo, hi].
    if top_normal > 254:  # 8-bit "fn" exponent with a mantissa cannot fit: use 7 bits
        ebits, top = 7, 127
        top_normal = top
    lo, hi = top_normal - 127, 127
    default = 2 ** (ebits - 1) - 1
    bias = draw(st.one_of(st.just(min(max(default, lo), hi)), st.integers(lo, hi)))
    return Format(ebits, mbits, bias, subnormals=subnormals, inf=inf, nan=nan)


def modes(include_stochastic: bool = True) -> st.SearchStrategy[str]:
    """A rounding mode name."""
    return st.sampled_from(MODES if include_stochastic else MODES[:-1])


def _format_landmarks(fmt: Format) -> list[float]:
    """Values of fmt where rounding decisions change: extremes and their midpoints."""
    maxf, tiny = fmt.max_finite, fmt.min_subnormal
    out = [0.0, tiny, tiny / 2, fmt.min_normal, maxf, 1.0, fmt.epsilon]
    # the value halfway past the largest finite number: the overflow threshold of RNE
    out.append(maxf + math.ldexp(1.0, fmt.emax - fmt.mbits - 1))
    out.append(fmt.min_normal - tiny / 2 if fmt.subnormals else fmt.min_normal / 2)
    return [v for v in out if math.isfinite(v) and abs(v) <= float(np.finfo(np.float32).max)]


@st.composite
def _tie_neighbourhood(draw, fmt: Format) -> float:
    """An exact midpoint between two adjacent fmt values, or one fp32 step off it."""
    emin, m = fmt.emin, fmt.mbits
    emax = min(fmt.emax, 127)
    e = draw(st.integers(emin - (m if fmt.subnormals else 0) - 2, emax))
    if e >= emin:
        q = math.ldexp(1.0, e - m)
        n = draw(st.integers(2 ** m, 2 ** (m + 1) - 1))
    else:
        q = math.ldexp(1.0, emin - (m if fmt.subnormals else 0))
        n = draw(st.integers(0, max(0, 2 ** m - 1) if fmt.subnormals else 0))
    mid = (n + 0.5) * q
    if not (mid <= float(np.finfo(np.float32).max)) or mid < 2.0 ** -149:
        mid = q
    x = float(_F32(mid))
    x = draw(st.sampled_from([x, next_f32(x), prev_f32(x)]))
    return x


def float32_values(fmt: Optional[Format] = None, allow_nan: bool = True,
                   allow_infinity: bool = True) -> st.SearchStrategy[float]:
    """float32 values (as Python floats) weighted toward rounding's hard cases:
    ties of ``fmt`` and their fp32 neighbours, subnormals (fp32's and fmt's), values
    around the largest finite value, signed zeros, and (optionally) inf and NaN."""
    fmt = fmt or BF16
    parts = [
        st.floats(width=32, allow_nan=allow_nan, allow_infinity=allow_infinity),
        _tie_neighbourhood(fmt),
        st.sampled_from(_format_landmarks(fmt)).flatmap(
            lambda v: st.sampled_from([float(_F32(v)), next_f32(_F32(v)), prev_f32(_F32(v))])),
        st.integers(1, 2 ** 23 - 1).map(_bits_to_f32),  # fp32 subnormals
        st.sampled_from([0.0, -0.0]),
    ]
    vals = st.one_of(*parts)
    vals = st.tuples(vals, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])
    if not allow_infinity:
        vals = vals.filter(math.isfinite)
    if not allow_nan:
        vals = vals.filter(lambda v: not math.isnan(v))
    return vals


def float32_arrays(fmt: Optional[Format] = None, min_size: int = 0, max_size: int = 300,
                   allow_nan: bool = True, allow_infinity: bool = True):
    """1-D float32 numpy arrays of :func:`float32_values`."""
    return hnp.arrays(np.float32, st.integers(min_size, max_size),
                      elements=float32_values(fmt, allow_nan, allow_infinity).map(_F32))


def float32_bits() -> st.SearchStrategy[int]:
    """Uniform over all 2**32 float32 bit patterns, NaN payloads included."""
    return st.integers(0, 2 ** 32 - 1)
