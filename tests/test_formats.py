"""gatesim.Format: named formats, derived quantities, validation, C++ agreement."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given

import gatesim
from gatesim import BF16, E4M3FN, E5M2, FP16, FP32, TF32, Format
from gatesim._ops import spec_numbers
from gatesim.testing import formats

NAMED_WITH_REF = [
    (FP32, np.float32), (BF16, ml_dtypes.bfloat16), (FP16, np.float16),
    (E4M3FN, ml_dtypes.float8_e4m3fn), (E5M2, ml_dtypes.float8_e5m2),
]


@pytest.mark.parametrize("fmt,ref", NAMED_WITH_REF, ids=lambda v: str(v))
def test_named_formats_match_ml_dtypes_finfo(fmt, ref):
    fi = ml_dtypes.finfo(ref)
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.epsilon == float(fi.eps)
    assert fmt.mbits == fi.nmant
    assert fmt.bits == fi.bits


def test_named_format_facts():
    assert E4M3FN.max_finite == 448.0 and not E4M3FN.inf and E4M3FN.nan == "fn"
    assert E5M2.max_finite == 57344.0 and E5M2.inf
    assert TF32.precision == 11 and TF32.emax == 127
    assert BF16.torch_dtype is torch.bfloat16 and TF32.torch_dtype is None
    assert gatesim.as_format("bfloat16") == BF16 and gatesim.as_format(torch.float16) == FP16


def test_names_do_not_change_equality():
    assert Format(8, 7, name="x") == BF16 and hash(Format(8, 7)) == hash(BF16)


@pytest.mark.parametrize("kwargs,param", [
    (dict(ebits=0, mbits=3), "ebits"), (dict(ebits=9, mbits=3), "ebits"),
    (dict(ebits=5, mbits=24), "mbits"), (dict(ebits=5, mbits=-1), "mbits"),
    (dict(ebits=5, mbits=2, nan="weird"), "nan"),
    (dict(ebits=4, mbits=3, nan="fn"), "inf"),  # fn formats have no infinity
    (dict(ebits=5, mbits=0), "mbits"),  # IEEE NaN needs a mantissa
    (dict(ebits=8, mbits=7, bias=100), "bias"),  # exponent beyond fp32
    (dict(ebits=8, mbits=7, bias=128), "bias"),  # normals below fp32's
    (dict(ebits=5, mbits=2, bias=1.5), "bias"),
    (dict(ebits=1, mbits=2), "ebits"),  # no normal binade
])
def test_invalid_formats_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        Format(**kwargs)


def test_unknown_names_and_types():
    with pytest.raises(ValueError, match="unknown format"):
        gatesim.as_format("fp12")
    with pytest.raises(TypeError, match="fmt"):
        gatesim.as_format(3.5)
    with pytest.raises(TypeError, match="dtype"):
        gatesim.as_format(torch.int8)


@given(formats())
def test_python_and_cpp_derive_the_same_constants(fmt):
    (ebits, m, bias, emin, msub, max_bits, q_bits, has_inf, fn, sat, uniform,
     rbits) = spec_numbers(fmt.op_args())
    assert (ebits, m, bias) == (fmt.ebits, fmt.mbits, fmt.bias)
    assert emin == fmt.emin
    assert np.uint32(max_bits).view(np.float32) == np.float32(fmt.max_finite)
    assert float(np.uint32(q_bits).view(np.float32)) == fmt.min_subnormal
    assert bool(has_inf) == fmt.inf and bool(fn) == (fmt.nan == "fn")
    assert msub == (fmt.mbits if fmt.subnormals else 0)


@given(formats())
def test_format_values_fit_float32(fmt):
    assert math.isfinite(np.float32(fmt.max_finite))
    assert float(np.float32(fmt.min_subnormal)) == fmt.min_subnormal


@pytest.mark.parametrize("fmt,ref", NAMED_WITH_REF, ids=lambda v: str(v))
def test_bit_facts_classify_every_pattern_as_the_reference_decodes_it(fmt, ref):
    """inf_code / nan_code / sign_bit / magnitude_mask against ml_dtypes' decoding of every
    bit pattern (fp32: every exponent with a spread of mantissas)."""
    w = fmt.bits
    if w <= 16:
        pats = np.arange(1 << w, dtype=np.uint64)
    else:
        rng = np.random.default_rng(0)
        exps = np.repeat(np.arange(256, dtype=np.uint64), 64)
        mants = rng.integers(0, 1 << 23, exps.size, dtype=np.uint64)
        mants[::64] = 0
        mants[1::64] = 1
        mants[2::64] = (1 << 23) - 1
        pats = (exps << np.uint64(23)) | mants
        pats = np.concatenate([pats, pats | np.uint64(1 << 31)])
    with np.errstate(invalid="ignore"):
        vals = pats.astype(f"u{w // 8}").view(ref).astype(np.float64)
    mag = pats & np.uint64(fmt.magnitude_mask)
    assert fmt.sign_bit | fmt.magnitude_mask == (1 << w) - 1
    np.testing.assert_array_equal(np.isnan(vals), mag >= fmt.nan_code)
    if fmt.inf_code is None:
        assert not np.isinf(vals).any()
    else:
        np.testing.assert_array_equal(np.isinf(vals), mag == fmt.inf_code)
    np.testing.assert_array_equal(np.signbit(vals) & ~np.isnan(vals),
                                  ((pats & np.uint64(fmt.sign_bit)) != 0) & ~np.isnan(vals))


def test_storage_and_view_dtypes():
    for fmt in gatesim.FORMATS.values():
        t = torch.zeros(3, dtype=fmt.storage_dtype)
        assert fmt.storage_dtype == (fmt.torch_dtype or torch.float32)
        assert t.view(fmt.view_dtype).dtype == fmt.view_dtype      # same width
        assert fmt.view_dtype.is_signed and not fmt.view_dtype.is_floating_point
    from gatesim.formats import STORAGE_DTYPES
    assert STORAGE_DTYPES == (torch.float32, torch.bfloat16, torch.float16,
                              torch.float8_e4m3fn, torch.float8_e5m2)
    assert Format(3, 2).storage_dtype is torch.float32
    assert Format(3, 2).view_dtype is torch.int32


def test_bit_facts_of_formats_without_a_torch_dtype():
    f = Format(3, 2)                       # e3m2: IEEE specials at exponent 0b111
    assert (f.bits, f.sign_bit, f.magnitude_mask) == (6, 0x20, 0x1F)
    assert (f.inf_code, f.nan_code) == (0x1C, 0x1D)
    g = Format(3, 2, inf=False)            # top exponent neither finite nor infinite
    assert (g.inf_code, g.nan_code) == (None, 0x1C)
    h = Format(3, 2, inf=False, nan="fn")  # only the all-ones pattern is NaN
    assert (h.inf_code, h.nan_code) == (None, 0x1F)
    assert h.max_finite == math.ldexp(1.5, h.emax)    # 0x1E, just below nan_code
