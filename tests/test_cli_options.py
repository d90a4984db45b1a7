"""Every command line command and option runs in a test that fails if the option is ignored
(issue 23, item 2), and the report, figure and summary writers are checked by content.

Coverage: command / option -> the test that would fail if it were ignored
(CO = tests/test_cli_options.py, SO = tests/test_sim_options.py, others named in full).

| command / option                      | test                                                |
|---------------------------------------|-----------------------------------------------------|
| python -m gatesim                     | CO test_absorbed_cli_by_python_m_gatesim            |
| gatesim absorbed [--seed]             | CO test_absorbed_cli_by_python_m_gatesim            |
| gatesim demo --out --quiet            | CO test_demo_cli_reduced (demo design, small cells) |
| demo_sweep(seeds)                     | CO test_demo_sweep_design                           |
| demo/ablate --workers --executor      | CO test_sweep_executor_options_reach_the_executor   |
| gatesim ablate CONFIG (JSON, TOML,    | CO test_ablate_cli_bundled_name_and_toml_file,      |
|   bundled 'paper') --out --quiet      |    test_sim.py test_end_to_end_cli                  |
| gatesim run [--config] [--record]     | CO test_run_and_replay_cli                          |
| gatesim replay --policy... --seed     | CO test_run_and_replay_cli                          |
| gatesim diff --out --map --k --alpha  | CO test_diff_cli_options (each option against       |
|   --eta --atol --sparsity-only        |    the run without it)                              |
|   --bitwise-only --cast --svd         |                                                     |
|   --max-svd-numel --overwrite         |                                                     |
|   --no-figures --no-progress          |                                                     |
| diff --workers --threads --executor   | CO test_sweep_executor_options_reach_the_executor   |
| gatesim lab --tiny --model --layers   | test_lab_run.py test_cli_lab_and_errors (the one    |
|   --families --seeds --second-recipe  |    tiny lab run: the cells it ran = the options)    |
|   --extra-precisions --steps --out    |                                                     |
|   --quiet --workers                   |                                                     |
| lab --name --precision --optimizer    | CO test_lab_options_reach_the_cells (argv -> every  |
|   --lr --beta --ppo-epochs --clip     |    cell); effects: test_lab.py (beta, optimizer,    |
|   --methods --arms --rank --mask-file |    precision, lr), CO test_lab_ppo_epochs_clip,     |
|   --overwrite --executor              |    test_lab_arms.py (arms, rank, mask file)         |
| sim algo grpo / reinforce / sft       | SO test_grpo_reinforce_sft_follow_their_definitions |
| sim beta                              | SO test_beta_adds_the_exact_kl_gradient             |
| sim clip, inner_steps > 1             | SO test_inner_steps_with_a_small_clip_range_clip    |
| sim norm_matched, step_norm           | SO test_norm_matched_rescales_every_step            |
| sim lr, eps, betas, weight_decay      | SO test_adam_settings_eps_betas_weight_decay        |
| sim group, batch, n_targets, seed,    | SO test_task_and_sampling_settings_reach_the_run    |
|   n_contexts, task_seed, steps, rows, |                                                     |
|   row_offset, matrix                  |                                                     |
| sim path                              | SO test_path_loads_the_matrix_from_a_safetensors... |
| sim k, alpha, eval_every, policies,   | SO test_metric_settings_k_alpha_eval_every_and_...  |
|   null_policies, train_policy         |    test_sim.py test_replay_reproduces_the_run_...   |
| sim geometry, dataset                 | test_sim.py test_rotation_preserves_the_policy,     |
|                                       |    test_sim_science.py test_datasets_differ_and_... |
| sim mask, mask_density                | test_lab_arms.py test_sim_mask_restricts_the_...    |
| sim streams / replay                  | test_sim.py test_replay_reproduces_the_run_...,     |
|                                       |    CO test_run_and_replay_cli                       |
| sim executors (workers 1, 2, ray)     | test_sim.py test_results_identical_across_runs_..., |
|                                       |    test_ray.py, CO test_sweep_executor_options_...  |
| report: table.md, figures, summary    | CO test_demo_cli_reduced (rows, columns, numbers vs |
|                                       |    results.json; PNGs decode, sane size, not blank; |
|                                       |    every claim's verdict in the printed summary)    |
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gatesim.cli import main

from conftest import assert_png_shows_a_plot

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

#: the demo's cells scaled down (the design, variants and seeds are the demo's own)
SMALL = {"rows": 48, "n_contexts": 16, "n_targets": 4, "batch": 8, "group": 4, "steps": 6,
         "eval_every": 3, "k": 4}


# -- helpers --------------------------------------------------------------------------------
def _md_cells(line: str) -> list[str]:
    """The cells of a Markdown table line (an escaped pipe, \\|, stays in its cell)."""
    return [c.strip().replace("\\|", "|")
            for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def md_table(text: str, header_start: str) -> list[dict]:
    """The rows (column -> cell text) of the Markdown table whose header line starts with
    ``header_start``."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(header_start))
    cols = _md_cells(lines[i])
    assert len(_md_cells(lines[i + 1])) == len(cols), "header and delimiter row differ"
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = _md_cells(ln)
        assert len(cells) == len(cols), ln
        rows.append(dict(zip(cols, cells)))
    return rows


