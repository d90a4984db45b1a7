"""``gatesim diff BASE TUNED [--out DIR] ...``: the command-line face of :func:`gatesim.diff`.

:func:`add_diff_parser` adds the subcommand to the ``gatesim`` argparse parser;
:func:`cmd_diff` runs it. Errors of the inputs (:class:`gatesim.diff.DiffError`, bad
arguments) print one line to stderr and exit with status 2; nothing is written for them.
Ctrl-C stops the worker pool at once and exits with status 130; the rows stored so far
resume.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_diff_parser", "cmd_diff", "main"]

_EPILOG = """\
examples:
  gatesim diff Qwen2.5-Math-1.5B Qwen2.5-Math-1.5B-RL --out diff_qwen
  gatesim diff base/ tuned/ --out d --map model.= --map base_model.model.=
  gatesim diff base/ tuned/ --sparsity-only --workers 2
  gatesim diff base_bf16/ tuned_fp32/ --cast bf16 --out d

Without --out nothing is written and the summary is printed. With --out, rerunning the same
command after an interruption computes only the missing rows.
"""


def add_diff_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``diff`` to an ``argparse`` subparsers object (``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "diff", help="per-tensor sparsity, ULP and spectral diff of two checkpoints",
        description="Compare a base and a tuned checkpoint tensor by tensor: bitwise,\n"
                    "relative-probe and atol sparsity, ULP distances, non-finite counts, and\n"
                    "for matrices NSS, principal angles and mask overlaps with their random\n"
                    "baselines (definitions: docs/metrics.md).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="base checkpoint: HF folder (sharded safetensors + index, "
                                "model.safetensors, pytorch_model*.bin) or a file")
    p.add_argument("tuned", help="tuned checkpoint, same forms")
    p.add_argument("--out", "-o", default=None,
                   help="output folder (rows.csv, summaries, figures, report.md; resumable)")
    p.add_argument("--map", action="append", default=None, metavar="OLD=NEW",
                   help="rename prefix OLD to NEW on both sides before pairing "
                        "(repeatable; first match wins), e.g. --map model.=")
    p.add_argument("--k", type=int, default=None,
                   help="subspace dimension (default per matrix: min(64, min(m,n)//4))")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="fraction in the principal / low-magnitude masks (default 0.05)")
    p.add_argument("--eta", type=float, default=1e-3, help="relative probe (default 1e-3)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--sparsity-only", action="store_true",
                   help="skip the spectral metrics (no SVD)")
    p.add_argument("--bitwise-only", action="store_true",
                   help="only bitwise sparsity and non-finite counts (fastest)")
    p.add_argument("--cast", choices=("bf16", "fp16", "fp32"), default=None,
                   help="round both sides to this format (nearest-even) before comparing")
    p.add_argument("--svd", choices=("gram", "full"), default="gram",
                   help="gram: exact eigendecomposition of the smaller Gram matrix "
                        "(default); full: LAPACK SVD (slower)")
    p.add_argument("--max-svd-numel", type=int, default=None,
                   help="skip spectral metrics for matrices with more entries")
    p.add_argument("--workers", type=int, default=1,
                   help="processes (default 1; 0 = one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    from gatesim.executor import add_executor_args
    add_executor_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier run's rows in --out instead of resuming")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_diff)
    return p


def cmd_diff(args: argparse.Namespace) -> int:
    from gatesim.diff.core import diff
    from gatesim.diff.errors import DiffError
    from gatesim.diff.report import markdown_table
    from gatesim.executor import TasksFailed, executor_from_args
    ex = None
    try:
        ex = executor_from_args(args)
        res = diff(args.base, args.tuned, args.out, map=args.map, k=args.k, alpha=args.alpha,
                   eta=args.eta, atol=args.atol, sparsity_only=args.sparsity_only,
                   bitwise_only=args.bitwise_only, cast=args.cast, svd=args.svd,
                   max_svd_numel=args.max_svd_numel, workers=args.workers,
                   threads=args.threads, executor=ex, progress=not args.no_progress,
                   overwrite=args.overwrite, figures=not args.no_figures)
    except (DiffError, ValueError, TypeError, FileNotFoundError, ConnectionError,
            TasksFailed) as exc:
        print(f"gatesim diff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the worker pool is already down (gatesim.executor)
        where = f"; the rows finished so far are in {args.out}, rerun the same command " \
                "to resume" if args.out else ""
        print(f"gatesim diff: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        getattr(ex, "close", lambda: None)()
    cols = ["tensors", "numel", "changed", "sparsity_bitwise", "sparsity_relative",
            "sparsity_atol", "ulp_1_frac", "if_bf16_sparsity", "if_fp16_sparsity",
            "matrices", "nss_median", "angle_max_deg"]
    print(markdown_table(res.summary["model"], cols))
    print()
    print(markdown_table(res.summary["module"], ["module"] + cols))
    m = res.summary["model"].iloc[0]
    print(f"\npaired {int(m['n_paired'])}, only in base {int(m['n_only_base'])}, only in tuned "
          f"{int(m['n_only_tuned'])}, shape mismatches {int(m['n_shape_mismatch'])}, dtype "
          f"mismatches {int(m['n_dtype_mismatch'])}; {res.seconds:.1f} s"
          + (f" ({res.resumed} rows resumed)" if res.resumed else ""))
    if res.out is not None:
        print(f"rows: {res.files['rows_csv']}\nreport: {res.files['report']}")
    return 0


def main(argv=None) -> int:
    """``python -m gatesim.diff.cli BASE TUNED ...`` (the same as ``gatesim diff``)."""
    parser = argparse.ArgumentParser(prog="gatesim")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_diff_parser(sub)
    args = parser.parse_args(["diff", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
