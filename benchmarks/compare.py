"""Precision-core comparison table: gatesim rounding vs copies, torch, ml_dtypes, numba.

Times every case of ``precision_cases`` (median of ``--repeat`` runs after ``--warmup``
warm-ups, ``time.perf_counter``) at each thread count of ``--threads``, prints the machine,
a Markdown table per thread count and the pass/fail of the issue's targets:

(a) gatesim nearest_even to bf16 (``quantize`` into fp32, ``to_dtype`` into bf16) within
    1.25x of the fp32 ``copy_`` of the same tensor;
(b) gatesim stochastic rounding to bf16 within 3x of that copy and at least 4x faster
    than the eager torch randint-add-mask trick.

Usage::

    PYTHONPATH=. python benchmarks/compare.py [--size N] [--markdown PATH]

With ``--markdown PATH`` the report also goes to PATH: if PATH already holds the
``MARKER_BEGIN``/``MARKER_END`` comment pair, only the text between them is replaced
(so BENCHMARKS.md keeps its other sections); otherwise PATH is overwritten.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the in-place build

import ml_dtypes  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import gatesim  # noqa: E402
import precision_cases as pc  # noqa: E402

MARKER_BEGIN = "<!-- compare.py:precision:begin -->"
MARKER_END = "<!-- compare.py:precision:end -->"
DEFAULT_SIZE = 4096 * 4096

Timings = Dict[str, Optional[float]]  # case name -> median ms, None if unavailable


@dataclass
class Target:
    """One pass/fail check: ``numerator / denominator`` compared against ``limit``."""

    label: str
    numerator: str
    denominator: str
    limit: float
    at_most: bool  # True: ratio <= limit passes; False: ratio >= limit passes

    def ratio(self, t: Timings) -> Optional[float]:
        num, den = t.get(self.numerator), t.get(self.denominator)
        return None if num is None or den is None else num / den

    def passed(self, t: Timings) -> Optional[bool]:
        r = self.ratio(t)
        if r is None:
            return None
        return r <= self.limit if self.at_most else r >= self.limit


TARGETS = [
    Target("(a) quantize RNE bf16 (out fp32) / fp32 copy", pc.GS_RNE_QUANTIZE,
           pc.COPY_FP32, 1.25, True),
    Target("(a) to_dtype RNE bf16 (out bf16) / fp32 copy", pc.GS_RNE_TO_DTYPE,
           pc.COPY_FP32, 1.25, True),
    Target("(b) quantize SR bf16 (out fp32) / fp32 copy", pc.GS_SR_QUANTIZE,
           pc.COPY_FP32, 3.0, True),
    Target("(b) torch randint trick / quantize SR bf16", pc.TORCH_SR_TRICK,
           pc.GS_SR_QUANTIZE, 4.0, False),
    Target("(b) to_dtype SR bf16 (out bf16) / fp32 copy", pc.GS_SR_TO_DTYPE,
           pc.COPY_FP32, 3.0, True),
    Target("(b) torch randint trick / to_dtype SR bf16", pc.TORCH_SR_TRICK,
           pc.GS_SR_TO_DTYPE, 4.0, False),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="elements in the input (default 4096*4096, as a 4096x4096 matrix)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per case (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--markdown", metavar="PATH", help="also write the report to PATH")
    return p.parse_args(argv)


def input_shape(size: int) -> tuple:
    """4096x4096 for the default size, a flat vector otherwise."""
    return pc.DEFAULT_SHAPE if size == DEFAULT_SIZE else (size,)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_seconds() -> tuple:
    """(busy CPU seconds of the whole machine, all CPU seconds, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        jiffies = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return (sum(jiffies) - idle) / hz, sum(jiffies) / hz, own


class BackgroundLoad:
    """Share of the machine's CPU time that other processes used during a measurement.

    Thread-count comparisons are meaningless on a shared 2-core box when something else
    runs; the share goes into the report so a contaminated run is visible.
    """

    def __init__(self):
        try:
            self._start = _cpu_seconds()
        except (OSError, ValueError, IndexError):
            self._start = None

    def share(self) -> Optional[float]:
        if self._start is None:
            return None
        busy, total, own = (b - a for a, b in zip(self._start, _cpu_seconds()))
        return max(busy - own, 0.0) / max(total, 1e-9)


def extension_built() -> str:
    """Modification time of the loaded gatesim extension: which build was timed."""
    from gatesim import _C

    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(_C.__file__)).astimezone()
    return stamp.strftime("%Y-%m-%d %H:%M:%S %Z")


