"""Emulated optimizers: bit-identical to torch.optim in fp32, to the numba twin in every policy."""
import json

import numpy as np
import pytest
import torch

import gatesim
from gatesim import reference as ref
from gatesim.optim import EmulatedAdam, EmulatedAdamW, EmulatedSGD, PrecisionPolicy
from gatesim.precision import mode_index
from gatesim.update import SUM_MODES, UpdateStats
from gatesim.weights import load_matrix
from conftest import (ADAM_POLICIES, adam_policy_id, assert_fused_adam_equals_torch_ops,
                      assert_same_bits)

MINILM = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.output.dense.weight"]


def minilm_params():
    return [torch.nn.Parameter(load_matrix(n)) for n in MINILM]


def random_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adam_l2"])
def test_fp32_policy_is_bit_identical_to_torch_optim(kind):
    ours_p, theirs_p = minilm_params(), minilm_params()
    if kind == "sgd":
        ours = EmulatedSGD(ours_p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
        theirs = torch.optim.SGD(theirs_p, lr=0.05, momentum=0.9, dampening=0.1,
                                 weight_decay=1e-3, foreach=False)
    elif kind == "sgd_nesterov":
        ours = EmulatedSGD(ours_p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        theirs = torch.optim.SGD(theirs_p, lr=0.01, momentum=0.9, nesterov=True,
                                 weight_decay=1e-4, foreach=False)
    elif kind == "adamw":
        ours = EmulatedAdamW(ours_p, lr=1e-3, weight_decay=0.01)
        theirs = torch.optim.AdamW(theirs_p, lr=1e-3, weight_decay=0.01, foreach=False)
    else:
        ours = EmulatedAdam(ours_p, lr=1e-3, weight_decay=0.01)
        theirs = torch.optim.Adam(theirs_p, lr=1e-3, weight_decay=0.01, foreach=False)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(100):
        random_grads(ours_p, g1)
        random_grads(theirs_p, g2)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert_same_bits(a.detach(), b.detach(), kind)
    assert set(ours.last_stats) == {"group0.param0", "group0.param1"}
    assert all(s.n == p.numel() for s, p in zip(ours.last_stats.values(), ours_p))


POLICIES = [
    dict(param_format="bf16", torch_dtype=torch.bfloat16),
    dict(param_format="bf16", mode="stochastic", seed=7, torch_dtype=torch.bfloat16),
    dict(param_format="bf16", master=True, torch_dtype=torch.bfloat16),
    dict(param_format="bf16", master=True, mode="stochastic", seed=3),
    dict(param_format="bf16", kahan=True, torch_dtype=torch.bfloat16),
    dict(param_format="fp16", kahan=True, sum="exact"),
    dict(param_format="e4m3fn", state_format="bf16", mode="stochastic", seed=1, sum="exact"),
    dict(param_format="fp32", state_format="fp16"),
]


def twin_run(kind, policy: PrecisionPolicy, init, grads, hyper, dtype=torch.float32):
    """The numba twin of an emulated optimizer: fp32 math of adam_step/sgd_step, storage by
    the apply_update twin."""
    fmt = policy.param_format
    fargs = np.array(fmt.op_args(), dtype=np.int64)
    sargs = np.array(policy.state_format.op_args(), dtype=np.int64)
    path = ref.MASTER if policy.master else (ref.KAHAN if policy.kahan else ref.STORAGE)
    mode, summ = mode_index(policy.mode), SUM_MODES.index(policy.sum)
    params, masters, comps, states = [], [], [], []
    offset = 0
    offsets = []
    for w in init:
        w = w.to(dtype).float().numpy().ravel()  # what the optimizer is given
        masters.append(w.copy())
        params.append(gatesim.quantize(torch.from_numpy(w), fmt).numpy())
        comps.append(np.zeros_like(w))
        states.append([np.zeros_like(w), np.zeros_like(w), False])
        offsets.append(offset)
        offset += w.size
    stats_all = []
    for step, gs in enumerate(grads):
        stats_step = []
        for i, g in enumerate(gs):
            g = g.numpy().ravel()
            x = masters[i] if policy.master else params[i]
            if kind == "sgd":
                d, buf = ref.sgd_step(x, g, states[i][0], states[i][2], hyper["lr"], hyper["momentum"],
                                      0.0, hyper["weight_decay"], hyper.get("nesterov", False), sargs)
                states[i][0], states[i][2] = buf, True
                alpha, decay, rstep = -hyper["lr"], 1.0, step
            else:
                neg_step, bc2s = ref.adam_scalars(step + 1, hyper["lr"], 0.9, 0.999)
                d, m, v = ref.adam_step(x, g, states[i][0], states[i][1], neg_step, bc2s, 0.9,
                                        0.999, 1e-8, hyper["weight_decay"], True, sargs)
                decay = 1 - hyper["lr"] * hyper["weight_decay"]
                states[i][0], states[i][1] = m, v
                alpha, rstep = 1.0, step
            pn, mn, cn, counts, mass = ref.apply_update(
                params[i], d, masters[i], comps[i], path, fargs, mode, summ, alpha, decay,
                policy.seed, offsets[i], rstep)
            params[i], comps[i] = pn, cn
            if policy.master:
                masters[i] = mn
            stats_step.append(UpdateStats.from_op(torch.from_numpy(counts),
                                                  torch.tensor([mass], dtype=torch.float64)))
        stats_all.append(stats_step)
    return params, masters, comps, states, stats_all


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("pol", POLICIES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()
                                                               if k != "torch_dtype"))
def test_every_policy_equals_the_twin(kind, pol):
    pol = dict(pol)
    dtype = pol.pop("torch_dtype", torch.float32)
    policy = PrecisionPolicy(torch_math=False, **pol)
    gen = torch.Generator().manual_seed(11)
    init = [load_matrix(MINILM[0])[:7, :43].contiguous() * 1.0,
            torch.randn(4099, generator=gen) * 0.05]
    grads = [[torch.randn(w.shape, generator=gen) * 1e-2 for w in init] for _ in range(6)]
    params = [torch.nn.Parameter(w.clone().to(dtype)) for w in init]
    hyper = dict(lr=1e-2, momentum=0.9, weight_decay=0.05) if kind == "sgd" else \
        dict(lr=1e-3, weight_decay=0.05)
    opt = (EmulatedSGD(params, lr=1e-2, momentum=0.9, weight_decay=0.05, policy=policy)
           if kind == "sgd" else EmulatedAdamW(params, lr=1e-3, weight_decay=0.05, policy=policy))
    got_stats = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype)
        opt.step()
        got_stats.append(list(opt.last_stats.values()))
    tp, tm, tc, ts, tstats = twin_run(kind, policy, init, [[g.to(dtype).float() for g in gs]
                                                          for gs in grads], hyper, dtype)
    for i, p in enumerate(params):
        assert_same_bits(p.detach().float().reshape(-1), tp[i], f"param {i}", any_nan=True)
        st = opt.state[p]
        if policy.master:
            assert_same_bits(st["master"].reshape(-1), tm[i], f"master {i}")
        if policy.kahan:
            assert_same_bits(st["compensation"].float().reshape(-1), tc[i], f"comp {i}", any_nan=True)
        if kind == "adamw":
            assert_same_bits(st["exp_avg"].reshape(-1), ts[i][0], f"exp_avg {i}")
            assert_same_bits(st["exp_avg_sq"].reshape(-1), ts[i][1], f"exp_avg_sq {i}")
    for k, (a, b) in enumerate(zip(got_stats, tstats)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert x == y, (k, i, {f: (getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__ if getattr(x, f) != getattr(y, f)})


def test_log_and_stats(tmp_path):
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    log = tmp_path / "steps.jsonl"
    opt = EmulatedAdamW([("w", params[0])], lr=1e-4,
                        policy=PrecisionPolicy(param_format="bf16"), log=log)
    for _ in range(3):
        params[0].grad = torch.randn(64, 64)
        opt.step()
    opt.close()
    opt.close()  # twice is fine
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert all(r["param"] == "w" and r["n"] == 4096 and r["numel"] == 4096 for r in recs)
    assert recs[-1]["absorbed"] == opt.last_stats["w"].absorbed
    assert 0.0 <= recs[0]["absorbed_fraction"] <= 1.0


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = EmulatedSGD([a, b], lr=0.1)
    a.grad = torch.ones(10)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before) and list(opt.last_stats) == ["group0.param0"]


def test_policy_errors():
    with pytest.raises(ValueError, match="master and kahan"):
        PrecisionPolicy(master=True, kahan=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        PrecisionPolicy(mode="nearest_odd")
    with pytest.raises(ValueError, match="unknown format"):
        PrecisionPolicy(param_format="bf12")
    with pytest.raises(TypeError, match="is torch.bfloat16 but the policy stores fp16"):
        EmulatedSGD([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], lr=0.1,
                    policy=PrecisionPolicy(param_format="fp16"))
    with pytest.raises(ValueError, match="Nesterov"):
        EmulatedSGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, nesterov=True)


def test_fused_adam_direction_equals_torch_ops():
    """gatesim.ops.adam_direction_out (CPU) gives the bits of torch's four ops, specials
    included, for ragged lengths; bad input is refused."""
    g = torch.Generator().manual_seed(11)
    for n in (1, 17, 4099, 100_003):
        m = torch.randn(n, generator=g) * 1e-3
        v = torch.rand(n, generator=g) * 1e-6
        m[::97], v[::89], v[::83], m[::79] = float("nan"), float("inf"), 0.0, float("-inf")
        root = torch.sqrt(v)
        for bc2, eps, ss in ((0.0316, 1e-8, 1e-3), (0.99995, 1e-6, 3.3e-4)):
            want = torch.mul(m, -ss).div_(root.clone().div_(bc2).add_(eps))
            out = torch.empty(n)
            torch.ops.gatesim.adam_direction_out(m, root, bc2, eps, -ss, out)
            assert_same_bits(out, want, f"n={n}")  # NaN payloads too
            same = root.clone()
            torch.ops.gatesim.adam_direction_out(m, same, bc2, eps, -ss, same)  # in place
            assert torch.equal(same.view(torch.int32), out.view(torch.int32))
    x = torch.ones(8)
    with pytest.raises(ValueError, match="shapes differ"):
        torch.ops.gatesim.adam_direction_out(x, torch.ones(7), 1.0, 1e-8, -1e-3, x.clone())
    with pytest.raises(TypeError, match="float32"):
        torch.ops.gatesim.adam_direction_out(x.double(), x, 1.0, 1e-8, -1e-3, x.clone())
    buf = torch.ones(12)
    with pytest.raises(ValueError, match="partially overlaps"):
        torch.ops.gatesim.adam_direction_out(buf[:8], x, 1.0, 1e-8, -1e-3, buf[4:])
    torch.library.opcheck(torch.ops.gatesim.adam_direction_out.default,
                          (torch.randn(16), torch.rand(16), 0.5, 1e-8, -1e-3, torch.empty(16)))


@pytest.mark.parametrize("pol", ADAM_POLICIES, ids=adam_policy_id)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])
def test_fused_adam_step_equals_torch_ops_cpu(pol, betas):
    """The chunked CPU Adam step (moments, torch's sqrt per chunk, direction, write) gives
    the bits of torch's separate ops followed by apply_update, statistics included."""
    from gatesim.optim import adam_variant
    assert adam_variant(torch.device("cpu"), betas[0] <= 0.5) is not None, \
        "no fused variant reproduces this torch build's lerp_/addcmul_/sqrt"
    assert_fused_adam_equals_torch_ops("cpu", pol, betas)


