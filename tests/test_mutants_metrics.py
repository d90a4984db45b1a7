"""gatesim.metrics: ULP keys of negative values against numpy's nextafter, compare()'s
``angles=False`` and its error names; each written to kill a mutant the mutation run
(docs/mutation.md) found surviving."""
import numpy as np
import pytest
import torch

import gatesim.metrics as gm
from gatesim.metrics.sparsity import ulp_keys


def test_ulp_keys_are_monotone_through_zero_and_count_steps():
    """Keys are monotone over the whole line (negatives included), +0 and -0 give 0, and
    neighbours (numpy's nextafter, independently) differ by exactly 1."""
    x = np.float32(1.5)
    up = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
    tiny = np.nextafter(np.float32(0), np.float32(1), dtype=np.float32)   # smallest subnormal
    vals = np.array([-up, -x, -1.0, -tiny, -0.0, 0.0, tiny, 1.0, x, up], dtype=np.float32)
    k = ulp_keys(torch.from_numpy(vals)).tolist()
    assert k == sorted(k)
    assert k[4] == k[5] == 0 and k[3] == -1 and k[6] == 1
    assert k[1] - k[0] == 1 and k[9] - k[8] == 1
    assert k[:4] == [-v for v in k[9:5:-1]]                    # key(-x) = -key(x)
    # between 1.0 and 1.5 there are 2**22 float32 steps (half of the binade's 2**23)
    assert k[8] - k[7] == 1 << 22 and k[2] - k[1] == 1 << 22


def test_ulp_keys_of_bf16_negatives():
    x = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.bfloat16)
    k = ulp_keys(x).tolist()
    # bf16 has 7 fraction bits: 128 steps per binade
    assert k == [-(127 + 1) * 128, -127 * 128, 127 * 128, (127 + 1) * 128]


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(12, 10, generator=g)
    return W0, W0 + 1e-2 * torch.randn(12, 10, generator=g)


def test_compare_without_angle_lists_keeps_the_maxima():
    W0, W1 = _pair()
    full = gm.compare(W0, W1, k=3)
    short = gm.compare(W0, W1, k=3, angles=False)
    assert "angle_left_deg" in full and "angle_right_deg" in full
    assert "angle_left_deg" not in short and "angle_right_deg" not in short
    assert short["angle_left_max_deg"] == full["angle_left_max_deg"] == max(
        full["angle_left_deg"])
    assert short["angle_right_max_deg"] == max(full["angle_right_deg"])


def test_compare_errors_name_w0_and_w1():
    W0, W1 = _pair()
    with pytest.raises(ValueError, match=r"W0 has shape \(12, 10\), W1 has \(10, 12\)"):
        gm.compare(W0, W1.T.contiguous(), k=3)
    with pytest.raises(TypeError, match="W0 is torch.float32, W1 is torch.float64"):
        gm.compare(W0, W1.double(), k=3)
