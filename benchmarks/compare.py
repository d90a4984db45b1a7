"""Benchmark comparison tables: gatesim kernels vs copies, torch, ml_dtypes, numba.

Times every case of a suite (median of ``--repeat`` runs after ``--warmup`` warm-ups,
``time.perf_counter``) at each thread count of ``--threads``, prints the machine, Markdown
tables per thread count and the pass/fail of the issue's targets. Suites (``--suite``,
default ``all``: both, one after the other):

``precision`` (cases in ``precision_cases``): fp32 -> bf16/fp16/fp8 rounding. Targets:
(a) gatesim nearest_even to bf16 (``quantize`` into fp32, ``to_dtype`` into bf16) within
1.25x of the fp32 ``copy_`` of the same tensor; (b) gatesim stochastic rounding to bf16
within 3x of that copy and at least 4x faster than the eager torch randint-add-mask trick.

``update`` (cases in ``update_cases``): the replay step fp32 master + fp32 delta -> bf16
param with UpdateStats (``gatesim.apply_update(p, delta, master=m)``), and
``EmulatedAdamW.step()``. Targets: (1) the replay step with stats at least 20x faster
than the eager torch code computing the same statistics and within 1.5x of a copy moving
the same bytes (16 B/element); (2) ``EmulatedAdamW.step()`` (bf16 + fp32 master, and the
all-fp32 policy) within 1.5x of ``torch.optim.AdamW(foreach=True).step()``.

Before timing, each suite checks that the implementations it compares give the same
results (bits and statistics) and aborts if they do not.

Usage::

    python benchmarks/compare.py [--suite precision|update|all] [--size N]
                               [--markdown PATH]

With ``--markdown PATH`` each suite's report also goes to PATH: if PATH already holds that
suite's ``<!-- compare.py:SUITE:begin -->``/``<!-- compare.py:SUITE:end -->`` comment
pair, only the text between them is replaced (so BENCHMARKS.md keeps its other sections);
if PATH exists without the pair, the marked block is appended; a new PATH gets the block.
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
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the in-place build
sys.path[1:1] = [str(HERE / "precision"), str(HERE / "update")]  # the suites' cases

import ml_dtypes  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import gatesim  # noqa: E402
from markdown_block import replace_marked  # noqa: E402
import precision_cases as pc  # noqa: E402
import update_cases as uc  # noqa: E402

SUITES = ("precision", "update")
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


PRECISION_TARGETS = [
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

UPDATE_TARGETS = [
    Target("(1) eager torch replay with stats / gatesim replay with stats", uc.EAGER_STATS,
           uc.GS_REPLAY, 20.0, False),
    Target("(1) same, naive eager spelling (.sum(), bool indexing) / gatesim",
           uc.EAGER_NAIVE, uc.GS_REPLAY, 20.0, False),
    Target("(1) gatesim replay with stats / 16 B/elem copy", uc.GS_REPLAY, uc.COPY_16B,
           1.5, True),
    Target("(2) EmulatedAdamW bf16+master step / torch AdamW foreach", uc.GS_ADAMW_BF16,
           uc.TORCH_ADAMW_FOREACH, 1.5, True),
    Target("(2) EmulatedAdamW fp32 step / torch AdamW foreach", uc.GS_ADAMW_FP32,
           uc.TORCH_ADAMW_FOREACH, 1.5, True),
]

Cases = Dict[str, Optional[Callable[[], object]]]


@dataclass
class Group:
    """One table: the cases it lists (None: all) and its ratio columns (header, case)."""

    title: str
    names: Optional[List[str]]
    columns: List[Tuple[str, str]]


@dataclass
class Prepared:
    """A suite ready to time: its cases, a sentence on the problem, and check notes."""

    cases: Cases
    problem: str
    notes: List[str]


@dataclass
class Suite:
    name: str
    prepare: Callable[[int], Prepared]  # input size -> checked cases
    groups: List[Group]
    targets: List[Target]

    @property
    def marker_begin(self) -> str:
        return f"<!-- compare.py:{self.name}:begin -->"

    @property
    def marker_end(self) -> str:
        return f"<!-- compare.py:{self.name}:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=SUITES + ("all",), default="all",
                   help="which benchmarks to run (default: all)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="elements in the input (default 4096*4096, as a 4096x4096 matrix)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per case (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--markdown", metavar="PATH",
                   help="also write each suite's report into its marked block of PATH")
    return p.parse_args(argv)


def input_shape(size: int) -> tuple:
    """4096x4096 for the default size, a flat vector otherwise."""
    return pc.DEFAULT_SHAPE if size == DEFAULT_SIZE else (size,)


def _shape_text(shape: tuple) -> str:
    numel = int(np.prod(shape))
    return f"{'x'.join(map(str, shape))} ({numel * 4 / 2**20:.1f} MiB as fp32)"


def prepare_precision(size: int) -> Prepared:
    shape = input_shape(size)
    buffers = pc.Buffers.allocate(pc.make_input(shape))
    pc.check_references(buffers)
    problem = (f"float32 input of shape {_shape_text(shape)}, N(0, {pc.INPUT_STD}), "
               "preallocated outputs")
    return Prepared(pc.all_cases(buffers), problem,
                    ["gatesim, torch, ml_dtypes and the numba loop give bit-identical RNE "
                     "bf16 results (checked before timing)."])


def prepare_update(size: int) -> Prepared:
    shape = input_shape(size)
    state = uc.ReplayState.allocate(shape)
    compiled = uc.compile_replay(state, uc.COMPILE_OPTIONS)
    stats = uc.check_replay(state, compiled)
    notes = []
    for mode, st in stats.items():
        notes.append(f"First replay step, {mode}: {st.changed / st.n:.1%} of the bf16 values "
                     f"change, {st.absorbed_fraction:.1%} of the updates are absorbed "
                     f"(absorbed mass {st.absorbed_mass:.4g}).")
    notes.append("gatesim's bf16 and master bits and its UpdateStats (changed, absorbed, "
                 "zero, 34-bin histogram; absorbed mass to 1e-12 relative) equal those of "
                 "all three eager torch spellings" + (" and torch.compile's" if compiled
                                                      else "") + " (checked before timing).")
    default_ok = uc.compiled_default_agrees(state)
    if default_ok is False:
        notes.append("torch.compile with inductor's default options gives WRONG statistics "
                     "for this code (it skips the bf16 rounding of `master.to(bfloat16)` "
                     "inside the fused comparison, so nearly every element counts as "
                     "changed); the timed compiled case uses "
                     f"`options={uc.COMPILE_OPTIONS}`, which agrees with eager.")
    uc.check_storage(state)
    notes.append("Without master weights, gatesim's bf16 storage and Kahan steps with "
                 "sum='fp32' are bit-identical to the eager torch spellings (param.add_; "
                 "torch-optimi's four ops) over 3 steps (checked before timing); the timed "
                 "gatesim cases use the default exact sum.")
    same = uc.check_optimizers(shape)
    notes.append("EmulatedAdamW under the fp32 policy, and the fp32 master weights under "
                 "bf16 + master, are bit-identical to torch AdamW(foreach=False) after 3 "
                 "steps (checked before timing); "
                 + "; ".join(f"{name.replace(' (reference)', '')}: "
                             f"{'bit-identical' if ok else 'not bit-identical'}"
                             for name, ok in same.items()) + ".")
    opt_state = uc.OptimizerState.allocate(shape)
    cases = {**uc.replay_reference_cases(state), **uc.replay_gatesim_cases(state),
             **uc.replay_compiled_cases(state, compiled), **uc.storage_cases(state),
             **uc.optimizer_cases(opt_state)}
    problem = (f"fp32 master weights N(0, {uc.MASTER_STD}), fp32 delta N(0, "
               f"{uc.DELTA_STD}) and a bf16 parameter, each of shape {_shape_text(shape)}, "
               "updated in place (every call is one more step); AdamW on one fp32 "
               f"parameter of that shape, lr {uc.LR}, weight decay {uc.WEIGHT_DECAY}, a "
               f"fixed N(0, {uc.GRAD_STD}) gradient, state initialised before timing")
    return Prepared(cases, problem, notes)


SUITE_DEFS = {
    "precision": Suite(
        "precision", prepare_precision,
        [Group("", None, [("/ fp32 copy", pc.COPY_FP32),
                          ("/ ml_dtypes astype", pc.ML_DTYPES_ASTYPE),
                          ("/ numba RNE", pc.NUMBA_RNE)])],
        PRECISION_TARGETS),
    "update": Suite(
        "update", prepare_update,
        [Group("Replay step (fp32 master + fp32 delta -> bf16 param)",
               [uc.COPY_16B, uc.ADD_16B, uc.EAGER_NO_STATS, uc.EAGER_NAIVE, uc.EAGER_STATS,
                uc.EAGER_PREALLOC, uc.COMPILED_STATS, uc.GS_REPLAY, uc.GS_REPLAY_SR, uc.GS_REPLAY_NO_STATS],
               [("/ 16 B copy", uc.COPY_16B), ("/ eager with stats", uc.EAGER_STATS)]),
         Group("bf16 parameter without master weights (+ fp32 delta; Kahan: + bf16 "
               "compensation)",
               [uc.COPY_8B, uc.EAGER_STORAGE, uc.EAGER_KAHAN, uc.GS_STORAGE,
                uc.GS_STORAGE_NO_STATS, uc.GS_KAHAN],
               [("/ 8 B copy", uc.COPY_8B), ("/ eager add_", uc.EAGER_STORAGE)]),
         Group("Optimizer step (one fp32 parameter, stats on for gatesim)",
               list(uc.OPTIMIZER_NAMES),
               [("/ torch AdamW foreach", uc.TORCH_ADAMW_FOREACH)])],
        UPDATE_TARGETS),
}


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


def timing_table(t: Timings, group: Group) -> List[str]:
    """Markdown table: case, ms and time ratios (< 1 means faster than the reference)."""
    rows = ["| operation | ms | " + " | ".join(h for h, _ in group.columns) + " |",
            "|---|---:|" + "---:|" * len(group.columns)]
    refs = [t.get(name) for _, name in group.columns]
    names = t if group.names is None else [n for n in group.names if n in t]
    for name in names:
        ms = t[name]
        ms_s = "unavailable" if ms is None else f"{ms:.2f}"
        rows.append(f"| {name} | {ms_s} | " + " | ".join(_fmt_ratio(ms, r) for r in refs)
                    + " |")
    return rows


def target_table(by_threads: Dict[int, Timings], targets: List[Target]) -> List[str]:
    rows = ["| target | threads | ratio | limit | result |", "|---|---:|---:|---:|---|"]
    for target in targets:
        for threads, t in by_threads.items():
            ratio, ok = target.ratio(t), target.passed(t)
            ratio_s = "n/a" if ratio is None else f"{ratio:.2f}"
            limit_s = f"{'<=' if target.at_most else '>='} {target.limit:g}"
            result = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            rows.append(f"| {target.label} | {threads} | {ratio_s} | {limit_s} | {result} |")
    return rows


def report(suite: Suite, by_threads: Dict[int, Timings], info: Dict[str, str],
           prepared: Prepared, warmup: int, repeat: int) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"Measured {date} with `python benchmarks/{suite.name}/{suite.name}_report.py`: "
             f"{prepared.problem}; median of {repeat} runs after {warmup} warm-ups.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [""] + [f"- {note}" for note in prepared.notes] + [""]
    lines += ["Ratios are time ratios (op time / reference time, < 1 is faster); the "
              "reference runs at the same thread count.", ""]
    for threads, t in by_threads.items():
        lines += [f"#### {threads} thread{'s' if threads > 1 else ''}", ""]
        for group in suite.groups:
            if group.title:
                lines += [f"{group.title}:", ""]
            lines += timing_table(t, group) + [""]
    lines += ["#### Targets", ""] + target_table(by_threads, suite.targets)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: str, suite: Suite) -> None:
    """Replaces ``suite``'s marked region of ``path`` with ``body`` (see markdown_block)."""
    replace_marked(path, suite.marker_begin, suite.marker_end, body)


