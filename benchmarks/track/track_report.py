"""Overhead of live tracking (``gatesim.track``) on a real training step: the ratio of the
tracked to the untracked step time, with a breakdown of where the tracking time goes.

For each parameter dtype and batch shape, two identical MiniLM models + AdamW optimizers are
built (``track_cases``: the whole bundled MiniLM, 22.57M parameters); one gets a tracker
(every parameter, every step, one what-if policy). After warm-up steps (and a check that both
runs still hold bit-identical weights) the two take turns, one step each, ``--repeat`` times
(the order alternates every round), so drift in the machine's load hits both alike; the
report gives medians of wall time (``time.perf_counter``) and of process CPU time
(``time.process_time``, both threads counted), the ratio of the fastest tracked to the fastest
untracked step (the least disturbed samples on a shared machine), the forward+backward and
optimizer-step parts, and a cProfile breakdown of one tracked step's hooks. Target (issue: live tracking): tracked
step under 1.5x the untracked one.

Usage::

    python benchmarks/track/track_report.py [--dtypes bf16,fp32] [--batch 8x128,32x128]
                                      [--threads N] [--repeat 9] [--markdown BENCHMARKS.md]

With ``--markdown PATH`` the report replaces the text between ``<!-- track:begin -->`` and
``<!-- track:end -->`` in PATH (appending the marked block at the end if PATH has no such
pair; a new PATH gets the block alone).
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # markdown_block
import track_cases as tc  # noqa: E402
from markdown_block import replace_marked  # noqa: E402

import gatesim  # noqa: E402

TARGET = 1.5
BEGIN, END = "<!-- track:begin -->", "<!-- track:end -->"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--batch", default="8x128,32x128",
                   help="comma-separated BATCHxSEQ shapes (default: 8x128,32x128)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    shapes = []
    for s in args.batch.split(","):
        try:
            b, n = (int(x) for x in s.lower().split("x"))
        except ValueError:
            p.error(f"--batch: {s!r} is not BATCHxSEQ")
        shapes.append((b, n))
    args.shapes = shapes
    return args


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _time_step(case: tc.Case) -> tuple[float, float, float, float]:
    """(wall, cpu, forward+backward wall, optimizer step wall) of one training step."""
    w0, c0 = time.perf_counter(), time.process_time()
    case.forward_backward()
    w1 = time.perf_counter()
    case.opt.step()
    w2 = time.perf_counter()
    case.opt.zero_grad()
    return time.perf_counter() - w0, time.process_time() - c0, w1 - w0, w2 - w1


def _hook_breakdown(case: tc.Case) -> dict:
    """Cumulative seconds of the tracker's parts in one profiled optimizer step."""
    case.forward_backward()
    prof = cProfile.Profile()
    prof.enable()
    case.opt.step()
    prof.disable()
    case.opt.zero_grad()
    stats = pstats.Stats(prof).stats
    want = {"pre": ("tracking/replay.py", "pre"), "replay": ("tracking/replay.py", "_replay"),
            "post": ("tracking/replay.py", "post"),
            "stats": ("tracking/observed.py", "step_stats"),
            "emit": ("tracking/output.py", "emit"), "what-if": ("update.py", "apply_update"),
            "optimizer": ("adam.py", "_single_tensor_adam")}
    out = {k: 0.0 for k in want}
    for (file, _, func), (_, _, _, cum, _) in stats.items():
        for k, (f, fn) in want.items():
            if file.endswith(f) and func == fn:
                out[k] += cum
    return out


