"""Bad input gets a clear TypeError/ValueError naming the argument."""
import numpy as np
import pytest
import torch

import gatesim

X = torch.randn(8)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: gatesim.quantize(X.double(), "bf16"), TypeError, "x must be float32"),
    (lambda: gatesim.quantize(X.numpy(), "bf16"), TypeError, "x must be a torch.Tensor"),
    (lambda: gatesim.quantize(torch.randn(4, 4).t(), "bf16"), ValueError, "x must be contiguous"),
    (lambda: gatesim.quantize(X, "bf17"), ValueError, "unknown format"),
    (lambda: gatesim.quantize(X, 7), TypeError, "fmt must be"),
    (lambda: gatesim.quantize(X, "bf16", "nearest_odd"), ValueError, "mode must be one of"),
    (lambda: gatesim.quantize(X, "bf16", 3), TypeError, "mode must be a string"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic"), ValueError, "seed is required"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=-1), ValueError, "seed must be"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=2 ** 64), ValueError, "seed must be"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=1.5), ValueError, "seed must be"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=1, offset=-3), ValueError, "offset"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=1, offset=2 ** 62), ValueError,
     "offset"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=1, rand_bits=0), ValueError,
     "rand_bits"),
    (lambda: gatesim.quantize(X, "bf16", "stochastic", seed=1, rand_bits=33), ValueError,
     "rand_bits"),
    (lambda: gatesim.quantize(X, "bf16", out=torch.empty(9)), ValueError, "out has shape"),
    (lambda: gatesim.quantize(X, "bf16", out=torch.empty(8, dtype=torch.float16)), TypeError,
     "out must be torch.float32"),
    (lambda: gatesim.quantize(X, "bf16", out=[0.0] * 8), TypeError, "out must be a torch.Tensor"),
    (lambda: gatesim.quantize(X, "bf16", out=torch.empty(16)[::2]), ValueError,
     "out must be contiguous"),
    (lambda: gatesim.to_dtype(X, gatesim.TF32), TypeError, "no torch storage dtype"),
    (lambda: gatesim.to_dtype(X, torch.int8), TypeError, "dtype"),
    (lambda: gatesim.to_dtype(X, torch.bfloat16, out=torch.empty(8)), TypeError,
     "out must be torch.bfloat16"),
    (lambda: gatesim.ulp(X.half(), "fp16"), TypeError, "x must be float32"),
    (lambda: gatesim.absorbed(X, X[:4], "fp32"), ValueError, "delta has shape"),
    (lambda: gatesim.absorbed(X, X.double(), "fp32"), TypeError, "delta must be float32"),
    (lambda: gatesim.random_bits(-1, 0), ValueError, "n must be"),
    (lambda: gatesim.random_bits(4, None), ValueError, "seed is required"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_wrong_device_is_named():
    meta = torch.empty(8, device="meta")
    with pytest.raises((ValueError, NotImplementedError, RuntimeError), match="meta|device"):
        gatesim.quantize(X, "bf16", out=meta)


def test_direct_op_calls_are_checked_in_cpp():
    ops = torch.ops.gatesim
    with pytest.raises(ValueError, match="ebits must be in 1..8"):
        ops.quantize(X, [9, 7, 127, 1, 1, 0, 0, 0], 0, 0, 0, torch.float32)
    with pytest.raises(ValueError, match="fmt must have 8 entries"):
        ops.quantize(X, [8, 7], 0, 0, 0, torch.float32)
    with pytest.raises(ValueError, match="mode must be in"):
        ops.quantize(X, gatesim.BF16.op_args(), 9, 0, 0, torch.float32)
    with pytest.raises(TypeError, match="bfloat16 output needs BF16"):
        ops.quantize(X, gatesim.FP16.op_args(), 0, 0, 0, torch.bfloat16)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.ulp(X.double(), gatesim.BF16.op_args())
    with pytest.raises(ValueError, match="bias too large"):
        ops.ulp(X, [8, 7, 130, 1, 1, 0, 0, 0])


def test_nan_and_inf_inputs_are_values_not_errors():
    x = torch.tensor([np.nan, np.inf, -np.inf, 1.0])
    y = gatesim.quantize(x, "e4m3fn")
    assert y.isnan()[:3].all() and y[3].item() == 1.0
