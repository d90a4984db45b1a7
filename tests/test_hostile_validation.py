"""Hostile inputs, class 4 of issue 22: every input is checked completely before the first
byte is written. Every command of the CLI is in the table below (a test fails when a new
command is added without hostile cases): each case must exit 2 with one line on stderr
naming the file or field, no traceback, and leave its output folder untouched."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import gatesim.diff as gd
from hostile import assert_refused, planted_pair, run_cli

TINY = {"rows": 16, "row_offset": 0, "n_contexts": 8, "n_targets": 2, "batch": 4,
        "group": 4, "steps": 2, "eval_every": 1, "k": 2, "policies": ["fp32", "bf16"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base, tuned = planted_pair(root, n=2, size=16)
    save_file({"w": torch.randn(32, 12), "v": torch.randn(12)}, str(root / "m.safetensors"))
    (root / "notes.txt").write_text("not a safetensors file at all, just text")

    def sweep(name, **base):
        d = {"name": "s", "base": {**TINY, "path": str(root / "m.safetensors"),
                                   "matrix": "w", **base}}
        p = root / f"{name}.json"
        p.write_text(json.dumps(d))
        return p

    good = sweep("good")
    cells = {
        "no_file": sweep("no_file", path=str(root / "missing.safetensors")),
        "not_safetensors": sweep("not_st", path=str(root / "notes.txt")),
        "no_tensor": sweep("no_tensor", matrix="nope"),
        "vector": sweep("vector", matrix="v"),
        "rows_past": sweep("rows_past", rows=16, row_offset=20),
        "k_too_large": sweep("k_big", k=13),
        "seed_bool": sweep("seed_bool", seed=True),
    }
    stream = root / "stream"
    code, _, err = run_cli(["run", "--config", _cell(root, TINY, "m.safetensors"),
                            "--record", stream])
    assert code == 0, err
    return dict(root=root, base=base, tuned=tuned, good=good, **cells, stream=stream)


def _cell(root, fields, matrix_file):
    p = root / "cell.json"
    p.write_text(json.dumps({**fields, "path": str(root / matrix_file), "matrix": "w"}))
    return p


def _cases(f, out):
    """(command, argv, names the error line must contain)."""
    r = f["root"]
    bad_cell = r / "bad_cell.json"
    bad_cell.write_text(json.dumps({**TINY, "path": str(r / "notes.txt"), "matrix": "w"}))
    return [
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--workers", "-1"], ["workers"]),
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--threads", "0"], ["threads"]),
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--k", "0"], ["k"]),
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--alpha", "2"], ["alpha"]),
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--eta", "nan"], ["eta"]),
        ("diff", ["diff", f["base"], f["tuned"], "--out", out, "--max-svd-numel", "0"],
         ["max_svd_numel"]),
        ("diff", ["diff", r / "nope", f["tuned"], "--out", out], ["nope"]),
        ("diff", ["diff", f["base"], r / "notes.txt", "--out", out], ["notes.txt"]),
        ("ablate", ["ablate", f["no_file"], "--out", out], ["path", "missing.safetensors"]),
        ("ablate", ["ablate", f["not_safetensors"], "--out", out], ["notes.txt", "safetensors"]),
        ("ablate", ["ablate", f["no_tensor"], "--out", out], ["matrix", "nope"]),
        ("ablate", ["ablate", f["vector"], "--out", out], ["matrix", "2-D"]),
        ("ablate", ["ablate", f["rows_past"], "--out", out], ["rows", "32 rows"]),
        ("ablate", ["ablate", f["k_too_large"], "--out", out], ["k", "13"]),
        ("ablate", ["ablate", f["seed_bool"], "--out", out], ["seed", "bool"]),
        ("ablate", ["ablate", f["good"], "--out", out, "--workers", "-1"], ["workers"]),
        ("ablate", ["ablate", r / "missing.toml", "--out", out], ["missing.toml"]),
        ("demo", ["demo", "--out", out, "--workers", "-1", "--quiet"], ["workers"]),
        ("run", ["run", "--config", bad_cell, "--record", out], ["notes.txt"]),
        ("replay", ["replay", r / "nope", "--policy", "bf16"], ["nope"]),
        ("replay", ["replay", f["stream"], "--policy", "bf17"], ["bf17"]),
        ("replay", ["replay", f["stream"], "--policy", "bf16", "--seed", "-1"], ["seed"]),
        ("absorbed", ["absorbed", "--seed", "-1"], ["seed"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--workers", "-1"], ["workers"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--model", r / "nope"], ["nope"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--model", r], ["config.json"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--families", "bogus"],
         ["families", "bogus"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--seeds", "-1"], ["seeds"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--lr", "nan"], ["lr"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--precision", "bf17"],
         ["precision", "bf17"]),
        ("lab", ["lab", "--tiny", "--out", out, "--quiet", "--executor", "spark"],
         ["executor", "spark"]),
    ]


def _commands():
    code, out, _ = run_cli(["--help"])
    return set(re.search(r"\{([a-z_,]+)\}", out).group(1).split(","))


def test_every_command_has_hostile_cases(files, tmp_path):
    covered = {c for c, *_ in _cases(files, tmp_path / "out")}
    assert _commands() == covered, "add hostile cases for every new command"


def test_refused_before_anything_is_written(files, tmp_path):
    out = tmp_path / "out"
    for i, (cmd, argv, names) in enumerate(_cases(files, out)):
        line = assert_refused(argv, out, *names)
        assert line.startswith(f"gatesim {cmd}: error:"), line


def test_refused_config_leaves_the_folder_usable(files, tmp_path):
    """The issue's case: a bad sweep used to write sweep.json first, so the corrected
    config was then refused for that --out. Now the corrected one just runs."""
    out = tmp_path / "out"
    assert_refused(["ablate", files["no_tensor"], "--out", out], out, "nope")
    code, _, err = run_cli(["ablate", files["good"], "--out", out, "--workers", "1",
                            "--quiet"])
    assert code == 0, err
    assert (out / "s" / "results.json").exists()


def test_python_api_checks_before_writing(files, tmp_path):
    from gatesim.sim.config import load_sweep
    from gatesim.sim.sweep import ablate
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="workers"):
        gd.diff(files["base"], files["tuned"], out, workers=-1, progress=False)
    with pytest.raises(ValueError, match="limit"):
        gd.diff(files["base"], files["tuned"], out, limit=-1, progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        gd.diff(files["base"], files["tuned"], out, overwrite="yes", progress=False)
    with pytest.raises(ValueError, match="workers"):
        ablate(load_sweep(files["good"]), out, workers=-1, progress=False)
    with pytest.raises(ValueError, match="nope"):
        ablate(load_sweep(files["no_tensor"]), out, progress=False)
    assert not out.exists()
