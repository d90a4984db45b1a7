"""Per-matrix cost of gatesim's full metric set (``gatesim.metrics.compare``), exact vs
randomized SVD, on LLM-sized fp32 matrices.

Every case runs in a fresh process (spawned), so each one's peak memory is its own and no
SVD is cached from an earlier case. A case builds W0 ~ N(0, 0.02) (fixed seed) and
W1 = W0 + D with a sparse small update D (N(0, 1e-4) on 10% of the entries), runs
``compare(W0, W1, k, alpha, method)`` once (sparsity with the ULP histogram, NSS, angles,
energy, the update's ranks, principal/low masks and overlaps) and reports its stage times,
then times one plain ``torch.linalg.svd(W0, full_matrices=False)`` in fp32 in the same
process: what a user writes today for one matrix, and the yardstick of the ratio column.

Usage (from the repository root, with the extension built in place)::

    python benchmarks/metrics/metrics_report.py                               # print the table
    python benchmarks/metrics/metrics_report.py --markdown BENCHMARKS.md      # and refresh it
    python benchmarks/metrics/metrics_report.py --shapes 1024x2752 --threads 1

With ``--markdown PATH`` the report replaces the text between ``<!-- metrics:begin -->``
and ``<!-- metrics:end -->`` in PATH (the pair is appended at the end if absent; a new
PATH gets just the block), as ``compare.py`` does for its suites.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the in-place build
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # markdown_block
from markdown_block import replace_marked  # noqa: E402

MARK_BEGIN = "<!-- metrics:begin -->"
MARK_END = "<!-- metrics:end -->"
W0_STD = 0.02
UPDATE_STD = 1e-4
UPDATE_DENSITY = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008",
                   help="comma-separated MxN shapes (default 4096x4096,4096x11008)")
    p.add_argument("--methods", default="exact,randomized",
                   help="comma-separated SVD methods (default exact,randomized)")
    p.add_argument("--k", type=int, default=64, help="subspace dimension (default 64)")
    p.add_argument("--alpha", type=float, default=0.05, help="mask fraction (default 0.05)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each case (default: torch's default)")
    p.add_argument("--no-plain-svd", action="store_true",
                   help="skip the plain fp32 torch.linalg.svd yardstick")
    p.add_argument("--markdown", metavar="PATH", help="write the report into PATH's block")
    return p.parse_args(argv)


def _cpu_seconds() -> tuple:
    """(busy CPU seconds of the machine, all CPU seconds, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        jiffies = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = jiffies[3] + jiffies[4]
    t = os.times()
    return (sum(jiffies) - idle) / hz, sum(jiffies) / hz, t.user + t.system


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_case(shape: tuple, method: str, k: int, alpha: float, threads: Optional[int],
             plain_svd: bool) -> Dict[str, object]:
    """One case, meant to run in its own process."""
    import torch

    import gatesim.metrics as gm

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g) * W0_STD
    D = torch.randn(shape, generator=g) * UPDATE_STD
    D *= torch.rand(shape, generator=g) < UPDATE_DENSITY
    W1 = W0 + D
    del D
    gm.compare(W0[:64, :64].contiguous(), W1[:64, :64].contiguous(), k=8, alpha=alpha,
               method=method)                                   # warm code paths
    base_rss = _rss_mib()
    try:
        start = _cpu_seconds()
    except (OSError, ValueError, IndexError):
        start = None
    row = gm.compare(W0, W1, k=k, alpha=alpha, method=method, angles=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    out = {k_: row[k_] for k_ in ("seconds", "t_sparsity", "t_svd", "t_spectral", "t_masks",
                                  "sparsity_bitwise", "nss", "angle_left_max_deg",
                                  "angle_right_max_deg", "energy_topk", "overlap_principal",
                                  "overlap_principal_baseline", "svd0_residual",
                                  "svd0_sketch_error")}
    out["extra_rss_mib"] = max(peak - base_rss, 0.0)
    out["threads"] = torch.get_num_threads()
    if start is not None:
        busy, total, own = (b - a for a, b in zip(start, _cpu_seconds()))
        out["others_cpu_share"] = max(busy - own, 0.0) / max(total, 1e-9)
    if plain_svd:
        t = time.perf_counter()
        torch.linalg.svd(W0, full_matrices=False)
        out["plain_svd_s"] = time.perf_counter() - t
    return out


def _worker(args, queue):
    try:
        queue.put(("ok", run_case(*args)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", repr(exc)))


def run_isolated(*args) -> Dict[str, object]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(args, q))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"case {args[:2]} failed: {value}")
    return value


def cpu_model() -> str:
    """Model name, with family/model numbers (AMD family 25 model 17 is Zen 4)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                info.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info and "model" in info:
        zen4 = info["cpu family"] == "25" and info["model"] == "17"
        name += f" (family {info['cpu family']}, model {info['model']}" + (
            ": Zen 4)" if zen4 else ")")
    return name


def _fmt(v, spec=".1f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def report(results: List[Dict[str, object]], args: argparse.Namespace) -> str:
    import torch

    lines = [
        "## Metrics (issue 4): full metric set per matrix",
        "",
        "What is measured: one call of `gatesim.metrics.compare(W0, W1, k, alpha, method)` - "
        "every sparsity (bitwise, relative probe, atol, ULP histogram), NSS, principal angles, "
        "top-k energy, effective and stable rank of the update, principal and low-magnitude "
        "masks with their overlaps - on one fp32 matrix pair: W0 ~ N(0, 0.02), W1 = W0 + D, "
        f"D ~ N(0, {UPDATE_STD:g}) on {UPDATE_DENSITY:.0%} of the entries (fixed seeds). "
        f"k = {args.k}, alpha = {args.alpha}. Each case runs once in a fresh process (no "
        "cached SVD); stage times come from the row's `t_*` columns. Exact: the Gram path "
        "of `gatesim/metrics/gram.py` (the checkpoint diff's: every singular value and the "
        "top-k vectors from the float64 Gram matrix's eigendecomposition, with its error "
        "bounds and gesdd fallbacks) for W0 and W1 and the singular values of D. Randomized: q = 2k, niter = 8 (the enforced minimum) for "
        "W0, W1 and D; its NSS and update ranks then cover only the top q singular values. "
        "The yardstick is one plain `torch.linalg.svd(W0, full_matrices=False)` in fp32 in "
        "the same process (what a user writes today; it gives none of the metrics).",
        "",
        "| shape | method | total s | sparsity s | SVD W0+W1 s | spectrum of D, angles, "
        "energy s | masks s | total / plain fp32 SVD | plain fp32 SVD s | extra peak RSS MiB "
        "| max angle L/R deg | SVD residual | others' CPU share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["seconds"] / r["plain_svd_s"] if r.get("plain_svd_s") else None
        lines.append(
            f"| {r['shape']} | {r['method']} | {_fmt(r['seconds'])} | "
            f"{_fmt(r['t_sparsity'], '.2f')} | {_fmt(r['t_svd'])} | {_fmt(r['t_spectral'])} | "
            f"{_fmt(r['t_masks'], '.2f')} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(r.get('plain_svd_s'))} | {_fmt(r['extra_rss_mib'], '.0f')} | "
            f"{r['angle_left_max_deg']:.3g} / {r['angle_right_max_deg']:.3g} | "
            f"{_fmt(r['svd0_residual'], '.1e')} | "
            f"{_fmt(r.get('others_cpu_share'), '.0%')} |")
    lines += [
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{results[0]['threads'] if results else '?'} torch threads, python "
        f"{platform.python_version()}. The machine is shared with other engineers: the last "
        "column is the share of the machine's CPU time other processes used during the "
        "case; multithreaded LAPACK slows down badly when the cores are oversubscribed, so "
        "treat these timings as noisy upper bounds.",
        "",
        "Reproduce: `python benchmarks/metrics/metrics_report.py --markdown BENCHMARKS.md`; "
        "`pytest benchmarks/metrics/metrics_bench.py` times the stages on smaller matrices.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, body: str) -> None:
    """Replaces the text between the markers; appends the marked block if absent."""
    replace_marked(path, MARK_BEGIN, MARK_END, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    results = []
    for shape in shapes:
        for method in methods:
            print(f"[metrics_report] {shape[0]}x{shape[1]} {method} ...", file=sys.stderr,
                  flush=True)
            r = run_isolated(shape, method, args.k, args.alpha, args.threads,
                             not args.no_plain_svd)
            r.update(shape=f"{shape[0]}x{shape[1]}", method=method)
            print(f"[metrics_report]   {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            results.append(r)
    body = report(results, args)
    print(body)
    if args.markdown:
        write_markdown(Path(args.markdown), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
