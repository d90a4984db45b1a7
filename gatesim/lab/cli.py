"""``gatesim lab``: the command-line face of :func:`gatesim.lab.run_lab`.

:func:`add_lab_parser` adds the subcommand to the ``gatesim`` argparse parser. The engine is
chosen by the shared ``--executor`` option (:func:`gatesim.executor.add_executor_args`:
local processes of ``--workers``, or Ray), or through ``run_lab(executor=...)`` from Python.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_lab_parser", "cmd_lab"]

_EPILOG = """\
examples:
  gatesim lab                                   the default lab (bundled MiniLM, ~15 min on 2 cores)
  gatesim lab --out results --workers 2         same, explicit
  gatesim lab --model ./my-small-causal-lm --families arithmetic --seeds 0 1 2
  gatesim lab --tiny --out /tmp/lab             a lab of seconds (one layer, 3 steps)
  gatesim lab --arms all --workers 1            restricted arms: full, principal, low, safe,
                                                random masks, LoRA, PiSSA (GRPO and SFT, 3 seeds)
  gatesim lab --arms full,mask --mask-file my_masks.safetensors   your own masks

Rerunning the same command after an interruption runs only the missing cells.
"""


def add_lab_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lab", help="RLVR vs SFT on a whole pretrained model: checkpoints, diffs, table, claims",
        description="Fine-tune the bundled MiniLM (or --model, a local Hugging Face folder)\n"
                    "with RLVR (GRPO, REINFORCE) and SFT under bf16+fp32-master, pure bf16 and\n"
                    "fp32 storage; save real checkpoints, diff them with gatesim diff, and\n"
                    "write table.md, results.json, figures and the claims' verdicts.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="output root (default: results)")
    p.add_argument("--name", default=None, help="lab name = subfolder (default: default/tiny)")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder (default: the bundled MiniLM)")
    p.add_argument("--tiny", action="store_true",
                   help="a lab of seconds: first layer only, 3 steps, 2 seeds (tests, try-outs)")
    p.add_argument("--families", nargs="+", default=None, help="task families")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds")
    p.add_argument("--methods", nargs="+", default=None, help="main methods (grpo sft)")
    p.add_argument("--second-recipe", default=None,
                   help="second RL recipe on the first family ('none' to skip)")
    p.add_argument("--extra-precisions", nargs="*", default=None,
                   help="precisions besides the default, for the first family")
    p.add_argument("--precision", default=None, help="default precision (bf16+master)")
    p.add_argument("--optimizer", choices=("emulated", "torch"), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=None, help="KL coefficient")
    p.add_argument("--ppo-epochs", type=int, default=None,
                   help="PPO-style passes over each batch of samples for grpo (default 1: "
                        "on-policy, the clip is inactive; > 1 turns the clipping on)")
    p.add_argument("--clip", type=float, default=None,
                   help="PPO clip range epsilon of grpo (default 0.2)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--arms", default=None,
                   help="restricted arms, comma-separated, or 'all' (full, principal, low, "
                        "safe, random, lora, pissa; 'mask' with --mask-file): the arm sweep "
                        "(gatesim.lab.arms; default family arithmetic, no extra precisions)")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter rank of the arms; masks train as many entries (default 8)")
    p.add_argument("--mask-file", default=None,
                   help="safetensors file of bool masks keyed by parameter name (arm 'mask')")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes (1: in this process; default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier lab in the folder instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from gatesim.executor import add_executor_args
    add_executor_args(p)
    p.set_defaults(func=cmd_lab)
    return p


def config_from_args(args):
    from gatesim.lab.arms import arms_lab, parse_arms, tiny_arms_lab
    from gatesim.lab.run import default_lab, tiny_lab
    kw = {}
    for name in ("name", "model", "precision", "optimizer", "steps", "lr", "beta", "clip",
                 "ppo_epochs", "layers", "rank", "mask_file"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    for name in ("families", "seeds", "methods", "extra_precisions"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = tuple(v)
    if args.second_recipe is not None:
        kw["second_recipe"] = None if args.second_recipe == "none" else args.second_recipe
    if args.arms is not None:
        kw["arms"] = parse_arms(args.arms)
        return tiny_arms_lab(**kw) if args.tiny else arms_lab(**kw)
    return tiny_lab(**kw) if args.tiny else default_lab(**kw)


def cmd_lab(args: argparse.Namespace) -> int:
    from gatesim.lab.model import ModelError
    from gatesim.lab.run import LabError, run_lab
    from gatesim.lab.task import TaskError
    from gatesim.executor import TasksFailed, executor_from_args
    t0 = time.perf_counter()
    ex = None
    try:
        config = config_from_args(args)
        cells = config.cells()
        from gatesim.lab.model import resolve_model_path
        resolve_model_path(config.model)
        print(f"gatesim lab '{config.name}': {len(cells)} cells "
              f"({config.steps} steps each) -> {Path(args.out) / config.name}", flush=True)
        ex = executor_from_args(args)
        run_lab(config, args.out, executor=ex, progress=not args.quiet,
                overwrite=args.overwrite)
    except (LabError, ModelError, TaskError, ValueError, TypeError, ConnectionError,
            TasksFailed) as exc:
        print(f"gatesim lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the worker pool is already down (gatesim.executor)
        print(f"gatesim lab: interrupted; finished cells are stored in {args.out}, rerun "
              "the same command to resume", file=sys.stderr)
        return 130
    finally:
        getattr(ex, "close", lambda: None)()
    root = Path(args.out) / config.name
    print((root / "table.md").read_text(encoding="utf-8").split("## Figures")[0])
    print(f"Results: {root} (results.json, table.md, figures/, cells/*/diff/); "
          f"{time.perf_counter() - t0:.0f} s.")
    return 0