def test_fused_adam_step_is_thread_count_independent():
    g = torch.Generator().manual_seed(2)
    init = torch.randn(700, 300, generator=g) * 0.05
    grads = [torch.randn(700, 300, generator=g) * 1e-2 for _ in range(3)]
    out = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            p = torch.nn.Parameter(init.clone())
            opt = EmulatedAdamW([p], lr=1e-3, policy=PrecisionPolicy(
                param_format="bf16", master=True, mode="stochastic", seed=1))
            for gr in grads:
                p.grad = gr
                opt.step()
            out.append((p.detach().float(), opt.last_stats["group0.param0"]))
    finally:
        torch.set_num_threads(threads)
    assert_same_bits(out[1][0], out[0][0], "param")
    assert out[0][1] == out[1][1]


def test_adam_step_op_errors_name_the_problem():
    p, g, m, v = (torch.zeros(64) for _ in range(4))
    fmt = gatesim.FP32.op_args()
    coef = [0.1, 0.999, 0.001, 0.1, 1e-8, -1e-3]
    op = torch.ops.gatesim.adam_step
    with pytest.raises(ValueError, match="share memory"):
        op(p, g, m, m, None, None, fmt, [], 0, 1, coef, 0, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="share memory"):
        op(p, g, g, v, None, None, fmt, [], 0, 1, coef, 0, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="coef must hold 6"):
        op(p, g, m, v, None, None, fmt, [], 0, 1, [0.1], 0, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="coef must be finite"):
        op(p, g, m, v, None, None, fmt, [], 0, 1, coef[:5] + [float("nan")], 0, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="variant bits 3-4"):
        op(p, g, m, v, None, None, fmt, [], 0, 1, coef, 8, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="invalid adam_step variant"):
        op(p, g, m, v, None, None, fmt, [], 0, 1, coef, 64, 1.0, 0, 0, 0, True)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        op(p, g, torch.zeros(65), v, None, None, fmt, [], 0, 1, coef, 0, 1.0, 0, 0, 0, True)
    with pytest.raises(TypeError, match="exp_avg_sq must be float32"):
        op(p, g, m, torch.zeros(64, dtype=torch.float64), None, None, fmt, [], 0, 1, coef, 0,
           1.0, 0, 0, 0, True)


def test_adam_step_opcheck():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5000, generator=g).to(torch.bfloat16)
    args = (torch.randn(5000, generator=g) * 1e-2, torch.randn(5000, generator=g) * 1e-3,
            torch.rand(5000, generator=g) * 1e-6, torch.randn(5000, generator=g), None,
            gatesim.BF16.op_args(), [], 0, 1, [0.1, 0.999, 0.001, 0.3, 1e-8, -1e-3], 35, 0.99,
            0, 0, 0, True)
    torch.library.opcheck(torch.ops.gatesim.adam_step.default, (p, *args))
