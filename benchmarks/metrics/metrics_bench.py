"""pytest-benchmark suite for ``gatesim.metrics``: the stages of the full metric set.

Run with::

    PYTHONPATH=. pytest benchmarks/metrics/metrics_bench.py

Times each stage on its own - sparsity (all rules, ULP histogram) and the update mask on a
4096 x 4096 bf16 pair, the randomized SVD (k = 64, q = 128, niter = 8) of a 4096 x 4096
fp32 matrix, the principal and low-magnitude masks from a given SVD, the exact float64 SVD
of a 1024 x 1024 matrix next to a plain fp32 ``torch.linalg.svd`` of it - and the whole
``compare()`` row on a 1024 x 2752 pair, exact and randomized. The per-matrix cost at full
LLM size (4096 x 4096 and 4096 x 11008) comes from ``benchmarks/metrics/metrics_report.py``
(one case per process; too slow for repeated rounds). Not named ``test_*.py`` and outside
``tests/``, so ``pytest tests/`` never collects it.
"""
from __future__ import annotations

import pytest
import torch

import gatesim
import gatesim.metrics as gm

ROUNDS = 3
K = 64


def _pair(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(shape, generator=g) * 0.02
    D = torch.randn(shape, generator=g) * 1e-4 * (torch.rand(shape, generator=g) < 0.1)
    W1 = W0 + D
    if dtype != torch.float32:
        return gatesim.to_dtype(W0, dtype), gatesim.to_dtype(W1, dtype)
    return W0, W1


@pytest.fixture(scope="module")
def big_bf16():
    return _pair((4096, 4096), torch.bfloat16)


@pytest.fixture(scope="module")
def big_fp32():
    return _pair((4096, 4096))


@pytest.fixture(scope="module")
def big_rand_svd(big_fp32):
    return gm.base_svd(big_fp32[0], method="randomized", k=K, cache=False)


def _pedantic(benchmark, fn, rounds=ROUNDS):
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


def test_sparsity_4096_bf16(benchmark, big_bf16):
    benchmark.group = "sparsity 4096x4096 bf16"
    r = _pedantic(benchmark, lambda: gm.sparsity(*big_bf16))
    assert 0 < r.bitwise < 1


def test_update_mask_bitwise_4096_bf16(benchmark, big_bf16):
    benchmark.group = "sparsity 4096x4096 bf16"
    _pedantic(benchmark, lambda: gm.update_mask(*big_bf16))


def test_randomized_svd_4096(benchmark, big_fp32):
    benchmark.group = "SVD"
    s = _pedantic(benchmark, lambda: gm.base_svd(big_fp32[0], method="randomized", k=K,
                                                 cache=False))
    assert s.q == 2 * K


def test_exact_svd_1024_float64(benchmark):
    benchmark.group = "SVD"
    W = torch.randn(1024, 1024) * 0.02
    _pedantic(benchmark, lambda: gm.base_svd(W, cache=False))


def test_plain_torch_svd_1024_fp32(benchmark):
    benchmark.group = "SVD"
    W = torch.randn(1024, 1024) * 0.02
    _pedantic(benchmark, lambda: torch.linalg.svd(W, full_matrices=False))


def test_principal_mask_4096(benchmark, big_fp32, big_rand_svd):
    benchmark.group = "masks 4096x4096"
    _pedantic(benchmark, lambda: gm.principal_mask(big_fp32[0], K, 0.05, svd0=big_rand_svd))


def test_low_magnitude_mask_4096(benchmark, big_fp32):
    benchmark.group = "masks 4096x4096"
    _pedantic(benchmark, lambda: gm.low_magnitude_mask(big_fp32[0], 0.05))


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_compare_1024x2752(benchmark, method):
    benchmark.group = "compare 1024x2752"
    W0, W1 = _pair((1024, 2752))
    row = _pedantic(benchmark, lambda: gm.compare(W0, W1, k=K, alpha=0.05, method=method),
                    rounds=2)
    assert row["k"] == K
