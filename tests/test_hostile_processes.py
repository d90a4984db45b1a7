"""Hostile conditions, class 5 of issue 22: nothing is left behind. A ``kill -9`` of a
command that runs a worker pool takes the workers (and multiprocessing's resource tracker)
down within seconds; a Ctrl-C stops the pool at once, exits 130 with one line, and the
run resumes. Never more than 2 workers; everything started here is killed here."""
import os
import signal
import subprocess
import sys
import time

import pytest

import gatesim.diff as gd
from hostile import alive, children, planted_pair

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

GONE_WITHIN = 5.0


def _wait(cond, timeout, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


SLEEPER = """
import sys, multiprocessing
from concurrent.futures import ProcessPoolExecutor
from gatesim.executor import ProcessExecutor
# each task marks that its worker is up and in a task, then sleeps
code = [f"import pathlib, time; pathlib.Path({sys.argv[1] + f'.{i}'!r}).touch(); "
        "time.sleep(300)" for i in range(2)]
if sys.argv[2] == "gatesim":
    for _ in ProcessExecutor(2).map(exec, [("a", code[0]), ("b", code[1])]):
        pass
else:   # the control: a bare pool, whose workers outlive their parent
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    futs = [pool.submit(exec, c) for c in code]
    futs[0].result()
"""


def _workers(pid):
    return [c for c in children(pid) if "resource_tracker" not in _cmdline(c)]


def _start_sleepers(tmp_path, kind):
    p = subprocess.Popen([sys.executable, "-c", SLEEPER, str(tmp_path / "mark"), kind],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks_ok = _wait(lambda: all((tmp_path / f"mark.{i}").exists() for i in range(2)), 120)
    ok = _wait(lambda: len(_workers(p.pid)) >= 2, 60)
    return p, children(p.pid), marks_ok and ok


def test_kill_9_takes_the_pool_down(tmp_path):
    p, kids, ok = _start_sleepers(tmp_path, "gatesim")
    try:
        assert ok, "the pool never started"
        kids = children(p.pid)
        workers = _workers(p.pid)
        assert len(workers) >= 2 and all(alive(c) for c in workers)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL
        gone = _wait(lambda: not any(alive(c) for c in kids), GONE_WITHIN)
        assert gone, f"left behind: {[(c, _cmdline(c)) for c in kids if alive(c)]}"
    finally:
        _kill_all([p.pid] + kids)


def test_control_a_bare_pool_would_be_left_behind(tmp_path):
    """The check above can fail: the same kill leaves a plain ProcessPoolExecutor's
    workers running (so their disappearance above is gatesim's doing)."""
    p, kids, ok = _start_sleepers(tmp_path, "bare")
    try:
        assert ok
        workers = _workers(p.pid)
        assert len(workers) >= 2 and all(alive(c) for c in workers)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL      # the kill happened
        time.sleep(2.0)
        assert any(alive(c) for c in workers)
    finally:
        _kill_all([p.pid] + kids)


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow")
    # enough work that a run is far from done when the tests act on it (at 20 x 192 a
    # loaded machine once let the run reach its exit before the Ctrl-C arrived)
    return planted_pair(root, n=48, size=256)


def _cli(b, t, out, *extra):
    code = "import sys; from gatesim.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "diff", str(b), str(t), "--out", str(out),
            "--no-progress", "--no-figures", "--svd", "full", "--workers", "2", *extra]


def _rows(out):
    f = out / "rows.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_kill_9_of_diff_workers_2(slow_pair, tmp_path):
    b, t = slow_pair
    out = tmp_path / "d"
    p = subprocess.Popen(_cli(b, t, out), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    kids = []
    try:
        assert _wait(lambda: _rows(out) >= 2, 120), "no rows came"
        kids = children(p.pid)
        assert len(_workers(p.pid)) == 2
        assert p.poll() is None, "the run ended before the kill"
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL
        gone = _wait(lambda: not any(alive(c) for c in kids), GONE_WITHIN)
        assert gone, f"left behind: {[(c, _cmdline(c)) for c in kids if alive(c)]}"
    finally:
        _kill_all([p.pid] + kids)
    n = _rows(out)
    res = gd.diff(b, t, out, svd="full", progress=False, figures=False)
    assert res.resumed == n < len(res.rows)


def test_ctrl_c_stops_the_pool_cleanly(slow_pair, tmp_path):
    b, t = slow_pair
    out = tmp_path / "d"
    p = subprocess.Popen(_cli(b, t, out), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    kids = []
    try:
        assert _wait(lambda: _rows(out) >= 2, 120), "no rows came"
        kids = children(p.pid)
        assert p.poll() is None, "the run ended before Ctrl-C"
        t0 = time.time()
        os.killpg(p.pid, signal.SIGINT)           # what a terminal's Ctrl-C does
        _, err = p.communicate(timeout=30)
        took = time.time() - t0
        assert p.returncode == 130, err
        assert "Traceback" not in err, err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and "interrupted" in lines[0] and str(out) in lines[0], err
        assert took < 10, f"Ctrl-C took {took:.1f} s"
        assert _wait(lambda: not any(alive(c) for c in kids), GONE_WITHIN)
    finally:
        _kill_all([p.pid] + kids)
    n = _rows(out)
    res = gd.diff(b, t, out, svd="full", progress=False, figures=False)
    assert res.resumed == n < len(res.rows)
