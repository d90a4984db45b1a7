"""Observed statistics: the :class:`~gatesim.UpdateStats` of a step a real optimizer took,
from the stored values before and after it and the intended update (what the tracker's
``own`` records hold). A numba kernel on CPU (:mod:`gatesim.tracking._observed_kernel`),
tensor ops elsewhere; both give the same counts. Definitions: ``docs/metrics.md``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from gatesim.formats import STORAGE_DTYPES, Format, as_format
from gatesim.stat_layout import STAT_FIELDS
from gatesim.update import UpdateStats, apply_update

__all__ = ["observed_stats", "step_stats", "TRACKED_DTYPES", "CPU_CHUNK"]

#: Parameter dtypes the tracker observes.
TRACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
assert set(TRACKED_DTYPES) <= set(STORAGE_DTYPES)  # the kernel reads these bit layouts
#: UpdateStats counters before the histogram in the kernel's counts (its layout).
_N_COUNTERS = len(STAT_FIELDS)


def _stats_from_counts(counts: Sequence[int], mass: float) -> UpdateStats:
    c = [int(x) for x in counts]
    return UpdateStats(n=c[0], changed=c[1], absorbed=c[2], zero=c[3], nonfinite_delta=c[4],
                       nonfinite_param=c[5], nonfinite_result=c[6], sum_differs=0,
                       absorbed_mass=float(mass), hist=c[_N_COUNTERS:])


#: Elements per chunk of the CPU pass: chunks run on torch.get_num_threads() threads and
#: their results are combined in chunk order, so the absorbed mass has the same bits for
#: any thread count.
CPU_CHUNK = 1 << 16
_POOLS: dict = {}


def _cpu_pool(workers: int):
    pool = _POOLS.get(workers)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="gatesim-track")
    return pool


def _observed_numba(before32: torch.Tensor, after: torch.Tensor, u: torch.Tensor,
                    fmt: Format, src: Optional[torch.Tensor] = None) -> UpdateStats:
    from gatesim.tracking import _observed_kernel as K

    after = after.detach()
    if not after.is_contiguous():
        after = after.contiguous()
    kind = {torch.float32: K.KIND_FP32, torch.bfloat16: K.KIND_BF16,
            torch.float16: K.KIND_FP16}[after.dtype]
    ab = after.view(torch.int32 if kind == K.KIND_FP32 else torch.int16).reshape(-1).numpy()
    ab = ab.view(np.uint32 if kind == K.KIND_FP32 else np.uint16)
    bf = before32.reshape(-1).numpy()
    bb = bf.view(np.uint32)
    un = u.reshape(-1).numpy()
    ubits = un.view(np.uint32)
    sn = un if src is None else src.detach().reshape(-1).numpy()
    n = un.size
    cu = src is not None
    run = lambda lo, hi: K.observed_pass(bb[lo:hi], bf[lo:hi], ab[lo:hi], kind,  # noqa: E731
                                         sn[lo:hi], un[lo:hi], ubits[lo:hi], cu, fmt.emin,
                                         fmt.mbits)
    if n <= CPU_CHUNK:
        counts, mass = run(0, n)
        return _stats_from_counts(counts, mass)
    bounds = [(lo, min(lo + CPU_CHUNK, n)) for lo in range(0, n, CPU_CHUNK)]
    workers = max(1, torch.get_num_threads())
    if workers == 1:
        parts = [run(lo, hi) for lo, hi in bounds]
    else:
        parts = list(_cpu_pool(workers).map(lambda b: run(*b), bounds))
    counts = np.zeros(K.N_COUNTS, dtype=np.int64)
    mass = 0.0
    for c, m in parts:  # chunk order: the same bits for any thread count
        counts += c
        mass += m
    counts[0] = n
    return _stats_from_counts(counts, mass)


def _observed_torch(before32: torch.Tensor, after: torch.Tensor, u: torch.Tensor,
                    fmt: Format, scratch: Optional[torch.Tensor] = None,
                    src: Optional[torch.Tensor] = None) -> UpdateStats:
    """Tensor-op version (any device). Destroys before32 (the last thing it reads)."""
    if src is not None:
        torch.sub(src, before32, out=u)
    n = before32.numel()
    after = after.detach()
    same = before32 == after  # +0 == -0; NaN never equal: exactly "bits unchanged"
    absorbed_mask = same & (u != 0)
    mass = torch.where(absorbed_mask, u, torch.zeros((), dtype=u.dtype, device=u.device))
    counts = torch.stack([same.sum(), absorbed_mask.sum(),
                          torch.isfinite(after).sum()]).tolist()
    mass = float(mass.abs().sum(dtype=torch.float64))
    # zero / non-finite inputs / histogram depend only on (before, u): the fused kernel
    # computes them in the master policy, whose result is discarded.
    if scratch is None:
        scratch = torch.empty_like(u)
    k = apply_update(before32, u, fmt=fmt, master=scratch)
    return UpdateStats(n=n, changed=n - counts[0], absorbed=counts[1], zero=k.zero,
                       nonfinite_delta=k.nonfinite_delta, nonfinite_param=k.nonfinite_param,
                       nonfinite_result=n - counts[2], sum_differs=0, absorbed_mass=mass,
                       hist=list(k.hist))


def observed_stats(before: torch.Tensor, after: torch.Tensor, update: torch.Tensor, *,
                   backend: str = "auto") -> UpdateStats:
    """:class:`~gatesim.UpdateStats` of an optimizer step that stored ``after`` over
    ``before`` while it intended ``update``: what the ``own`` records of :func:`track` hold.

    ``changed``: stored bits differ (+0 == -0, NaN never equal); ``absorbed``: ``update != 0``
    (NaN counts as non-zero) and bits unchanged; ``zero``; ``nonfinite_delta`` /
    ``nonfinite_param`` / ``nonfinite_result`` for update / before / after; ``absorbed_mass``
    sum of ``|update|`` over absorbed elements in fp64 (summation order is the backend's:
    numba on CPU sums in index order, torch in its own; they agree to rounding);
    ``hist``: ``log2(|update| / ulp(before))`` in :data:`gatesim.update.HIST_EDGES_LOG2` bins
    over non-zero finite updates on finite values, exactly as :func:`gatesim.apply_update`;
    ``sum_differs`` 0.

    Args:
        before, after: stored values (float32, bfloat16 or float16, same dtype and shape).
        update: float32 intended update of the same shape.
        backend: ``"numba"`` (CPU only), ``"torch"`` (any device) or ``"auto"``.
    """
    for name, t in (("before", before), ("after", after), ("update", update)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if before.dtype not in TRACKED_DTYPES or after.dtype != before.dtype:
        raise TypeError(f"before and after must share one of {TRACKED_DTYPES}, got "
                        f"{before.dtype} and {after.dtype}")
    if update.dtype != torch.float32:
        raise TypeError(f"update must be float32, got {update.dtype}")
    if not (before.shape == after.shape == update.shape):
        raise ValueError(f"shapes differ: {tuple(before.shape)}, {tuple(after.shape)}, "
                         f"{tuple(update.shape)}")
    if not (before.device == after.device == update.device):
        raise ValueError("before, after and update must be on one device")
    fmt = as_format(before.dtype)
    b32 = before.detach().to(torch.float32, copy=True).contiguous()
    u = update.detach().contiguous()
    return step_stats(b32, after, u, fmt, backend)


def step_stats(b32, after, u, fmt, backend, scratch=None, src=None) -> UpdateStats:
    """Stats of the step; with src, u is first computed in place as fl32(src - b32) (src an
    fp32 tensor, possibly u itself)."""
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "numba" or (backend == "auto" and u.device.type == "cpu"):
        if u.device.type != "cpu":
            raise ValueError("backend='numba' needs CPU tensors")
        if src is not None and not src.is_contiguous():
            src = src.contiguous()
        return _observed_numba(b32, after, u, fmt, src)
    return _observed_torch(b32, after, u, fmt, scratch, src)
