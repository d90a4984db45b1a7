"""gatesim.executor internals, against what the module's docstrings promise (written to kill
the mutants that the mutation run (docs/mutation.md) found surviving): the failure summary,
executor selection, the result store's file format and repairs, the skip of finished keys,
and the pool workers' set-up, checked in this process with the system calls replaced."""
import json
import os
import signal
import threading

import pytest

import gatesim.executor as ex
from gatesim.executor import (ProcessExecutor, ResultStore, SerialExecutor, TasksFailed,
                              make_executor, show_status)


def _double(x):
    return 2 * x


# -- TasksFailed ------------------------------------------------------------------------
def test_tasks_failed_message_lists_each_failure_and_counts():
    e = TasksFailed([("a", "ValueError: x"), ("b", "KeyError: 'y'")], total=5)
    assert e.failures == [("a", "ValueError: x"), ("b", "KeyError: 'y'")] and e.total == 5
    msg = str(e)
    assert msg.startswith("2 of 5 tasks failed (the others are stored; rerunning retries "
                          "only the failed ones):")
    assert msg.endswith(":\n  a: ValueError: x\n  b: KeyError: 'y'")
    assert "more" not in msg


def test_tasks_failed_shows_twenty_and_counts_the_rest():
    fails = [(f"k{i}", f"E: {i}") for i in range(23)]
    msg = str(TasksFailed(fails, total=30))
    assert msg.startswith("23 of 30 tasks failed")
    shown = [ln for ln in msg.split("\n") if ln.startswith("  k")]
    assert shown == [f"  k{i}: E: {i}" for i in range(20)]
    assert msg.endswith("\n  ... and 3 more")
    # exactly twenty: everything shown, no "more" line
    assert "more" not in str(TasksFailed(fails[:20], total=20))


# -- show_status --------------------------------------------------------------------------
class _Bar:
    def __init__(self):
        self.postfix = None

    def set_postfix(self, **kw):
        self.postfix = kw


class _WithStatus:
    on_status = None


def test_show_status_wires_running_and_failed_counts_to_the_bar():
    bar, exe = _Bar(), _WithStatus()
    show_status(exe, bar)
    exe.on_status(3, 1)
    assert bar.postfix == {"running": 3, "failed": 1}


def test_show_status_leaves_executors_without_status_and_no_bar_alone():
    serial = SerialExecutor()
    show_status(serial, _Bar())
    assert not hasattr(serial, "on_status")
    exe = _WithStatus()
    show_status(exe, None)
    assert exe.on_status is None


def test_unknown_module_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        ex.Nope  # noqa: B018


# -- make_executor ------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [None, 1])
def test_make_executor_serial(workers):
    e = make_executor(workers, threads=3)
    assert type(e) is SerialExecutor and e.threads == 3