def measure(dtype_name: str, batch: int, seq: int, repeat: int, warmup: int) -> dict:
    dtype = DTYPES[dtype_name]
    plain = tc.make_case(dtype, batch, seq)
    tracked = tc.make_case(dtype, batch, seq, tracked=True)
    for _ in range(warmup):
        plain.step()
        tracked.step()
    tc.check_identical(plain, tracked)
    rows = {"plain": [], "tracked": []}
    for r in range(repeat):
        order = (("plain", plain), ("tracked", tracked))
        for name, case in (order if r % 2 == 0 else order[::-1]):
            rows[name].append(_time_step(case))
    tc.check_identical(plain, tracked)
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in rows.items()}
    best = {k: min(x[0] for x in v) for k, v in rows.items()}
    # the profiled step runs on both so they stay in step (bit-identical at the end)
    breakdown = _hook_breakdown(tracked)
    _hook_breakdown(plain)
    tc.check_identical(plain, tracked)
    tracked.tracker.close()
    return dict(dtype=dtype_name, batch=batch, seq=seq, params=plain.params,
                what_if=tc.WHAT_IF[dtype], plain=med["plain"], tracked=med["tracked"],
                ratio=med["tracked"][0] / med["plain"][0],
                ratio_min=best["tracked"] / best["plain"],
                cpu_ratio=med["tracked"][1] / med["plain"][1], breakdown=breakdown)


def report(results: list, args, load_before, load_after, seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {now} with `python benchmarks/track/track_report.py` ({seconds:.0f} s): the whole "
        f"bundled MiniLM ({results[0]['params'] / 1e6:.2f}M parameters, real weights) + "
        "classification head, AdamW (lr 1e-4, weight decay 0.01), random token ids; one step = "
        "forward + backward + `optimizer.step()` + `zero_grad()`. Tracked: "
        "`gatesim.track(optimizer, model=model, what_if=[policy])`, every parameter, every "
        f"step, no log file. Medians of {args.repeat} interleaved steps after {args.warmup} "
        "warm-up steps; tracked and untracked weights checked bit-identical before and after.",
        "",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{_plural(torch.get_num_threads(), 'thread')}; gatesim.cpu_isa(): {gatesim.cpu_isa()}",
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} "
        "(other processes on the machine; see caveats)",
        "",
        "| params | batch x seq | what-if | untracked step (ms) | tracked step (ms) | "
        "**ratio** (medians) | ratio of minima | CPU-time ratio | fwd+bwd (ms) | optimizer "
        "step (ms) | tracked optimizer step (ms) | target < 1.5x |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        p, t = r["plain"], r["tracked"]
        ok = "pass" if r["ratio"] < TARGET else "**fail**"
        lines.append(
            f"| {r['dtype']} | {r['batch']} x {r['seq']} | {r['what_if']} | {p[0] * 1e3:.0f} | "
            f"{t[0] * 1e3:.0f} | **{r['ratio']:.2f}x** | {r['ratio_min']:.2f}x | "
            f"{r['cpu_ratio']:.2f}x | "
            f"{p[2] * 1e3:.0f} | {p[3] * 1e3:.0f} | {t[3] * 1e3:.0f} | {ok} |")
    lines += ["", "Where the tracking time goes (one profiled tracked `optimizer.step()`, "
              "cumulative ms; cProfile adds a little):", "",
              "| params | batch x seq | tracker hooks, total (ms) | pre-step hook (ms) | of "
              "which replay (ms) | post-step hook (ms) | of which own stats (ms) | of which "
              "what-if apply_update (ms) | log/aggregates (ms) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = r["breakdown"]
        lines.append(
            f"| {r['dtype']} | {r['batch']} x {r['seq']} | {(b['pre'] + b['post']) * 1e3:.0f}"
            f" | {b['pre'] * 1e3:.0f} | {b['replay'] * 1e3:.0f} | "
            f"{b['post'] * 1e3:.0f} | {b['stats'] * 1e3:.0f} | {b['what-if'] * 1e3:.0f} | "
            f"{b['emit'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: str) -> None:
    """Replaces the marked region of ``path`` with ``body`` (see markdown_block)."""
    replace_marked(path, BEGIN, END, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = []
    for d in args.dtypes:
        for b, n in args.shapes:
            print(f"[track_report] {d} {b}x{n} ...", file=sys.stderr, flush=True)
            results.append(measure(d, b, n, args.repeat, args.warmup))
    body = report(results, args, load_before, os.getloadavg()[0], time.perf_counter() - t0)
    print(body)
    if args.markdown:
        write_markdown(args.markdown, body)
        print(f"[track_report] wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
