"""CUDA backend: every op bit-identical to the CPU kernels (same seeds, same stats).

Skips cleanly without a GPU or without a CUDA build of the extension.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import gatesim
from gatesim.optim import EmulatedAdamW, EmulatedSGD, PrecisionPolicy
from conftest import (ADAM_POLICIES, adam_policy_id, assert_fused_adam_equals_torch_ops,
                      assert_same_bits)

HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("gatesim::quantize", "CUDA")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_CUDA_KERNELS),
                                reason="needs a GPU and gatesim built with CUDA")

FORMATS = [gatesim.BF16, gatesim.FP16, gatesim.E4M3FN, gatesim.E5M2, gatesim.TF32, gatesim.FP32,
           gatesim.Format(4, 5, subnormals=False), gatesim.Format(3, 1, nan="fn", inf=False),
           gatesim.Format(6, 0, nan="fn", inf=False)]


def hard_values(n=1 << 20, seed=0):
    """Random bit patterns mixed with normal-looking values, ties, subnormals, specials."""
    g = np.random.default_rng(seed)
    bits = g.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[: n // 4] = (g.standard_normal(n // 4) * 10.0 ** g.integers(-40, 38, n // 4)).astype(np.float32)
    x[n // 4: n // 2] = (g.integers(-2 ** 12, 2 ** 12, n // 2 - n // 4) * 2.0 ** -12).astype(np.float32)
    x[:16] = [0.0, -0.0, np.inf, -np.inf, np.nan, 448.0, 464.0, 65504.0, 65520.0, 1e-45,
              -1e-40, 3.0e-8, 2.98e-8, 57344.0, 1.0 + 2 ** -8, -(1.0 + 3 * 2 ** -8)]
    return torch.from_numpy(x)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mode", gatesim.MODES)
def test_quantize_matches_cpu(fmt, mode):
    x = hard_values()
    for kw in (dict(), dict(saturate=True), dict(rand_bits=7, offset=77)):
        kw = dict(kw, seed=12345)
        cpu = gatesim.quantize(x, fmt, mode, **kw)
        gpu = gatesim.quantize(x.cuda(), fmt, mode, **kw).cpu()
        assert_same_bits(gpu, cpu, f"{fmt} {mode} {kw}")
        if fmt.torch_dtype is not None and fmt.bits <= 16:
            a = gatesim.to_dtype(x, fmt.torch_dtype, mode, **kw)
            b = gatesim.to_dtype(x.cuda(), fmt.torch_dtype, mode, **kw).cpu()
            raw = torch.uint8 if fmt.bits == 8 else torch.int16
            assert torch.equal(a.view(raw), b.view(raw)), f"to_dtype {fmt} {mode}"


def test_stochastic_offsets_and_chunks_match_cpu():
    x = hard_values(300_001, seed=3)
    for offset in (0, 1, 63, 64, 2 ** 40 + 5):
        cpu = gatesim.quantize(x, gatesim.BF16, "stochastic", seed=9, offset=offset)
        gpu = gatesim.quantize(x.cuda(), gatesim.BF16, "stochastic", seed=9, offset=offset).cpu()
        assert_same_bits(gpu, cpu, f"offset {offset}")
    n = 1000
    assert torch.equal(gatesim.random_bits(n, 5, 99), gatesim.random_bits(n, 5, 99, device="cuda").cpu())


def test_all_exponents_and_mantissas_sampled():
    """2**28 patterns (every 16th) through every named format, CPU vs GPU."""
    x = torch.arange(0, 2 ** 32, 16, dtype=torch.int64).to(torch.int32).view(torch.float32)
    xg = x.cuda()
    for fmt in FORMATS[:6]:
        assert_same_bits(gatesim.quantize(xg, fmt).cpu(), gatesim.quantize(x, fmt), str(fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_ulp_and_absorbed_match_cpu(fmt):
    x = hard_values(200_000, seed=5)
    assert_same_bits(gatesim.ulp(x.cuda(), fmt).cpu(), gatesim.ulp(x, fmt), "ulp")
    w = gatesim.quantize(x, fmt)
    d = hard_values(200_000, seed=6) * 1e-3
    for mode in gatesim.MODES:
        a = gatesim.absorbed(w, d, fmt, mode, seed=4, check=False)
        b = gatesim.absorbed(w.cuda(), d.cuda(), fmt, mode, seed=4, check=False).cpu()
        assert torch.equal(a, b), f"absorbed {fmt} {mode}"


POLICIES = [("storage", "exact"), ("storage", "fp32"), ("master", "exact"), ("kahan", "exact"),
            ("kahan", "fp32")]


@pytest.mark.parametrize("fmt", [gatesim.BF16, gatesim.FP16, gatesim.E4M3FN, gatesim.FP32],
                         ids=str)
@pytest.mark.parametrize("mode", ["nearest_even", "stochastic", "toward_zero", "odd"])
@pytest.mark.parametrize("policy,summ", POLICIES)
def test_apply_update_matches_cpu(fmt, mode, policy, summ):
    g = torch.Generator().manual_seed(8)
    n = 3 * 4096 + 17
    w = gatesim.quantize(torch.randn(n, generator=g) * 0.02, fmt)
    w[:4] = torch.tensor([math.inf, math.nan, 0.0, -0.0])
    d = torch.randn(n, generator=g) * 1e-4
    d[5:9] = torch.tensor([math.nan, 0.0, math.inf, 1e-30])
    dtype = fmt.torch_dtype
    results = []
    for dev in ("cpu", "cuda"):
        p = w.clone().to(dtype).to(dev)  # a copy: .to() of the same dtype/device aliases w
        kw = dict(mode=mode, seed=3, offset=11, step=4, alpha=-0.5, decay=0.999, sum_mode=summ)
        if policy == "master":
            kw["master"] = (w + torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-6).to(dev)
        if policy == "kahan":
            kw["compensation"] = gatesim.quantize(torch.randn(n, generator=torch.Generator().manual_seed(2)) * 1e-5, fmt).to(dtype).to(dev)
        s = gatesim.apply_update(p, d.to(dev), **kw)
        results.append((p.cpu(), kw.get("master"), kw.get("compensation"), s))
    (pc, mc, cc, sc), (pg, mg, cg, sg) = results
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[pc.element_size()]
    assert torch.equal(pc.view(raw), pg.view(raw))
    if mc is not None:
        assert_same_bits(mg.cpu(), mc, "master")
    if cc is not None:
        assert torch.equal(cc.view(raw), cg.cpu().view(raw))
    assert sc == sg


def test_replay_fast_path_matches_cpu_on_a_large_tensor():
    n = 5_000_001
    g = torch.Generator().manual_seed(0)
    m = torch.randn(n, generator=g) * 0.02
    d = torch.randn(n, generator=g) * 1e-5
    for mode in ("nearest_even", "stochastic"):
        out = []
        for dev in ("cpu", "cuda"):
            mm = m.clone().to(dev)
            p = gatesim.to_dtype(mm, torch.bfloat16)
            s = gatesim.apply_update(p, d.to(dev), master=mm, mode=mode, seed=1)
            out.append((p.cpu().view(torch.int16), mm.cpu(), s))
        assert torch.equal(out[0][0], out[1][0])
        assert_same_bits(out[1][1], out[0][1], "master")
        assert out[0][2] == out[1][2]


# SGD's fp32 math is fmas and products, which torch computes identically on CPU and GPU;
# Adam's lerp/addcmul/sqrt kernels are torch's own and need not agree across devices, so
# the storage side of AdamW on CUDA is covered by test_apply_update_matches_cpu instead.
@pytest.mark.parametrize("opt_cls", [EmulatedSGD])
def test_emulated_optimizers_on_cuda_match_cpu(opt_cls):
    g = torch.Generator().manual_seed(4)
    init = torch.randn(257, 129, generator=g) * 0.05
    grads = [torch.randn(257, 129, generator=g) * 1e-2 for _ in range(5)]
    finals = []
    for dev in ("cpu", "cuda"):
        p = torch.nn.Parameter(init.clone().to(dev))
        pol = PrecisionPolicy(param_format="bf16", master=True, mode="stochastic", seed=2,
                              torch_math=False)
        kw = dict(lr=1e-2, momentum=0.9) if opt_cls is EmulatedSGD else dict(lr=1e-3)
        opt = opt_cls([p], policy=pol, **kw)
        for gr in grads:
            p.grad = gr.to(dev)
            opt.step()
        finals.append((p.detach().cpu(), opt.last_stats["group0.param0"]))
    assert_same_bits(finals[1][0], finals[0][0], "param")
    assert finals[0][1] == finals[1][1]


def test_cuda_errors_name_the_problem():
    x = torch.randn(8, device="cuda")
    with pytest.raises(ValueError, match="out is on"):
        gatesim.quantize(x, "bf16", out=torch.empty(8))
    with pytest.raises(ValueError, match="delta is on"):
        gatesim.apply_update(x, torch.randn(8))


@pytest.mark.parametrize("mode", ["nearest_even", "stochastic", "toward_zero", "up"])
@pytest.mark.parametrize("fmt", [gatesim.BF16, gatesim.TF32, gatesim.FP32], ids=str)
def test_vectorized_quantize_paths_match_cpu(fmt, mode):
    """The 256-element vector kernel and the general kernel on the tail: aligned and
    misaligned buffers, offsets that do and do not start a Philox block."""
    x = hard_values(256 * 37 + 13 + 1, seed=11)
    xg = x.cuda()
    for view in (slice(0, None), slice(1, None)):  # [1:] is not 16-byte aligned
        for offset in (0, 64, 128, 11):
            sr = mode == "stochastic"
            for rb in ((None, 5, 16, 32) if sr else (None,)):
                kw = dict(seed=77, offset=offset, rand_bits=rb) if sr else {}
                cpu = gatesim.quantize(x[view], fmt, mode, **kw)
                gpu = gatesim.quantize(xg[view], fmt, mode, **kw).cpu()
                assert_same_bits(gpu, cpu, f"{fmt} {mode} {view} {offset} {rb}")
                if fmt == gatesim.BF16:
                    a = gatesim.to_dtype(x[view], torch.bfloat16, mode, **kw)
                    b = gatesim.to_dtype(xg[view], torch.bfloat16, mode, **kw).cpu()
                    assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (view, offset, rb)


@pytest.mark.parametrize("fmt,mode,policy", [
    (gatesim.FP16, "toward_zero", "storage"), (gatesim.BF16, "stochastic", "storage"),
    (gatesim.BF16, "nearest_even", "kahan"), (gatesim.FP32, "nearest_even", "storage"),
    (gatesim.E4M3FN, "nearest_even", "storage")])
def test_apply_update_many_blocks_match_cpu(fmt, mode, policy):
    """Enough statistics blocks that every CUDA block loops over several (and flushes its
    histogram counters more than once)."""
    n = 2_000_003
    g = torch.Generator().manual_seed(21)
    w = gatesim.quantize(torch.randn(n, generator=g) * 0.02, fmt)
    d = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, -1, (n,), generator=g).float()
    out = []
    for dev in ("cpu", "cuda"):
        p = w.clone().to(fmt.torch_dtype).to(dev)
        kw = dict(mode=mode, seed=5, offset=3, step=2, decay=0.999, sum_mode="exact")
        if policy == "kahan":
            kw["compensation"] = torch.zeros_like(p)
        s = gatesim.apply_update(p, d.to(dev), **kw)
        raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[p.element_size()]
        out.append((p.cpu().view(raw), s))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


@pytest.mark.parametrize("pol", ADAM_POLICIES, ids=adam_policy_id)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])
def test_fused_adam_matches_torch_ops(pol, betas):
    """The one-pass CUDA Adam step gives the bits of torch's own ops followed by
    apply_update: parameters, master, moments, compensation and statistics, every step."""
    from gatesim.optim import adam_variant
    assert adam_variant(torch.device("cuda"), betas[0] <= 0.5) is not None, \
        "no fused variant reproduces this torch build's lerp_/addcmul_/div_"
    assert_fused_adam_equals_torch_ops("cuda", pol, betas)


def test_fused_adam_refuses_shared_buffers():
    p = torch.zeros(64, device="cuda")
    g = torch.ones(64, device="cuda")
    m = torch.zeros(64, device="cuda")
    args = (gatesim.FP32.op_args(), [], 0, 1, [0.1, 0.999, 0.001, 0.1, 1e-8, -1e-3], 0, 1.0, 0,
            0, 0, True)
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.gatesim.adam_step(p, g, m, m, None, None, *args)
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.gatesim.adam_step(p, g, g, m, None, None, *args)
    # A coef list of the wrong length once ended this process with a segfault (torch 2.11,
    # H100; cause not established): checked in a child process, so that a crash fails this
    # test instead of ending the run.
    code = ("import torch, gatesim\n"
            "z = lambda: torch.zeros(64, device='cuda')\n"
            "try:\n"
            "    torch.ops.gatesim.adam_step(z(), z(), z(), z(), None, None, "
            "gatesim.FP32.op_args(), [], 0, 1, [0.1], 0, 1.0, 0, 0, 0, True)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ValueError: coef must hold 6 numbers" in res.stdout, \
        (res.returncode, res.stdout[-500:], res.stderr[-2000:])
