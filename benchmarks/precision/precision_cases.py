"""Operations timed by the precision-core benchmarks (fp32 -> bf16/fp16/fp8 rounding).

Shared by ``precision_bench.py`` (pytest-benchmark) and ``compare.py`` (one-shot table),
so both time exactly the same code. Every case is a zero-argument callable that writes
into buffers allocated once up front (:class:`Buffers`); the only exception is the
ml_dtypes ``astype`` reference, which allocates because that is what users write.

Not collected by ``pytest tests/``: this file lives in ``benchmarks/`` and is not named
``test_*.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import ml_dtypes
import numba
import numpy as np
import torch

import gatesim

#: Default problem: one 4096 x 4096 float32 weight matrix.
DEFAULT_SHAPE = (4096, 4096)
INPUT_SEED = 0
INPUT_STD = 0.02
SR_SEED = 1
#: Mask keeping the top 16 bits of an fp32 word (sign, exponent, 7 mantissa bits).
BF16_MASK = -65536

# Names of the cases that the targets and ratio columns refer to.
COPY_FP32 = "torch copy_ fp32 -> fp32 (reference)"
ML_DTYPES_ASTYPE = "ml_dtypes astype bf16 (allocates)"
NUMBA_RNE = "numba RNE loop -> bf16 (1 thread)"
GS_RNE_QUANTIZE = "gatesim quantize BF16 nearest_even (out fp32)"
GS_RNE_TO_DTYPE = "gatesim to_dtype bf16 nearest_even (out bf16)"
GS_SR_QUANTIZE = "gatesim quantize BF16 stochastic (out fp32)"
GS_SR_TO_DTYPE = "gatesim to_dtype bf16 stochastic (out bf16)"
TORCH_SR_TRICK = "torch randint-add-mask SR (eager)"
COMPILED_SR_TRICK = "torch.compile randint-add-mask SR"
COMPILED_RNE = "torch.compile x.to(bf16) -> copy_"

Case = Callable[[], object]


def make_input(shape=DEFAULT_SHAPE, seed: int = INPUT_SEED) -> torch.Tensor:
    """N(0, 0.02) float32 tensor, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * INPUT_STD


@dataclass
class Buffers:
    """The input and every preallocated output the cases write into."""

    x: torch.Tensor
    out_fp32: torch.Tensor
    out_bf16: torch.Tensor
    out_fp16: torch.Tensor
    out_e4m3: torch.Tensor
    rand_i32: torch.Tensor
    tmp_i32: torch.Tensor
    x_np: np.ndarray
    out_np_fp32: np.ndarray
    out_np_bf16: np.ndarray
    x_u32: np.ndarray
    out_u16: np.ndarray

    @classmethod
    def allocate(cls, x: torch.Tensor) -> "Buffers":
        x_np = x.numpy()
        return cls(
            x=x,
            out_fp32=torch.empty_like(x),
            out_bf16=torch.empty(x.shape, dtype=torch.bfloat16),
            out_fp16=torch.empty(x.shape, dtype=torch.float16),
            out_e4m3=torch.empty(x.shape, dtype=torch.float8_e4m3fn),
            rand_i32=torch.empty(x.shape, dtype=torch.int32),
            tmp_i32=torch.empty(x.shape, dtype=torch.int32),
            x_np=x_np,
            out_np_fp32=np.empty_like(x_np),
            out_np_bf16=np.empty(x_np.shape, dtype=ml_dtypes.bfloat16),
            x_u32=x_np.reshape(-1).view(np.uint32),
            out_u16=np.empty(x_np.size, dtype=np.uint16),
        )


@numba.njit(parallel=False)
def numba_rne_bf16(src: np.ndarray, dst: np.ndarray) -> None:
    """The loop users prototype: fp32 bits -> bf16 bits, round to nearest even.

    Adds ``0x7FFF`` plus the lowest kept bit, then keeps the top half. NaN payloads are
    not special-cased (fine for a timing reference; the test input has no NaN).
    """
    for i in range(src.size):
        bits = src[i]
        lsb = (bits >> 16) & 1
        dst[i] = (bits + 0x7FFF + lsb) >> 16


def torch_sr_trick(b: Buffers) -> torch.Tensor:
    """Eager "add 16 random bits, mask" stochastic rounding, reusing buffers."""
    torch.randint(0, 1 << 16, b.x.shape, dtype=torch.int32, out=b.rand_i32)
    torch.add(b.x.view(torch.int32), b.rand_i32, out=b.tmp_i32)
    b.tmp_i32.bitwise_and_(BF16_MASK)
    return b.tmp_i32.view(torch.float32)


def _sr_trick_expr(x: torch.Tensor, out: torch.Tensor) -> None:
    r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    out.copy_(((x.view(torch.int32) + r) & BF16_MASK).view(torch.float32))


def _rne_expr(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x.to(torch.bfloat16))


