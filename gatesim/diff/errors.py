"""Exceptions of :mod:`gatesim.diff`: every one names the file (and tensor) it is about.

Hierarchy::

    DiffError
    +-- CheckpointError            an input checkpoint cannot be trusted or read
    |   +-- CheckpointNotFoundError    path missing, or a folder without weights
    |   +-- UnsafePathError            an index shard name or symlink leaves the folder
    |   +-- MissingShardError          the index names a shard that is not there
    |   +-- IndexFormatError           the index JSON is malformed or disagrees with a shard
    |   +-- HeaderError                a safetensors header is malformed, huge, or lies
    |   +-- TruncatedFileError         a file is shorter than its header says
    |   +-- UnsupportedFormatError     a pickle that weights_only refuses, a legacy .bin, ...
    +-- NameMapError               a prefix map is malformed or makes two names collide
    +-- ResumeError                the output folder holds a different run

All input checks run before anything is written, so a hostile or broken checkpoint leaves
no output behind; a file that changes while a run reads it (a short read) raises
:class:`TruncatedFileError` for that tensor, and no row is written for it.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["DiffError", "CheckpointError", "CheckpointNotFoundError", "UnsafePathError",
           "MissingShardError", "IndexFormatError", "HeaderError", "TruncatedFileError",
           "UnsupportedFormatError", "NameMapError", "ResumeError"]


class DiffError(Exception):
    """Base class of every error :mod:`gatesim.diff` raises on purpose."""


class CheckpointError(DiffError):
    """A checkpoint cannot be trusted or read.

    Attributes:
        path: the file or folder concerned (str), or None.
        tensor: the tensor concerned, or None.
    """

    def __init__(self, message: str, *, path: Optional[str] = None,
                 tensor: Optional[str] = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist, or the folder holds no recognised weight files."""


class UnsafePathError(CheckpointError):
    """A shard name in an index is absolute or contains ``..``, or a shard (symlink) resolves
    to a place outside the checkpoint folder."""


class MissingShardError(CheckpointError):
    """The index names a shard file that does not exist (or is not a regular file)."""


class IndexFormatError(CheckpointError):
    """The index JSON is malformed, too large, or names a tensor its shard does not hold;
    or two shards of an index-less folder hold the same tensor."""


class HeaderError(CheckpointError):
    """A safetensors header is malformed: an impossible or huge length, not JSON, an
    unknown dtype, a shape that does not match its byte range, overlapping ranges, bytes
    that belong to no tensor."""


class TruncatedFileError(CheckpointError):
    """A file is shorter than its header (or the format) says it must be, or a read came
    back short."""


class UnsupportedFormatError(CheckpointError):
    """A file that cannot be read safely: a pickle ``torch.load(weights_only=True)``
    refuses, a legacy (non-zip) ``.bin`` that cannot be memory-mapped, an unknown
    extension."""


class NameMapError(DiffError, ValueError):
    """A prefix-map rule is malformed, or applying the map makes two tensors of one side
    share a name."""


class ResumeError(DiffError):
    """The output folder holds rows of a run with other inputs or settings."""
