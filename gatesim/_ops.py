"""Loads the compiled extension and gives its ops fake (meta) kernels.

The ops themselves are defined in C++ (``csrc/ops.cpp``, namespace ``gatesim``);
importing ``gatesim._C`` registers them. The fake kernels let ``torch.compile`` and
FakeTensor tracing see output shapes and dtypes without running anything.
"""
from __future__ import annotations

import torch

from gatesim.stat_layout import N_STATS

try:
    from gatesim import _C  # noqa: F401  (registers torch.ops.gatesim)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gatesim's C++ extension is not built. Run `make build` (or "
        "`pip install --no-build-isolation -e .`) in the gatesim checkout.") from exc

ops = torch.ops.gatesim


@torch.library.register_fake("gatesim::quantize")
def _quantize_fake(x, fmt, rmode, seed, offset, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.register_fake("gatesim::quantize_out")
def _quantize_out_fake(x, fmt, rmode, seed, offset, out):
    return None


@torch.library.register_fake("gatesim::ulp")
def _ulp_fake(x, fmt):
    return torch.empty_like(x)


@torch.library.register_fake("gatesim::absorbed")
def _absorbed_fake(w, delta, fmt, rmode, seed, offset):
    return torch.empty_like(w, dtype=torch.bool)


@torch.library.register_fake("gatesim::random_bits_out")
def _random_bits_out_fake(out, seed, offset):
    return None


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'base'.

    Set GATESIM_CPU_ISA before the first gatesim call to force one.
    """
    return ops.cpu_isa()


def spec_numbers(fmt_args: list[int]) -> list[int]:
    """The C++ derivation of a format's constants (for tests)."""
    return list(ops.spec(fmt_args))


@torch.library.register_fake("gatesim::apply_update")
def _apply_update_fake(param, delta, master, comp, fmt, rmode, sum_mode, alpha, decay, seed,
                       offset, step, stats):
    return (param.new_empty((N_STATS,), dtype=torch.int64),
            param.new_empty((1,), dtype=torch.float64))


@torch.library.register_fake("gatesim::adam_step")
def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, master, comp, fmt, state_fmt, rmode,
                    sum_mode, coef, variant, decay, seed, offset, step, stats):
    return _apply_update_fake(param, grad, master, comp, fmt, rmode, sum_mode, 1.0, decay,
                              seed, offset, step, stats)


@torch.library.register_fake("gatesim::adam_direction_out")
def _adam_direction_out_fake(exp_avg, root, bc2_sqrt, eps, neg_step_size, out):
    return None
