"""Tensors past 2**31 elements index correctly (64-bit indexing in every kernel).

Needs about 11 GB of memory (an 8.6 GB float32 input and a 2.1 GB fp8 output).
"""
import numpy as np
import torch

import gatesim
from gatesim import reference as ref


def test_more_than_2_31_elements():
    n = 2 ** 31 + 1000
    x = torch.empty(n, dtype=torch.float32)
    x.fill_(1.0 + 2.0 ** -5)  # a quarter of the way to the next e4m3 value
    tail = torch.tensor([3.0, -500.0, 0.3, 1e-3], dtype=torch.float32)
    x[-4:] = tail
    offset = 12345
    y = gatesim.to_dtype(x, torch.float8_e4m3fn, "stochastic", seed=3, offset=offset)
    del x
    args = np.array(gatesim.E4M3FN.op_args(), dtype=np.int64)
    # the last elements and the ones around 2**31 use stream positions past 2**31
    idx = np.array([2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, n - 5])
    want_mid = np.empty(len(idx), dtype=np.float32)
    for j, i in enumerate(idx):
        want_mid[j] = ref.quantize(np.array([1.0 + 2.0 ** -5], dtype=np.float32), args, 6, 3,
                                   offset + int(i))[0]
    got_mid = y[torch.from_numpy(idx)].float().numpy()
    np.testing.assert_array_equal(got_mid, want_mid)
    want_tail = np.array([ref.quantize(tail[k:k + 1].numpy(), args, 6, 3, offset + n - 4 + k)[0]
                          for k in range(4)], dtype=np.float32)
    np.testing.assert_array_equal(y[-4:].float().numpy(), want_tail)
    # both neighbours occur, at about the right rate, on the last million (spanning 2**31)
    s = y[-1_000_004:-4].float()
    assert ((s == 1.0) | (s == 1.125)).all()
    ups = int((s > 1.0).sum())
    assert 245_000 < ups < 255_000  # expectation 250_000, sigma 433
