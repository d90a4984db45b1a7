"""gatesim.ulp and gatesim.absorbed against the twin and the definitions of docs/metrics.md."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gatesim
from gatesim import reference as ref
from gatesim.precision import mode_index
from gatesim.testing import float32_arrays, formats, modes, named_formats
from conftest import assert_same_bits


@given(data=st.data(), fmt=st.one_of(named_formats(), formats()))
def test_ulp_equals_twin(data, fmt):
    x = data.draw(float32_arrays(fmt))
    got = gatesim.ulp(torch.from_numpy(x), fmt)
    assert_same_bits(got, ref.ulp(x, np.array(fmt.op_args(), dtype=np.int64)), str(fmt))


def test_ulp_bf16_matches_science_definition():
    # |w| in [2**e, 2**(e+1)) -> ULP = 2**(e-7); relative ULP in (2**-8, 2**-7]
    w = torch.tensor([1.0, 1.99, 2.0, 0.02, -3.0e-5, 1e-38])
    u = gatesim.ulp(w, gatesim.BF16).tolist()
    for wi, ui in zip(w.tolist(), u):
        e = math.floor(math.log2(abs(wi)))
        assert ui == 2.0 ** (max(e, -126) - 7)
    rel = (gatesim.ulp(w[:5], gatesim.BF16) / w[:5].abs())
    assert ((rel > 2 ** -8) & (rel <= 2 ** -7)).all()
    assert gatesim.ulp(torch.tensor([0.0]), gatesim.FP16).item() == 2.0 ** -24
    assert math.isinf(gatesim.ulp(torch.tensor([math.inf]), gatesim.FP16).item())


def twin_absorbed(w, d, fmt, mode, seed=0, offset=0):
    return ref.absorbed(w, d, np.array(fmt.op_args(), dtype=np.int64), mode_index(mode), seed,
                        offset)


@given(data=st.data(), fmt=st.one_of(named_formats(), formats()), mode=modes())
def test_absorbed_equals_twin(data, fmt, mode):
    x = data.draw(float32_arrays(fmt, min_size=1))
    w = gatesim.quantize(torch.from_numpy(x), fmt).numpy()
    scale = data.draw(st.sampled_from([0.0, 1e-12, 1e-6, 1e-3, 0.01, 0.5, 3.0]))
    d = data.draw(float32_arrays(fmt, min_size=w.size, max_size=w.size))
    d = (d * np.float32(scale)).astype(np.float32) if scale else d
    seed = data.draw(st.integers(0, 2 ** 40))
    with np.errstate(all="ignore"):
        got = gatesim.absorbed(torch.from_numpy(w), torch.from_numpy(d), fmt, mode, seed=seed)
    np.testing.assert_array_equal(got.numpy(), twin_absorbed(w, d, fmt, mode, seed))


def test_absorbed_thresholds_under_nearest():
    fmt = gatesim.BF16
    w = gatesim.quantize(torch.randn(100_000) * 0.02, fmt)
    w[:4] = torch.tensor([1.0, -1.0, 2.0 ** -20, 0.5])  # powers of two: spacing halves below
    u = gatesim.ulp(w, fmt)
    s = torch.sign(w)
    assert gatesim.absorbed(w, 0.49 * u * s, fmt).all()  # < ulp/2 away from zero
    assert gatesim.absorbed(w, -0.24 * u * s, fmt).all()  # < ulp/4 toward zero
    assert not gatesim.absorbed(w, u * s, fmt).any()  # >= ulp: never
    assert not gatesim.absorbed(w, -u * s, fmt).any()
    # toward zero from a power of two the gap is ulp/2, so 0.49 ulp is not absorbed there
    assert not gatesim.absorbed(w[:2], -0.49 * u[:2] * s[:2], fmt).any()
    assert not gatesim.absorbed(w, torch.zeros_like(w), fmt).any()  # zero update: not counted


def test_absorbed_uses_the_exact_sum():
    # fp32 storage: absorbed exactly where fl32(w + delta) == w
    w = torch.randn(200_000)
    d = torch.randn(200_000) * torch.logspace(-12, 0, 200_000)
    want = ((w + d) == w) & (d != 0)
    assert torch.equal(gatesim.absorbed(w, d, gatesim.FP32), want)
    # bf16: w + delta lands within half an fp32 ulp of a bf16 tie; fp32 rounding of the
    # sum would make it an exact tie (-> even = w), the exact sum rounds away.
    w = torch.tensor([1.0])
    d = torch.tensor([2.0 ** -8 + 2.0 ** -31])  # just above half a bf16 ulp of 1.0
    assert d.item() == 2.0 ** -8 + 2.0 ** -31
    assert (1.0 + d).item() == 1.0 + 2.0 ** -8  # fp32 loses the 2**-31
    assert not gatesim.absorbed(w, d, gatesim.BF16).item()


def test_absorbed_rejects_unrepresentable_w():
    w = torch.tensor([1.0 + 2.0 ** -10])
    with pytest.raises(ValueError, match="not representable in bf16"):
        gatesim.absorbed(w, w, gatesim.BF16)


def test_absorbed_stochastic_keeps_tiny_updates_alive():
    # an update of 2**-20 of a bf16 ULP: below half an fp32 ulp of w, so fl32(w + d) == w,
    # yet the exact-sum stochastic rounding keeps it with probability 2**-20 per element
    n = 1 << 22
    w = torch.full((n,), 1.0)
    d = torch.full((n,), 2.0 ** -7 * 2.0 ** -20)
    assert ((w + d) == w).all()
    kept = int((~gatesim.absorbed(w, d, gatesim.BF16, "stochastic", seed=5)).sum())
    assert 0 < kept <= 40  # expectation 4
