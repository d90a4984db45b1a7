"""Command line: ``gatesim demo`` (and, as later issues land, ablate/replay/diff)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

import gatesim
from gatesim.weights import DEFAULT_MATRIX, bundled_model_path, load_matrix

DEMO_MATRICES = (DEFAULT_MATRIX, "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.5.intermediate.dense.weight")
DEMO_FORMATS = (gatesim.BF16, gatesim.FP16, gatesim.E4M3FN)
DEMO_STEPS = (1e-6, 1e-5, 1e-4)


def absorbed_table(seed: int = 0) -> list[dict]:
    """For each bundled matrix, format, step size and mode: the fraction of a random
    update (delta ~ step * N(0, 1)) that rounding to the stored format swallows."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in DEMO_MATRICES:
        w32 = load_matrix(name)
        noise = torch.randn(w32.shape, generator=gen)
        for fmt in DEMO_FORMATS:
            w = gatesim.quantize(w32, fmt)
            for step in DEMO_STEPS:
                delta = noise * step
                for mode in ("nearest_even", "stochastic"):
                    mask = gatesim.absorbed(w, delta, fmt, mode, seed=seed)
                    rows.append(dict(matrix=name, shape=tuple(w.shape), fmt=str(fmt), step=step,
                                     mode=mode, absorbed=float(mask.float().mean())))
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"gatesim {gatesim.__version__} demo on {bundled_model_path()} "
          f"(CPU kernels: {gatesim.cpu_isa()})")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gatesim", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the bundled default on the MiniLM weights")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
