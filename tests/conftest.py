"""Shared test set-up: hypothesis profiles and helpers."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs derandomized (the same examples every run, so a red build is reproducible);
# set HYPOTHESIS_PROFILE=dev locally to explore new examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def f32_bits(t) -> np.ndarray:
    """uint32 bit patterns of a float32 tensor or array."""
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(got, want, what: str = "", any_nan: bool = False) -> None:
    """Bit-for-bit equality of float32 data, with the first mismatches in the message.

    any_nan: NaNs match any NaN (for values decoded by torch from a storage dtype, whose
    NaN payloads are torch's choice)."""
    g, w = f32_bits(got), f32_bits(want)
    ne = g != w
    if any_nan:
        ne &= ~(np.isnan(g.view(np.float32)) & np.isnan(w.view(np.float32)))
    bad = np.flatnonzero(ne)
    if bad.size:
        src = ", ".join(f"#{i}: got {g[i]:#010x} want {w[i]:#010x}" for i in bad[:5])
        pytest.fail(f"{what}: {bad.size} of {g.size} differ ({src})")


def _openblas_threads(n=None):
    """Best effort: get (n=None) or set the thread count of the OpenBLAS builds numpy and
    scipy load (their reference SVDs); [] where the symbols are not found."""
    import ctypes
    out = []
    try:
        paths = {ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower()}
    except OSError:
        return out
    for p in sorted(paths):
        for suffix in ("64_", ""):
            try:
                lib = ctypes.CDLL(p)
                get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
                put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
            except (OSError, AttributeError):
                continue
            out.append(get())
            if isinstance(n, int):
                put(n)
            elif n:  # restoring: libraries loaded since the first call keep their setting
                put(n.pop(0))
            break
    return out


@pytest.fixture(scope="module")
def one_lapack_thread():
    """Small LAPACK calls run fastest on one thread, and a shared machine's oversubscribed
    cores make multithreaded ones erratic (10x swings seen); restored afterwards."""
    old = torch.get_num_threads()
    old_blas = _openblas_threads(1)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if old_blas:
        _openblas_threads(list(old_blas))


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread (no OpenMP fork/join waits on a busy machine, and the
    same bits whatever the machine's default); restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
