"""pytest-benchmark suite for the precision core (fp32 -> bf16/fp16/fp8 rounding).

Run with::

    PYTHONPATH=. pytest benchmarks/precision/precision_bench.py

Times every case of ``precision_cases`` on a 4096 x 4096 N(0, 0.02) float32 tensor with
preallocated outputs, at torch's default thread count. The file is not named ``test_*.py``
and lives outside ``tests/``, so a plain ``pytest tests/`` never collects it. For the
1- vs 2-thread table and the issue's pass/fail targets use ``benchmarks/precision/precision_report.py``.
"""
from __future__ import annotations

import pytest

import precision_cases as pc

# Fast cases: pytest-benchmark calibrates them, capped at max_time seconds each.
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=5)

# Slow (tens of ms and more) or just-compiled cases: a fixed, small number of rounds.
SLOW_ROUNDS = 5
SLOW_WARMUP_ROUNDS = 2

_BUFFERS = pc.Buffers.allocate(pc.make_input())
_FAST = {**pc.reference_cases(_BUFFERS), **pc.gatesim_cases(_BUFFERS)}
_SLOW_NAMES = {pc.TORCH_SR_TRICK, pc.ML_DTYPES_ASTYPE, pc.NUMBA_RNE}
_COMPILED_NAMES = [pc.COMPILED_SR_TRICK, pc.COMPILED_RNE]


@pytest.fixture(scope="module")
def compiled():
    """torch.compile'd cases, compiled once per module (None where unavailable)."""
    return pc.compiled_cases(_BUFFERS)


def _group(name: str) -> str:
    return "gatesim" if name.startswith("gatesim") else "reference"


def _pedantic(benchmark, fn) -> None:
    benchmark.pedantic(fn, rounds=SLOW_ROUNDS, warmup_rounds=SLOW_WARMUP_ROUNDS,
                       iterations=1)


def test_references_agree():
    """gatesim, torch, ml_dtypes and the numba loop give the same RNE bf16 bits."""
    pc.check_references(_BUFFERS)


@pytest.mark.parametrize("name", list(_FAST))
def test_eager(benchmark, name):
    benchmark.group = _group(name)
    fn = _FAST[name]
    if name in _SLOW_NAMES:
        _pedantic(benchmark, fn)
    else:
        benchmark(fn)


@pytest.mark.parametrize("name", _COMPILED_NAMES)
def test_torch_compile(benchmark, compiled, name):
    fn = compiled[name]
    if fn is None:
        pytest.skip(f"{name}: torch.compile unavailable on this machine")
    benchmark.group = "torch.compile"
    _pedantic(benchmark, fn)
