"""Stochastic rounding: neighbours, determinism, unbiasedness, the bf16 add-and-truncate trick."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gatesim
from gatesim import reference as ref
from gatesim.testing import float32_arrays, named_formats
from conftest import assert_same_bits, f32_bits


def test_philox_known_answers():
    # Random123 kat_vectors, philox4x32 10: (counter, key) -> output
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert tuple(ref.philox4x32_10(*ctr, *key)) == want
    # the C++ stream: positions 0, 16, 32, 48 are the four words of counter 0
    w = gatesim.random_bits(64, seed=0)
    assert tuple(w[[0, 16, 32, 48]].tolist()) == kat[0][2]


@given(n=st.integers(0, 300), seed=st.integers(0, 2 ** 63 - 1), offset=st.integers(0, 2 ** 61))
def test_random_bits_equal_twin(n, seed, offset):
    np.testing.assert_array_equal(gatesim.random_bits(n, seed, offset).numpy(),
                                  ref.random_words(n, seed, offset))


@given(data=st.data(), fmt=named_formats())
def test_result_is_a_neighbour_and_representable_values_stay(data, fmt):
    x = data.draw(float32_arrays(fmt, allow_nan=False, allow_infinity=False))
    xt = torch.from_numpy(x)
    y = gatesim.quantize(xt, fmt, "stochastic", seed=data.draw(st.integers(0, 2 ** 32))).numpy()
    lo = gatesim.quantize(xt, fmt, "toward_zero").numpy()
    away = np.where(x >= 0, gatesim.quantize(xt, fmt, "up").numpy(),
                    gatesim.quantize(xt, fmt, "down").numpy())
    fin = ~np.isnan(y)
    assert ((y == lo) | (y == away))[fin].all()
    exact = lo == x
    assert_same_bits(y[exact], x[exact], "representable inputs unchanged")


def test_same_bits_for_any_chunking_and_thread_count():
    x = torch.randn(1_000_003) * 1e-2
    whole = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=11, offset=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_same_bits(gatesim.quantize(x, gatesim.BF16, "stochastic", seed=11, offset=5), whole)
    finally:
        torch.set_num_threads(threads)
    # in arbitrary pieces, each with the offset of its first element
    cuts = [0, 1, 63, 64, 1000, 70_001, 500_000, 1_000_003]
    parts = [gatesim.quantize(x[a:b].contiguous(), gatesim.BF16, "stochastic", seed=11,
                              offset=5 + a) for a, b in zip(cuts, cuts[1:])]
    assert_same_bits(torch.cat(parts), whole, "chunked")


def test_different_seeds_and_offsets_differ():
    x = torch.full((4096,), 1.0 + 2 ** -9)  # a quarter of the way to the next bf16
    a = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=1)
    b = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=2)
    c = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=1, offset=1)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, gatesim.quantize(x, gatesim.BF16, "stochastic", seed=1))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 12, 16])
def test_unbiased_within_five_sigma(k):
    """E[SR(x)] = x for x a fraction 2**-k of a bf16 ULP above 1.0, down to 2**-16."""
    n = 1 << 22
    ulp = 2.0 ** -7
    p = 2.0 ** -k
    x = torch.full((n,), 1.0 + p * ulp)
    assert x[0].item() == 1.0 + p * ulp  # exact in fp32
    y = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=1234 + k)
    ups = int((y > 1.0).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(ups - n * p) <= 5 * sigma + 1e-9, (ups, n * p, sigma)
    assert ((y == 1.0) | (y == 1.0 + ulp)).all()


def test_rand_bits_quantize_the_probability():
    # 2**-12 of an ULP is invisible with 8 random bits and visible with 16
    x = torch.full((1 << 16,), 1.0 + 2.0 ** -12 * 2.0 ** -7)
    assert (gatesim.quantize(x, gatesim.BF16, "stochastic", seed=3, rand_bits=8) == 1.0).all()
    assert (gatesim.quantize(x, gatesim.BF16, "stochastic", seed=3, rand_bits=16) > 1.0).any()


def add_and_truncate_trick(x: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """The common bf16 SR trick: add 16 random bits to the fp32 pattern, clear the low 16."""
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    out = (bits + r16.numpy().astype(np.uint64)) & 0xFFFF0000
    return torch.from_numpy(out.astype(np.uint32).view(np.float32))


@given(data=st.data())
def test_default_reproduces_the_add_and_truncate_trick(data):
    x = data.draw(float32_arrays(gatesim.BF16, allow_nan=False))
    seed = data.draw(st.integers(0, 2 ** 63 - 1))
    offset = data.draw(st.integers(0, 2 ** 40))
    xt = torch.from_numpy(x)
    r16 = gatesim.random_bits(x.size, seed, offset) >> 16
    want = add_and_truncate_trick(xt, r16)
    got = gatesim.quantize(xt, gatesim.BF16, "stochastic", seed=seed, offset=offset)
    assert_same_bits(got, want, "trick")
    got16 = gatesim.to_dtype(xt, torch.bfloat16, "stochastic", seed=seed, offset=offset)
    assert_same_bits(got16.float(), want, "trick via to_dtype")


_ISA_SCRIPT = r"""
import hashlib, torch, gatesim
torch.manual_seed(0)
x = torch.randn(300_001) * torch.logspace(-40, 30, 300_001)
x[::97] = float('nan'); x[::89] = float('inf')
h = hashlib.sha256()
for fmt in (gatesim.BF16, gatesim.FP16, gatesim.E4M3FN, gatesim.E5M2, gatesim.Format(4, 5, subnormals=False)):
    for mode in gatesim.MODES:
        h.update(gatesim.quantize(x, fmt, mode, seed=9, offset=3).numpy().tobytes())
    h.update(gatesim.ulp(x, fmt).numpy().tobytes())
