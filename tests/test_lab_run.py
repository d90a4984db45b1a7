"""``gatesim lab`` end to end on a tiny model: files, the results.json schema, resuming after
an interruption, deterministic results, the CLI, and the claims' verdict rule."""
import json

import pytest

from gatesim.cli import main
from gatesim.lab.claims import check_lab_claims
from gatesim.lab.model import make_tiny_model
from gatesim.lab.report import SCHEMA
from gatesim.lab.run import LabError, run_lab, tiny_lab

CELL_KEYS = {"id", "config", "task", "curve", "evals", "absorbed", "changed", "numel", "final",
             "trainable"}
AGG_KEYS = {"numel", "changed", "sparsity", "fp32_density", "nss_median", "sv_drift_median",
            "angle_median", "angle_max", "energy_ratio", "density", "stored_principal",
            "stored_principal_ratio", "stored_low", "stored_low_ratio", "ranked_principal",
            "ranked_principal_ratio", "ranked_low", "ranked_low_ratio"}
#: every metric's random baseline: the precision-only null (gatesim.lab.analysis)
NULL_KEYS = {"null_sparsity", "null_nss_median", "null_sv_drift_median", "null_angle_median",
             "null_angle_max", "null_energy_ratio", "null_density", "null_principal",
             "null_principal_ratio", "null_low", "null_low_ratio"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lab_model"), "masked", layers=1)


def _config(model, **kw):
    base = dict(model=str(model), layers=None, seeds=(0, 1), second_recipe="reinforce",
                extra_precisions=("bf16",), extra_seeds=(0,), steps=2)
    base.update(kw)
    return tiny_lab(**base)


def test_lab_files_schema_resume(tiny_model, tmp_path):
    cfg = _config(tiny_model)
    cells = cfg.cells()
    # 2 families x 2 methods x 2 seeds + reinforce x 2 seeds + bf16 (grpo, sft) x 1 seed
    assert len(cells) == 12
    part = run_lab(cfg, tmp_path, workers=1, progress=False, limit=3)
    assert part == {"complete": False, "cells_done": 3, "cells": 12,
                    "out": str(tmp_path / "tiny")}
    root = tmp_path / "tiny"
    assert not (root / "results.json").exists()
    first = {json.loads(line)["key"] for line in open(root / "cells.jsonl")}
    doc = run_lab(cfg, tmp_path, workers=1, progress=False)
    keys = [json.loads(line)["key"] for line in open(root / "cells.jsonl")]
    assert len(keys) == len(set(keys)) == 12 and first <= set(keys)  # nothing ran twice
    # files
    for name in ("lab.json", "results.json", "table.md", "timings.json", "cells.jsonl",
                 "analysis.jsonl", "figures/learning.png", "figures/layers.png",
                 "base_bf16/model.safetensors", "base_bf16/config.json",
                 "base_masks_bf16.npz"):
        assert (root / name).is_file(), name
    for c in cells:
        cell = root / "cells" / c.id
        for name in ("checkpoint/model.safetensors", "checkpoint/config.json",
                     "update_fp32.safetensors", "steps.jsonl", "update_mask.npz",
                     "diff/rows.csv", "diff/report.md", "diff/summary_module.csv"):
            assert (cell / name).is_file(), (c.id, name)
    # schema
    on_disk = json.loads((root / "results.json").read_text())
    assert on_disk["schema"] == SCHEMA
    assert set(on_disk) == {"schema", "lab", "cells", "analysis", "consistency", "learning",
                            "claims"}
    assert [c["id"] for c in on_disk["cells"]] == [c.id for c in cells]
    for c in on_disk["cells"]:
        assert set(c) == CELL_KEYS
        assert len(c["curve"]["reward"]) == 2 and c["evals"]["step"] == [0, 2]
        a = on_disk["analysis"][c["id"]]
        assert set(a["network"]) == AGG_KEYS | NULL_KEYS
        net = a["network"]
        for key in AGG_KEYS | NULL_KEYS:   # every metric and baseline is measured
            assert net[key] is not None, (c["id"], key)
        assert 0 <= net["null_sparsity"] <= 1 and net["null_sv_drift_median"] >= 0
        for r in a["rows"]:
            if r.get("spectral") == "ok":  # the null changes at most the entries updated
                assert "sv_drift" in r and "null_nss" in r and "null_sv_drift" in r
                assert r["null_changed"] <= round(r["fp32_density"] * r["numel"]), r["name"]
        assert {"q", "k", "v", "o", "up", "down", "embed"} <= set(a["kinds"])
        assert set(a["layers"]) == {"0"}
    axes = {(p["axis"], p["method"]) for p in on_disk["consistency"]}
    assert {("seed", "grpo"), ("seed", "sft"), ("family", "grpo"), ("recipe", "grpo")} <= axes
    for p in on_disk["consistency"]:
        allk = p["kinds"]["all"]
        assert 0 <= allk["jaccard_baseline"] <= 1 and allk["cosine_baseline"] == 0.0
    assert all(c["verdict"] in ("holds", "fails", "inconclusive", "not tested")
               for c in on_disk["claims"])
    assert len(on_disk["claims"]) == 15
    table = (root / "table.md").read_text()
    for heading in ("## Learning", "## Per module kind", "## Mask overlaps", "## Per layer",
                    "## Every precision", "## Consistency", "## Claims"):
        assert heading in table
    for column in ("| sv drift | null |", "| princ. null |", "| low null |"):
        assert column in table
    # the lab says plainly, per family, whether RLVR learned
    for c in on_disk["claims"]:
        if c["name"].startswith("rlvr_learns["):
            fam = c["name"][len("rlvr_learns["):-1]
            said = (f"RLVR learned `{fam}`" if c["verdict"] == "holds"
                    else f"RLVR did not learn `{fam}` materially")
            assert said in table, fam
    # the pure-bf16 cell's |dW| ranking comes from... itself (no fp32 twin in this lab)
    assert doc["analysis"]["grpo-arithmetic-bf16-s0"]["network"]["sparsity"] is not None
    # a finished lab reruns to the same bytes (no timings in results.json)
    before = (root / "results.json").read_bytes()
    run_lab(cfg, tmp_path, workers=1, progress=False)
    assert (root / "results.json").read_bytes() == before
    # another lab in the same folder is refused
    with pytest.raises(LabError, match="another lab"):
        run_lab(_config(tiny_model, steps=3), tmp_path, workers=1, progress=False)


def test_cli_lab_and_errors(tiny_model, tmp_path, capsys):
    rc = main(["lab", "--tiny", "--model", str(tiny_model), "--layers", "1", "--families",
               "relations", "--seeds", "0", "1", "--second-recipe", "none",
               "--extra-precisions", "--steps", "2", "--workers", "1", "--quiet",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "## Claims" in out and (tmp_path / "tiny" / "results.json").is_file()
    # the cells run are exactly the options': one family, seeds 0 and 1, grpo and sft, no
    # second recipe, no extra precision, 2 steps, the given model with one layer
    doc = json.loads((tmp_path / "tiny" / "results.json").read_text())
    ran = {(c["config"]["method"], c["config"]["family"], c["config"]["precision"],
            c["config"]["seed"]) for c in doc["cells"]}
    assert ran == {(m, "relations", "bf16+master", s) for m in ("grpo", "sft") for s in (0, 1)}
    for c in doc["cells"]:
        assert c["config"]["steps"] == 2 and c["evals"]["step"][-1] == 2
        assert c["config"]["model"] == str(tiny_model) and c["config"]["layers"] == 1
    # the printed table is the table.md written
    assert out.count("## Claims") == 1 and \
        (tmp_path / "tiny" / "table.md").read_text().split("## Figures")[0].strip() in out
    rc = main(["lab", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
               "--quiet"])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    rc = main(["lab", "--tiny", "--model", str(tiny_model), "--families", "poetry",
               "--out", str(tmp_path / "y"), "--quiet", "--workers", "1"])
    assert rc == 2 and "unknown task family" in capsys.readouterr().err


def _doc(gains, sparsity_rl, sparsity_sft):
    """A minimal results document for the claim rules."""
    cells, analysis = [], {}
    for i, (g, srl, ssft) in enumerate(zip(gains, sparsity_rl, sparsity_sft)):
        for m, s in (("grpo", srl), ("sft", ssft)):
            cid = f"{m}-{i}"
            cells.append({"id": cid, "config": {"method": m, "family": "f", "seed": i,
                                                "precision": "bf16+master"},
                          "final": {"heldout_acc0": 0.1, "heldout_acc": 0.1 + g}})
            analysis[cid] = {"network": {"sparsity": s, "nss_median": 1e-3,
                                         "sv_drift_median": 1e-4 if m == "grpo" else 1e-3,
                                         "angle_median": 1.0,
                                         "ranked_principal_ratio": 0.9,
                                         "stored_low_ratio": 2.0, "ranked_low_ratio": 1.0}}
    return {"lab": {"precision": "bf16+master"}, "cells": cells, "analysis": analysis,
            "consistency": []}


def test_claim_verdicts_follow_the_intervals():
    by = {c.name: c for c in check_lab_claims(_doc([0.5, 0.6, 0.55], [0.5, 0.6, 0.55],
                                                   [0.1, 0.2, 0.15]))}
    assert by["rlvr_learns[f]"].verdict == "holds"
    assert by["rlvr_sparser_than_sft"].verdict == "holds"
    assert by["rlvr_avoids_principal_weights"].verdict == "holds"
    assert by["bf16_storage_favors_low_magnitude"].verdict == "holds"
    assert by["rlvr_smaller_spectral_drift"].verdict == "inconclusive"  # all differences 0
    assert by["rlvr_smaller_sv_drift"].verdict == "holds"   # log10 ratio -1 on every seed
    assert by["rlvr_masks_consistent_across_seeds"].verdict == "not tested"
    by = {c.name: c for c in check_lab_claims(_doc([0.0, 0.01, -0.01], [0.1, 0.2, 0.15],
                                                   [0.5, 0.6, 0.55]))}
    assert by["rlvr_learns[f]"].verdict == "fails"
    assert by["rlvr_sparser_than_sft"].verdict == "fails"
    by = {c.name: c for c in check_lab_claims(_doc([0.0, 0.5, 0.2], [0.1, 0.2, 0.15],
                                                   [0.5, 0.6, 0.55]))}
    assert by["rlvr_learns[f]"].verdict == "inconclusive"


def test_ppo_clipping_reaches_grpo_cells_only():
    """--ppo-epochs / --clip turn on grpo's PPO-style clipping from the command line; SFT
    and REINFORCE cells are unchanged (their ids too, so a resumed lab keeps them)."""
    import argparse

    from gatesim.lab.cli import add_lab_parser, config_from_args
    parser = argparse.ArgumentParser()
    add_lab_parser(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["lab", "--ppo-epochs", "3", "--clip", "0.1"]))
    by = {(c.method, c.family, c.precision, c.seed): c for c in cfg.cells()}
    g = by[("grpo", "arithmetic", "bf16+master", 0)]
    assert g.ppo_epochs == 3 and g.clip == 0.1 and g.id.endswith("-ppo3")
    for m in ("sft", "reinforce"):
        c = by[(m, "arithmetic", "bf16+master", 0)]
        assert c.ppo_epochs == 1 and "ppo" not in c.id
    plain = config_from_args(parser.parse_args(["lab"]))
    assert all(c.ppo_epochs == 1 for c in plain.cells())
