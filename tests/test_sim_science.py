"""Gate simulation science (issue 15): the learning regime, the KL anchor, the null, the
rotation control's frames, the claims' interval verdicts, the regime reference."""
import json
import math

import numpy as np
import pytest
import torch

from gatesim.claims import (CONSISTENT_RATIO, KL_BIND_RATIO, LEARN_FACTOR, RANDOM_MARGIN,
                            check_claims, kl_anchor_binds, make_claim, rotation_claims)
from gatesim.sim import CellConfig, run_cell
from gatesim.sim.analysis import cross_frame, family, mask_jaccard, run_pairs
from gatesim.sim.config import DATASETS, DEMO_VARIANTS, demo_sweep, load_sweep, paper_sweep
from gatesim.sim.regime import rlvr_reference
from gatesim.sim.run import DELTA_KEY, NULL_PREFIX, hist_quantiles, ratio_quantiles, _log2_hist
from gatesim.sim.sweep import cell_id
from gatesim.sim.task import Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

#: the default's learning regime scaled down to a 64-row slice (chance 2/64, like the
#: default's 8/256), 150 steps at the default lr: about a second per cell
REDUCED = dict(rows=64, n_targets=2, n_contexts=16, batch=16, group=8, steps=150, k=4,
               eval_every=50, policies=("fp32", "bf16+master"), null_policies=("bf16+master",))


def _reduced(arm: str, **kw) -> CellConfig:
    return CellConfig(**dict(REDUCED, **DEMO_VARIANTS[arm], **kw))


def test_reduced_default_learns_and_the_kl_anchor_binds():
    res = {arm: run_cell(_reduced(arm)) for arm in ("rl_kl", "rl_nokl", "sft")}
    for arm, r in res.items():
        rew = r["trajectory"]["reward"]
        assert rew[-1] >= LEARN_FACTOR * rew[0], (arm, rew)
    kl, nokl = res["rl_kl"]["trajectory"]["kl"][-1], res["rl_nokl"]["trajectory"]["kl"][-1]
    assert kl < KL_BIND_RATIO * nokl
    assert res["rl_kl"]["update_norm"] < res["rl_nokl"]["update_norm"]
    # the null keeps the run's exact per-step |update| multiset: same absorbed-free totals
    r = res["rl_nokl"]
    assert r["null"]["bf16+master"]["nonzero_updates"] == \
        r["policies"]["bf16+master"]["nonzero_updates"]
    q = r["step_ratio"]
    assert 0 < q["p10"] <= q["p50"] <= q["p90"]


def test_null_is_the_stream_permuted():
    """The null is deterministic and moves stored weights. (That its stored weights are
    the run's per-step updates permuted and sign-flipped is checked, metric by metric, on
    an independent numpy emulation in test_sim_metrics.py.)"""
    cfg = CellConfig(**dict(REDUCED, steps=6, null_policies=("bf16+master",),
                            policies=("bf16+master",)))
    r1 = run_cell(cfg)
    r2 = run_cell(cfg)
    assert r1["null"] == r2["null"]
    assert r1["null"]["bf16+master"]["bitwise_sparsity"] != pytest.approx(1.0)


def test_datasets_differ_and_rotation_preserves_each():
    idx = torch.arange(16)
    seen = []
    for ds in DATASETS:
        cfg = dict(REDUCED, dataset=ds)
        real, rot = Task(CellConfig(**cfg)), Task(CellConfig(**cfg, geometry="rotated"))
        torch.testing.assert_close(torch.softmax(rot.logits(rot.W0, idx), 1),
                                   torch.softmax(real.logits(real.W0, idx), 1),
                                   atol=1e-6, rtol=1e-4)
        assert real.targets.shape == (16, 2)
        assert (real.target_mask.sum(1) == 2).all()
        assert real.H.norm(dim=1).mean() == pytest.approx(math.sqrt(384), rel=0.3)
        seen.append((real.H, real.targets))
    for (ha, ta), (hb, tb) in zip(seen, seen[1:]):
        assert not torch.equal(ha, hb) and not torch.equal(ta, tb)
    with pytest.raises(ValueError, match="dataset"):
        CellConfig(dataset="imagenet")


def test_mask_overlap_across_frames_is_at_baseline_for_independent_masks(tmp_path):
    """Frame (a) of the rotation control on a synthetic case where it must sit at chance:
    two independent Bernoulli masks give J / baseline = 1 (and identical masks give
    1 / baseline); cross_frame pairs a non-real cell with its real twin of the same seed."""
    rng = np.random.default_rng(0)
    n = 400_000
    a, b = rng.random(n) < 0.3, rng.random(n) < 0.6
    j = mask_jaccard(a, b)
    p, q = j["p"], j["q"]
    assert j["baseline"] == pytest.approx(p * q / (p + q - p * q), rel=1e-12)
    assert j["baseline"] == pytest.approx(0.18 / 0.72, rel=0.01)
    assert j["ratio"] == pytest.approx(1.0, abs=0.01)
    assert mask_jaccard(a, a)["ratio"] == pytest.approx(1 / mask_jaccard(a, a)["baseline"])

    cfg = CellConfig(**REDUCED).to_dict()
    cells = []
    for seed in (0, 1):
        for geo in ("real", "rotated"):
            c = {"key": f"variant=rl_kl{'@' + geo if geo != 'real' else ''},seed={seed}",
                 "variant": "rl_kl" if geo == "real" else f"rl_kl@{geo}",
                 "config": dict(cfg, seed=seed, geometry=geo),
                 "policies": {"bf16+master": {}}}
            m = rng.random(n) < (0.3 if geo == "real" else 0.6)
            np.savez(tmp_path / f"{cell_id(c['key'])}.npz", shape=np.array([n]),
                     **{"bf16+master": np.packbits(m), DELTA_KEY: rng.standard_normal(n)})
            cells.append(c)
    rows = cross_frame(cells, tmp_path)
    assert len(rows) == 2 and {r["seed"] for r in rows} == {0, 1}
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=0.01)
    doc = {"cells": cells, "cross_frame": rows, "jaccard": [], "stored_policy": "bf16+master"}
    rot = {c.name: c for c in rotation_claims(doc)}
    assert rot["gate2_rotation_frame_overlap_at_chance"].verdict == "holds"


