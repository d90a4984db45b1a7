"""gatesim.track: tracked runs are bit-identical to untracked ones, and what the tracker logs
equals what is computed offline from saved weights and an independently replayed update.

The helpers here (a small model initialised from real MiniLM weights, a training loop, an
offline reference of the observed statistics) are shared with tests/test_track_*.py.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gatesim
import gatesim.optim
from gatesim.policy import PrecisionPolicy
from gatesim.tracking import track
from gatesim.update import HIST_EDGES_LOG2
from gatesim.weights import load_matrix


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

VOCAB, USED_TOKENS, DIM, HID, LABELS = 64, 40, 48, 32, 4
WHAT_IFS = ["bf16", "bf16_sr", "master", "fp16", "bf16_kahan"]


class Net(nn.Module):
    """Embedding + projection initialised from MiniLM (word embeddings of ids 1000..1063,
    a 32x48 block of layer 0's query matrix), LayerNorm, dropout (consumes torch's global
    RNG: a tracker that touched it would change the run), linear head. Token ids are drawn
    from 0..39, so embedding rows 40..63 get zero gradients (decay only)."""

    def __init__(self, dtype=torch.float32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, HID)
        self.norm = nn.LayerNorm(HID)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(HID, LABELS)
        with torch.no_grad():
            self.emb.weight.copy_(load_matrix("embeddings.word_embeddings.weight",
                                              rows=1000 + VOCAB)[1000:, :DIM])
            q = load_matrix("encoder.layer.0.attention.self.query.weight")
            self.proj.weight.copy_(q[:HID, :DIM])
            self.proj.bias.copy_(q[HID:2 * HID, 0] * 0.1)
            self.head.weight.copy_(torch.randn(LABELS, HID, generator=gen) * 0.1)
            self.head.bias.zero_()
        self.to(dtype)

    def forward(self, ids):
        x = self.emb(ids).mean(dim=1)
        return self.head(self.drop(F.gelu(self.norm(self.proj(x)))))


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.05),
}


def batches(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.randint(0, USED_TOKENS, (8, 6), generator=gen),
               torch.randint(0, LABELS, (8,), generator=gen))


def train(dtype=torch.float32, opt="adamw", steps: int = 12, track_kw=None, accum: int = 1,
          before_step=None, after_step=None, model=None, optimizer=None, seed: int = 0,
          scheduler: bool = False):
    """Trains Net; returns (model, optimizer, tracker or None). ``track_kw=None``: untracked."""
    torch.manual_seed(seed)
    model = model or Net(dtype)
    optimizer = optimizer or OPTIMIZERS[opt](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5) if scheduler else None
    tracker = None
    if track_kw is not None:
        kw = dict(model=model, on_error="raise")
        kw.update(track_kw)
        tracker = track(optimizer, **kw)
    data = batches()
    for s in range(steps):
        for _ in range(accum):
            ids, y = next(data)
            (F.cross_entropy(model(ids).float(), y) / accum).backward()
        if before_step:
            before_step(s, model, optimizer)
        optimizer.step()
        if after_step:
            after_step(s, model, optimizer)
        optimizer.zero_grad()
        if sched:
            sched.step()
    return model, optimizer, tracker


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_same_run(a, b):
    (ma, oa), (mb, ob) = a, b
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert na == nb
        assert torch.equal(bits(pa), bits(pb)), f"{na} differs"
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            if isinstance(v, torch.Tensor):
                assert torch.equal(bits(v), bits(w)), f"state {k}.{key} differs"
            else:
                assert v == w


def reference_stats(before: torch.Tensor, after: torch.Tensor, u: torch.Tensor):
    """Offline UpdateStats of an observed step, in numpy float64 (independent of the
    tracker's code): the definitions of gatesim.apply_update with the stored result."""
    fmt = gatesim.as_format(before.dtype)
    b = before.detach().float().numpy().astype(np.float64).ravel()
    a = after.detach().float().numpy().astype(np.float64).ravel()
    uu = u.detach().numpy().astype(np.float64).ravel()
    with np.errstate(invalid="ignore"):
        changed = ~(b == a)  # +0 == -0; NaN never equal
        zero = uu == 0
        absorbed = ~zero & ~changed
        valid = ~zero & np.isfinite(uu) & np.isfinite(b)
    be = np.frexp(b)[1] - 1  # floor(log2 |b|) for b != 0
    ulp_e = np.where((b != 0) & (be >= fmt.emin), be - fmt.mbits, fmt.emin - fmt.mbits)
    ue = np.frexp(uu)[1] - 1
    k = np.clip(ue - ulp_e - HIST_EDGES_LOG2[0] + 1, 0, len(HIST_EDGES_LOG2))
    hist = np.bincount(k[valid], minlength=len(HIST_EDGES_LOG2) + 1)
    return dict(n=b.size, changed=int(changed.sum()), absorbed=int(absorbed.sum()),
                zero=int(zero.sum()), nonfinite_delta=int((~np.isfinite(uu)).sum()),
                nonfinite_param=int((~np.isfinite(b)).sum()),
                nonfinite_result=int((~np.isfinite(a)).sum()), sum_differs=0,
                absorbed_mass=float(np.abs(uu[absorbed]).sum()), hist=hist.tolist())


def assert_stats_equal(got: gatesim.UpdateStats, want: dict, what: str = ""):
    g = got.to_dict()
    for k, v in want.items():
        if k == "absorbed_mass":
            if np.isnan(v):
                assert np.isnan(g[k]), what
            else:
                assert g[k] == pytest.approx(v, rel=1e-12, abs=0), f"{what}: {k}"
        else:
            assert g[k] == v, f"{what}: {k}: got {g[k]} want {v}"


def replay_update(p: torch.nn.Parameter, opt: torch.optim.Optimizer, dtype=torch.float32,
                  fused: bool = True):
    """The intended update, computed independently of the tracker through torch's public
    API: a fresh optimizer of the same class and current hyperparameters (torch's fused
    kernel if `fused`, as the tracker's default replay="auto") steps a copy of p in `dtype`,
    with its state loaded from an upcast copy of the real state."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names",
                                                           "decoupled_weight_decay",
                                                           "initial_lr")}
    if fused:
        hyper.update(fused=True, foreach=False)
    q = p.detach().to(dtype).clone()
    q.grad = p.grad.detach().to(dtype).clone()
    o = type(opt)([q], **hyper)
    st = opt.state.get(p)
    if st:
        o.state[q] = {k: (v.to(dtype).clone() if isinstance(v, torch.Tensor) and k != "step"
                          and v.dtype == p.dtype else copy.deepcopy(v)) for k, v in st.items()}
    o.step()
    return (q - p.detach().to(dtype)).float()


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tracked_run_is_bit_identical(opt, dtype, tmp_path):
    """Every parameter, every step, five what-ifs (stochastic ones included), gradient
    accumulation, an LR schedule and dropout: weights, optimizer state and torch's RNG state
    end bit-identical to an untracked run."""
    plain = train(dtype, opt, steps=10, accum=2, scheduler=True)
    rng_plain = torch.random.get_rng_state()
    tracked = train(dtype, opt, steps=10, accum=2, scheduler=True,
                    track_kw=dict(what_if=WHAT_IFS, log=tmp_path / "log.jsonl"))
    rng_tracked = torch.random.get_rng_state()
    assert_same_run(plain[:2], tracked[:2])
    assert torch.equal(rng_plain, rng_tracked)
    t = tracked[2]
    assert t.steps_seen == t.steps_tracked == 10 and t.errors == 0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 10 * 7 * (1 + len(WHAT_IFS))  # steps x params x policies


def test_fp16_and_fp64_runs_are_bit_identical():
    plain = train(torch.float16, "adamw", steps=6)
    tracked = train(torch.float16, "adamw", steps=6, track_kw=dict(what_if=["bf16", "master"]))
    assert_same_run(plain[:2], tracked[:2])
    plain = train(torch.float32, "sgd", steps=6)
    tracked = train(torch.float32, "sgd", steps=6, track_kw=dict(intended="fp64",
                                                                   what_if=["bf16_sr"]))
    assert_same_run(plain[:2], tracked[:2])


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_logged_stats_equal_offline(opt, dtype, tmp_path):
    """Before/after weights saved at every step plus the intended update (replayed
    independently through torch's API) give, offline, exactly the logged own stats."""
    saved = {}

    def before(s, model, o):
        saved[s] = {"before": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "u": {n: (replay_update(p, o) if p.dtype != torch.float32 else None)
                          for n, p in model.named_parameters()}}

    def after(s, model, o):
        saved[s]["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        saved[s]["last"] = {n: tracker_box[0].last_update(n) for n, _ in model.named_parameters()}

    tracker_box = []
    model = Net(dtype)
    optimizer = OPTIMIZERS[opt](model.parameters())
    t = track(optimizer, model=model, log=tmp_path / "log.jsonl", on_error="raise")
    tracker_box.append(t)
    train(dtype, opt, steps=6, model=model, optimizer=optimizer, before_step=before,
          after_step=after, scheduler=True)
    t.close()
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 7
    absorbed_any = 0
    for rec in records:
        s, name = rec["step"], rec["param"]
        b, a = saved[s]["before"][name], saved[s]["after"][name]
        u = saved[s]["u"][name]
        if u is None:  # fp32: the intended update is the stored one
            u = (a - b).float()
        assert torch.equal(bits(saved[s]["last"][name]), bits(u)), f"{name} step {s}: u"
        want = reference_stats(b, a, u)
        got = gatesim.UpdateStats(**{k: rec[k] for k in want})
        assert_stats_equal(got, want, f"{name} step {s}")
        assert rec["changed"] + (rec["n"] - rec["changed"]) == rec["n"]
        assert rec["absorbed"] <= rec["n"] - rec["changed"]
        absorbed_any += rec["absorbed"]
    if dtype == torch.float32:
        assert absorbed_any == 0  # u is the stored update
    else:
        assert absorbed_any > 0  # bf16/fp16 swallowed some updates: the test can tell


def test_fp64_replay_shows_fp32_absorption():
    """intended="fp64": fp32 parameters get an fp64 replay, so updates below half an fp32
    ULP show up as absorbed (and match the offline count)."""
    model = Net(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    saved = {}
    t = track(opt, model=model, intended="fp64", on_error="raise")

    def before(s, m, o):
        saved["b"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        saved["u"] = {n: replay_update(p, o, torch.float64) for n, p in m.named_parameters()}

    def after(s, m, o):
        for n, p in m.named_parameters():
            assert torch.equal(bits(t.last_update(n)), bits(saved["u"][n]))
            assert_stats_equal(t.last_stats[(n, "own")],
                               reference_stats(saved["b"][n], p, saved["u"][n]), n)

    train(torch.float32, steps=3, model=model, optimizer=opt, before_step=before,
          after_step=after)
    assert t.last_stats[("proj.weight", "own")].absorbed > 0


def test_stored_mode_counts_nothing_absorbed():
    _, _, t = train(torch.bfloat16, "adamw", steps=4,
                    track_kw=dict(intended="stored", what_if=["master"]))
    for (name, pol), st in t.last_stats.items():
        if pol == "own":
            assert st.absorbed == 0 and st.absorbed_mass == 0
            assert st.changed == st.n - st.zero  # u == 0 exactly where bits did not change


def test_weight_decay_below_half_ulp_is_absorbed_in_bf16_but_not_with_master():
    """Zero gradients: AdamW's only update is the decay -lr*wd*w, relative 5e-4 here, below
    what bf16 nearest rounding needs toward zero (half the gap below w: 2**-9 relative, 2**-10
    at a power of two): every element absorbed, the mass is the decay; the fp32-master
    what-if accumulates it and starts flipping bits after a few steps."""
    lr, wd = 5e-3, 0.1
    model = Net(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    t = track(opt, model=model, what_if=["master", "bf16"], on_error="raise")
    w0 = model.proj.weight.detach().float().clone()
    master_changed = 0
    for s in range(12):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        own = t.last_stats[("proj.weight", "own")]
        assert own.changed == 0 and own.absorbed == own.n - own.zero
        assert own.zero == int((w0 == 0).sum())
        decay = lr * wd * w0.abs().double().sum().item()
        assert own.absorbed_mass == pytest.approx(decay, rel=1e-3)
        assert t.last_stats[("proj.weight", "bf16")].changed == 0
        master_changed += t.last_stats[("proj.weight", "master")].changed
    assert torch.equal(model.proj.weight.detach().float(), w0)  # bf16 never decayed
    assert master_changed > 0.5 * w0.numel()
    wm = t.what_if_weights("proj.weight", "master")
    assert wm["master"].abs().sum() < 0.997 * w0.abs().sum()


def test_what_if_weights_equal_independent_replay():
    """A what-if is apply_update of the logged intended updates onto its own storage: replay
    the saved u's by hand and get the same bits (nearest, stochastic, master)."""
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["adamw"](model.parameters())
    pols = {"near": "bf16", "sr": gatesim.optim.PrecisionPolicy(param_format="bf16",
                                                                mode="stochastic", seed=7),
            "m": "master"}
    t = track(opt, model=model, what_if=pols, on_error="raise")
    name = "proj.weight"
    start = model.proj.weight.detach().clone()
    us = []
    train(torch.bfloat16, steps=5, model=model, optimizer=opt,
          after_step=lambda s, m, o: us.append(t.last_update(name)))
    offset = sum(p.numel() for n, p in model.named_parameters()
                 if n in ("emb.weight",))  # proj.weight follows emb.weight in the optimizer
    near, sr, mp = start.clone(), start.clone(), start.clone()
    master = start.float().clone()
    for s, u in enumerate(us):
        gatesim.apply_update(near, u, sum_mode="fp32")
        gatesim.apply_update(sr, u, mode="stochastic", seed=7, offset=offset, step=s,
                             sum_mode="fp32")
        gatesim.apply_update(mp, u, master=master)
    assert torch.equal(bits(t.what_if_weights(name, "near")["param"]), bits(near))
    assert torch.equal(bits(t.what_if_weights(name, "sr")["param"]), bits(sr))
    assert torch.equal(bits(t.what_if_weights(name, "m")["param"]), bits(mp))
    assert torch.equal(bits(t.what_if_weights(name, "m")["master"]), bits(master))
    assert not torch.equal(bits(sr), bits(near))


def test_every_and_window(tmp_path):
    _, _, t = train(torch.bfloat16, "sgd", steps=10,
                    track_kw=dict(every=4, window=2, what_if=["master"], start_step=100,
                                  log=tmp_path / "l.jsonl"))
    recs = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in recs})
    assert steps == [100, 101, 104, 105, 108, 109]
    anchored = sorted({r["step"] for r in recs if r["anchored"]})
    assert anchored == [100, 104, 108]  # what-ifs restart at the start of each window
    assert t.steps_seen == 10 and t.steps_tracked == 6


def test_subset_by_pattern():
    import re
    _, _, t = train(torch.bfloat16, "adamw", steps=2,
                    track_kw=dict(include=["proj.*", re.compile(r"^head\.w")],
                                  exclude="*.bias"))
    assert {n for n, _ in t.last_stats} == {"proj.weight", "head.weight"}


def test_group_granularity_sums_params(tmp_path):
    model = Net(torch.bfloat16)
    opt = torch.optim.AdamW([{"params": [model.emb.weight, model.proj.weight]},
                             {"params": [p for n, p in model.named_parameters()
                                         if n not in ("emb.weight", "proj.weight")],
                              "weight_decay": 0.0}], lr=1e-4)
    t1 = track(opt, model=model, what_if=["master"], on_error="raise")
    t2 = track(opt, model=model, what_if=["master"], granularity="group",
               log=tmp_path / "g.jsonl", on_error="raise")
    train(torch.bfloat16, steps=3, model=model, optimizer=opt)
    recs = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert {(r["param"], r["policy"]) for r in recs} == {
        ("group0", "own"), ("group1", "own"), ("group0", "master"), ("group1", "master")}
    for pol in ("own", "master"):
        want = t1.last_stats[("emb.weight", pol)] + t1.last_stats[("proj.weight", pol)]
        assert t2.last_stats[("group0", pol)] == want


def test_track_model_hooks_every_optimizer_of_the_model():
    """track(model): both optimizers stepping the model are tracked, an unrelated optimizer
    is not, the shadow steps fire no hook, and the run stays bit-identical."""

    def run(tracked):
        torch.manual_seed(0)
        model = Net(torch.bfloat16)
        body = torch.optim.AdamW([p for n, p in model.named_parameters()
                                  if not n.startswith("head")], lr=1e-4)
        head = torch.optim.SGD(model.head.parameters(), lr=0.05)
        other_p = nn.Parameter(torch.ones(3))
        other = torch.optim.SGD([other_p], lr=0.1)
        t = track(model, what_if=["master"], on_error="raise") if tracked else None
        data = batches()
        for _ in range(4):
            ids, y = next(data)
            F.cross_entropy(model(ids).float(), y).backward()
            other_p.grad = torch.ones(3)
            body.step(), head.step(), other.step()
            body.zero_grad(), head.zero_grad()
        if t:
            t.close()
        return model, body, head, t

    m1, b1, h1, _ = run(False)
    m2, b2, h2, t = run(True)
    assert_same_run((m1, b1), (m2, b2))
    assert_same_run((m1, h1), (m2, h2))
    names = {k[0] for k in t.last_stats}
    assert "proj.weight" in names and "1:head.weight" in names
    assert t.steps_tracked == 8  # 4 steps x 2 optimizers, the unrelated one not counted
    from torch.optim import optimizer as optim_module
    assert len(optim_module._global_optimizer_pre_hooks) == 0  # close() removed them


def test_closure_step_uses_stored_update(tmp_path):
    model = Net(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t = track(opt, model=model, log=tmp_path / "c.jsonl", on_error="raise")
    ids, y = next(batches())
    for _ in range(2):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(ids).float(), y)
            loss.backward()
            return loss
        opt.step(closure)
    t.close()
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 7 and {r["intended"] for r in recs} == {"stored"}
    assert all(r["absorbed"] == 0 for r in recs)


def test_what_if_parsing():
    w = PrecisionPolicy.parse("bf16_sr")
    assert (w.param_format, w.mode, w.master) == (gatesim.BF16, "stochastic", False)
    w = PrecisionPolicy.parse("master")
    assert w.param_format is None and w.master and w.name == "master"
    w = PrecisionPolicy.parse("fp16_kahan_exact")
    assert (w.param_format, w.kahan, w.sum) == (gatesim.FP16, True, "exact")
    w = PrecisionPolicy.parse(gatesim.optim.PrecisionPolicy(param_format="e4m3fn", master=True))
    assert w.name == "e4m3fn+master" and w.param_format == gatesim.E4M3FN
    with pytest.raises(ValueError, match="unknown format"):
        PrecisionPolicy.parse("bf17")
    with pytest.raises(ValueError, match="unknown flag"):
        PrecisionPolicy.parse("bf16_fast")
    with pytest.raises(ValueError, match="master and kahan"):
        PrecisionPolicy.parse("bf16_master_kahan")
    with pytest.raises(TypeError):
        PrecisionPolicy.parse(3)
    model = Net()
    with pytest.raises(ValueError, match="unique"):
        track(torch.optim.SGD(model.parameters(), lr=0.1), what_if=["bf16", "bf16"])


def test_argument_errors():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw, err in [(dict(every=0), ValueError), (dict(every=2, window=3), ValueError),
                    (dict(intended="fp16"), ValueError), (dict(granularity="x"), ValueError),
                    (dict(on_error="ignore"), ValueError), (dict(start_step=-1), ValueError),
                    (dict(include=[3]), TypeError), (dict(stats_backend="c"), ValueError),
                    (dict(model=3), TypeError)]:
        with pytest.raises(err):
            track(opt, **kw)
    with pytest.raises(TypeError, match="Optimizer or a torch.nn.Module"):
        track(model.parameters())
    assert len(opt._optimizer_step_pre_hooks) == 0  # failed constructions left no hook


@pytest.mark.parametrize("intended", ["fp32", "fp64", "stored"])
def test_stats_backends_agree_inside_the_tracker(intended):
    """The tensor-op backend (the one GPUs use) and the numba CPU kernel log the same stats
    for every intended-update mode (the mass to rounding: different summation orders)."""
    runs = {}
    for backend in ("numba", "torch"):
        runs[backend] = train(torch.bfloat16 if intended != "fp64" else torch.float32, "adamw",
                              steps=4, track_kw=dict(what_if=["master"], intended=intended,
                                                     stats_backend=backend))[2]
    a, b = runs["numba"].last_stats, runs["torch"].last_stats
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].to_dict(), b[key].to_dict()
        assert x.pop("absorbed_mass") == pytest.approx(y.pop("absorbed_mass"), rel=1e-12)
        x.pop("absorbed_fraction"), y.pop("absorbed_fraction")
        assert x == y, key


def test_replay_same_uses_the_groups_own_settings():
    """replay="same": the replay runs the group's own (here: for-loop) implementation, and
    u equals that replay bit for bit; the default fused replay agrees to a few fp32 ULPs."""
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["adamw"](model.parameters())
    same = track(opt, model=model, replay="same", on_error="raise")
    auto = track(opt, model=model, on_error="raise")
    refs = {}

    def before(s, m, o):
        refs.update({n: (replay_update(p, o, fused=False), replay_update(p, o), None,
                         p.detach().float().clone()) for n, p in m.named_parameters()})

    def after(s, m, o):
        for n, _ in m.named_parameters():
            u_same, u_auto = same.last_update(n), auto.last_update(n)
            assert torch.equal(bits(u_same), bits(refs[n][0])), n
            assert torch.equal(bits(u_auto), bits(refs[n][1])), n
            # the two kernels round differently (e.g. the for-loop's fp32 decay factor
            # 1 - lr*wd): a few fp32 ULPs of the weight, far below bf16's resolution
            scale = torch.maximum(refs[n][3].abs(), u_same.abs())
            assert ((u_same - u_auto).abs() <= 16 * gatesim.ulp(scale, gatesim.FP32)).all(), n

    train(torch.bfloat16, steps=4, model=model, optimizer=opt, before_step=before,
          after_step=after)
    with pytest.raises(ValueError):
        track(opt, replay="fast")
