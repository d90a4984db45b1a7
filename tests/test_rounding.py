"""quantize/to_dtype in every mode, against the numba twin and the defining properties."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatesim
from gatesim import reference as ref
from gatesim.precision import MODES, mode_index
from gatesim.testing import float32_arrays, formats, modes, named_formats
from conftest import assert_same_bits, f32_bits

DETERMINISTIC = [m for m in MODES if m != "stochastic"]


def twin_quantize(x: np.ndarray, fmt, mode, saturate=False, seed=0, offset=0, rand_bits=0):
    args = np.array(fmt.op_args(saturate, rand_bits), dtype=np.int64)
    return ref.quantize(x, args, mode_index(mode), seed, offset)


@given(data=st.data(), fmt=st.one_of(named_formats(), formats()), mode=modes(),
       saturate=st.booleans())
def test_quantize_equals_numba_twin(data, fmt, mode, saturate):
    x = data.draw(float32_arrays(fmt))
    seed = data.draw(st.integers(0, 2 ** 63 - 1))
    offset = data.draw(st.integers(0, 2 ** 40))
    rand_bits = data.draw(st.sampled_from([None, 1, 8, 16, 23, 32]))
    got = gatesim.quantize(torch.from_numpy(x), fmt, mode, saturate=saturate, seed=seed,
                           offset=offset, rand_bits=rand_bits)
    want = twin_quantize(x, fmt, mode, saturate, seed, offset, rand_bits or 0)
    assert_same_bits(got, want, f"{fmt} {mode} saturate={saturate}")


@given(data=st.data(), fmt=named_formats().filter(lambda f: f.torch_dtype is not None and f.bits <= 16),
       mode=modes(), saturate=st.booleans())
def test_to_dtype_encodes_quantize_exactly(data, fmt, mode, saturate):
    x = data.draw(float32_arrays(fmt))
    xt = torch.from_numpy(x)
    kw = dict(saturate=saturate, seed=7, offset=3)
    q = gatesim.quantize(xt, fmt, mode, **kw)
    s = gatesim.to_dtype(xt, fmt.torch_dtype, mode, **kw)
    assert s.dtype == fmt.torch_dtype
    codes = s.view(torch.uint8 if fmt.bits == 8 else torch.int16).numpy().astype(np.int64)
    codes &= (1 << fmt.bits) - 1
    want = ref.encode(q.numpy(), np.array(fmt.op_args(), dtype=np.int64))
    np.testing.assert_array_equal(codes, want)


def neighbours(x: np.ndarray, fmt):
    """The two format values around each x: toward_zero and away-from-zero roundings."""
    xt = torch.from_numpy(x)
    lo = gatesim.quantize(xt, fmt, "toward_zero").numpy()
    up = gatesim.quantize(xt, fmt, "up").numpy()
    down = gatesim.quantize(xt, fmt, "down").numpy()
    hi = np.where(x >= 0, up, down)
    return lo, hi


@given(data=st.data(), fmt=st.one_of(named_formats(), formats()))
def test_directed_modes_defining_properties(data, fmt):
    x = data.draw(float32_arrays(fmt, allow_nan=False, allow_infinity=False))
    xt = torch.from_numpy(x)
    maxf = np.float32(fmt.max_finite)
    inrange = np.abs(x) <= maxf
    r = {m: gatesim.quantize(xt, fmt, m).numpy() for m in DETERMINISTIC}
    with np.errstate(invalid="ignore"):
        # toward_zero never grows |x|; up >= x; down <= x (where no NaN is produced)
        assert (np.abs(r["toward_zero"]) <= np.abs(x)).all()
        fin_up = ~np.isnan(r["up"])
        assert (r["up"][fin_up] >= x[fin_up]).all()
        fin_dn = ~np.isnan(r["down"])
        assert (r["down"][fin_dn] <= x[fin_dn]).all()
    lo, hi = neighbours(x, fmt)
    for m in DETERMINISTIC:
        y = r[m][inrange]
        ok = (y == lo[inrange]) | (y == hi[inrange])
        assert ok.all(), f"{m}: result is not a neighbour of x"
        # idempotent: rounding a representable value changes nothing
        assert_same_bits(gatesim.quantize(torch.from_numpy(r[m]), fmt, m), r[m], m)
    # exact inputs stay, inexact ones get an odd last bit under round-to-odd
    exact = (lo == x) & inrange
    assert_same_bits(r["odd"][exact], x[exact], "odd keeps exact values")
    if fmt.torch_dtype is not None and fmt.bits <= 16:
        inexact = (lo != x) & inrange & (r["odd"] != 0)
        codes = gatesim.to_dtype(torch.from_numpy(r["odd"][inexact].copy()), fmt.torch_dtype)
        raw = codes.view(torch.uint8 if fmt.bits == 8 else torch.int16).numpy()
        assert ((raw & 1) == 1).all(), "round-to-odd left an even last bit"


@given(fmt=st.one_of(named_formats(), formats()), mode=modes(include_stochastic=False))
def test_signed_zero_nan_and_infinity(fmt, mode):
    x = torch.tensor([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf])
    y = gatesim.quantize(x, fmt, mode)
    b = f32_bits(y)
    assert b[0] == 0 and b[1] == 0x80000000
    assert b[2] == 0x7FC00000 and b[3] == 0xFFC00000
    want_inf = math.inf if fmt.inf else math.nan
    for v, s in ((y[4].item(), 1), (y[5].item(), -1)):
        assert (math.isnan(v) and math.isnan(want_inf)) or v == s * want_inf
    ys = gatesim.quantize(x, fmt, mode, saturate=True)
    assert ys[4].item() == np.float32(fmt.max_finite) and ys[5].item() == -np.float32(fmt.max_finite)


OVERFLOW_EXPECT = {  # (positive, negative) result just past the largest finite value
    "nearest_even": ("inf", "-inf"), "nearest_away": ("inf", "-inf"),
    "toward_zero": ("max", "-max"), "odd": ("max", "-max"),
    "up": ("inf", "-max"), "down": ("max", "-inf"),
}


@pytest.mark.parametrize("mode", list(OVERFLOW_EXPECT))
@pytest.mark.parametrize("fmt", [gatesim.BF16, gatesim.FP16, gatesim.E5M2, gatesim.E4M3FN],
                         ids=str)
def test_overflow_follows_ieee(fmt, mode):
    maxf = fmt.max_finite
    big = np.float32(min(maxf * 2, float(np.finfo(np.float32).max)))  # past every threshold
    y = gatesim.quantize(torch.tensor([big, -big]), fmt, mode).tolist()
    for got, want in zip(y, OVERFLOW_EXPECT[mode]):
        sign = -1.0 if want.startswith("-") else 1.0
        if want.endswith("inf"):
            assert (math.isnan(got) if not fmt.inf else got == sign * math.inf), (got, want)
        else:
            assert got == sign * maxf
    y = gatesim.quantize(torch.tensor([big, -big]), fmt, mode, saturate=True).tolist()
    assert y == [maxf, -maxf]


def test_known_values():
    t = torch.tensor
    assert gatesim.quantize(t([70000.0]), gatesim.FP16).item() == math.inf  # QPyTorch: 70016
    assert gatesim.quantize(t([2.98e-8]), gatesim.FP16).item() == 0.0  # no double rounding
    assert gatesim.quantize(t([3.0e-8]), gatesim.FP16).item() == 2.0 ** -24
    fm = float(np.finfo(np.float32).max)
    assert gatesim.quantize(t([fm, -fm]), gatesim.BF16).tolist() == [math.inf, -math.inf]
    assert gatesim.quantize(t([fm]), gatesim.BF16, "toward_zero").item() == gatesim.BF16.max_finite
    # 464 is the tie between 448 (even) and the NaN code 480: it stays finite
    assert gatesim.quantize(t([464.0, 465.0]), gatesim.E4M3FN).isnan().tolist() == [False, True]
    assert gatesim.quantize(t([1.0 + 2 ** -8]), gatesim.BF16).item() == 1.0  # tie to even
    assert gatesim.quantize(t([1.0 + 3 * 2 ** -8]), gatesim.BF16).item() == 1.0 + 2 ** -6
    assert gatesim.quantize(t([1.0 + 2 ** -8]), gatesim.BF16, "nearest_away").item() == 1 + 2 ** -7
    assert f32_bits(gatesim.quantize(t([-1e-30]), gatesim.FP16))[0] == 0x80000000  # -0 kept


def test_format_without_subnormals_rounds_across_the_gap():
    ftz = gatesim.Format(5, 10, subnormals=False)
    mn = ftz.min_normal
    x = torch.tensor([0.75 * mn, 0.5 * mn, 0.25 * mn, -0.75 * mn])
    assert gatesim.quantize(x, ftz).tolist() == [mn, 0.0, 0.0, -mn]
    assert gatesim.quantize(x, ftz, "up").tolist() == [mn, mn, mn, -0.0]


def test_out_argument_and_in_place():
    x = torch.randn(1000) * 3
    want = gatesim.quantize(x, gatesim.FP16)
    out = torch.empty_like(x)
    assert gatesim.quantize(x, gatesim.FP16, out=out) is out
    assert_same_bits(out, want)
    y = x.clone()
    gatesim.quantize(y, gatesim.FP16, out=y)
    assert_same_bits(y, want)
    o16 = torch.empty(1000, dtype=torch.float16)
    assert gatesim.to_dtype(x, torch.float16, out=o16) is o16
    assert_same_bits(o16.float(), want)


def test_empty_and_shapes():
    for shape in [(0,), (3, 0, 2), (2, 3, 4)]:
        x = torch.randn(shape)
        y = gatesim.quantize(x, gatesim.BF16)
        assert y.shape == x.shape
        z = gatesim.to_dtype(x, torch.bfloat16, "stochastic", seed=1)
        assert z.shape == x.shape and z.dtype == torch.bfloat16


def test_opcheck_schemas_and_fake_kernels():
    x = torch.randn(64)
    args = gatesim.BF16.op_args()
    torch.library.opcheck(torch.ops.gatesim.quantize.default, (x, args, 0, 0, 0, torch.float32))
    torch.library.opcheck(torch.ops.gatesim.quantize.default,
                          (x, args, 6, 5, 0, torch.bfloat16))
    torch.library.opcheck(torch.ops.gatesim.quantize_out.default,
                          (x, args, 0, 0, 0, torch.empty_like(x)))
    torch.library.opcheck(torch.ops.gatesim.ulp.default, (x, args))
    torch.library.opcheck(torch.ops.gatesim.absorbed.default,
                          (gatesim.quantize(x, "bf16"), x * 1e-3, args, 0, 0, 0))