def test_make_executor_pool_sizes(monkeypatch):
    e = make_executor(5, threads=2)
    assert type(e) is ProcessExecutor and (e.workers, e.threads) == (5, 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    e = make_executor(0, threads=3)          # 0: one per core, threads each: 8 // 3
    assert type(e) is ProcessExecutor and (e.workers, e.threads) == (2, 3)
    e = make_executor(0, threads=16)         # never fewer than one worker
    assert e.workers == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert make_executor(0).workers == 1
    assert type(make_executor(2, spec="local")) is ProcessExecutor


@pytest.mark.parametrize("kw", [dict(threads=0), dict(workers=-1), dict(workers=1.5)])
def test_make_executor_checks_numbers(kw):
    with pytest.raises((ValueError, TypeError)):
        make_executor(**kw)


@pytest.mark.parametrize("spec", ["dask", "RAY", "rayx", 3])
def test_make_executor_refuses_unknown_specs(spec):
    with pytest.raises(ValueError, match="executor must be 'local', 'ray'"):
        make_executor(2, spec=spec)


@pytest.mark.parametrize("spec, address, cpus", [
    ("ray", None, 3), ("ray://h:10001", "ray://h:10001", 3), ("ray:h:6379", "h:6379", 3)])
def test_make_executor_ray_addresses(monkeypatch, spec, address, cpus):
    import gatesim.ray_executor as rx
    seen = {}

    class FakeRay:
        def __init__(self, address, threads, local_cpus):
            seen.update(address=address, threads=threads, local_cpus=local_cpus)

    monkeypatch.setattr(rx, "RayExecutor", FakeRay)
    assert type(make_executor(cpus, threads=2, spec=spec)) is FakeRay
    assert seen == {"address": address, "threads": 2, "local_cpus": cpus}
    make_executor(0, spec=spec)                  # 0 workers: all the cluster's CPUs
    assert seen["local_cpus"] is None


def test_executor_args_round_trip():
    import argparse
    p = argparse.ArgumentParser()
    ex.add_executor_args(p)
    p.add_argument("--workers", type=int)
    a = p.parse_args([])
    assert a.executor == "local"
    assert type(ex.executor_from_args(a)) is SerialExecutor
    e = ex.executor_from_args(argparse.Namespace(workers=3, threads=2, executor="local"))
    assert type(e) is ProcessExecutor and (e.workers, e.threads) == (3, 2)
    e = ex.executor_from_args(argparse.Namespace())    # nothing given: serial, one thread
    assert type(e) is SerialExecutor and e.threads == 1


# -- executors --------------------------------------------------------------------------
def test_serial_executor_yields_every_task_in_order():
    out = list(SerialExecutor(threads=2).map(_double, [("a", 1), ("b", 5), ("c", -2)]))
    assert out == [("a", 2), ("b", 10), ("c", -4)]


class _Fut:
    def __init__(self, value=None, exc=None):
        self.value, self.exc = value, exc

    def exception(self):
        return self.exc

    def result(self):
        return self.value


class _Pool:
    """Runs each submitted task at once; records how many were in flight at most."""

    def __init__(self):
        self.submitted = []

    def submit(self, fn, task_fn, payload, threads):
        self.submitted.append(payload)
        try:
            return _Fut(value=task_fn(payload))
        except Exception as e:  # noqa: BLE001
            return _Fut(exc=e)


def test_pool_driver_submits_two_per_worker_then_one_per_result(monkeypatch):
    """At most 2 * workers tasks are queued: the first 2w go at once, then one more per
    finished result (counted with a pool that finishes a task when it is submitted)."""
    monkeypatch.setattr(ex, "wait", lambda pending, return_when: (list(pending)[:1], None))
    pool = _Pool()
    tasks = [(f"k{i}", i) for i in range(9)]
    it = ProcessExecutor(3, threads=1)._drive(pool, _double, tasks)
    first = next(it)
    assert len(pool.submitted) == 6 and first == ("k0", 0)   # 2 * 3 up front
    rest = list(it)
    assert sorted([first] + rest) == sorted((k, 2 * v) for k, v in tasks)
    assert pool.submitted == list(range(9))


def _fail_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def test_pool_driver_raises_after_yielding_what_finished(monkeypatch):
    """An error stops new submissions; the results already running are still yielded,
    then the error is raised."""
    monkeypatch.setattr(ex, "wait", lambda pending, return_when: (list(pending)[:1], None))
    pool = _Pool()
    got = []
    with pytest.raises(ValueError, match="three"):
        for kv in ProcessExecutor(2, threads=1)._drive(pool, _fail_on_3,
                                                       [(f"k{i}", i) for i in range(10)]):
            got.append(kv)
    # 4 up front (0..3), 0, 1, 2 finish and each submits one more (4, 5, 6); 3 fails, so
    # nothing is submitted after it but 4, 5, 6 (already running) are yielded
    assert pool.submitted == [0, 1, 2, 3, 4, 5, 6]
    assert got == [("k0", 0), ("k1", 1), ("k2", 2), ("k4", 4), ("k5", 5), ("k6", 6)]


def test_process_executor_with_no_tasks_starts_nothing(monkeypatch):
    monkeypatch.setattr(ex, "ProcessPoolExecutor",
                        lambda *a, **k: pytest.fail("a pool was started"))
    assert list(ProcessExecutor(2).map(_double, [])) == []


# -- worker set-up ------------------------------------------------------------------------
class _Exit(Exception):
    pass


def _fake_exit(code):
    raise _Exit(code)


def _patch_worker_calls(monkeypatch, ppid):
    calls = {"signal": [], "prctl": [], "threads": []}
    monkeypatch.setattr(signal, "signal", lambda s, h: calls["signal"].append((s, h)))

    class Libc:
        def prctl(self, *args):
            calls["prctl"].append(args)

    import ctypes
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(os, "getppid", lambda: ppid)
    monkeypatch.setattr(os, "_exit", _fake_exit)

    class Thread:
        def __init__(self, target, args, name, daemon):
            calls["threads"].append(dict(target=target, args=args, daemon=daemon,
                                         started=False))

        def start(self):
            calls["threads"][-1]["started"] = True

    monkeypatch.setattr(threading, "Thread", Thread)
    return calls


def test_worker_init_ignores_ctrl_c_dies_with_parent_and_watches_it(monkeypatch):
    calls = _patch_worker_calls(monkeypatch, ppid=4242)
    ex._worker_init(4242)
    assert calls["signal"] == [(signal.SIGINT, signal.SIG_IGN)]
    if os.uname().sysname == "Linux":   # PR_SET_PDEATHSIG (1) = SIGKILL
        assert calls["prctl"] == [(1, int(signal.SIGKILL), 0, 0, 0)]
    assert calls["threads"] == [dict(target=ex._watch_parent, args=(4242,), daemon=True,
                                     started=True)]


def test_worker_init_exits_when_the_parent_is_already_gone(monkeypatch):
    calls = _patch_worker_calls(monkeypatch, ppid=1)
    with pytest.raises(_Exit) as e:
        ex._worker_init(4242)
    assert e.value.args == (1,) and calls["threads"] == []


def test_watch_parent_polls_every_fifth_of_a_second_until_reparented(monkeypatch):
    sleeps, parents = [], iter([7, 7, 7, 1])
    monkeypatch.setattr(ex.time, "sleep", sleeps.append)
    monkeypatch.setattr(os, "getppid", lambda: next(parents))
    monkeypatch.setattr(os, "_exit", _fake_exit)
    with pytest.raises(_Exit) as e:
        ex._watch_parent(7)
    assert e.value.args == (1,) and sleeps == [0.2] * 4


def test_kill_pool_kills_every_worker_and_cancels_the_queue():
    log = []

    class Proc:
        def __init__(self, i, fail=None):
            self.i, self.fail = i, fail

        def kill(self):
            log.append(("kill", self.i))
            if self.fail:
                raise self.fail

        def join(self, timeout):
            log.append(("join", self.i, timeout))

    class Pool:
        _processes = {1: Proc(1, OSError("gone")), 2: Proc(2)}

        def shutdown(self, wait, cancel_futures):
            log.append(("shutdown", wait, cancel_futures))
            raise RuntimeError("broken pool")

    ex._kill_pool(Pool())
    assert log == [("kill", 1), ("kill", 2), ("shutdown", False, True),
                   ("join", 1, 5), ("join", 2, 5)]


# -- ResultStore ------------------------------------------------------------------------
def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_store_opening_writes_nothing(tmp_path):
    p = tmp_path / "sub" / "r.jsonl"
    s = ResultStore(p)
    assert len(s) == 0 and not p.exists() and not p.parent.exists()
    s.add("a", 1)
    assert _lines(p) == [{"key": "a", "result": 1}]


def test_store_round_trip_and_last_record_wins(tmp_path):
    p = tmp_path / "r.jsonl"
    s = ResultStore(p)
    s.add("a", {"x": 1.5})
    s.add("b", [1, 2])
    s.add("a", {"x": 2.5})
    assert len(s) == 2 and "a" in s and "c" not in s
    t = ResultStore(p)
    assert t.get("a") == {"x": 2.5} and t.get("b") == [1, 2] and t.get("c", "dflt") == "dflt"
    assert dict(t.items()) == {"a": {"x": 2.5}, "b": [1, 2]}
    assert [r["key"] for r in _lines(p)] == ["a", "b", "a"]      # append only


def test_store_keys_are_strings_and_nan_survives(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"key": 7, "result": NaN}\n\n   \n{"key": "b", "result": Infinity}\n')
    s = ResultStore(p)
    assert "7" in s and s.get("7") != s.get("7") and s.get("b") == float("inf")


def test_store_torn_last_line_is_dropped_and_cut_before_the_next_record(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"key": "a", "result": 1}\n{"key": "b", "res')   # killed mid-write
    s = ResultStore(p)
    assert dict(s.items()) == {"a": 1}
    assert p.read_text().endswith('"res')                        # opening repairs nothing
    s.add("c", 3)
    assert _lines(p) == [{"key": "a", "result": 1}, {"key": "c", "result": 3}]
    assert not p.with_suffix(".jsonl.tmp").exists()


def test_store_torn_line_with_trailing_newline_is_also_the_tail(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"key": "a", "result": 1}\n{"key": "b"\n')
    assert dict(ResultStore(p).items()) == {"a": 1}


def test_store_damage_before_the_tail_is_refused_with_its_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"key": "a", "result": 1}\nnot json\n{"key": "b", "result": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultStore(p)
    p.write_text('{"key": "a", "result": 1}\n{"key": "b"}\n{"key": "c", "result": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a result record"):
        ResultStore(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="line 1 is not a result record"):
        ResultStore(p)
    p.write_text('{"result": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a result record"):
        ResultStore(p)


def test_store_fresh_ignores_the_file_and_replaces_it_at_the_first_add(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"key": "old", "result": 1}\n')
    s = ResultStore(p, fresh=True)
    assert len(s) == 0 and p.read_text() == '{"key": "old", "result": 1}\n'
    s.add("new", 2)
    s.add("newer", 3)
    assert _lines(p) == [{"key": "new", "result": 2}, {"key": "newer", "result": 3}]
    # fresh on a missing file: nothing to replace
    q = tmp_path / "q.jsonl"
    s = ResultStore(q, fresh=True)
    s.add("x", 1)
    assert _lines(q) == [{"key": "x", "result": 1}]


def test_store_rewrite_puts_order_first_then_the_rest(tmp_path):
    p = tmp_path / "r.jsonl"
    s = ResultStore(p)
    for k in ["c", "x", "a", "b", "c"]:
        s.add(k, k.upper())
    s.rewrite(["a", "missing", "b", "c"])
    assert [(r["key"], r["result"]) for r in _lines(p)] == [
        ("a", "A"), ("b", "B"), ("c", "C"), ("x", "X")]


def test_store_discard_forgets_and_the_new_record_supersedes(tmp_path):
    p = tmp_path / "r.jsonl"
    s = ResultStore(p)
    s.add("a", 1)
    s.discard("a")
    s.discard("never")                      # no error
    assert "a" not in s and len(s) == 0
    s.add("a", 2)
    assert ResultStore(p).get("a") == 2


def test_store_run_computes_only_what_is_missing(tmp_path):
    calls = []

    def fn(x):
        calls.append(x)
        return x * 10

    p = tmp_path / "r.jsonl"
    s = ResultStore(p)
    s.add("k1", 999)                        # stored: not recomputed, its value kept
    progress = []
    out = s.run(SerialExecutor(), fn, [("k0", 0), ("k1", 1), ("k2", 2)], progress.append)
    assert calls == [0, 2] and progress == ["k0", "k2"]
    assert out == {"k0": 0, "k1": 999, "k2": 20} and list(out) == ["k0", "k1", "k2"]
    calls.clear()
    again = ResultStore(p).run(SerialExecutor(), fn, [("k2", 2), ("k0", 0)])
    assert calls == [] and again == {"k2": 20, "k0": 0}


def test_store_run_refuses_duplicate_keys(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        ResultStore(tmp_path / "r.jsonl").run(SerialExecutor(), _double, [("a", 1), ("a", 2)])


def test_store_run_closes_the_stream_when_interrupted(tmp_path):
    closed = []

    class Exe:
        def map(self, fn, tasks):
            def gen():
                try:
                    for k, p in tasks:
                        yield k, fn(p)
                finally:
                    closed.append(True)
            return gen()

    def boom(key):
        if key == "b":
            raise KeyboardInterrupt

    s = ResultStore(tmp_path / "r.jsonl")
    with pytest.raises(KeyboardInterrupt):
        s.run(Exe(), _double, [("a", 1), ("b", 2), ("c", 3)], progress=boom)
    assert closed == [True] and dict(s.items()) == {"a": 2, "b": 4}
