"""Ray executor against the local process pool, both with 2 workers (issue 18).

Measured in one run, interleaved (pool, Ray, pool, Ray, ...), medians of ``--reps``:

* **Per-task overhead**: a map of ``--large`` no-op tasks (``abs(0)`` through the
  executor's task wrapper, which sets the thread limits): the time from its first result to
  its last per task (steady state, both workers busy), the time from the call to the first
  result (the pool spawns its workers per map; Ray's are running), and Ray's round trip of
  a one-task map.
* **Mini sweep** (``gatesim.sim.mini_sweep``, 8 cells) and a **small diff** (a generated
  bf16 pair, full metrics) in two settings: *library* (``ablate`` / ``gatesim.diff`` with an
  executor object in one long-lived driver: Ray's workers stay warm between calls, the
  pool is spawned per call) and *command* (``gatesim ablate`` / ``gatesim diff`` as a new
  process each time, ``--executor local --workers 2`` vs ``--executor ray:GCS`` on the
  running 2-CPU cluster: a new Ray job starts new worker processes). The library runs
  come first: after a command's job, the library driver's idle workers would have been
  retired and its next call would pay their start-up again.
* ``--paper``: the ``paper`` sweep once per executor (command setting), where
  ``gatesim.sim.config`` has ``paper_sweep``.

Every run's ``results.json`` / ``rows.csv`` is checked to have the same bytes as the first
pool run. Usage::

    PYTHONPATH=. python benchmarks/ray/ray_report.py [--reps 3] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gatesim.executor import ProcessExecutor, RayExecutor  # noqa: E402


def _pair(root: Path, n: int, size: int) -> tuple:
    from gatesim.diff.synthetic import save_sharded
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(n):
        w = (0.02 * torch.randn(size, size, generator=g)).to(torch.bfloat16)
        t = w.clone()
        idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 3]
        t.view(-1)[idx] = (t.view(-1)[idx].float() * 1.03).to(torch.bfloat16)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = t
    save_sharded(base, root / "base", shard_bytes=4 * 2 ** 20)
    save_sharded(tuned, root / "tuned", shard_bytes=4 * 2 ** 20)
    return root / "base", root / "tuned"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run_cmd(args: list) -> None:
    r = subprocess.run([sys.executable, "-m", "gatesim", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"gatesim {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--large", type=int, default=400, help="no-op tasks per map")
    ap.add_argument("--diff-n", type=int, default=24, help="matrices in the small diff")
    ap.add_argument("--diff-size", type=int, default=384, help="their side")
    ap.add_argument("--paper", action="store_true", help="also time the paper sweep")
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()

    import ray
    from gatesim.diff import diff
    from gatesim.sim import mini_sweep
    from gatesim.sim.sweep import ablate

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2 ** 20,
             include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    gcs = ray.get_runtime_context().gcs_address
    pool, rex = ProcessExecutor(2), RayExecutor()
    out: dict = {"ray_start_s": ray_start, "ray": ray.__version__, "torch": torch.__version__,
                 "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                 "load_before": os.getloadavg()}
    try:
        # warm Ray's two workers (imports) once: a running cluster's state
        list(rex.map(abs, [(str(i), 0) for i in range(4)]))
        ablate(mini_sweep("warm"), tmp / "warm", executor=rex, progress=False, figures=False)

        # ---- per-task overhead: inside one map of no-op tasks, the time from the first
        # result to the last one per task (steady state, 2 workers), and the time to the
        # first result (start-up: the pool spawns its workers, Ray's are running)
        def one_map(ex, n):
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for _ in ex.map(abs, [(str(i), 0) for i in range(n)])]
            return (stamps[-1] - stamps[0]) / (n - 1), stamps[0] - t0
        per = {"pool": [], "ray": []}
        first = {"pool": [], "ray": []}
        for _ in range(a.reps):
            for name, ex in (("pool", pool), ("ray", rex)):
                p, f = one_map(ex, a.large)
                per[name].append(p)
                first[name].append(f)
        for name in ("pool", "ray"):
            out[f"{name}_per_task_ms"] = 1e3 * statistics.median(per[name])
            out[f"{name}_first_result_s"] = statistics.median(first[name])
        rtt = [_timed(lambda: list(rex.map(abs, [("x", 0)]))) for _ in range(20)]
        out["ray_one_task_map_ms"] = 1e3 * statistics.median(rtt)

        # ---- mini sweep and small diff, library setting
        b, t = _pair(tmp / "pair", a.diff_n, a.diff_size)
        cfg = tmp / "mini.json"
        cfg.write_text(json.dumps(mini_sweep().to_dict()))
        ref_sweep = ref_rows = None
        lib = {k: [] for k in ("sweep_pool", "sweep_ray", "diff_pool", "diff_ray")}
        cmd = {k: [] for k in lib}
        for rep in range(a.reps):
            for name, ex in (("pool", pool), ("ray", rex)):
                d = tmp / f"lib_sweep_{name}_{rep}"
                lib[f"sweep_{name}"].append(_timed(lambda: ablate(
                    mini_sweep(), d, executor=ex, progress=False, figures=False)))
                got = (d / "mini" / "results.json").read_bytes()
                ref_sweep = ref_sweep or got
                assert got == ref_sweep, f"results.json differs ({name}, library)"
                d = tmp / f"lib_diff_{name}_{rep}"
                lib[f"diff_{name}"].append(_timed(lambda: diff(
                    b, t, d, executor=ex, progress=False, figures=False)))
                got = (d / "rows.csv").read_bytes()
                ref_rows = ref_rows or got
                assert got == ref_rows, f"rows.csv differs ({name}, library)"
        # ---- command setting: a fresh driver process per command (after the library runs:
        # each new driver is a new Ray job, which gets new worker processes, and on a
        # 2-CPU cluster Ray then retires the idle workers of the jobs before it)
        for rep in range(a.reps):
            for name, spec in (("pool", ["--executor", "local", "--workers", "2"]),
                               ("ray", ["--executor", f"ray:{gcs}"])):
                d = tmp / f"cmd_sweep_{name}_{rep}"
                cmd[f"sweep_{name}"].append(_timed(lambda: _run_cmd(
                    ["ablate", str(cfg), "--out", str(d), "--quiet", *spec])))
                assert (d / "mini" / "results.json").read_bytes() == ref_sweep
                d = tmp / f"cmd_diff_{name}_{rep}"
                cmd[f"diff_{name}"].append(_timed(lambda: _run_cmd(
                    ["diff", str(b), str(t), "--out", str(d), "--no-progress",
                     "--no-figures", *spec])))
                assert (d / "rows.csv").read_bytes() == ref_rows
        out["library"] = lib
        out["command"] = cmd

        if a.paper:
            from gatesim.sim import config as sim_config
            if hasattr(sim_config, "paper_sweep"):
                pcfg = tmp / "paper.json"
                pcfg.write_text(json.dumps(sim_config.paper_sweep().to_dict()))
                out["paper"] = {}
                for name, spec in (("pool", ["--executor", "local", "--workers", "2"]),
                                   ("ray", ["--executor", f"ray:{gcs}"])):
                    out["paper"][name] = _timed(lambda: _run_cmd(
                        ["ablate", str(pcfg), "--out", str(tmp / f"paper_{name}"), "--quiet",
                         *spec]))
                    out["paper"][f"{name}_load"] = os.getloadavg()[0]
                paper_bytes = [(tmp / f"paper_{n}" / "paper" / "results.json").read_bytes()
                               for n in ("pool", "ray")]
                assert paper_bytes[0] == paper_bytes[1], "paper: Ray and pool results differ"
                out["paper"]["same_bytes"] = True
            else:
                out["paper"] = None
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    out["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["diff_pair"] = f"{a.diff_n} bf16 matrices {a.diff_size}x{a.diff_size}"
    out["reps"] = a.reps
    text = report(out, a)
    print(text)
    print(json.dumps(out, default=str), file=sys.stderr)
    if a.markdown is not None:
        from markdown_block import replace_marked
        replace_marked(a.markdown, "<!-- ray:begin -->", "<!-- ray:end -->", text)
    return 0


def report(o: dict, a) -> str:
    md = statistics.median
    L = [f"Measured {o['date']} by `benchmarks/ray/ray_report.py` on {o['machine']} (shared with "
         f"other engineers: load average {o['load_before'][0]:.1f} before, "
         f"{o['load_after'][0]:.1f} after), ray {o['ray']}, torch {o['torch']}. Both "
         "executors with 2 workers on the same 2 cores (Ray: a local 2-CPU instance, "
         f"started in {o['ray_start_s']:.1f} s); medians of {o['reps']} interleaved runs.",
         "", "| per-task cost (no-op tasks) | process pool | Ray | Ray / pool |",
         "|---|---|---|---|",
         f"| per task in a map of {a.large} (first to last result, 2 workers) | "
         f"{o['pool_per_task_ms']:.3f} ms | {o['ray_per_task_ms']:.3f} ms | "
         f"{o['ray_per_task_ms'] / o['pool_per_task_ms']:.1f} |",
         f"| start of a map to its first result | {o['pool_first_result_s']:.2f} s | "
         f"{o['ray_first_result_s']:.3f} s | "
         f"{o['ray_first_result_s'] / o['pool_first_result_s']:.3f} |",
         f"| a whole map of one task (Ray, round trip) | | "
         f"{o['ray_one_task_map_ms']:.1f} ms | |",
         "", "| work | setting | process pool (s) | Ray (s) | Ray / pool |", "|---|---|---|---|---|"]
    for work, label in (("sweep", "mini sweep (8 cells)"),
                        ("diff", f"small diff ({o['diff_pair']})")):
        for setting in ("library", "command"):
            p, r = md(o[setting][f"{work}_pool"]), md(o[setting][f"{work}_ray"])
            L.append(f"| {label} | {setting} | {p:.2f} | {r:.2f} | {r / p:.2f} |")
    runs = "; ".join(f"{setting} {k.replace('_', ' ')} " + ", ".join(f"{x:.1f}" for x in v)
                     for setting in ("library", "command") for k, v in o[setting].items())
    L += ["", f"Every run (s, in order): {runs}.", ""]
    if o.get("paper"):
        p, r = o["paper"]["pool"], o["paper"]["ray"]
        L.append(f"`paper` sweep (command setting, one run each, pool first): process pool "
                 f"{p:.0f} s (1-min load after it {o['paper']['pool_load']:.1f}), Ray {r:.0f} s "
                 f"(load {o['paper']['ray_load']:.1f}); Ray / pool {r / p:.2f}; the two "
                 "results.json have the same bytes.")
    else:
        L.append("`paper` sweep: not timed in this run (`--paper`; needs "
                 "`gatesim.sim.config.paper_sweep`).")
    L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