def reference_cases(b: Buffers) -> Dict[str, Case]:
    """Plain copies and the rounding that torch, ml_dtypes and numba already offer."""
    return {
        COPY_FP32: lambda: b.out_fp32.copy_(b.x),
        "numpy copyto fp32 -> fp32": lambda: np.copyto(b.out_np_fp32, b.x_np),
        "torch copy_ fp32 -> bf16": lambda: b.out_bf16.copy_(b.x),
        ML_DTYPES_ASTYPE: lambda: b.x_np.astype(ml_dtypes.bfloat16),
        "ml_dtypes copyto bf16 (prealloc)":
            lambda: np.copyto(b.out_np_bf16, b.x_np, casting="unsafe"),
        NUMBA_RNE: lambda: numba_rne_bf16(b.x_u32, b.out_u16),
        TORCH_SR_TRICK: lambda: torch_sr_trick(b),
    }


def gatesim_cases(b: Buffers) -> Dict[str, Case]:
    """gatesim rounding into preallocated fp32 (quantize) or storage (to_dtype) tensors."""
    x = b.x
    return {
        GS_RNE_QUANTIZE: lambda: gatesim.quantize(x, gatesim.BF16, out=b.out_fp32),
        GS_RNE_TO_DTYPE: lambda: gatesim.to_dtype(x, torch.bfloat16, out=b.out_bf16),
        "gatesim quantize FP16 nearest_even (out fp32)":
            lambda: gatesim.quantize(x, gatesim.FP16, out=b.out_fp32),
        "gatesim to_dtype fp16 nearest_even (out fp16)":
            lambda: gatesim.to_dtype(x, torch.float16, out=b.out_fp16),
        "gatesim quantize E4M3FN nearest_even (out fp32)":
            lambda: gatesim.quantize(x, gatesim.E4M3FN, out=b.out_fp32),
        "gatesim to_dtype e4m3fn nearest_even (out fp8)":
            lambda: gatesim.to_dtype(x, torch.float8_e4m3fn, out=b.out_e4m3),
        GS_SR_QUANTIZE: lambda: gatesim.quantize(x, gatesim.BF16, "stochastic",
                                                 seed=SR_SEED, out=b.out_fp32),
        GS_SR_TO_DTYPE: lambda: gatesim.to_dtype(x, torch.bfloat16, "stochastic",
                                                 seed=SR_SEED, out=b.out_bf16),
    }


def compiled_cases(b: Buffers) -> Dict[str, Optional[Case]]:
    """torch.compile'd versions of the randint trick and of RNE via ``x.to(bf16)``.

    Each is compiled and run once here. A case whose compilation fails maps to ``None``
    (reported as unavailable) instead of aborting the benchmark. Dynamo guards on
    ``torch.get_num_threads()``, so after changing the thread count the first call
    recompiles: warm up before timing.
    """
    specs = {
        COMPILED_SR_TRICK: (_sr_trick_expr, b.out_fp32),
        COMPILED_RNE: (_rne_expr, b.out_bf16),
    }
    cases: Dict[str, Optional[Case]] = {}
    for name, (fn, out) in specs.items():
        try:
            compiled = torch.compile(fn)
            compiled(b.x, out)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "unavailable"
            print(f"[benchmarks] {name}: torch.compile unavailable "
                  f"({type(exc).__name__}: {exc})")
            cases[name] = None
        else:
            cases[name] = (lambda c=compiled, o=out: c(b.x, o))
    return cases


def all_cases(b: Buffers) -> Dict[str, Optional[Case]]:
    """Every benchmarked operation, references first; ``None`` marks an unavailable one."""
    return {**reference_cases(b), **gatesim_cases(b), **compiled_cases(b)}


def set_threads(n: int) -> None:
    """Intra-op thread count for torch (and the gatesim ops, which use torch's pool).

    numba's count is deliberately left alone: the numba loop is ``parallel=False``, and
    ``numba.set_num_threads`` starts numba's own OpenMP pool, whose idle spinning threads
    steal the 2 cores from torch (it doubled every torch/gatesim time on the reference
    machine).
    """
    torch.set_num_threads(n)


def check_references(b: Buffers) -> None:
    """Asserts that the RNE implementations being compared agree bit-for-bit.

    Guards against timing something that silently computes a different result.
    """
    expected = b.x.to(torch.bfloat16).view(torch.int16)
    gatesim.to_dtype(b.x, torch.bfloat16, out=b.out_bf16)
    assert torch.equal(b.out_bf16.view(torch.int16), expected), "gatesim to_dtype != torch"
    gatesim.quantize(b.x, gatesim.BF16, out=b.out_fp32)
    assert torch.equal(b.out_fp32.to(torch.bfloat16).view(torch.int16), expected), \
        "gatesim quantize != torch"
    numba_rne_bf16(b.x_u32, b.out_u16)
    got = torch.from_numpy(b.out_u16.view(np.int16)).view(b.x.shape)
    assert torch.equal(got, expected), "numba RNE loop != torch"
    ml = torch.from_numpy(b.x_np.astype(ml_dtypes.bfloat16).view(np.int16))
    assert torch.equal(ml, expected), "ml_dtypes != torch"