def _kl_doc(pairs):
    """A results document with rl_kl / rl_nokl cells whose final KLs are ``pairs``."""
    cells = []
    for seed, (a, b) in enumerate(pairs):
        for v, kl in (("rl_kl", a), ("rl_nokl", b)):
            cells.append({"variant": v, "key": f"variant={v},seed={seed}",
                          "config": {"seed": seed, "geometry": "real", "algo": "grpo", "k": 4,
                                     "alpha": 0.05},
                          "trajectory": {"kl": [0.0, kl], "reward": [0.1, 0.4]},
                          "policies": {}})
    return {"cells": cells}


def test_claim_verdicts_follow_the_interval():
    # ratios 0.1, 0.2, 0.3: the interval lies below 0.5 -> holds
    assert kl_anchor_binds(_kl_doc([(0.1, 1), (0.2, 1), (0.3, 1)])).verdict == "holds"
    # ratios 0.9, 1.0, 1.1 -> fails
    assert kl_anchor_binds(_kl_doc([(0.9, 1), (1.0, 1), (1.1, 1)])).verdict == "fails"
    # ratios 0.1, 0.5, 0.9 straddle 0.5 -> inconclusive
    c = kl_anchor_binds(_kl_doc([(0.1, 1), (0.5, 1), (0.9, 1)]))
    assert c.verdict == "inconclusive" and c.lo < KL_BIND_RATIO < c.hi and c.n == 3
    # one seed cannot support a claim
    assert kl_anchor_binds(_kl_doc([(0.1, 1)])).verdict == "inconclusive"
    assert kl_anchor_binds({"cells": []}).verdict == "not tested"
    assert make_claim("x", "s", [1.0, 1.1, 0.9], 1.0, "above").verdict == "inconclusive"
    assert make_claim("x", "s", [2.0, 2.1, 1.9], 1.0, "above").verdict == "holds"
    assert make_claim("x", "s", [float("nan"), 2.0, 2.1, 1.9], 1.0, "above").n == 3
    # the whole list runs on a sparse document without raising
    names = [c.name for c in check_claims(_kl_doc([(0.1, 1), (0.2, 1)]))]
    assert "gate1_kl_anchor_binds" in names and len(names) == len(set(names))


def test_thresholds_are_fixed_constants():
    assert (LEARN_FACTOR, KL_BIND_RATIO, RANDOM_MARGIN, CONSISTENT_RATIO) == (3.0, 0.5, 1.05,
                                                                            1.25)


def test_ratio_quantiles_of_a_known_distribution():
    r = torch.tensor([2.0 ** -10] * 10 + [2.0 ** -4] * 80 + [2.0 ** 2] * 10)
    q = ratio_quantiles(_log2_hist(r).numpy())
    assert q["p50"] == pytest.approx(2.0 ** -4, rel=0.05)
    # p10 and p90 fall at the end of the 2**-10 and 2**-4 groups: inside their 1/16-octave
    # bins (not just somewhere between the groups)
    assert 2.0 ** -10 <= q["p10"] <= 2.0 ** (-10 + 1 / 16)
    assert 2.0 ** -4 <= q["p90"] <= 2.0 ** (-4 + 1 / 16)
    assert hist_quantiles([0, 0], np.array([0.0, 1.0, 2.0]))["p50"] is None


def test_rlvr_reference_is_lr_over_bf16_ulp():
    ref = rlvr_reference()
    a, b = ref["lrs"]["1e-06"], ref["lrs"]["3e-06"]
    assert ref["weights"] > 20_000_000
    assert b["p50"] == pytest.approx(3 * a["p50"], rel=0.05)
    # MiniLM's typical |w| ~ 0.03..0.06: ulp 2**-12, lr 1e-6 -> about 0.004
    assert 0.002 < a["p50"] < 0.01
    with pytest.raises(ValueError, match="positive"):
        rlvr_reference(lrs=(0.0,))


def test_bundled_sweeps_hold_the_design():
    from gatesim.sim.config import bundled_sweeps
    paper = load_sweep(bundled_sweeps()["paper"])
    assert paper.to_dict() == paper_sweep().to_dict()
    cells = [{"variant": k.split(",")[0].split("=")[1], "config": c.to_dict(), "key": k}
             for k, c in paper.cells()]
    assert len({c["config"]["seed"] for c in cells}) == 5
    betas = {c["config"]["beta"] for m in family(cells, "rl_kl", ("beta",)).values() for c in m}
    assert {0.0, 0.01, 0.05, 0.2, 1.0} <= betas
    lrs = {c["config"]["lr"] for m in family(cells, "sft", ("lr",)).values() for c in m}
    assert max(lrs) / min(lrs) >= 100  # two decades
    geos = {c["config"]["geometry"] for c in cells}
    assert geos == {"real", "rotated", "random"}
    demo = demo_sweep()
    assert len({c.seed for _, c in demo.cells()}) == 3
