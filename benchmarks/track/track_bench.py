"""pytest-benchmark suite for live tracking (``gatesim.track``).

Run with::

    PYTHONPATH=. pytest benchmarks/track/track_bench.py

Times one training step (forward + backward + AdamW step) of the whole bundled MiniLM
(22.57M parameters, bf16 and fp32, batch 8 x 128 tokens) untracked and tracked (every
parameter, every step, one what-if policy); see ``track_cases``. The file is not named
``test_*.py`` and lives outside ``tests/``, so ``pytest tests/`` never collects it. For the
overhead ratio, measured interleaved (which cancels drift in the machine's load), and the
BENCHMARKS.md section use ``benchmarks/track/track_report.py``.
"""
from __future__ import annotations

import pytest
import torch

import track_cases as tc

ROUNDS, WARMUP = 5, 2
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module", params=list(DTYPES))
def cases(request):
    dtype = DTYPES[request.param]
    plain, tracked = tc.make_case(dtype), tc.make_case(dtype, tracked=True)
    for _ in range(2):
        plain.step()
        tracked.step()
    tc.check_identical(plain, tracked)
    yield request.param, plain, tracked
    tracked.tracker.close()


def test_step_untracked(benchmark, cases):
    name, plain, _ = cases
    benchmark.group = f"MiniLM {name} training step"
    benchmark.pedantic(plain.step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def test_step_tracked(benchmark, cases):
    name, _, tracked = cases
    benchmark.group = f"MiniLM {name} training step"
    benchmark.pedantic(tracked.step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
