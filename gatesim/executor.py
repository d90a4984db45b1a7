"""Run pure per-item work (gate-simulation cells, checkpoint-diff tensors) and keep results.

Two small pieces shared by :mod:`gatesim.sim` and :mod:`gatesim.diff`:

* An **executor** maps a module-level function over ``(key, payload)`` tasks and yields
  ``(key, result)`` as each finishes. :class:`SerialExecutor` runs in this process;
  :class:`ProcessExecutor` (the default with ``workers > 1``) uses a local process pool.
  :class:`~gatesim.ray_executor.RayExecutor` (``gatesim.executor.RayExecutor``, imported
  on first use) runs each task as one Ray task on a cluster. Anything with the same ``map``
  method can be passed instead: the work is a pure function of its payload, so where it
  runs does not matter. :func:`add_executor_args` / :func:`executor_from_args` give every
  command the same ``--executor`` option.
* A :class:`ResultStore` appends each finished result to a JSON-lines file at once
  (flushed and fsynced), and on a rerun reports which keys are done so they are skipped.
  A killed run loses at most the items in flight; a torn last line is ignored. Opening a
  store writes nothing, so callers can validate everything first.

A :class:`ProcessExecutor`'s workers die with the process that started them (``kill -9``
included) and a Ctrl-C stops them at once (see its docstring); :func:`make_executor`
checks ``workers`` and ``threads`` before anything runs.

Determinism: every task runs with ``threads`` threads (default 1) in torch and in numba's
parallel loops, so a result has the same bits whatever the number of workers, and a pool
of workers does not oversubscribe the cores.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, Tuple, Union

from gatesim.checks import check_int

__all__ = ["Executor", "SerialExecutor", "ProcessExecutor", "RayExecutor", "make_executor",
           "ResultStore", "TasksFailed", "show_status", "add_executor_args",
           "executor_from_args"]

Task = Tuple[str, Any]


class Executor(Protocol):
    """What :mod:`gatesim.sim` and :mod:`gatesim.diff` need from an execution engine."""

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Task]) -> Iterator[Tuple[str, Any]]:
        """Yields ``(key, fn(payload))`` for every task, in any order."""
        ...


class TasksFailed(RuntimeError):
    """Some tasks raised; the others finished (and were stored). ``failures`` holds
    ``(key, "Type: message")`` pairs, ``total`` the number of tasks run; the message lists
    the failures, so a command line can print it as its final summary."""

    def __init__(self, failures: Sequence[Tuple[str, str]], total: int):
        self.failures = list(failures)
        self.total = total
        shown = "".join(f"\n  {k}: {e}" for k, e in self.failures[:20])
        more = f"\n  ... and {len(self.failures) - 20} more" if len(self.failures) > 20 else ""
        super().__init__(f"{len(self.failures)} of {total} tasks failed (the others are "
                         f"stored; rerunning retries only the failed ones):{shown}{more}")


def show_status(executor: Any, bar: Any) -> None:
    """Puts an executor's running / failed counts on a tqdm ``bar`` (whose count is the
    finished units), for executors that report them (``on_status``, e.g. RayExecutor)."""
    if bar is not None and hasattr(executor, "on_status"):
        executor.on_status = lambda running, failed: bar.set_postfix(
            running=running, failed=failed)


def __getattr__(name: str):
    if name == "RayExecutor":       # imported on first use: ray is heavy
        from gatesim.ray_executor import RayExecutor
        return RayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_task(fn: Callable[[Any], Any], payload: Any, threads: int) -> Any:
    """Runs one task with ``threads`` threads in torch and in numba's parallel loops (the
    metrics' counting kernels): without the numba limit every worker of a process pool
    would start one numba thread per core and the workers would oversubscribe the CPU."""
    import numba
    import torch
    old, old_nb = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return fn(payload)
    finally:
        torch.set_num_threads(old)
        numba.set_num_threads(old_nb)


class SerialExecutor:
    """Runs the tasks one after the other in this process."""

    def __init__(self, threads: int = 1):
        self.threads = check_int(threads, "threads", lo=1)

    def map(self, fn, tasks):
        for key, payload in tasks:
            yield key, _run_task(fn, payload, self.threads)


class ProcessExecutor:
    """A local process pool (``spawn`` start method: safe with torch's thread pools).

    At most ``2 * workers`` tasks are submitted at a time, so a long sweep does not queue
    (and pickle) everything up front. An exception in a task is raised here, after the
    results that finished before it were yielded (and so stored).

    **Lifetime.** Workers never outlive this process: each asks the kernel for SIGKILL
    when its parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux) and also watches its parent
    pid from a thread (every 0.2 s; the fallback elsewhere), so a ``kill -9`` of the parent
    takes the workers (and with them multiprocessing's resource tracker, which exits when
    the last holder of its pipe is gone) down within a second. Workers ignore SIGINT: a
    Ctrl-C reaches the parent only, which then kills the workers, cancels what was queued
    and re-raises ``KeyboardInterrupt`` at once (results already yielded stay stored).
    The same happens when the caller stops iterating early or raises. (Workers are
    started by the thread that iterates, and the parent-death signal follows that thread:
    iterate from a thread that outlives the iteration, as every gatesim command does.)
    """

    def __init__(self, workers: int, threads: int = 1):
        self.workers = check_int(workers, "workers", lo=1)
        self.threads = check_int(threads, "threads", lo=1)

    def map(self, fn, tasks):
        tasks = list(tasks)
        if not tasks:
            return
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            yield from self._drive(pool, fn, tasks)
        except BaseException:     # Ctrl-C, the caller stopped iterating, an error
            _kill_pool(pool)
            raise
        pool.shutdown(wait=True)

    def _drive(self, pool, fn, tasks):
        pending = {}
        it = iter(tasks)
        error = None

        def submit_next() -> bool:
            try:
                key, payload = next(it)
            except StopIteration:
                return False
            pending[pool.submit(_run_task, fn, payload, self.threads)] = key
            return True

        for _ in range(2 * self.workers):
            if not submit_next():
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                key = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    error = error or exc
                    continue
                yield key, fut.result()
                if error is None:
                    submit_next()
        if error is not None:
            raise error


_PR_SET_PDEATHSIG = 1
_WATCH_SECONDS = 0.2


def _worker_init(parent_pid: int) -> None:
    """First thing a pool worker runs: die with the parent, leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass                  # the watchdog below still holds
    if os.getppid() != parent_pid:    # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="gatesim-parent-watch",
                     daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCH_SECONDS)
        if os.getppid() != parent_pid:   # re-parented: the parent is gone
            os._exit(1)


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Kills the pool's workers now (no waiting for running tasks), cancels the queue."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        pool.shutdown(wait=False, cancel_futures=True)
    except Exception:   # noqa: BLE001 - a broken pool: the workers are dead anyway
        pass
    for p in procs:
        try:
            p.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass


