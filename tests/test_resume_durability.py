"""Resume and durability, tested by what they promise (gatesim.executor's ResultStore, the
sweep, the diff): a rerun of finished work computes nothing (the work is counted, not
inferred from equal outputs); a crash right after a result was reported finished loses
nothing, and the rerun computes only what is missing; every stored result is flushed and
fsynced before it counts as finished; ``ResultStore.discard`` and ``make_executor(0)``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import gatesim.diff as gd
import gatesim.diff.core as diff_core
import gatesim.executor as gex
import gatesim.sim.sweep as sweep_mod
from gatesim.executor import ProcessExecutor, ResultStore, SerialExecutor, make_executor
from hostile import planted_pair

ROOT = Path(__file__).resolve().parents[1]


class Counter:
    """Wraps a task function and records the payloads it ran on (in this process)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, payload):
        self.calls.append(payload)
        return self.fn(payload)


def _square(x):
    return {"x": x, "sq": x * x}


def _keys(path: Path) -> list:
    return [json.loads(x)["key"] for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------
# ResultStore
# ------------------------------------------------------------------------------------------
def test_store_rerun_computes_nothing(tmp_path):
    tasks = [(f"k{i}", i) for i in range(5)]
    fn = Counter(_square)
    first = ResultStore(tmp_path / "s.jsonl").run(SerialExecutor(), fn, tasks)
    assert len(fn.calls) == 5 and first["k3"] == {"x": 3, "sq": 9}
    fn.calls.clear()
    again = ResultStore(tmp_path / "s.jsonl").run(SerialExecutor(), fn, tasks)  # reopened
    assert fn.calls == [] and again == first
    # one more task: only it runs
    again = ResultStore(tmp_path / "s.jsonl").run(SerialExecutor(), fn, tasks + [("k9", 9)])
    assert fn.calls == [9] and again["k9"] == {"x": 9, "sq": 81}


def test_store_discard_reruns_and_supersedes(tmp_path):
    path = tmp_path / "s.jsonl"
    store = ResultStore(path)
    store.run(SerialExecutor(), _square, [("a", 1), ("b", 2), ("c", 3)])
    store.discard("b")
    store.discard("never-stored")                     # no error
    assert "b" not in store and len(store) == 2 and store.get("b", "gone") == "gone"
    assert dict(store.items()) == {"a": {"x": 1, "sq": 1}, "c": {"x": 3, "sq": 9}}
    fn = Counter(_square)
    out = store.run(SerialExecutor(), fn, [("a", 1), ("b", 20), ("c", 3)])
    assert fn.calls == [20]                           # only the discarded key ran again
    assert out["b"] == {"x": 20, "sq": 400}
    reread = ResultStore(path)                        # the new record supersedes the old
    assert reread.get("b") == {"x": 20, "sq": 400} and len(reread) == 3


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_store_fsyncs_each_record_after_flushing_it(tmp_path, monkeypatch):
    """Each add fsyncs the store file, and at that moment the record is already in the
    file (flushed, so another reader sees it): a store that stopped flushing or syncing
    fails here."""
    path = tmp_path / "s.jsonl"
    seen = []
    real = os.fsync

    def fsync(fd):
        p = _fd_path(fd)
        seen.append((p, Path(p).read_text() if os.path.exists(p) else None))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = ResultStore(path)
    for i in range(3):
        n = len(seen)
        store.add(f"k{i}", {"i": i})
        mine = [text for p, text in seen[n:] if p == str(path)]
        assert mine, f"add {i} did not fsync {path}"
        assert f'"key": "k{i}"' in mine[-1], "fsynced before the record was flushed"
    # a record reported finished is readable by another process while this one lives
    code = f"from gatesim.executor import ResultStore; print(len(ResultStore({str(path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "3"


# ------------------------------------------------------------------------------------------
# make_executor
# ------------------------------------------------------------------------------------------
def test_make_executor_workers_0_is_one_process_per_core(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    ex = make_executor(0)
    assert isinstance(ex, ProcessExecutor) and (ex.workers, ex.threads) == (6, 1)
    ex = make_executor(0, threads=2)
    assert isinstance(ex, ProcessExecutor) and (ex.workers, ex.threads) == (3, 2)
    assert make_executor(0, threads=8).workers == 1          # never 0 workers
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert make_executor(0).workers == 1
    for w in (None, 1):
        ex = make_executor(w, threads=3)
        assert isinstance(ex, SerialExecutor) and ex.threads == 3
    assert make_executor(5).workers == 5
    with pytest.raises(ValueError):
        make_executor(-1)


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------
def _sweep(tmp_path):
    from gatesim.sim.config import SweepConfig
    m = tmp_path / "m.safetensors"
    if not m.exists():
        g = torch.Generator().manual_seed(0)
        save_file({"w": torch.randn(24, 12, generator=g)}, str(m))
    return SweepConfig(name="s", base={
        "path": str(m), "matrix": "w", "rows": 16, "row_offset": 0, "n_contexts": 8,
        "n_targets": 2, "batch": 4, "group": 4, "steps": 2, "eval_every": 1, "k": 2,
        "policies": ["fp32"]}, grid={"seed": [0, 1, 2]})


def _ablate(sweep, out):
    return sweep_mod.ablate(sweep, out, workers=1, progress=False, figures=False)


@pytest.fixture()
def counted_cells(monkeypatch):
    c = Counter(sweep_mod._run)
    monkeypatch.setattr(sweep_mod, "_run", c)
    return c


def test_sweep_rerun_computes_nothing_and_reruns_only_what_is_missing(tmp_path,
                                                                       counted_cells):
    sweep = _sweep(tmp_path)
    out = tmp_path / "out"
    _ablate(sweep, out)
    assert len(counted_cells.calls) == 3
    results = (out / "s" / "results.json").read_bytes()
    counted_cells.calls.clear()
    _ablate(sweep, out)
    assert counted_cells.calls == []                       # finished: nothing computed
    assert (out / "s" / "results.json").read_bytes() == results
    # a cell whose mask file is gone is discarded and run again, alone
    masks = sorted((out / "s" / "masks").glob("*.npz"))
    assert len(masks) == 3
    masks[1].unlink()
    _ablate(sweep, out)
    assert len(counted_cells.calls) == 1 and counted_cells.calls[0][1] == str(masks[1])
    assert (out / "s" / "results.json").read_bytes() == results


CRASH = """
import os, signal, sys
from gatesim.executor import ResultStore
target, after = sys.argv[1], int(sys.argv[2])
real = ResultStore.add
def add(self, key, result):
    real(self, key, result)                 # reported finished ...
    if self.path.name == target:
        add.n += 1
        if add.n == after:
            os.kill(os.getpid(), signal.SIGKILL)   # ... then the process dies at once
add.n = 0
ResultStore.add = add
"""


def _crash(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASH + textwrap.dedent(script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sweep_killed_after_a_cell_loses_nothing(tmp_path, counted_cells):
    sweep = _sweep(tmp_path)
    out = tmp_path / "out"
    r = _crash("""
        from gatesim.sim.config import SweepConfig
        from gatesim.sim.sweep import ablate
        import json
        ablate(SweepConfig(**json.loads(sys.argv[3])), sys.argv[4], workers=1,
               progress=False, figures=False)
        """, "cells.jsonl", "2", json.dumps(sweep.to_dict()), str(out))
    assert r.returncode == -signal.SIGKILL, r.stderr      # the kill happened
    stored = _keys(out / "s" / "cells.jsonl")
    assert len(stored) == 2                               # both reported cells are on disk
    _ablate(sweep, out)
    assert len(counted_cells.calls) == 1                  # only the third cell ran
    missing = [k for k, _ in sweep.cells() if k not in stored]
    assert counted_cells.calls[0][0] == dict(sweep.cells())[missing[0]].to_dict()
    counted_cells.calls.clear()
    _ablate(sweep, tmp_path / "ref")                      # one uninterrupted run
    assert (out / "s" / "results.json").read_bytes() == \
        (tmp_path / "ref" / "s" / "results.json").read_bytes()


# ------------------------------------------------------------------------------------------
# the diff
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return planted_pair(tmp_path_factory.mktemp("pair"), n=4, size=24)


@pytest.fixture()
def counted_rows(monkeypatch):
    c = Counter(diff_core.diff_tensor)
    monkeypatch.setattr(diff_core, "diff_tensor", c)
    return c


RESULT_FILES = ("rows.jsonl", "rows.csv", "summary_model.csv", "summary_module.csv",
                "summary_layer.csv", "rows.parquet", "report.md")


def test_diff_rerun_computes_nothing(pair, tmp_path, counted_rows):
    b, t = pair
    out = tmp_path / "d"
    first = gd.diff(b, t, out, progress=False, figures=False)
    n = len(first.rows)
    assert n == 8 and len(counted_rows.calls) == n
    before = {f: (out / f).read_bytes() for f in RESULT_FILES}
    counted_rows.calls.clear()
    again = gd.diff(b, t, out, progress=False, figures=False)
    assert counted_rows.calls == [] and again.resumed == n
    assert {f: (out / f).read_bytes() for f in RESULT_FILES} == before
    pd.testing.assert_frame_equal(again.rows, first.rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_diff_fsyncs_every_row_as_it_is_stored(pair, tmp_path, monkeypatch):
    b, t = pair
    out = tmp_path / "d"
    rows_path = str(out / "rows.jsonl")
    lines_at_sync = []
    real = os.fsync

    def fsync(fd):
        if _fd_path(fd) == rows_path:
            lines_at_sync.append(len(Path(rows_path).read_text().splitlines()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    res = gd.diff(b, t, out, progress=False, figures=False)
    n = len(res.rows)
    # every row: synced on its own, with itself (and every earlier row) in the file
    assert lines_at_sync[:n] == list(range(1, n + 1))


def test_diff_killed_after_a_row_loses_nothing(pair, tmp_path, counted_rows):
    b, t = pair
    out = tmp_path / "d"
    r = _crash("""
        import gatesim.diff as gd
        gd.diff(sys.argv[3], sys.argv[4], sys.argv[5], progress=False, figures=False)
        """, "rows.jsonl", "3", str(b), str(t), str(out))
    assert r.returncode == -signal.SIGKILL, r.stderr      # the kill happened
    stored = _keys(out / "rows.jsonl")
    assert len(stored) == 3
    res = gd.diff(b, t, out, progress=False, figures=False)
    assert res.resumed == 3
    done = [task.key for task in counted_rows.calls]
    assert len(done) == len(res.rows) - 3 and not set(done) & set(stored)
    ref = gd.diff(b, t, progress=False)
    pd.testing.assert_frame_equal(res.rows, ref.rows)