def run_suite(suite: Suite, args: argparse.Namespace, thread_counts: List[int]) -> str:
    """Checks, primes and times one suite; returns its Markdown report."""
    print(f"[compare] suite {suite.name}: preparing and checking", file=sys.stderr)
    built = extension_built()  # the build that was loaded (the file may be replaced later)
    prepared = suite.prepare(args.size)
    prime(prepared.cases, thread_counts)
    load = BackgroundLoad()
    by_threads = {n: time_cases(prepared.cases, n, args.warmup, args.repeat)
                  for n in thread_counts}
    info = machine_info()
    if info["gatesim extension built"] != built:
        info["gatesim extension built"] = f"{built} (rebuilt on disk during the run!)"
    share = load.share()
    info["CPU time used by other processes during the timing"] = (
        "unknown" if share is None else f"{share:.0%}")
    return report(suite, by_threads, info, prepared, args.warmup, args.repeat)


def main(argv=None) -> int:
    args = parse_args(argv)
    thread_counts = [int(n) for n in args.threads.split(",")]
    names = SUITES if args.suite == "all" else (args.suite,)
    for name in names:
        suite = SUITE_DEFS[name]
        text = run_suite(suite, args, thread_counts)
        if len(names) > 1:
            print(f"### compare.py suite: {name}\n")
        print(text)
        if args.markdown:
            write_markdown(Path(args.markdown), text, suite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