def make_executor(workers: Optional[int] = None, threads: int = 1,
                  spec: Optional[str] = None) -> Executor:
    """``workers`` None or 1: serial; more: a local process pool (0: one per core). Both
    numbers are checked here (before a caller writes anything).

    ``spec`` (the ``--executor`` option): None or ``"local"`` as above; ``"ray"``: a
    :class:`RayExecutor` on the cluster of ``RAY_ADDRESS``, else on a local Ray instance
    with ``workers`` CPUs (None/0: all cores); ``"ray://HOST:PORT"`` or ``"ray:HOST:PORT"``:
    that cluster (Ray Client / GCS address)."""
    threads = check_int(threads, "threads", lo=1)
    if workers is not None:
        workers = check_int(workers, "workers", lo=0)
    if spec not in (None, "local"):
        if not isinstance(spec, str) or not (spec == "ray" or spec.startswith("ray:")):
            raise ValueError(f"executor must be 'local', 'ray', 'ray://HOST:PORT' or "
                             f"'ray:HOST:PORT', got {spec!r}")
        from gatesim.ray_executor import RayExecutor
        address = None if spec == "ray" else (spec if spec.startswith("ray://") else spec[4:])
        return RayExecutor(address, threads=threads, local_cpus=workers or None)
    if workers is None or workers == 1:
        return SerialExecutor(threads)
    if workers == 0:
        workers = max(1, (os.cpu_count() or 1) // threads)
    return ProcessExecutor(workers, threads)


def add_executor_args(parser: Any) -> None:
    """Adds ``--executor`` to an argparse parser (``--workers`` / ``--threads`` stay the
    command's own); read it back with :func:`executor_from_args`."""
    parser.add_argument(
        "--executor", default="local", metavar="SPEC",
        help="where tasks run: local (default: serial or a process pool of --workers), "
             "ray (the Ray cluster of RAY_ADDRESS, else a local Ray instance with "
             "--workers CPUs), ray://HOST:PORT (a cluster's Ray Client server) or "
             "ray:HOST:PORT (a cluster's GCS address)")


def executor_from_args(args: Any) -> Executor:
    """The executor an ``argparse`` namespace asks for (``executor``, ``workers`` and,
    where present, ``threads``). Close it (``close()``, where it has one) when done."""
    return make_executor(getattr(args, "workers", None), getattr(args, "threads", 1),
                         getattr(args, "executor", None))


class ResultStore:
    """Append-only JSON-lines store of finished results: one ``{"key": ..., "result": ...}``
    per line, written and fsynced as soon as the result exists.

    Opening a store only reads (nothing is created or repaired until the first
    :meth:`add`, so a command can open it, validate, and still leave nothing behind when
    it refuses). Loading skips a torn last line (a run killed mid-write; the file is cut
    back to whole lines before the next record is appended) and keeps the last record of
    a key written twice. ``fresh=True`` ignores what the file holds (it is replaced at the
    first :meth:`add`). Results must be JSON-serializable.
    """

    def __init__(self, path: Union[str, os.PathLike], *, fresh: bool = False):
        self.path = Path(path)
        self._results: dict[str, Any] = {}
        self._rewrite_first = fresh and self.path.exists()
        if self.path.exists() and not fresh:
            self._load()

    def _load(self) -> None:
        with open(self.path, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # the torn last line of a killed run
                    self._rewrite_first = True
                    continue
                raise ValueError(f"{self.path}: line {i + 1} is not JSON; the result store "
                                 "is damaged (delete it to start over)") from None
            if not isinstance(rec, dict) or "key" not in rec or "result" not in rec:
                raise ValueError(f"{self.path}: line {i + 1} is not a result record")
            self._results[str(rec["key"])] = rec["result"]

    def _write_all(self, keys) -> None:
        """Replaces the file (atomically) by the records of ``keys``, in that order."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"key": k, "result": self._results[k]}, allow_nan=True)
                       + "\n" for k in keys)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._rewrite_first = False

    def rewrite(self, order: Sequence[str]) -> None:
        """Rewrites the file with one record per stored key, keys of ``order`` first in
        that order, then the rest: a store filled in completion order (a process pool, a
        resumed run) becomes the same bytes as one filled in order."""
        seen = set(order)
        keys = [k for k in order if k in self._results]
        keys += [k for k in self._results if k not in seen]
        self._write_all(keys)

    def __contains__(self, key: str) -> bool:
        return key in self._results

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: str, default: Any = None) -> Any:
        return self._results.get(key, default)

    def items(self) -> Iterable[Tuple[str, Any]]:
        return self._results.items()

    def discard(self, key: str) -> None:
        """Forgets a stored result (it is run again; the new record supersedes the old)."""
        self._results.pop(key, None)

    def add(self, key: str, result: Any) -> None:
        line = json.dumps({"key": key, "result": result}, allow_nan=True)
        if self._rewrite_first:     # a torn tail (or a fresh start) would glue onto this
            self._write_all(list(self._results))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._results[key] = result

    def run(self, executor: Executor, fn: Callable[[Any], Any], tasks: Sequence[Task],
            progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
        """Runs the tasks whose keys are not stored yet, storing each result as it comes.
        Returns every stored result of the given tasks, keyed."""
        keys = [k for k, _ in tasks]
        if len(set(keys)) != len(keys):
            raise ValueError("task keys must be unique")
        todo = [(k, p) for k, p in tasks if k not in self._results]
        stream = executor.map(fn, todo)
        try:
            for key, result in stream:
                self.add(key, result)
                if progress is not None:
                    progress(key)
        finally:
            if hasattr(stream, "close"):   # interrupted: the executor stops its workers now
                stream.close()
        return {k: self._results[k] for k in keys}
