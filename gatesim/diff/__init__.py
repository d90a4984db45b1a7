"""Checkpoint diff: the papers' per-matrix measurements for a real base/tuned pair.

::

    import gatesim.diff
    res = gatesim.diff("Qwen2.5-Math-1.5B", "Qwen2.5-Math-1.5B-RL", out="diff_out")
    res.rows            # pandas DataFrame, one row per tensor (gatesim.diff.COLUMNS)
    res.summary["module"], res.summary["layer"], res.summary["model"]

or ``gatesim diff BASE TUNED --out DIR`` on the command line. The package module itself is
callable (``gatesim.diff(...)`` is :func:`gatesim.diff.core.diff`).

* :mod:`~gatesim.diff.io`: safe reading (validated safetensors headers and indexes,
  ``torch.load(weights_only=True, mmap=True)`` for ``.bin``), one tensor at a time;
* :mod:`~gatesim.diff.names`: layer index and module kind from a name; the prefix map;
* :mod:`~gatesim.diff.scan`: the one-pass bitwise count and gather;
* :mod:`~gatesim.diff.gram` (home: :mod:`gatesim.metrics.gram`): exact top-k singular vectors and all singular values;
* :mod:`~gatesim.diff.matrix`: the spectral and mask metrics of one matrix pair;
* :mod:`~gatesim.diff.core`: the per-tensor pure function and the driver;
* :mod:`~gatesim.diff.resume`: the output folder: run identity, resume checks;
* :mod:`~gatesim.diff.report`: summaries, figures, Markdown;
* :mod:`~gatesim.diff.errors`: the documented exceptions;
* :mod:`~gatesim.diff.cli`: ``gatesim diff`` (:func:`~gatesim.diff.cli.add_diff_parser`);
* :mod:`~gatesim.diff.synthetic`: generated checkpoints for tests and the benchmark.
"""
import sys as _sys
import types as _types

from gatesim.diff.core import (COLUMNS, DiffOptions, DiffResult, TensorTask, default_k, diff,
                               diff_tensor, pair_tensors)
from gatesim.diff.errors import (CheckpointError, CheckpointNotFoundError, DiffError,
                                 HeaderError, IndexFormatError, MissingShardError,
                                 NameMapError, ResumeError, TruncatedFileError,
                                 UnsafePathError, UnsupportedFormatError)
from gatesim.diff.io import (Checkpoint, TensorRef, open_checkpoint, read_safetensors_header,
                             read_tensor)
from gatesim.diff.names import KINDS, NameInfo, apply_map, parse_map, parse_name

__all__ = [
    "diff", "diff_tensor", "DiffOptions", "DiffResult", "TensorTask", "COLUMNS", "default_k",
    "pair_tensors", "open_checkpoint", "read_tensor", "read_safetensors_header", "Checkpoint",
    "TensorRef", "parse_name", "parse_map", "apply_map", "NameInfo", "KINDS",
    "DiffError", "CheckpointError", "CheckpointNotFoundError", "UnsafePathError",
    "MissingShardError", "IndexFormatError", "HeaderError", "TruncatedFileError",
    "UnsupportedFormatError", "NameMapError", "ResumeError",
]


class _CallableModule(_types.ModuleType):
    """Makes ``gatesim.diff(base, tuned, ...)`` call :func:`gatesim.diff.core.diff`."""

    def __call__(self, *args, **kwargs):
        return diff(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