h.update(gatesim.to_dtype(x, torch.bfloat16, "stochastic", seed=1).view(torch.int16).numpy().tobytes())
h.update(gatesim.random_bits(1001, 5, 77).numpy().tobytes())
w = gatesim.quantize(x, gatesim.BF16)
h.update(gatesim.absorbed(w, x * 1e-3, gatesim.BF16, check=False).numpy().tobytes())
# apply_update: every path's kernels (the replay step has a hand-written AVX-512 one)
m = (torch.randn(70_001) * 0.02); m[::31] = x[:70_001:31]
d = torch.randn(70_001) * 1e-5; d[::13] = 0.0; d[::37] = x[:70_001:37]
p0 = m.to(torch.bfloat16); p0[::41] = x[:70_001:41].to(torch.bfloat16)
for mode in ("nearest_even", "stochastic"):
    for kw in (dict(master=m.clone()), dict(), dict(compensation=torch.zeros_like(p0)),
               dict(master=m.clone(), alpha=-0.5, decay=0.99), dict(sum_mode="fp32"), dict(stats=False),
               dict(compensation=torch.zeros_like(p0), sum_mode="fp32"),
               dict(compensation=torch.zeros_like(p0), alpha=-0.5, decay=0.99)):
        p = p0.clone()
        st = gatesim.apply_update(p, d, mode=mode, seed=3, **kw)
        h.update(p.view(torch.int16).numpy().tobytes()); h.update(repr(st).encode())
        if "master" in kw:
            h.update(kw["master"].numpy().tobytes())
# the optimizers' fp32 policy step (fp32 storage, alpha 1, decay; a fused AVX-512 kernel)
for sum_mode in ("exact", "fp32"):
    for decay in (1.0, 0.99999):
        p = m.clone()
        st = gatesim.apply_update(p, d, decay=decay, sum_mode=sum_mode)
        h.update(p.numpy().tobytes()); h.update(repr(st).encode())
print(gatesim.cpu_isa(), h.hexdigest())
"""


def _available_isas():
    import gatesim._ops  # noqa
    best = gatesim.cpu_isa()
    order = ["base", "avx2", "avx512"]
    return order[: order.index(best) + 1]


def test_every_cpu_isa_gives_the_same_bits():
    # each instruction set; on AVX-512, also with the statistics histogram's
    # compare-per-bin loop instead of the bit-sliced one (GATESIM_HIST=cmp)
    runs = [(isa, {}) for isa in _available_isas()]
    if runs[-1][0] == "avx512":
        runs.append(("avx512", {"GATESIM_HIST": "cmp"}))
    digests = {}
    for isa, extra in runs:
        env = dict(os.environ, GATESIM_CPU_ISA=isa, **extra)
        out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[0] == isa
        digests[f"{isa} {extra}"] = out[1]
    assert len(set(digests.values())) == 1, digests


def test_forcing_an_unknown_isa_is_a_clear_error():
    env = dict(os.environ, GATESIM_CPU_ISA="sse9")
    res = subprocess.run([sys.executable, "-c", "import gatesim; gatesim.cpu_isa()"], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "GATESIM_CPU_ISA=sse9" in res.stderr
