"""Run gatesim's units of work (sweep cells, checkpoint-diff tensor pairs) on a Ray cluster.

:class:`RayExecutor` is an executor of :mod:`gatesim.executor`: ``map(fn, tasks)`` yields
``(key, fn(payload))`` as tasks finish, and the caller (:class:`gatesim.executor.ResultStore`
on the driver) appends and fsyncs each result at once, exactly as with the local process
pool. Every task is a pure function of its payload run with ``threads`` threads
(:func:`gatesim.executor._run_task`), so a result has the same bits on Ray as serially.

* **One Ray task per unit**, with a declared resource request: ``threads`` CPUs, and
  whatever the payload declares through a ``resources()`` method (a diff tensor pair
  declares its memory from the tensor's size: :meth:`gatesim.diff.core.TensorTask.resources`).
  A request that no node of the cluster can satisfy fails that unit at once with the
  numbers, instead of waiting forever as an infeasible Ray task.
* **Data stays where it is**: payloads carry paths and byte ranges (diff pairs) or configs
  and output paths (cells); nothing large goes through the object store. A payload with a
  ``paths()`` method has those paths checked on every node before anything runs, so a
  worker that cannot see a checkpoint is reported by node and path
  (:class:`WorkerPathError`); every node must mount inputs and outputs at the same paths.
* **Faults**: a worker process that dies mid-task is retried by Ray (``max_retries``);
  the retry computes the same bits. A task that raises is not retried (the work is
  deterministic, it would raise again): the other tasks go on and, after the last one,
  :class:`gatesim.executor.TasksFailed` lists every failed key with its error. Ctrl-C (or
  the consumer abandoning the iterator) cancels the queued and running tasks.
* **Progress**: :func:`gatesim.executor.show_status` puts running / failed counts on the
  caller's progress bar (finished units are the bar's count).

Connecting: ``address=None`` uses a Ray already initialized in this process, else the
cluster named by ``RAY_ADDRESS``, else starts a local instance with ``local_cpus`` CPUs
(shut down by :meth:`RayExecutor.close`). ``"auto"`` / ``"HOST:PORT"`` connect to a running
cluster's GCS; ``"ray://HOST:PORT"`` goes through the Ray Client server.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

from gatesim.executor import TasksFailed, _run_task

__all__ = ["RayExecutor", "WorkerPathError"]


class WorkerPathError(FileNotFoundError):
    """A Ray worker cannot see a file or folder that the driver named (no shared filesystem,
    or one mounted at another path on that node)."""


_SHARED_FS = ("gatesim on Ray passes paths, not data: checkpoints, configs and output folders "
              "must be on a filesystem that every Ray node mounts at the same path")


def _node() -> str:
    try:
        import ray
        ip = ray.util.get_node_ip_address()
    except Exception:   # noqa: BLE001 - only for the message
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


def _ray_task(fn: Callable[[Any], Any], payload: Any, threads: int) -> Any:
    """What one Ray task runs: the executor's task with the thread limit. A failure with
    one of the payload's ``paths()`` missing here, or a missing file, is reported with the
    node it is missing on."""
    try:
        return _run_task(fn, payload, threads)
    except Exception as exc:
        if isinstance(exc, WorkerPathError):
            raise
        missing = [p for p in (payload.paths() if hasattr(payload, "paths") else ())
                   if not os.path.exists(p)]
        if missing:
            raise WorkerPathError(f"on Ray node {_node()}: cannot see {', '.join(missing)}; "
                                  f"{_SHARED_FS}") from exc
        if isinstance(exc, FileNotFoundError):
            raise WorkerPathError(f"on Ray node {_node()}: {exc}; {_SHARED_FS}") from exc
        raise


def _probe(paths: Sequence[str]) -> Tuple[str, list, str]:
    """Runs on one node: its name, the paths it cannot see, its gatesim version."""
    from gatesim._version import __version__
    return _node(), [p for p in paths if not os.path.exists(p)], __version__


def _fmt_bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


class RayExecutor:
    """Runs each task as one Ray task (module docstring).

    Args:
        address: None (an initialized Ray, else ``RAY_ADDRESS``, else a local instance),
            ``"auto"``, ``"HOST:PORT"`` (a cluster's GCS) or ``"ray://HOST:PORT"`` (Ray
            Client).
        threads: CPUs requested by, and torch/numba threads used in, every task.
        max_retries: how often Ray reruns a task whose worker process died (killed, OOM,
            node lost). Exceptions raised by the task itself are never retried.
        max_in_flight: tasks submitted at a time (default: twice the task slots of the
            cluster); the rest wait on the driver, so Ctrl-C has little to cancel and a
            long sweep pickles nothing up front.
        local_cpus: CPUs of a local instance started here (default: all cores).
        object_store_memory: bytes of a local instance's object store (default 200 MB:
            only small results travel through it).
        init_kwargs: more keyword arguments for ``ray.init``.
        check_paths: check the payloads' ``paths()`` on every node before running.
    """

    def __init__(self, address: Optional[str] = None, *, threads: int = 1,
                 max_retries: int = 3, max_in_flight: Optional[int] = None,
                 local_cpus: Optional[int] = None,
                 object_store_memory: Optional[int] = 200 * 2 ** 20,
                 init_kwargs: Optional[dict] = None, check_paths: bool = True):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if max_in_flight is not None and (not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if local_cpus is not None and (not isinstance(local_cpus, int) or local_cpus < 1):
            raise ValueError(f"local_cpus must be an int >= 1, got {local_cpus!r}")
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"address must be None or a non-empty string, got {address!r}")
        self.address = address
        self.threads = threads
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.local_cpus = local_cpus
        self.object_store_memory = object_store_memory
        self.init_kwargs = dict(init_kwargs or {})
        self.check_paths = check_paths
        #: called with (running, failed) as tasks start and end (see gatesim.executor.show_status)
        self.on_status: Optional[Callable[[int, int], None]] = None
        self._owns_ray = False
        self._remote = None
        self._probe_remote = None

    # -------------------------------------------------------------------- connection
    def _ray(self):
        try:
            import ray
        except ImportError as exc:   # pragma: no cover - ray is in requirements.txt
            raise ImportError("RayExecutor needs the 'ray' package (pip install -r "
                              "requirements.txt)") from exc
        return ray

    def connect(self) -> "RayExecutor":
        """Connects to (or starts) Ray now; :meth:`map` does it on first use."""
        ray = self._ray()
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            kw = dict(include_dashboard=False, log_to_driver=False)
            kw.update(self.init_kwargs)
            if address is None:
                kw.setdefault("num_cpus", self.local_cpus or os.cpu_count() or 1)
                if self.object_store_memory is not None:
                    kw.setdefault("object_store_memory", self.object_store_memory)
                self._owns_ray = True
            else:
                kw.pop("include_dashboard", None)
            try:
                # "local": a new instance, never one that `ray start` left on this machine
                ray.init(address=address or "local", **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                self._owns_ray = False
                raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: "
                                      f"{exc}") from exc
        if self._remote is None:
            self._remote = ray.remote(_ray_task)
            self._probe_remote = ray.remote(_probe)
        return self

    def close(self) -> None:
        """Shuts down the local Ray instance this executor started (a cluster it connected
        to keeps running)."""
        if self._owns_ray:
            ray = self._ray()
            if ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False
        self._remote = self._probe_remote = None

    def __enter__(self) -> "RayExecutor":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- resources
    def _nodes(self) -> list:
        return [n for n in self._ray().nodes() if n.get("Alive")]

    def _request(self, payload: Any) -> dict:
        """Ray task options: CPUs = threads, plus what the payload declares."""
        opts = {"num_cpus": self.threads}
        declared = payload.resources() if hasattr(payload, "resources") else {}
        if declared.get("memory"):
            opts["memory"] = int(declared["memory"])
        if declared.get("gpus"):
            opts["num_gpus"] = declared["gpus"]
        return opts

    @staticmethod
    def _infeasible(opts: dict, nodes: list) -> Optional[str]:
        """Why no node can run a task with these options (None: some node can)."""
        need = {"CPU": opts.get("num_cpus", 0), "memory": opts.get("memory", 0),
                "GPU": opts.get("num_gpus", 0)}
        if any(all(n["Resources"].get(r, 0) >= v for r, v in need.items() if v)
               for n in nodes):
            return None
        best = {r: max((n["Resources"].get(r, 0) for n in nodes), default=0) for r in need}
        short = [r for r, v in need.items() if v > best[r]]   # else: no single node has all
        parts = []
        for r, v in need.items():
            if v and (r in short or not short):
                show = _fmt_bytes if r == "memory" else (lambda x: f"{x:g}")
                parts.append(f"{r} {show(v)} (largest node: {show(best[r])})")
        return "no node of the Ray cluster offers " + ", ".join(parts)

    def _check_paths(self, tasks: Sequence[Tuple[str, Any]]) -> None:
        paths = sorted({str(p) for _, pl in tasks if hasattr(pl, "paths") for p in pl.paths()})
        if not paths:
            return
        ray = self._ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        refs = [self._probe_remote.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                        n["NodeID"], soft=False)).remote(paths)
                for n in self._nodes()]
        from gatesim._version import __version__
        problems = []
        for node, missing, version in ray.get(refs):
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problems.append(f"Ray node {node} cannot see {', '.join(missing[:3])}{more}")
            if version != __version__:
                problems.append(f"Ray node {node} runs gatesim {version}, the driver "
                                f"{__version__}")
        if problems:
            raise WorkerPathError("; ".join(problems) + f". {_SHARED_FS}, and have the same "
                                  "gatesim installed.")

    def _slots(self, nodes: list) -> int:
        return max(1, int(sum(n["Resources"].get("CPU", 0) for n in nodes) // self.threads))

    # -------------------------------------------------------------------- map
    def map(self, fn: Callable[[Any], Any], tasks) -> Iterator[Tuple[str, Any]]:
        """Yields ``(key, fn(payload))`` as the tasks finish (any order); raises
        :class:`~gatesim.executor.TasksFailed` after the last one if any failed."""
        tasks = list(tasks)
        if not tasks:
            return
        self.connect()
        ray = self._ray()
        if self.check_paths:
            self._check_paths(tasks)
        nodes = self._nodes()
        slots = self._slots(nodes)
        window = self.max_in_flight or 2 * slots
        failures: list = []
        pending: dict = {}      # ObjectRef -> key
        it = iter(tasks)

        def status() -> None:
            if self.on_status is not None:
                self.on_status(min(len(pending), slots), len(failures))

        def submit_next() -> bool:
            for key, payload in it:
                opts = self._request(payload)
                why = self._infeasible(opts, nodes)
                if why is not None:
                    failures.append((key, f"ResourceError: {why}"))
                    status()
                    continue
                ref = self._remote.options(max_retries=self.max_retries,
                                           retry_exceptions=False, **opts
                                           ).remote(fn, payload, self.threads)
                pending[ref] = key
                return True
            return False

        try:
            while len(pending) < window and submit_next():
                pass
            status()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    key = pending.pop(ref)
                    try:
                        value = ray.get(ref)
                    except Exception as exc:   # noqa: BLE001 - reported per key below
                        failures.append((key, _describe(exc)))
                        submit_next()
                        status()
                        continue
                    submit_next()
                    status()
                    yield key, value
        finally:
            # Ctrl-C, an error on the driver or a consumer that stopped early: nothing of
            # this map keeps running on the cluster
            for ref in list(pending):
                try:
                    ray.cancel(ref, force=True)
                except Exception:   # noqa: BLE001 - already finished or gone
                    pass
            pending.clear()
        if failures:
            order = {key: i for i, (key, _) in enumerate(tasks)}
            raise TasksFailed(sorted(failures, key=lambda f: order[f[0]]), len(tasks))


def _describe(exc: BaseException) -> str:
    """``Type: message`` of what a Ray task raised (the cause, without Ray's traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}" + (
        f" (+{len(text) - 1} lines)" if len(text) > 1 else "")
