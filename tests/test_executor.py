"""gatesim.executor: per-task thread limits (torch and numba) and their restoration."""
import numba
import torch

from gatesim.executor import SerialExecutor


def _threads(_payload):
    return torch.get_num_threads(), numba.get_num_threads()


def test_tasks_run_with_the_thread_limit_in_torch_and_numba():
    before = (torch.get_num_threads(), numba.get_num_threads())
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        got = dict(SerialExecutor(threads=1).map(_threads, [("a", None), ("b", None)]))
        assert got == {"a": (1, 1), "b": (1, 1)}
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # restored
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
