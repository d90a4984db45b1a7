"""Gate simulation (issue 5): determinism, replay equivalence, the switches, end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_png_shows_a_plot

import gatesim.metrics as gm
from gatesim.cli import main as cli_main
from gatesim.executor import ResultStore
from gatesim.sim import CellConfig, Stream, mini_sweep, replay, run_cell
from gatesim.sim.config import SweepConfig, load_sweep
from gatesim.sim.run import _loss
from gatesim.sim.sweep import RESULTS_SCHEMA, ablate, cell_id
from gatesim.sim.task import Task

SMALL = dict(rows=64, n_contexts=16, n_targets=4, batch=4, group=4, steps=8, eval_every=4, k=4)


def _small(**kw) -> CellConfig:
    d = dict(SMALL)
    d.update(kw)
    return CellConfig(**d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def test_results_identical_across_runs_and_worker_counts(tmp_path):
    sweep = mini_sweep()
    a = ablate(sweep, tmp_path / "serial", workers=1, progress=False, figures=False)
    ablate(sweep, tmp_path / "pool", workers=2, progress=False, figures=False)
    ra = (tmp_path / "serial" / "mini" / "results.json").read_bytes()
    rb = (tmp_path / "pool" / "mini" / "results.json").read_bytes()
    assert ra == rb
    assert a["schema"] == RESULTS_SCHEMA and len(a["cells"]) == len(sweep.cells())
    # resume: forget one cell, rerun: only it is recomputed and the bytes are the same
    store_path = tmp_path / "serial" / "mini" / "cells.jsonl"
    lines = store_path.read_text().splitlines()
    store_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert len(ResultStore(store_path)) == len(lines) - 1  # torn tail ignored
    ablate(sweep, tmp_path / "serial", workers=1, progress=False, figures=False)
    assert (tmp_path / "serial" / "mini" / "results.json").read_bytes() == ra


def test_replay_reproduces_the_run_bit_for_bit(tmp_path):
    for train in ("bf16_sr", "fp16+master"):
        cfg = _small(train_policy=train, policies=(train, "fp32"))
        res = run_cell(cfg, record=tmp_path / train)
        s = Stream(tmp_path / train)
        assert s.complete and s.steps == cfg.steps * cfg.inner_steps
        shadow = replay(s, train)
        from gatesim.sim.run import _digest
        assert _digest(shadow.weights) == res["train_weights_sha"] == \
            res["final_weights_sha"][train]
        # another policy replays the same stream to other weights
        assert _digest(replay(s, "bf16").weights) != res["train_weights_sha"]


def test_rotation_preserves_the_policy():
    real, rot = Task(_small(geometry="real")), Task(_small(geometry="rotated"))
    idx = torch.arange(16)
    p_real = torch.softmax(real.logits(real.W0, idx), 1)
    p_rot = torch.softmax(rot.logits(rot.W0, idx), 1)
    torch.testing.assert_close(p_rot, p_real, atol=1e-6, rtol=1e-4)
    assert not torch.equal(real.W0, rot.W0)  # but the coordinates differ
    rnd = Task(_small(geometry="random"))
    assert torch.allclose(rnd.W0.double().norm(), real.W0.double().norm(), rtol=1e-6)


def test_fp32_storage_sparsity_is_the_zero_fraction_of_the_accumulated_update(tmp_path):
    cfg = _small(policies=("fp32",), lr=1e-7, steps=6)
    run_cell(cfg, record=tmp_path / "s")
    sh = replay(tmp_path / "s", "fp32")
    w0, w1 = sh.stored_initial(), sh.stored()
    sp = gm.sparsity(w0, w1).bitwise
    assert sp == float(((w1 - w0) == 0).double().mean())
    assert 0 < sp < 1  # a tiny lr leaves some fp32 weights exactly unchanged


def test_beta_zero_adds_nothing():
    cfg = _small(beta=0.0, clip=None)
    task = Task(cfg)
    W = torch.nn.Parameter(task.W0.clone())
    idx = torch.arange(4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lo = torch.log_softmax(task.logits(W, idx), 1)
        y = torch.multinomial(lo.exp(), 4, replacement=True, generator=gen)
    batch = {"y": y, "adv": torch.randn(4, 4, generator=gen), "logp_old": lo.gather(1, y)}
    nan_ref = torch.full((16, cfg.rows), float("nan"))  # would poison any KL term
    _loss(task, cfg, W, idx, batch, nan_ref).backward()
    g1 = W.grad.clone()
    W.grad = None
    logp = torch.log_softmax(task.logits(W, idx), 1)
    (-(torch.exp(logp.gather(1, y) - batch["logp_old"]) * batch["adv"]).mean()).backward()
    assert torch.equal(g1, W.grad)
    # and with beta > 0 the anchor does change the gradient
    W.grad = None
    cfg2 = _small(beta=0.5, clip=None)
    ref = torch.log_softmax(task.logits(task.W0, torch.arange(16)), 1).detach() - 0.1 * torch.randn(16, cfg.rows, generator=gen)
    _loss(task, cfg2, W, idx, batch, ref).backward()
    assert not torch.equal(g1, W.grad)


def test_bf16_sparsity_goes_to_one_as_lr_goes_to_zero():
    sp = [run_cell(_small(lr=lr, policies=("bf16",)))["policies"]["bf16"]["bitwise_sparsity"]
          for lr in (1e-3, 1e-5, 1e-9)]
    assert sp[0] <= sp[1] <= sp[2]
    assert sp[0] < 0.9 and sp[2] > 0.999


def test_end_to_end_cli(tmp_path, capsys):
    cfg = mini_sweep("cli").to_dict()
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(cfg))
    assert cli_main(["ablate", str(path), "--out", str(tmp_path / "out"), "--workers", "1",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Gate III" in out and "Claims" in out
    run = tmp_path / "out" / "cli"
    doc = json.loads((run / "results.json").read_text())
    assert doc["schema"] == RESULTS_SCHEMA
    assert {c["name"] for c in doc["claims"]} >= {"gate3_bf16_sparsity_far_above_fp32",
                                                  "gate2_rotation_frame_overlap_at_chance",
                                                  "rotated_basis_cross_seed_consistency",
                                                  "gate1_kl_anchor_binds",
                                                  "gate2_principal_overlap_rl_below_null"}
    for c in doc["claims"]:
        assert c["verdict"] in ("holds", "fails", "inconclusive", "not tested")
        if c["verdict"] in ("holds", "fails"):
            assert c["n"] >= 2 and c["lo"] <= c["statistic"] <= c["hi"]
    for cell in doc["cells"]:
        for p in cell["policies"].values():
            assert 0 <= p["bitwise_sparsity"] <= 1 and len(p["hist"]) == 34
            assert p["bitwise_sparsity"] == pytest.approx(1 - p["update_density"])
            assert p["absorbed_updates"] <= p["nonzero_updates"]
    # the sweep's Jaccards, recomputed with numpy from the mask files it wrote: J =
    # |A & B| / |A | B| against pq / (p + q - pq) (the grid is seeds only, so a variant and
    # a seed name one cell)
    by = {(c["variant"], c["config"]["seed"]): c for c in doc["cells"]}

    def mask(c, pol):
        with np.load(run / "masks" / f"{cell_id(c['key'])}.npz") as z:
            return np.unpackbits(z[pol])[:int(np.prod(z["shape"]))].astype(bool)

    def check_jaccard(row, a, b):
        p, q = a.mean(), b.mean()
        assert p > 0 and q > 0
        assert row["value"] == pytest.approx(np.count_nonzero(a & b) / np.count_nonzero(a | b),
                                             rel=1e-12)
        assert row["baseline"] == pytest.approx(p * q / (p + q - p * q), rel=1e-12)

    assert doc["jaccard"] and doc["cross_frame"]
    for j in doc["jaccard"]:
        check_jaccard(j, *(mask(by[(j["variant"], s)], j["policy"]) for s in j["seeds"]))
    assert {j["geometry"] for j in doc["cross_frame"]} == {"rotated"}
    for j in doc["cross_frame"]:
        check_jaccard(j, mask(by[(j["variant"], j["seed"])], j["policy"]),
                      mask(by[(j["variant"].split("@")[0], j["seed"])], j["policy"]))
    assert doc["run_pairs"] and all(-1 <= r["cosine"] <= 1 for r in doc["run_pairs"])
    assert "Regime:" in out and "RLVR" in out
    assert "| variant | geometry |" in (run / "table.md").read_text()
    for name in ("gates", "hist", "beta", "consistency", "trajectories"):
        assert_png_shows_a_plot(run / "figures" / f"{name}.png")
    # the replay command on a recorded stream
    from gatesim.sim.config import CellConfig as _C
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps(_C(**SMALL).to_dict()))
    assert cli_main(["run", "--config", str(cell), "--record", str(tmp_path / "stream")]) == 0
    assert cli_main(["replay", str(tmp_path / "stream"), "--policy", "bf16",
                     "--policy", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "Replayed 8 steps" in out and "| fp16" in out
    assert cli_main(["replay", str(tmp_path / "stream"), "--policy", "bf17"]) == 2


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="geometry"):
        CellConfig(geometry="sideways")
    with pytest.raises(ValueError, match="unknown format"):
        CellConfig(policies=("bf17",))
    with pytest.raises(ValueError, match="unknown cell config field"):
        CellConfig.from_dict({"lr": 1e-5, "lrr": 2})
    with pytest.raises(ValueError, match="cell variant=x"):
        SweepConfig(variants={"x": {"beta": -1.0}})
    bad = tmp_path / "s.toml"
    bad.write_text("name = 'x'\n[grid]\nseed = []\n")
    with pytest.raises(ValueError, match="non-empty list"):
        load_sweep(bad)
    # a results directory of another sweep is not silently mixed
    one_cell = SweepConfig(name="same", base=dict(mini_sweep().base, steps=2),
                           grid={"seed": [0]})
    ablate(one_cell, tmp_path, workers=1, progress=False, figures=False)
    other = SweepConfig(name="same", base=dict(mini_sweep().base, steps=3))
    with pytest.raises(ValueError, match="different sweep config"):
        ablate(other, tmp_path, workers=1, progress=False, figures=False)


def test_hostile_stream(tmp_path):
    run_cell(_small(steps=2, policies=("fp32",)), record=tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["shards"][0]["file"] = "../escape.safetensors"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="plain name"):
        Stream(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="not an update stream"):
        Stream(tmp_path)
