"""pytest-benchmark suite for fused updates (``gatesim.apply_update``) and the emulated
optimizers.

Run with::

    PYTHONPATH=. pytest benchmarks/update/update_bench.py

Times every case of ``update_cases`` on a 4096 x 4096 problem at torch's default thread
count: the replay step (fp32 master + fp32 delta -> bf16 parameter, with UpdateStats)
against the eager torch code that computes the same statistics, its torch.compile, and
copies that move as many bytes; and ``EmulatedAdamW.step()`` against ``torch.optim.AdamW``.
Every case updates its state in place, one more step per call. The file is not named
``test_*.py`` and lives outside ``tests/``, so a plain ``pytest tests/`` never collects
it. For the 1- vs 2-thread table and the issue's pass/fail targets use
``benchmarks/update/update_report.py``.
"""
from __future__ import annotations

import pytest

import update_cases as uc

# Fast cases: pytest-benchmark calibrates them, capped at max_time seconds each.
pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=5)

# Slow (~100 ms and more) or just-compiled cases: a fixed, small number of rounds.
SLOW_ROUNDS = 5
SLOW_WARMUP_ROUNDS = 2

_REPLAY = uc.ReplayState.allocate()
_REPLAY_CASES = {**uc.replay_reference_cases(_REPLAY), **uc.replay_gatesim_cases(_REPLAY)}
_SLOW_NAMES = {uc.EAGER_NAIVE, uc.EAGER_STATS, uc.EAGER_PREALLOC}
_STORAGE_CASES = uc.storage_cases(_REPLAY)


@pytest.fixture(scope="module")
def compiled():
    """The compiled eager replay, compiled once per module (None where unavailable)."""
    return uc.compile_replay(_REPLAY, uc.COMPILE_OPTIONS)


@pytest.fixture(scope="module")
def optimizers():
    """One optimizer per case on identical 4096 x 4096 parameters, state initialised."""
    return uc.optimizer_cases(uc.OptimizerState.allocate())


def _group(name: str) -> str:
    return "gatesim" if name.startswith("gatesim") else "reference"


def _pedantic(benchmark, fn) -> None:
    benchmark.pedantic(fn, rounds=SLOW_ROUNDS, warmup_rounds=SLOW_WARMUP_ROUNDS,
                       iterations=1)


def test_replay_agrees(compiled):
    """gatesim's bits and UpdateStats equal the eager (and compiled) torch reference's."""
    uc.check_replay(_REPLAY, compiled)


def test_storage_agrees():
    """bf16 storage and Kahan (sum="fp32") == the eager torch spellings' bits."""
    uc.check_storage(_REPLAY)


@pytest.mark.parametrize("name", list(_STORAGE_CASES))
def test_storage(benchmark, name):
    benchmark.group = "storage " + _group(name)
    benchmark(_STORAGE_CASES[name])


def test_optimizers_agree():
    """EmulatedAdamW (fp32 policy, and the master of bf16+master) == torch AdamW bits."""
    uc.check_optimizers(shape=(256, 256))


@pytest.mark.parametrize("name", list(_REPLAY_CASES))
def test_replay(benchmark, name):
    benchmark.group = "replay " + _group(name)
    fn = _REPLAY_CASES[name]
    if name in _SLOW_NAMES:
        _pedantic(benchmark, fn)
    else:
        benchmark(fn)


def test_replay_torch_compile(benchmark, compiled):
    if compiled is None:
        pytest.skip(f"{uc.COMPILED_STATS}: torch.compile unavailable on this machine")
    benchmark.group = "replay torch.compile"
    _pedantic(benchmark, uc.replay_compiled_cases(_REPLAY, compiled)[uc.COMPILED_STATS])


@pytest.mark.parametrize("name", uc.OPTIMIZER_NAMES)
def test_optimizer_step(benchmark, optimizers, name):
    fn = optimizers[name]
    if fn is None:
        pytest.skip(f"{name}: unavailable in this torch build")
    benchmark.group = "optimizer step"
    _pedantic(benchmark, fn)
