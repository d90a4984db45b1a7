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


def assert_png_shows_a_plot(path):
    """The file decodes as an image of a sane size that is not blank: a good share of
    non-background pixels and several colours."""
    import matplotlib.image as mpimg
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4), path
    h, w = img.shape[:2]
    assert 250 <= h <= 4000 and 400 <= w <= 6000, (path, img.shape)
    rgb = img[..., :3]
    ink = (rgb < 0.9).any(axis=2).mean()
    assert ink > 0.02, (path, ink)
    colours = len(np.unique((rgb.reshape(-1, 3) * 15).round(), axis=0))
    assert colours >= 8, (path, colours)


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


# Policies for the fused Adam step (torch.ops.gatesim.adam_step) against torch's own ops.
ADAM_POLICIES = [
    dict(),
    dict(param_format="bf16", master=True),
    dict(param_format="bf16", master=True, mode="stochastic", seed=3),
    dict(param_format="bf16", mode="stochastic", seed=4),
    dict(param_format="bf16", kahan=True),
    dict(param_format="fp16", state_format="bf16", sum="exact"),
    dict(param_format="e4m3fn", master=True, mode="toward_zero"),
    dict(param_format="bf16", torch_math=False),
]


def adam_policy_id(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "fp32"


def assert_fused_adam_equals_torch_ops(device: str, pol: dict, betas, steps: int = 6) -> None:
    """EmulatedAdamW with the fused step and with torch's separate ops (optimizer.fused =
    False) give the same parameters, master, moments, compensation and statistics after
    every step (shape 333 x 257: several CPU chunks and a partial statistics block)."""
    from gatesim.optim import EmulatedAdamW, PrecisionPolicy

    g = torch.Generator().manual_seed(6)
    init = torch.randn(333, 257, generator=g) * 0.05
    grads = [torch.randn(333, 257, generator=g) * 10.0 ** float(-k) for k in range(1, steps + 1)]
    runs = []
    for fused in (False, True):
        p = torch.nn.Parameter(init.clone().to(device))
        opt = EmulatedAdamW([p], lr=1e-3, betas=betas, weight_decay=0.1,
                            policy=PrecisionPolicy(**pol))
        opt.fused = fused
        hist = []
        for gr in grads:
            p.grad = gr.to(device)
            opt.step()
            st = opt.state[p]
            snap = [p.detach(), st["exp_avg"], st["exp_avg_sq"], st.get("master"),
                    st.get("compensation")]
            hist.append([None if t is None else t.float().cpu().clone() for t in snap] +
                        [opt.last_stats["group0.param0"]])
        runs.append(hist)
    for k, (a, b) in enumerate(zip(*runs)):
        for name, x, y in zip(("param", "exp_avg", "exp_avg_sq", "master", "comp"), a[:5], b[:5]):
            assert (x is None) == (y is None), name
            if x is not None:
                assert_same_bits(y, x, f"step {k} {name}", any_nan=True)
        assert a[5] == b[5], f"step {k} stats"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance with 2 CPUs for the whole session (started on first use,
    shut down at the end), plus a Ray Client server in front of it. Yields
    ``{"gcs": "IP:PORT", "client": "ray://127.0.0.1:PORT"}``. ``address="local"``: never
    a cluster someone else left running on this machine."""
    import signal
    import socket
    import subprocess
    import sys
    import ray
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2 ** 20,
             include_dashboard=False, log_to_driver=False)
    node = ray.nodes()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = subprocess.Popen(
        [sys.executable, "-m", "ray.util.client.server",
         f"--address={ray.get_runtime_context().gcs_address}", "--host=127.0.0.1",
         f"--port={port}", "--mode=proxy", f"--node-id={node['NodeID']}",
         f"--runtime-env-agent-address=http://{node['NodeManagerAddress']}:"
         f"{node['RuntimeEnvAgentPort']}"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield {"gcs": ray.get_runtime_context().gcs_address,
               "client": f"ray://127.0.0.1:{port}"}
    finally:
        try:
            os.killpg(client.pid, signal.SIGTERM)   # the server and the servers it started
            client.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(client.pid, signal.SIGKILL)
        ray.shutdown()
