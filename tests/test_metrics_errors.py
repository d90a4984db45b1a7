"""Bad input to gatesim.metrics: every error names the argument and the problem."""
import pytest
import torch

import gatesim.metrics as gm

W = torch.randn(20, 12)
W1 = W + 1e-3


@pytest.mark.parametrize("fn", [
    lambda a, b: gm.sparsity(a, b),
    lambda a, b: gm.update_mask(a, b),
    lambda a, b: gm.ulp_distance(a, b),
    lambda a, b: gm.nss(a, b),
    lambda a, b: gm.principal_angles(a, b, 2),
    lambda a, b: gm.update_energy(a, b, 2),
    lambda a, b: gm.spectral(a, b, 2),
    lambda a, b: gm.compare(a, b, k=2),
])
def test_pair_mismatches(fn):
    with pytest.raises(ValueError, match=r"shape mismatch: .* \(20, 12\), .* \(12, 20\)"):
        fn(W, W1.T.contiguous())
    with pytest.raises(TypeError, match=r"dtype mismatch: .*torch.float32.*torch.bfloat16"):
        fn(W, W1.to(torch.bfloat16))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn(W, W1.numpy())


def test_device_mismatch():
    meta = W1.to("meta")
    with pytest.raises(ValueError, match="device mismatch: w0 is on cpu, w1 on meta"):
        gm.sparsity(W, meta)
    with pytest.raises(ValueError, match="device mismatch: W0 is on cpu, W1 on meta"):
        gm.nss(W, meta)
    with pytest.raises(ValueError, match="device mismatch"):
        gm.overlap(W > 0, (W1 > 0).to("meta"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_sparsity_unsupported_dtypes(dtype):
    a = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=r"w0 has dtype .*; sparsity and ULP distances need"):
        gm.sparsity(a, a)
    with pytest.raises(TypeError, match="x has dtype"):
        gm.ulp_keys(a)


def test_sparsity_arguments():
    with pytest.raises(ValueError, match="empty"):
        gm.sparsity(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="eta must be a finite number >= 0, got -0.1"):
        gm.sparsity(W, W1, eta=-0.1)
    with pytest.raises(ValueError, match="atol must be a finite number >= 0, got nan"):
        gm.sparsity(W, W1, atol=[1e-5, float("nan")])
    with pytest.raises(TypeError, match="atol must be a number or a sequence"):
        gm.sparsity(W, W1, atol=None)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        gm.sparsity(W, W1, chunk=0)
    with pytest.raises(ValueError, match="rule must be one of"):
        gm.update_mask(W, W1, "ulp")


@pytest.mark.parametrize("bad,msg", [
    (torch.randn(4, 5, 6), r"W0 must be a 2-D matrix, got 3-D with shape \(4, 5, 6\)"),
    (torch.randn(7), r"W0 must be a 2-D matrix, got 1-D"),
    (torch.zeros(0, 5), r"W0 is empty"),
    (torch.ones(4, 5, dtype=torch.int64), r"W0 must be a floating-point matrix"),
])
def test_spectral_needs_a_matrix(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        gm.nss(bad, bad.clone())
    with pytest.raises((ValueError, TypeError), match=msg.replace("W0", "W")):
        gm.base_svd(bad)


@pytest.mark.parametrize("value,kind", [(float("nan"), "1 NaN, 0 inf"),
                                        (float("inf"), "0 NaN, 1 inf")])
def test_nonfinite_spectral_inputs(value, kind):
    bad = W1.clone()
    bad[3, 4] = value
    for fn in (lambda: gm.nss(W, bad), lambda: gm.principal_angles(W, bad, 2),
               lambda: gm.spectral(W, bad, 2), lambda: gm.compare(W, bad, k=2)):
        with pytest.raises(ValueError, match=rf"W1 holds 1 non-finite values \({kind}\)"):
            fn()
    with pytest.raises(ValueError, match="W holds 1 non-finite"):
        gm.base_svd(bad)
    with pytest.raises(ValueError, match="W0 holds 1 non-finite"):
        gm.principal_mask(bad, 2, 0.1)
    with pytest.raises(ValueError, match="NaN or inf"):
        gm.top_alpha(bad, 0.1)


@pytest.mark.parametrize("k", [0, -1, 13, 100])
def test_k_out_of_range(k):
    for fn in (lambda: gm.principal_angles(W, W1, k), lambda: gm.update_energy(W, W1, k),
               lambda: gm.spectral(W, W1, k), lambda: gm.principal_mask(W, k, 0.1),
               lambda: gm.compare(W, W1, k=k),
               lambda: gm.base_svd(W, method="randomized", k=k, unsafe=True)):
        with pytest.raises(ValueError, match=rf"k must be in 1..12 for a 20x12 matrix, got {k}"):
            fn()
    with pytest.raises(TypeError, match="k must be an int"):
        gm.principal_angles(W, W1, 2.0)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_alpha_out_of_range(alpha):
    for fn in (lambda: gm.top_alpha(W, alpha), lambda: gm.bottom_alpha(W, alpha),
               lambda: gm.principal_mask(W, 2, alpha), lambda: gm.low_magnitude_mask(W, alpha),
               lambda: gm.compare(W, W1, k=2, alpha=alpha)):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
            fn()
    with pytest.raises(TypeError, match="alpha must be a number"):
        gm.top_alpha(W, "0.1")


def test_masks_must_be_bool_and_match():
    with pytest.raises(TypeError, match="update must be a bool mask, got torch.float32"):
        gm.overlap(W, W > 0)
    with pytest.raises(ValueError, match=r"shape mismatch: mask has shape \(12, 20\)"):
        gm.overlap(W > 0, (W > 0).T)
    with pytest.raises(ValueError, match="shape mismatch"):
        gm.jaccard(W > 0, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="density must be in"):
        gm.random_mask((3, 3), 1.5)


def test_svd_argument_checks():
    s = gm.base_svd(torch.randn(8, 6))
    with pytest.raises(ValueError, match="svd0 is the SVD of a 8x6 matrix, the matrix is 20x12"):
        gm.principal_angles(W, W1, 2, svd0=s)
    with pytest.raises(TypeError, match="svd1 must be a BaseSVD"):
        gm.nss(W, W1, svd1="exact")
    with pytest.raises(ValueError, match="backend must be one of"):
        gm.base_svd(W, backend="numpy")
    with pytest.raises(TypeError, match="cache must be"):
        gm.base_svd(W, cache="yes")
    with pytest.raises(ValueError, match="W0 is the zero matrix"):
        gm.nss(torch.zeros(3, 3), torch.eye(3))


def test_table_input_shape():
    with pytest.raises(TypeError, match="pairs must be a mapping"):
        gm.table([W, W1], progress=False)