def assert_tables_well_formed(text: str):
    """Every Markdown table has as many cells in each row as in its header."""
    lines, n_tables = text.splitlines(), 0
    for i, ln in enumerate(lines):
        if ln.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            n_tables += 1
            width = len(_md_cells(ln))
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                assert len(_md_cells(lines[j])) == width, (ln, lines[j])
                j += 1
    assert n_tables >= 5


def t_interval(xs):
    """Mean and 95% Student-t interval, from the definition."""
    from scipy.stats import t
    xs = np.asarray(xs, dtype=np.float64)
    m = xs.mean()
    if len(xs) == 1:
        return m, -math.inf, math.inf
    half = t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return m, m - half, m + half


def ci_text(xs, fmt):
    m, lo, hi = t_interval(xs)
    return f"{m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def pm_text(xs, fmt):
    m, lo, hi = t_interval(xs)
    return f"{m:{fmt}}±{(hi - lo) / 2:{fmt}}"


def _cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- gatesim absorbed, python -m gatesim ----------------------------------------------------
def _bf16_rne(x64: np.ndarray) -> np.ndarray:
    """float64 -> bf16 (returned as float32): round to float32 (exact for these sums up to a
    rare tie), then to the nearest bf16, ties to even, on the bits."""
    b = x64.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def test_absorbed_cli_by_python_m_gatesim():
    """``python -m gatesim absorbed --seed 3`` prints the 27 rows of the absorbed table; the
    nearest-even fractions of the query matrix match a numpy count with seed 3's noise (and
    not with seed 0's); the fractions fall with the step and the coarser format absorbs
    more."""
    proc = subprocess.run([sys.executable, "-m", "gatesim", "absorbed", "--seed", "3"],
                          capture_output=True, text=True, env=_cli_env(), cwd=str(REPO),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for ln in proc.stdout.splitlines():
        m = re.match(r"\| (\S+)\s+\| (\w+)\s+\| (\S+) \|\s+([\d.]+) \|\s+([\d.]+) \|", ln)
        if m:
            rows[(m[1], m[2], float(m[3]))] = (float(m[4]), float(m[5]))
    from gatesim.cli import DEMO_MATRICES
    assert len(rows) == 27
    assert {k[0] for k in rows} == set(DEMO_MATRICES)
    assert {k[1] for k in rows} == {"bf16", "fp16", "e4m3fn"}
    for mat in DEMO_MATRICES:
        for fmt in ("bf16", "fp16", "e4m3fn"):
            near = [rows[(mat, fmt, s)][0] for s in (1e-6, 1e-5, 1e-4)]
            sr = [rows[(mat, fmt, s)][1] for s in (1e-6, 1e-5, 1e-4)]
            assert near[0] >= near[1] >= near[2] and sr[0] >= sr[1] >= sr[2]
        for s in (1e-5, 1e-4):     # fp16 has 3 more mantissa bits than bf16 at these |w|
            assert rows[(mat, "e4m3fn", s)][0] >= rows[(mat, "bf16", s)][0] > \
                rows[(mat, "fp16", s)][0] + 0.05
    # independent count for the query matrix (second draw of the seeded generator)
    from gatesim.weights import load_matrix
    q = DEMO_MATRICES[1]
    from safetensors import safe_open
    from gatesim.weights import bundled_model_path
    w32 = load_matrix(q).numpy()
    with safe_open(str(bundled_model_path()), "pt") as f:
        shapes = [tuple(f.get_slice(DEMO_MATRICES[0]).get_shape()), w32.shape]

    def count(seed):
        gen = torch.Generator().manual_seed(seed)
        torch.randn(shapes[0], generator=gen)
        noise = torch.randn(shapes[1], generator=gen).numpy().astype(np.float64)
        w = _bf16_rne(w32.astype(np.float64))
        wf = w32.astype(np.float16)
        out = {}
        for s in (1e-5, 1e-4):
            out[("bf16", s)] = float((_bf16_rne(w + s * noise) == w).mean())
            out[("fp16", s)] = float(((wf.astype(np.float64) + s * noise).astype(np.float16)
                                      == wf).mean())
        return out
    mine, other = count(3), count(0)
    for (fmt, s), v in mine.items():
        assert rows[(q, fmt, s)][0] == pytest.approx(v, abs=1.5e-4), (fmt, s)
    assert any(abs(rows[(q, fmt, s)][0] - v) > 1.5e-4 for (fmt, s), v in other.items())


# -- gatesim demo and demo_sweep -----------------------------------------------------------
def test_demo_sweep_design():
    from gatesim.sim.config import DEMO_POLICIES, demo_sweep
    d = demo_sweep()
    cells = d.cells()
    variants = {k.split(",")[0].split("=")[1]: c for k, c in cells if c.seed == 0}
    assert set(variants) == {"rl_kl", "rl_nokl", "rl_clip", "sft", "rl_kl@rotated",
                             "rl_aniso_teacher", "rl_embed_teacher", "rl_lr1e-6", "sft_lr1e-6"}
    assert len(cells) == 9 * 3 and sorted({c.seed for _, c in cells}) == [0, 1, 2]
    v = variants
    assert (v["rl_kl"].algo, v["rl_kl"].beta, v["rl_kl"].clip) == ("grpo", 1.0, None)
    assert (v["rl_nokl"].beta, v["rl_nokl"].clip, v["rl_nokl"].inner_steps) == (0.0, None, 1)
    assert (v["rl_clip"].clip, v["rl_clip"].inner_steps, v["rl_clip"].beta) == (0.2, 2, 0.0)
    assert v["sft"].algo == "sft" and v["rl_kl@rotated"].geometry == "rotated"
    assert v["rl_kl@rotated"].beta == 1.0
    assert v["rl_aniso_teacher"].dataset == "aniso_teacher"
    assert v["rl_embed_teacher"].dataset == "embed_teacher"
    assert v["rl_lr1e-6"].lr == 1e-6 and v["rl_lr1e-6"].beta == 0.0
    assert v["sft_lr1e-6"].lr == 1e-6 and v["sft_lr1e-6"].algo == "sft"
    for c in v.values():
        assert c.policies == tuple(DEMO_POLICIES) and c.null_policies == ("bf16+master",)
    assert sorted({c.seed for _, c in demo_sweep(seeds=(4, 7)).cells()}) == [4, 7]
    assert d.name == "demo"


def test_demo_cli_reduced(tmp_path, monkeypatch, capsys):
    """``gatesim demo`` with the demo's own design and 2 seeds, each cell scaled down (the
    full demo takes about 5 minutes on 2 free cores): the printed summary, table.md and the
    figures hold what results.json holds."""
    import gatesim.sim.config as sc
    real = sc.demo_sweep
    calls = []

    def reduced(seeds=(0, 1, 2)):
        calls.append(seeds)
        d = real(seeds=(0, 1))
        return sc.SweepConfig(name=d.name, base={**d.base, **SMALL}, variants=d.variants,
                              grid=d.grid)
    monkeypatch.setattr(sc, "demo_sweep", reduced)
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert calls == [(0, 1, 2)]
    printed = capsys.readouterr()
    assert "gatesim ablate demo" not in printed.err          # --quiet: no progress bar
    run = out / "demo"
    doc = json.loads((run / "results.json").read_text())
    variants = list(dict.fromkeys(c["variant"] for c in doc["cells"]))
    assert len(doc["cells"]) == 18 and len(variants) == 9
    by_v = {v: [c for c in doc["cells"] if c["variant"] == v] for v in variants}
    # the printed summary: every claim with its verdict, the regime line
    txt = printed.out
    assert len(doc["claims"]) >= 8
    for c in doc["claims"]:
        line = next(ln for ln in txt.splitlines() if f" {c['name']}: " in ln)
        assert line.split()[0] == c["verdict"].upper().split()[0], line
        if c["statistic"] is not None:
            assert f"{c['statistic']:.4g} [{c['lo']:.4g}, {c['hi']:.4g}] (n={c['n']})" in line
    assert "Regime: AdamW lr 0.0001, 6 steps, 48 rows" in txt
    # table.md: the regime table, one row per variant, numbers from results.json
    table = (run / "table.md").read_text()
    assert_tables_well_formed(table)
    assert table.startswith("# Gate simulation: demo\n\n18 cells, seeds [0, 1].")
    reg = md_table(table, "| variant | geometry | reward start |")
    assert [r["variant"] for r in reg] == variants
    for r in reg:
        cs = by_v[r["variant"]]
        assert r["geometry"] == cs[0]["config"]["geometry"]
        assert r["reward start"] == ci_text([c["trajectory"]["reward"][0] for c in cs], ".4f")
        assert r["reward end"] == ci_text([c["trajectory"]["reward"][-1] for c in cs], ".4f")
        assert r["update norm"] == pm_text([c["update_norm"] for c in cs], ".3g")
    g3 = md_table(table, "| variant | geometry | true density |")
    assert [r["variant"] for r in g3] == variants
    pols = list(doc["cells"][0]["policies"])
    assert pols == ["fp32", "bf16", "bf16_sr", "bf16+master"]
    for r in g3:
        cs = by_v[r["variant"]]
        for p in pols:
            assert r[p] == pm_text([c["policies"][p]["bitwise_sparsity"] for c in cs], ".4f")
        assert r["null bf16+master"] == pm_text(
            [c["null"]["bf16+master"]["bitwise_sparsity"] for c in cs], ".4f")
    # the lr response: RL and SFT at 1e-6 and 1e-4
    resp = md_table(table, "| algo | lr | acc/ulp p50 |")
    assert [(r["algo"], r["lr"]) for r in resp] == [("RL", "1e-06"), ("RL", "0.0001"),
                                                     ("SFT", "1e-06"), ("SFT", "0.0001")]
    # the leash table shows rl_clip's clipping and batch reuse
    leash = {r["arm"]: r for r in md_table(table, "| arm | beta | clip |")}
    assert (leash["rl_clip"]["clip"], leash["rl_clip"]["inner steps"]) == ("0.2", "2")
    assert (leash["rl_kl"]["beta"], leash["rl_kl"]["clip"]) == ("1", "None")
    claims = md_table(table, "| claim |")
    assert [r["claim"] for r in claims] == [c["name"] for c in doc["claims"]]
    for r, c in zip(claims, doc["claims"]):
        assert r["verdict"] == f"**{c['verdict']}**"
        assert r["threshold"] == f"{c['side']} {c['threshold']:g}"
    # figures decode and show something
    figs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert figs == ["beta.png", "consistency.png", "gates.png", "hist.png", "response.png",
                    "trajectories.png"]
    for name in figs:
        assert_png_shows_a_plot(run / "figures" / name)


# -- gatesim diff ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diff_pair(tmp_path_factory):
    """A base/tuned pair: a 40 x 32 matrix whose entries move by nothing, by a relative
    1e-6, by an absolute 1e-3 or by a lot, and a vector."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("diff_pair")
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 32, generator=g) * 0.05
    kind = torch.randint(0, 4, w.shape, generator=g)
    t = w.clone()
    t[kind == 1] = w[kind == 1] * (1 + 1e-6)
    t[kind == 2] = w[kind == 2] + 1e-3
    t[kind == 3] = w[kind == 3] + torch.randn(int((kind == 3).sum()), generator=g) * 0.05
    v = torch.randn(16, generator=g)
    save_file({"w": w, "v": v}, str(root / "base.safetensors"))
    save_file({"w": t, "v": v + 1.0}, str(root / "tuned.safetensors"))
    return root, w, t


def _diff(root, out, *opts, capsys=None):
    import pandas as pd
    argv = ["diff", str(root / "base.safetensors"), str(root / "tuned.safetensors")]
    if out is not None:
        argv += ["--out", str(out)]
    rc = main(argv + list(opts))
    cap = capsys.readouterr() if capsys is not None else None
    assert rc == 0, cap.err if cap else rc
    rows = None
    if out is not None:
        rows = pd.read_csv(out / "rows.csv").set_index("name")
    return rows, cap


def test_diff_cli_options(diff_pair, tmp_path, capsys):
    root, w, t = diff_pair
    quiet = ["--no-progress", "--no-figures"]
    base, cap = _diff(root, tmp_path / "base", *quiet, capsys=capsys)
    r = base.loc["w"]
    changed = int((w.view(torch.int32) != t.view(torch.int32)).sum())
    assert r["changed"] == changed and r["spectral"] == "ok"
    assert set(r["svd"].split("/")) == {"gram"}
    assert r["k"] == 8 and r["alpha"] == 0.05 and r["compared_dtype"] == "float32"
    assert np.isfinite(r["nss"]) and not np.isnan(r["changed_relative"])
    assert f"| {changed + 16} |" in cap.out.replace(" ", " ")  # the printed model summary
    assert "rows resumed" not in cap.out
    # each option against the default run
    rows, _ = _diff(root, tmp_path / "k", "--k", "3", *quiet)
    assert rows.loc["w", "k"] == 3 and rows.loc["w", "energy_topk_baseline"] == \
        pytest.approx((3 / 40) * (3 / 32))
    rows, _ = _diff(root, tmp_path / "alpha", "--alpha", "0.3", *quiet)
    low = np.zeros(w.numel(), bool)
    low[np.argsort(w.abs().numpy().ravel(), kind="stable")[:round(0.3 * w.numel())]] = True
    upd = (w.view(torch.int32) != t.view(torch.int32)).numpy().ravel()
    assert rows.loc["w", "alpha"] == 0.3
    assert rows.loc["w", "overlap_low"] == pytest.approx((upd & low).sum() / low.sum())
    assert rows.loc["w", "overlap_low"] != base.loc["w", "overlap_low"]
    rel = (t - w).abs() > 1e-2 * w.abs()
    rows, _ = _diff(root, tmp_path / "eta", "--eta", "1e-2", *quiet)
    assert rows.loc["w", "eta"] == 1e-2 and rows.loc["w", "changed_relative"] == int(rel.sum())
    assert base.loc["w", "changed_relative"] > int(rel.sum())
    rows, _ = _diff(root, tmp_path / "atol", "--atol", "1e-2", *quiet)
    assert rows.loc["w", "changed_atol"] == int(((t - w).abs() > 1e-2).sum())
    assert base.loc["w", "changed_atol"] > rows.loc["w", "changed_atol"]
    rows, _ = _diff(root, tmp_path / "sp", "--sparsity-only", *quiet)
    assert rows.loc["w", "spectral"] != "ok" and np.isnan(rows.loc["w", "nss"])
    rows, _ = _diff(root, tmp_path / "bw", "--bitwise-only", *quiet)
    assert np.isnan(rows.loc["w", "changed_relative"]) and rows.loc["w", "changed"] == changed
    rows, _ = _diff(root, tmp_path / "cast", "--cast", "bf16", *quiet)
    wb, tb = w.to(torch.bfloat16).view(torch.int16), t.to(torch.bfloat16).view(torch.int16)
    assert rows.loc["w", "changed"] == int((wb != tb).sum()) < changed
    rows, _ = _diff(root, tmp_path / "full", "--svd", "full", *quiet)
    assert "gram" not in rows.loc["w", "svd"] and rows.loc["w", "nss"] == pytest.approx(
        r["nss"], rel=1e-4)
    rows, _ = _diff(root, tmp_path / "max", "--max-svd-numel", "100", *quiet)
    assert rows.loc["w", "spectral"] != "ok" and np.isnan(rows.loc["w", "nss"])
    rows, _ = _diff(root, tmp_path / "map", "--map", "w=weight", *quiet)
    assert "weight" in rows.index and "w" not in rows.index
    # --overwrite: the rows are computed again instead of resumed
    _, cap = _diff(root, tmp_path / "base", *quiet, capsys=capsys)
    assert "(2 rows resumed)" in cap.out
    _, cap = _diff(root, tmp_path / "base", "--overwrite", *quiet, capsys=capsys)
    assert "rows resumed" not in cap.out
    # no --out: nothing written, the summary printed
    _, cap = _diff(root, None, *quiet, capsys=capsys)
    assert "sparsity_bitwise" in cap.out and "rows:" not in cap.out
    # figures (and the progress bar) unless switched off
    _, cap = _diff(root, tmp_path / "figs", capsys=capsys)
    pngs = sorted((tmp_path / "figs").rglob("*.png"))
    assert pngs and not list((tmp_path / "base").rglob("*.png"))
    for p in pngs:
        assert_png_shows_a_plot(p)
    assert "%|" in cap.err and "%|" not in _diff(root, tmp_path / "np", *quiet,
                                                   capsys=capsys)[1].err


# -- gatesim run / replay -------------------------------------------------------------------
def _policy_rows(text: str) -> dict:
    """policy -> (sparsity, absorbed) from the printed policy table."""
    out = {}
    for ln in text.splitlines():
        m = re.match(r"\| (\S+)\s+\|\s+([\d.]+) \|\s+([\d.]+) \|", ln)
        if m and m[1] != "policy":
            out[m[1]] = (float(m[2]), float(m[3]))
    return out


def _stored_replay(s, fmt: str) -> float:
    """Bitwise sparsity of a pure ``fmt`` replay of stream ``s``, by hand: the stored weight
    is rounded (nearest even) after every step."""
    w0 = s.initial().double().numpy()
    if fmt == "bf16":
        rnd = _bf16_rne
    else:
        def rnd(x):
            return x.astype(np.float16)
    w = rnd(w0)
    start = w.copy()
    for _, d, alpha, decay in s.updates():
        w = rnd(w.astype(np.float64) * decay + alpha * d.double().numpy())
    return float((w.view(np.uint16 if fmt == "fp16" else np.uint32) ==
                  start.view(np.uint16 if fmt == "fp16" else np.uint32)).mean())


def test_run_and_replay_cli(tmp_path, capsys):
    from gatesim.sim import CellConfig, Stream, replay
    cfg = CellConfig(rows=32, n_contexts=8, n_targets=3, batch=4, group=4, steps=3,
                     eval_every=3, k=2, lr=1e-3, policies=("fp32", "bf16"), null_policies=())
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps(cfg.to_dict()))
    stream = tmp_path / "stream"
    assert main(["run", "--config", str(cell), "--record", str(stream)]) == 0
    out = capsys.readouterr().out
    s = Stream(stream)
    assert s.complete and s.steps == 3 and tuple(s.initial().shape) == (32, 384)
    assert s.manifest["config"] == cfg.to_dict() and f"stream recorded in {stream}" in out
    run_rows = _policy_rows(out)
    assert set(run_rows) == {"fp32", "bf16"}
    assert run_rows["bf16"][0] == pytest.approx(_stored_replay(s, "bf16"), abs=1.5e-4)
    # without --record nothing is recorded
    assert main(["run", "--config", str(cell)]) == 0
    assert "stream recorded" not in capsys.readouterr().out
    # replay through two policies, each given by --policy
    assert main(["replay", str(stream), "--policy", "bf16", "--policy", "fp16"]) == 0
    out = capsys.readouterr().out
    rows = _policy_rows(out)
    assert set(rows) == {"bf16", "fp16"} and "Replayed 3 steps" in out
    assert rows["bf16"] == run_rows["bf16"]
    assert rows["fp16"][0] == pytest.approx(_stored_replay(s, "fp16"), abs=1.5e-4)
    assert rows["fp16"][0] < rows["bf16"][0]     # the finer format keeps more updates
    # --seed: the stochastic-rounding draws of bf16_sr
    lines = {}
    for seed in (None, 5):
        argv = ["replay", str(stream), "--policy", "bf16_sr"]
        assert main(argv + ([] if seed is None else ["--seed", str(seed)])) == 0
        lines[seed] = _policy_rows(capsys.readouterr().out)["bf16_sr"]
    import gatesim.metrics as gm
    for seed in (None, 5):
        sh = replay(s, "bf16_sr", seed=seed)
        sp = gm.sparsity(sh.stored_initial(), sh.stored()).bitwise
        assert lines[seed][0] == pytest.approx(sp, abs=5e-5), seed
    assert lines[None] != lines[5]


# -- gatesim ablate, and the executor options of every command ------------------------------
def test_ablate_cli_bundled_name_and_toml_file(tmp_path, monkeypatch, capsys):
    import gatesim.cli as cli
    from gatesim.sim.config import paper_sweep
    seen = []
    monkeypatch.setattr(cli, "_run_sweep", lambda sweep, args: seen.append(sweep) or 0)
    monkeypatch.chdir(tmp_path)          # no file called "paper" here
    assert main(["ablate", "paper", "--out", str(tmp_path / "x")]) == 0
    assert seen[0].to_dict() == paper_sweep().to_dict()
    monkeypatch.undo()
    # a TOML sweep file: its cells are what runs ("none" spells None)
    toml = tmp_path / "tiny.toml"
    toml.write_text('name = "tomlsweep"\n[base]\nrows = 32\nn_contexts = 8\nn_targets = 3\n'
                    'batch = 4\ngroup = 4\nsteps = 2\neval_every = 2\nk = 2\nclip = "none"\n'
                    'policies = ["fp32", "bf16"]\nnull_policies = []\n'
                    '[variants.a]\nbeta = 0.0\n[variants.b]\nalgo = "sft"\n'
                    '[grid]\nseed = [0, 1]\n')
    assert main(["ablate", str(toml), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--quiet"]) == 0
    doc = json.loads((tmp_path / "o" / "tomlsweep" / "results.json").read_text())
    got = [(c["variant"], c["config"]["seed"], c["config"]["algo"], c["config"]["clip"],
            c["config"]["steps"], c["config"]["beta"]) for c in doc["cells"]]
    assert got == [("a", 0, "grpo", None, 2, 0.0), ("a", 1, "grpo", None, 2, 0.0),
                   ("b", 0, "sft", None, 2, 0.05), ("b", 1, "sft", None, 2, 0.05)]
    assert "tomlsweep" in capsys.readouterr().out


class _Stop(ValueError):
    pass


def test_sweep_executor_options_reach_the_executor(tmp_path, monkeypatch, capsys, diff_pair):
    """--workers, --threads and --executor of demo, ablate, diff and lab are what
    make_executor gets; make_executor turns them into the executor they name."""
    import gatesim.executor as gx
    seen = []

    def spy(workers=None, threads=1, spec=None):
        seen.append((workers, threads, spec))
        raise _Stop("stop here")
    monkeypatch.setattr(gx, "make_executor", spy)
    sweep = tmp_path / "s.json"
    from gatesim.sim.config import mini_sweep
    sweep.write_text(json.dumps(mini_sweep("ex").to_dict()))
    root = diff_pair[0]
    cases = [
        (["demo", "--workers", "3", "--executor", "ray"], (3, 1, "ray")),
        (["ablate", str(sweep), "--workers", "0"], (0, 1, "local")),
        (["ablate", str(sweep), "--executor", "ray://h:1"], (2, 1, "ray://h:1")),
        (["diff", str(root / "base.safetensors"), str(root / "tuned.safetensors"),
          "--workers", "2", "--threads", "3", "--executor", "ray:h:2"], (2, 3, "ray:h:2")),
        (["lab", "--tiny", "--workers", "4", "--executor", "local"], (4, 1, "local")),
    ]
    for argv, want in cases:
        assert main(argv + ["--out", str(tmp_path / "o"), "--quiet"] if argv[0] != "diff"
                    else argv + ["--out", str(tmp_path / "o")]) == 2, argv
        assert seen[-1] == want, argv
        assert "stop here" in capsys.readouterr().err
    monkeypatch.undo()
    # make_executor: what each setting builds (Ray replaced by a recorder)
    import gatesim.ray_executor as rx
    made = []

    class FakeRay:
        def __init__(self, address=None, *, threads=1, local_cpus=None):
            made.append((address, threads, local_cpus))
    monkeypatch.setattr(rx, "RayExecutor", FakeRay)
    assert isinstance(gx.make_executor(1), gx.SerialExecutor)
    assert isinstance(gx.make_executor(None), gx.SerialExecutor)
    p = gx.make_executor(2, threads=3)
    assert isinstance(p, gx.ProcessExecutor) and (p.workers, p.threads) == (2, 3)
    p = gx.make_executor(0)
    assert isinstance(p, gx.ProcessExecutor) and p.workers == max(1, os.cpu_count())
    assert gx.make_executor(0, threads=2).workers == max(1, os.cpu_count() // 2)
    gx.make_executor(3, spec="ray")
    gx.make_executor(0, threads=2, spec="ray://h:1")
    gx.make_executor(None, spec="ray:h:2")
    assert made == [(None, 1, 3), ("ray://h:1", 2, None), ("h:2", 1, None)]
    assert isinstance(gx.make_executor(2, spec="local"), gx.ProcessExecutor)


# -- gatesim lab ----------------------------------------------------------------------------
def _lab_config(argv):
    import argparse
    from gatesim.lab.cli import add_lab_parser, config_from_args
    parser = argparse.ArgumentParser()
    add_lab_parser(parser.add_subparsers())
    return config_from_args(parser.parse_args(["lab"] + argv))


def test_lab_options_reach_the_cells(tmp_path, monkeypatch, capsys):
    """Every lab option ends up in the cells it configures (the tiny lab run of
    test_lab_run.py shows the cells run as configured)."""
    cfg = _lab_config(["--name", "mine", "--model", str(tmp_path), "--families", "relations",
                       "--seeds", "3", "4", "--methods", "grpo", "--second-recipe", "none",
                       "--extra-precisions", "fp32", "--precision", "bf16", "--optimizer",
                       "torch", "--steps", "7", "--lr", "1e-3", "--beta", "0.1",
                       "--ppo-epochs", "2", "--clip", "0.3", "--layers", "2"])
    cells = cfg.cells()
    assert cfg.name == "mine" and cfg.steps == 7
    assert {(c.method, c.family, c.precision, c.seed) for c in cells} == {
        ("grpo", "relations", "bf16", 3), ("grpo", "relations", "bf16", 4),
        ("grpo", "relations", "fp32", 0)}
    for c in cells:
        assert (c.model, c.optimizer, c.steps, c.lr, c.beta, c.ppo_epochs, c.clip,
                c.layers) == (str(tmp_path), "torch", 7, 1e-3, 0.1, 2, 0.3, 2)
    # the defaults these options replace are different, so an ignored option shows
    plain = _lab_config([])
    pc = plain.cells()
    assert plain.name == "default" and {c.family for c in pc} == {"arithmetic", "relations"}
    assert {c.method for c in pc} == {"grpo", "sft", "reinforce"}
    assert {c.precision for c in pc} == {"bf16+master", "bf16", "fp32"}
    c0 = pc[0]
    assert (c0.model, c0.optimizer, c0.steps, c0.lr, c0.beta, c0.ppo_epochs, c0.clip,
            c0.layers) == (None, "emulated", 80, 5e-5, 0.5, 1, 0.2, None)
    assert {c.seed for c in pc} == {0, 1, 2}
    # --second-recipe reinforce on the first family only
    rec = _lab_config(["--second-recipe", "reinforce", "--families", "relations",
                       "arithmetic", "--extra-precisions"]).cells()
    assert {c.family for c in rec if c.method == "reinforce"} == {"relations"}
    # --tiny: the tiny lab's size
    tiny = _lab_config(["--tiny"])
    assert (tiny.name, tiny.steps, tiny.layers, tiny.seeds) == ("tiny", 3, 1, (0, 1))
    # arms: --arms, --rank, --mask-file, with and without --tiny
    from safetensors.torch import save_file
    mf = tmp_path / "m.safetensors"
    save_file({"x": torch.ones(2, 2, dtype=torch.bool)}, str(mf))
    arms = _lab_config(["--arms", "full,lora,mask", "--rank", "4", "--mask-file", str(mf)])
    ac = arms.cells()
    assert arms.name == "arms" and {c.arm for c in ac} == {"full", "lora", "mask"}
    assert all(c.rank == 4 for c in ac if c.arm != "full")
    assert all(c.mask_file == str(mf) for c in ac if c.arm == "mask")
    assert all(c.mask_file is None for c in ac if c.arm != "mask")
    ta = _lab_config(["--tiny", "--arms", "all"])
    assert ta.name == "tiny_arms" and ta.rank == 2 and {c.arm for c in ta.cells()} == {
        "full", "principal", "low", "safe", "random", "lora", "pissa"}
    assert _lab_config(["--tiny", "--arms", "lora", "--rank", "3"]).rank == 3
    # --out, --overwrite and --quiet reach run_lab
    import gatesim.lab.run as lr
    got = []

    def fake(config, out, **kw):
        got.append((config.name, str(out), kw["overwrite"], kw["progress"]))
        raise lr.LabError("stop here")
    monkeypatch.setattr(lr, "run_lab", fake)
    for extra, want in (([], False), (["--overwrite"], True)):
        assert main(["lab", "--tiny", "--out", str(tmp_path / "o"), "--quiet",
                     "--workers", "1"] + extra) == 2
        assert got[-1] == ("tiny", str(tmp_path / "o"), want, False)
    assert main(["lab", "--tiny", "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
    assert got[-1][3] is True
    assert "stop here" in capsys.readouterr().err


def test_lab_ppo_epochs_clip(tmp_path):
    """grpo's PPO-style passes and clipping: rl_loss drops the gradient of a sample whose
    ratio left the clip range on the advantage's side (by hand), and in a tiny lab cell
    ppo_epochs = 2 changes the update, and the clip range then changes it again."""
    from gatesim.lab.train import rl_loss
    logp = torch.log_softmax(torch.tensor([[0.5, 0.0, -0.5]]), 1).requires_grad_(True)
    ans = torch.tensor([[0, 1]])
    old = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0]]), 1).gather(1, ans)
    adv = torch.tensor([[1.0, -1.0]])
    ref = logp.detach()
    rho = torch.exp(logp.detach().gather(1, ans) - old)[0]
    assert rho[0] > 1.2 and 0.8 < rho[1] < 1.2     # sample 0 is outside a 0.2 clip range
    g = {}
    for clip in (None, 0.2):
        logp.grad = None
        rl_loss(logp, old, ref, ans, adv, 0.0, clip)[0].backward()
        g[clip] = logp.grad.clone()
    # by hand: -(1/2) sum_j rho_j A_j d logp_{y_j}; clipped: only sample 1 remains
    want_free = torch.tensor([[-rho[0] / 2, rho[1] / 2, 0.0]])
    want_clip = torch.tensor([[0.0, rho[1] / 2, 0.0]])
    torch.testing.assert_close(g[None], want_free)
    torch.testing.assert_close(g[0.2], want_clip)
    # a tiny lab cell
    from gatesim.lab.model import make_tiny_model
    from gatesim.lab.train import CellConfig, run_cell
    from safetensors import safe_open
    model = make_tiny_model(tmp_path / "model", "masked", layers=1)

    def update(**kw):
        cfg = CellConfig(model=str(model), steps=2, batch=4, group=4, max_train=8,
                         max_heldout=8, eval_every=2, lr=1e-2, beta=0.0, precision="fp32",
                         **kw)
        out = tmp_path / "cells" / str(len(list(tmp_path.glob("cells/*"))))
        run_cell({"cell": cfg.to_dict(), "out": str(out)})
        with safe_open(str(out / "cells" / cfg.id / "update_fp32.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    one = update(ppo_epochs=1, clip=0.01)
    two = update(ppo_epochs=2, clip=0.01)
    wide = update(ppo_epochs=2, clip=0.9)
    assert set(one) == set(two) == set(wide)
    assert any(not torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], wide[k]) for k in one)
