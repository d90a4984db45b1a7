"""Command line.

  gatesim demo                       the bundled default gate factorial (about 5 min, 2 cores)
  gatesim ablate CONFIG [--out DIR]  a sweep from a JSON/TOML config, or a bundled one by
                                     name (`paper`: the full design, 5 seeds); resumes
  gatesim run [--config CELL.json] --record DIR   one cell, recording its update stream
  gatesim replay STREAM --policy P [--policy P2 ...]   a recorded stream through policies
  gatesim diff BASE TUNED [--out DIR] a base/tuned checkpoint pair, per tensor (resumes)
  gatesim absorbed                   what a random update loses per format and mode
  gatesim lab [--out DIR]            RLVR vs SFT on the whole bundled MiniLM (about 15 min)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from gatesim._ops import cpu_isa
from gatesim._version import __version__
from gatesim.formats import BF16, E4M3FN, FP16
from gatesim.precision import absorbed, quantize
from gatesim.weights import DEFAULT_MATRIX, bundled_model_path, load_matrix

DEMO_MATRICES = (DEFAULT_MATRIX, "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.5.intermediate.dense.weight")
DEMO_FORMATS = (BF16, FP16, E4M3FN)
DEMO_STEPS = (1e-6, 1e-5, 1e-4)


def absorbed_table(seed: int = 0) -> list[dict]:
    """For each bundled matrix, format, step size and mode: the fraction of a random
    update (delta ~ step * N(0, 1)) that rounding to the stored format swallows."""
    from gatesim.checks import check_int
    gen = torch.Generator().manual_seed(check_int(seed, "seed", lo=0))
    rows = []
    for name in DEMO_MATRICES:
        w32 = load_matrix(name)
        noise = torch.randn(w32.shape, generator=gen)
        for fmt in DEMO_FORMATS:
            w = quantize(w32, fmt)
            for step in DEMO_STEPS:
                delta = noise * step
                for mode in ("nearest_even", "stochastic"):
                    mask = absorbed(w, delta, fmt, mode, seed=seed)
                    rows.append(dict(matrix=name, shape=tuple(w.shape), fmt=str(fmt), step=step,
                                     mode=mode, absorbed=float(mask.float().mean())))
    return rows


def cmd_absorbed(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"gatesim {__version__} demo on {bundled_model_path()} "
          f"(CPU kernels: {cpu_isa()})")
    print("Fraction of a random update w <- w + step * N(0,1) that the stored format absorbs")
    print("(the stored weight keeps its bits although the update is non-zero):\n")
    rows = absorbed_table(args.seed)
    print(f"| {'matrix':44s} | fmt    | step  | nearest_even | stochastic |")
    print(f"|{'-' * 46}|--------|-------|--------------|------------|")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        print(f"| {a['matrix']:44s} | {a['fmt']:6s} | {a['step']:.0e} | {a['absorbed']:12.4f} "
              f"| {b['absorbed']:10.4f} |")
    print(f"\nNearest rounding drops every update below half an ULP; stochastic rounding keeps "
          f"each with probability |delta|/ULP.\nDone in {time.perf_counter() - t0:.1f} s.")
    return 0


def _print_claims(doc: dict) -> None:
    from gatesim.sim.report import claims_text
    print("Claims (mean [95% interval across seeds] vs the fixed threshold -> verdict):")
    print(claims_text(doc))


def _gate_summary(doc: dict) -> str:
    """The gate table without the long per-policy and per-pair sections."""
    from gatesim.sim.report import gate_table
    keep, skip = [], False
    for line in gate_table(doc).split("## Claims")[0].splitlines():
        if line.startswith("Per-step |u|/ulp of each policy") or \
                line.startswith("## Consistency"):
            skip = True
        elif line.startswith("## ") or line.startswith("### "):
            skip = False
        if not skip:
            keep.append(line)
    return "\n".join(keep)


def _run_sweep(sweep, args) -> int:
    from gatesim.sim.report import regime_line
    from gatesim.sim.sweep import ablate
    from gatesim.executor import executor_from_args
    t0 = time.perf_counter()
    ex = executor_from_args(args)
    try:
        doc = ablate(sweep, args.out, executor=ex, progress=not args.quiet)
    finally:
        getattr(ex, "close", lambda: None)()
    print(_gate_summary(doc))
    print(regime_line(doc) + "\n")
    _print_claims(doc)
    print(f"\nResults: {Path(args.out) / sweep.name} (results.json, table.md, figures/); "
          f"{time.perf_counter() - t0:.0f} s.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gatesim.sim.config import demo_sweep
    print(f"gatesim {__version__}: gate factorial on {bundled_model_path()} "
          f"(CPU kernels: {cpu_isa()}, {args.workers} workers)")
    return _run_sweep(demo_sweep(), args)


def cmd_ablate(args: argparse.Namespace) -> int:
    from gatesim.sim.config import bundled_sweeps, load_sweep
    bundled = bundled_sweeps()
    path = Path(args.config)
    if not path.exists() and args.config in bundled:
        path = bundled[args.config]
    return _run_sweep(load_sweep(path), args)


def cmd_run(args: argparse.Namespace) -> int:
    import json
    from gatesim.sim.config import CellConfig
    from gatesim.sim.run import run_cell
    cfg = CellConfig()
    if args.config:
        cfg = CellConfig.from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
    from gatesim.sim.validate import validate_cells
    validate_cells([("run", cfg)])                 # every input, before the stream is made
    torch.set_num_threads(1)
    res = run_cell(cfg, record=args.record)
    _print_policies(res["policies"])
    print(f"stream recorded in {args.record}" if args.record else "")
    return 0


def _print_policies(pols: dict) -> None:
    print(f"| {'policy':15s} | sparsity | absorbed | NSS      | max angle |")
    print(f"|{'-' * 17}|----------|----------|----------|-----------|")
    for name, p in pols.items():
        print(f"| {name:15s} | {p['bitwise_sparsity']:8.4f} | {p['absorbed_fraction']:8.4f} | "
              f"{p['nss']:8.2e} | {p['angle_left_max_deg']:9.4f} |")


def cmd_replay(args: argparse.Namespace) -> int:
    from gatesim.metrics import principal_mask, low_magnitude_mask
    from gatesim.sim.config import CellConfig
    from gatesim.sim.run import policy_metrics
    from gatesim.sim.stream import Stream, replay
    s = Stream(args.stream)
    if not s.complete:
        print(f"note: {args.stream} is incomplete ({s.steps} steps flushed)", file=sys.stderr)
    cfg = CellConfig.from_dict(s.manifest["config"])
    w0 = s.initial()
    principal = principal_mask(w0, cfg.k, cfg.alpha)
    low = low_magnitude_mask(w0, cfg.alpha)
    out = {}
    for pol in args.policy:
        shadow = replay(s, pol, seed=args.seed)
        out[pol], _ = policy_metrics(shadow, w0, cfg, principal, low)
    print(f"Replayed {s.steps} steps of {args.stream} (recorded under {s.manifest['policy']})")
    _print_policies(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gatesim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    from gatesim.executor import add_executor_args

    def sweep_opts(p):
        p.add_argument("--out", default="results", help="output root (default: results)")
        p.add_argument("--workers", type=int, default=2,
                       help="worker processes (1: serial, 0: one per core; default 2)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_executor_args(p)

    demo = sub.add_parser("demo", help="run the bundled default gate factorial")
    sweep_opts(demo)
    demo.set_defaults(func=cmd_demo)
    ab = sub.add_parser("ablate", help="run a sweep config (JSON or TOML, or a bundled "
                                       "name: paper); resumes")
    ab.add_argument("config", help="a sweep file, or the name of a bundled one (paper)")
    sweep_opts(ab)
    ab.set_defaults(func=cmd_ablate)
    run = sub.add_parser("run", help="run one cell and optionally record its update stream")
    run.add_argument("--config", help="a JSON file of CellConfig fields (default: defaults)")
    run.add_argument("--record", help="directory for the update stream")
    run.set_defaults(func=cmd_run)
    rp = sub.add_parser("replay", help="replay a recorded update stream through policies")
    rp.add_argument("stream")
    rp.add_argument("--policy", action="append", required=True,
                    help="precision policy, e.g. bf16, bf16_sr, fp16+master (repeatable)")
    rp.add_argument("--seed", type=int, default=None,
                    help="stochastic-rounding seed (default: the run's)")
    rp.set_defaults(func=cmd_replay)
    absd = sub.add_parser("absorbed", help="what a random update loses, per format and mode")
    absd.add_argument("--seed", type=int, default=0)
    absd.set_defaults(func=cmd_absorbed)
    from gatesim.diff.cli import add_diff_parser
    add_diff_parser(sub)
    from gatesim.lab.cli import add_lab_parser
    add_lab_parser(sub)
    args = parser.parse_args(argv)
    from gatesim.executor import TasksFailed
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError,
            ConnectionError, TasksFailed) as exc:
        print(f"gatesim {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the worker pool is already down (gatesim.executor)
        print(f"gatesim {args.cmd}: interrupted; finished results are stored, rerun the same "
              "command to resume", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