def machine_info() -> Dict[str, str]:
    return {
        "CPU": cpu_model(),
        "cores": str(os.cpu_count()),
        "gatesim.cpu_isa()": gatesim.cpu_isa(),
        "gatesim extension built": extension_built(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }


def median_ms(fn: Callable[[], object], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def prime(cases: Dict[str, Optional[Callable]], thread_counts: List[int]) -> None:
    """Runs every case once per thread count, outside the timing.

    torch.compile guards on the thread count, so this triggers (and caches) the recompile
    for each count; the other cases just get their code paths and pools warm.
    """
    for threads in thread_counts:
        pc.set_threads(threads)
        for fn in cases.values():
            if fn is not None:
                fn()


def time_cases(cases: Dict[str, Optional[Callable]], threads: int, warmup: int,
               repeat: int) -> Timings:
    """Median ms of every case at ``threads`` threads (None stays None)."""
    pc.set_threads(threads)
    timings: Timings = {}
    for name, fn in cases.items():
        timings[name] = None if fn is None else median_ms(fn, warmup, repeat)
        shown = "unavailable" if timings[name] is None else f"{timings[name]:.3f} ms"
        print(f"  [{threads} thr] {name}: {shown}", file=sys.stderr)
    return timings


def _fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}"


def timing_table(t: Timings) -> List[str]:
    """Markdown table: case, ms and time ratios (< 1 means faster than the reference)."""
    rows = ["| operation | ms | / fp32 copy | / ml_dtypes astype | / numba RNE |",
            "|---|---:|---:|---:|---:|"]
    refs = [t.get(pc.COPY_FP32), t.get(pc.ML_DTYPES_ASTYPE), t.get(pc.NUMBA_RNE)]
    for name, ms in t.items():
        ms_s = "unavailable" if ms is None else f"{ms:.2f}"
        rows.append(f"| {name} | {ms_s} | " + " | ".join(_fmt_ratio(ms, r) for r in refs)
                    + " |")
    return rows


def target_table(by_threads: Dict[int, Timings]) -> List[str]:
    rows = ["| target | threads | ratio | limit | result |", "|---|---:|---:|---:|---|"]
    for target in TARGETS:
        for threads, t in by_threads.items():
            ratio, ok = target.ratio(t), target.passed(t)
            ratio_s = "n/a" if ratio is None else f"{ratio:.2f}"
            limit_s = f"{'<=' if target.at_most else '>='} {target.limit:g}"
            result = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            rows.append(f"| {target.label} | {threads} | {ratio_s} | {limit_s} | {result} |")
    return rows


def report(by_threads: Dict[int, Timings], info: Dict[str, str], shape: tuple,
           warmup: int, repeat: int) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    numel = int(np.prod(shape))
    lines = [f"Measured {date} with `python benchmarks/compare.py`: float32 input of shape "
             f"{'x'.join(map(str, shape))} ({numel * 4 / 2**20:.1f} MiB), N(0, "
             f"{pc.INPUT_STD}), preallocated outputs; median of {repeat} runs after "
             f"{warmup} warm-ups.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "Ratios are time ratios (op time / reference time, < 1 is faster); the "
              "reference runs at the same thread count.", ""]
    for threads, t in by_threads.items():
        lines += [f"#### {threads} thread{'s' if threads > 1 else ''}", ""]
        lines += timing_table(t) + [""]
    lines += ["#### Targets", ""] + target_table(by_threads)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: str) -> None:
    """Replaces the marked region of ``path`` with ``body``, or writes ``body`` alone."""
    block = f"{MARKER_BEGIN}\n{body}{MARKER_END}\n"
    text = path.read_text() if path.exists() else ""
    start, end = text.find(MARKER_BEGIN), text.find(MARKER_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(MARKER_END):].lstrip("\n")
    else:
        text = block
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    built = extension_built()  # the build that was loaded (the file may be replaced later)
    thread_counts = [int(n) for n in args.threads.split(",")]
    shape = input_shape(args.size)
    buffers = pc.Buffers.allocate(pc.make_input(shape))
    pc.check_references(buffers)
    cases = pc.all_cases(buffers)
    prime(cases, thread_counts)
    load = BackgroundLoad()
    by_threads = {n: time_cases(cases, n, args.warmup, args.repeat) for n in thread_counts}
    info = machine_info()
    if info["gatesim extension built"] != built:
        info["gatesim extension built"] = f"{built} (rebuilt on disk during the run!)"
    share = load.share()
    info["CPU time used by other processes during the timing"] = (
        "unknown" if share is None else f"{share:.0%}")
    text = report(by_threads, info, shape, args.warmup, args.repeat)
    print(text)
    if args.markdown:
        write_markdown(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
