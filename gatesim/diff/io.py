"""Reading checkpoints safely, one tensor at a time.

:func:`open_checkpoint` finds and validates every weight file of a checkpoint *before*
anything is computed or written, and returns a :class:`Checkpoint`: a name -> :class:`TensorRef`
table (file, dtype, shape, byte range). :func:`read_tensor` then reads one tensor.

**What is accepted** (``path`` may be a folder or a file):

* a Hugging Face folder with ``model.safetensors.index.json`` and its shards, or with
  ``model.safetensors``, or with other ``*.safetensors`` files (all of them, no index);
* failing those, ``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``, or
  ``pytorch_model*.bin``: read only with ``torch.load(weights_only=True, mmap=True)``
  (legacy non-zip ``.bin`` files, which cannot be memory-mapped, are refused);
* a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, or an index ``.json``.

**Validation of a safetensors file** (the header is never trusted as it stands): the file
holds at least 8 bytes; the little-endian u64 header length is at most
:data:`MAX_HEADER_BYTES` (100 MiB) and fits in the file; the header is UTF-8 JSON (no
duplicate keys, no NaN literals), an object whose optional ``__metadata__`` maps strings to
strings and whose every other entry has a known ``dtype`` (:data:`SAFETENSORS_DTYPES`), a
``shape`` of non-negative ints and ``data_offsets`` ``[begin, end]`` with
``end - begin = numel * itemsize``; no range ends past the end of the file
(:class:`~gatesim.diff.errors.TruncatedFileError`); sorted by ``begin``, the ranges tile the
data area exactly, with no overlap, gap or trailing bytes (the rule of the safetensors
library itself). The file must then also open with ``safetensors.safe_open``.

**Validation of an index**: at most :data:`MAX_INDEX_BYTES`, JSON, ``weight_map`` an object
of strings; every shard name is relative, without ``..`` components, backslashes or NUL
(:class:`~gatesim.diff.errors.UnsafePathError`), exists
(:class:`~gatesim.diff.errors.MissingShardError`) and resolves (symlinks followed) to a
regular file inside the checkpoint folder; the one exception is the Hugging Face hub cache,
whose ``snapshots/<revision>/`` files are symlinks into the repository's ``blobs/`` folder,
which is then allowed too. Every tensor the index names must be in its shard's header.
Files found in an index-less folder obey the same containment rule.

**Reading** (:func:`read_tensor`): a safetensors tensor is memory-mapped on its own,
exactly its validated byte range (private, copy-on-write, so nothing can write to the
file), with ``MADV_WILLNEED`` read-ahead, and handed on zero-copy; the mapping goes away
when the tensor is freed. The resident memory of reading is therefore the two tensors being
compared, whatever the checkpoint size, and nothing outside the validated ranges is touched.
(``safe_open`` maps the whole file, and the pages touched stay resident until the handle
is closed: measured, the resident set grew by the size of every tensor read.) The file
size is checked with ``fstat`` just before mapping (a file truncated since validation raises
:class:`~gatesim.diff.errors.TruncatedFileError` naming file and tensor); a file truncated
*while* its tensor is being read can still end the process with ``SIGBUS``, as with any
memory map (``method="pread"`` copies instead and turns that into the same error). A
``.bin`` tensor comes from ``torch.load(..., mmap=True)`` the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import mmap
import os
import re
import struct
from typing import Optional, Union

import numpy as np
import torch

from gatesim.checks import strict_json_loads
from gatesim.diff.errors import (CheckpointNotFoundError, HeaderError, IndexFormatError,
                                 MissingShardError, TruncatedFileError, UnsafePathError,
                                 UnsupportedFormatError)

__all__ = ["TensorRef", "Checkpoint", "open_checkpoint", "read_tensor",
           "read_safetensors_header", "SAFETENSORS_DTYPES", "MAX_HEADER_BYTES",
           "MAX_INDEX_BYTES"]

#: Largest safetensors header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 2 ** 20
#: Largest index JSON accepted.
MAX_INDEX_BYTES = 100 * 2 ** 20
#: Largest number of dimensions accepted in a header.
MAX_NDIM = 64

#: safetensors dtype -> (torch dtype, itemsize in bytes).
SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2),
    "I8": (torch.int8, 1), "U64": (torch.uint64, 8), "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_TORCH_DTYPES = {str(d).replace("torch.", ""): d for d, _ in SAFETENSORS_DTYPES.values()}

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_READ_PIECE = 1 << 28   # pread at most 256 MiB per call (Linux caps one read near 2 GiB)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a :attr:`TensorRef.dtype` string (``"bfloat16"`` ...)."""
    d = _TORCH_DTYPES.get(name)
    if d is None:
        d = getattr(torch, name, None)
        if not isinstance(d, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}")
    return d


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives (picklable; what a worker needs to read it).

    Attributes:
        name: the tensor's name in its checkpoint.
        path: absolute path of its file (symlinks resolved).
        fmt: ``"safetensors"`` or ``"torch"`` (a ``.bin``/``.pt`` file).
        dtype: torch dtype name without ``torch.`` (``"bfloat16"``).
        shape: the shape.
        offset: absolute byte offset of the data in the file (safetensors; -1 for torch).
        nbytes: size of the data in bytes.
    """

    name: str
    path: str
    fmt: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class Checkpoint:
    """A validated checkpoint.

    Attributes:
        path: what the user gave (absolute).
        kind: ``"safetensors-index"``, ``"safetensors"``, ``"safetensors-files"``,
            ``"torch-index"``, ``"torch"`` or ``"torch-files"``.
        files: the weight files, absolute, in reading order.
        tensors: name -> :class:`TensorRef`, in file order then byte order.
        notes: things worth reporting (tensors in a shard that the index does not list).
        fingerprint: per file, name, size and a hash of the header (safetensors) or of
            the first and last MiB (torch files); used to refuse resuming on other inputs.
    """

    path: str
    kind: str
    files: list
    tensors: dict
    notes: list
    fingerprint: list

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


# ------------------------------------------------------------------------------------------
# safetensors headers
# ------------------------------------------------------------------------------------------


def _strict_json(data: bytes, what: str, path: str, err):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise err(f"{what} is not UTF-8 ({exc})", path=path) from None
    try:
        return strict_json_loads(text)
    except RecursionError:
        raise err(f"{what} is nested too deeply", path=path) from None
    except ValueError as exc:
        raise err(f"{what} is not valid JSON ({exc})", path=path) from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: Union[str, os.PathLike]) -> tuple[dict, dict, str]:
    """Validates the header of one safetensors file (module docstring).

    Returns:
        ``(tensors, metadata, sha256)``: name -> :class:`TensorRef` in byte order, the
        ``__metadata__`` dict, and the SHA-256 of the header bytes.

    Raises:
        HeaderError, TruncatedFileError: naming the file (and the tensor where there is one).
    """
    path = os.path.realpath(path)
    try:
        size = os.path.getsize(path)
        fh = open(path, "rb")
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot open: {exc.strerror or exc}", path=path) from None
    with fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TruncatedFileError(f"file has {size} bytes; a safetensors file starts with "
                                     "an 8-byte header length", path=path)
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte "
                              "limit (a corrupt or hostile file)", path=path)
        if hlen > size - 8:
            raise TruncatedFileError(f"header length {hlen} is larger than the {size - 8} "
                                     "bytes after the length field", path=path)
        if hlen < 2:
            raise HeaderError(f"header length {hlen} is too small for a JSON object",
                              path=path)
        raw = fh.read(hlen)
    if len(raw) != hlen:
        raise TruncatedFileError(f"read {len(raw)} of {hlen} header bytes", path=path)
    header = _strict_json(raw, "header", path, HeaderError)
    if not isinstance(header, dict):
        raise HeaderError(f"header is a JSON {type(header).__name__}, not an object", path=path)
    meta = header.pop("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise HeaderError("__metadata__ must map strings to strings", path=path)
    data_start = 8 + hlen
    data_size = size - data_start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise HeaderError("entry is not an object", path=path, tensor=name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise HeaderError(f"entry has no {key!r}", path=path, tensor=name)
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in SAFETENSORS_DTYPES:
            raise HeaderError(f"unknown dtype {dt!r} (known: {sorted(SAFETENSORS_DTYPES)})",
                              path=path, tensor=name)
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(s) and s >= 0 for s in shape)):
            raise HeaderError(f"shape {shape!r} is not a list of at most {MAX_NDIM} "
                              "non-negative ints", path=path, tensor=name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise HeaderError(f"data_offsets {offs!r} is not [begin, end] with "
                              "0 <= begin <= end", path=path, tensor=name)
        tdt, item = SAFETENSORS_DTYPES[dt]
        nbytes = math.prod(shape) * item
        if offs[1] - offs[0] != nbytes:
            raise HeaderError(f"data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                              f"{shape} of {dt} needs {nbytes}", path=path, tensor=name)
        if offs[1] > data_size:
            raise TruncatedFileError(
                f"data ends at byte {data_start + offs[1]} but the file has only {size} "
                "bytes (truncated, or the header lies)", path=path, tensor=name)
        entries.append((offs[0], offs[1], name, tdt, tuple(shape), nbytes))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    prev = None
    for b, e, name, *_ in entries:
        if b < pos:
            raise HeaderError(f"bytes {b}..{e} overlap tensor {prev!r} (ends at {pos})",
                              path=path, tensor=name)
        if b > pos:
            raise HeaderError(f"bytes {pos}..{b} of the data area belong to no tensor",
                              path=path, tensor=name)
        pos, prev = e, name
    if pos != data_size:
        raise HeaderError(f"{data_size - pos} trailing bytes after the last tensor belong to "
                          "no tensor", path=path)
    tensors = {}
    for b, e, name, tdt, shape, nbytes in entries:
        tensors[name] = TensorRef(name, path, "safetensors", str(tdt).replace("torch.", ""),
                                  shape, data_start + b, nbytes)
    return tensors, meta, hashlib.sha256(raw).hexdigest()


def _library_check(path: str, tensors: dict) -> None:
    """The file must also open with the safetensors library, with the same table."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for name in keys & tensors.keys():
                if tuple(f.get_slice(name).get_shape()) != tensors[name].shape:
                    raise HeaderError("the safetensors library reads another shape",
                                      path=path, tensor=name)
    except HeaderError:
        raise
    except Exception as exc:  # SafetensorError and friends
        raise HeaderError(f"the safetensors library refuses the file: {exc}",
                          path=path) from None
    if keys != set(tensors):
        raise HeaderError("the safetensors library lists other tensors than the header",
                          path=path)


# ------------------------------------------------------------------------------------------
# torch files
# ------------------------------------------------------------------------------------------
def _torch_load(path: str) -> dict:
    """``torch.load(weights_only=True, mmap=True)`` with errors mapped to ours."""
    import pickle
    import zipfile
    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(
            "not a zip-format torch file (a truncated file, or the legacy format, which "
            "cannot be memory-mapped: re-save it with torch.save or convert to safetensors)",
            path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise UnsupportedFormatError(f"torch.load(weights_only=True) refuses the pickle: "
                                     f"{str(exc).splitlines()[0]}", path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TruncatedFileError(f"cannot read the torch file (truncated or corrupt): "
                                 f"{str(exc).splitlines()[0] if str(exc) else exc!r}",
                                 path=path) from None
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(f"holds a {type(obj).__name__}, not a state dict",
                                     path=path)
    return obj


def _torch_tensors(path: str) -> tuple[dict, list]:
    obj = _torch_load(path)
    tensors, notes = {}, []
    for name, t in obj.items():
        if not isinstance(name, str):
            raise UnsupportedFormatError(f"state-dict key {name!r} is not a string", path=path)
        if not isinstance(t, torch.Tensor):
            notes.append(f"{os.path.basename(path)}: entry {name!r} is a "
                         f"{type(t).__name__}, not a tensor (ignored)")
            continue
        if t.is_sparse or t.layout != torch.strided or t.is_quantized:
            notes.append(f"{os.path.basename(path)}: tensor {name!r} is not a dense strided "
                         "tensor (ignored)")
            continue
        tensors[name] = TensorRef(name, path, "torch", str(t.dtype).replace("torch.", ""),
                                  tuple(t.shape), -1, t.numel() * t.element_size())
    return tensors, notes


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# folders and indexes
# ------------------------------------------------------------------------------------------
_DRIVE = re.compile(r"^[A-Za-z]:")


def _allowed_roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":        # Hugging Face hub cache layout
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _member(folder: str, name, index_path: Optional[str], tensor: Optional[str] = None) -> str:
    """Resolves a file name found in an index (or a folder listing) safely."""
    where = index_path or folder
    if not isinstance(name, str) or not name:
        raise IndexFormatError(f"shard name {name!r} is not a non-empty string", path=where,
                               tensor=tensor)
    if "\x00" in name or "\\" in name:
        raise UnsafePathError(f"shard name {name!r} contains a NUL or backslash", path=where,
                              tensor=tensor)
    if name.startswith("/") or os.path.isabs(name) or _DRIVE.match(name):
        raise UnsafePathError(f"shard name {name!r} is an absolute path", path=where,
                              tensor=tensor)
    if any(part == ".." for part in name.split("/")):
        raise UnsafePathError(f"shard name {name!r} leaves the checkpoint folder", path=where,
                              tensor=tensor)
    cand = os.path.join(folder, name)
    if not os.path.lexists(cand):
        raise MissingShardError(f"shard {name!r} named by the index does not exist",
                                path=cand, tensor=tensor)
    real = os.path.realpath(cand)
    roots = _allowed_roots(folder)
    if not any(_inside(real, r) for r in roots):
        raise UnsafePathError(f"shard {name!r} resolves to {real}, outside the checkpoint "
                              "folder", path=cand, tensor=tensor)
    if not os.path.isfile(real):
        raise MissingShardError(f"shard {name!r} is not a regular file (broken link?)",
                                path=cand, tensor=tensor)
    return real


def _read_index(index_path: str) -> dict:
    try:
        size = os.path.getsize(index_path)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot stat: {exc.strerror or exc}",
                                      path=index_path) from None
    if size > MAX_INDEX_BYTES:
        raise IndexFormatError(f"index is {size} bytes, above the {MAX_INDEX_BYTES}-byte "
                               "limit", path=index_path)
    with open(index_path, "rb") as f:
        data = f.read(MAX_INDEX_BYTES + 1)
    idx = _strict_json(data, "index", index_path, IndexFormatError)
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise IndexFormatError("index has no 'weight_map' object", path=index_path)
    wm = idx["weight_map"]
    if not wm:
        raise IndexFormatError("index 'weight_map' is empty", path=index_path)
    for k, v in wm.items():
        if not isinstance(v, str):
            raise IndexFormatError(f"weight_map value {v!r} is not a string",
                                   path=index_path, tensor=k)
    return wm


def _file_tensors(path: str, fmt: str, label: str) -> tuple[dict, list, dict]:
    """(tensors, notes, fingerprint entry) of one validated file."""
    if fmt == "safetensors":
        tensors, _meta, sha = read_safetensors_header(path)
        _library_check(path, tensors)
        return tensors, [], {"file": label, "size": os.path.getsize(path),
                             "header_sha256": sha}
    tensors, notes = _torch_tensors(path)
    return tensors, notes, {"file": label, "size": os.path.getsize(path),
                            "sha256_ends": _file_hash(path)}


def _fmt_of(name: str) -> str:
    low = name.lower()
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith((".bin", ".pt", ".pth")):
        return "torch"
    raise UnsupportedFormatError("unknown weight-file extension (expected .safetensors, "
                                 ".bin, .pt or .pth)", path=name)


def _from_index(folder: str, index_path: str, kind: str) -> Checkpoint:
    wm = _read_index(index_path)
    by_shard: dict[str, list] = {}
    shard_name: dict[str, str] = {}
    for tensor, shard in wm.items():
        real = _member(folder, shard, index_path, tensor)
        by_shard.setdefault(real, []).append(tensor)
        shard_name.setdefault(real, shard)
    tensors, notes, fps, files = {}, [], [], []
    for real in sorted(by_shard, key=lambda p: shard_name[p]):
        fmt = _fmt_of(shard_name[real])           # by the name the index gives (hub blobs
        have, n, fp = _file_tensors(real, fmt, shard_name[real])  # have no extension)
        notes += n
        fps.append(fp)
        files.append(real)
        wanted = set(by_shard[real])
        for t in by_shard[real]:
            if t not in have:
                raise IndexFormatError(f"the index puts tensor {t!r} in "
                                       f"{os.path.basename(real)}, which does not hold it",
                                       path=real, tensor=t)
        extra = [t for t in have if t not in wanted]
        if extra:
            notes.append(f"{os.path.basename(real)}: {len(extra)} tensor(s) not listed in the "
                         f"index were ignored (e.g. {extra[0]!r})")
        for name, ref in have.items():
            if name in wanted:
                tensors[name] = ref
    return Checkpoint(os.path.abspath(folder), kind, files, tensors, notes, fps)


def _from_files(folder: Optional[str], paths: list, kind: str, origin: str,
                contained: bool) -> Checkpoint:
    tensors, notes, fps, files = {}, [], [], []
    for p in paths:
        real = _member(folder, os.path.basename(p), None) if contained else os.path.realpath(p)
        fmt = _fmt_of(os.path.basename(p))
        have, n, fp = _file_tensors(real, fmt, os.path.basename(p))
        notes += n
        fps.append(fp)
        files.append(real)
        for name, ref in have.items():
            if name in tensors:
                raise IndexFormatError(f"tensor {name!r} is in both "
                                       f"{os.path.basename(tensors[name].path)} and "
                                       f"{os.path.basename(real)}", path=real, tensor=name)
            tensors[name] = ref
    return Checkpoint(os.path.abspath(origin), kind, files, tensors, notes, fps)


def open_checkpoint(path: Union[str, os.PathLike]) -> Checkpoint:
    """Finds, validates and lists the tensors of a checkpoint (module docstring).

    Raises:
        CheckpointError: a subclass naming the file (and tensor) for every problem found.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        raise CheckpointNotFoundError("no such file or folder", path=p)
    if os.path.isdir(p):
        j = lambda n: os.path.join(p, n)  # noqa: E731
        if os.path.lexists(j(ST_INDEX)):
            return _from_index(p, j(ST_INDEX), "safetensors-index")
        if os.path.lexists(j(ST_SINGLE)):
            return _from_files(p, [j(ST_SINGLE)], "safetensors", p, True)
        st = sorted(n for n in os.listdir(p) if n.endswith(".safetensors"))
        if st:
            return _from_files(p, [j(n) for n in st], "safetensors-files", p, True)
        if os.path.lexists(j(BIN_INDEX)):
            return _from_index(p, j(BIN_INDEX), "torch-index")
        if os.path.lexists(j(BIN_SINGLE)):
            return _from_files(p, [j(BIN_SINGLE)], "torch", p, True)
        bins = sorted(n for n in os.listdir(p)
                      if n.startswith("pytorch_model") and n.endswith(".bin"))
        if bins:
            return _from_files(p, [j(n) for n in bins], "torch-files", p, True)
        raise CheckpointNotFoundError(f"folder holds none of {ST_INDEX}, {ST_SINGLE}, "
                                      f"*.safetensors, {BIN_INDEX}, pytorch_model*.bin", path=p)
    if p.lower().endswith(".json"):
        fmt = "torch-index" if p.lower().endswith(".bin.index.json") else "safetensors-index"
        return _from_index(os.path.dirname(p), p, fmt)
    fmt = _fmt_of(p)
    return _from_files(None, [p], fmt, p, False)


# ------------------------------------------------------------------------------------------
# reading one tensor
# ------------------------------------------------------------------------------------------
_SCRATCH: dict[str, np.ndarray] = {}


def _scratch(slot: str, nbytes: int) -> np.ndarray:
    buf = _SCRATCH.get(slot)
    if buf is None or buf.nbytes < nbytes:
        _SCRATCH.pop(slot, None)
        buf = np.empty(max(nbytes, 64), dtype=np.uint8)
        _SCRATCH[slot] = buf
    return buf


def release_scratch() -> None:
    """Frees the per-process read buffers."""
    _SCRATCH.clear()


def read_tensor(ref: TensorRef, slot: Optional[str] = None, *,
                method: str = "mmap") -> torch.Tensor:
    """Reads one tensor (module docstring).

    Args:
        ref: where it lives.
        slot: with ``method="pread"``, the name of a reusable scratch buffer to read into
            (the tensor is then a view of it, valid until the next read into the same
            slot); None: a fresh buffer.
        method: ``"mmap"`` (default): a private (copy-on-write) memory map of exactly the
            tensor's validated byte range, zero-copy, unmapped when the tensor is freed;
            ``"pread"``: copy the range into memory.

    Raises:
        TruncatedFileError: the file is shorter than its validated header said (checked
            with ``fstat`` before mapping; a read that comes back short with ``pread``).
        CheckpointError: the torch file no longer reads or lacks the tensor.
    """
    dtype = torch_dtype(ref.dtype)
    if ref.fmt == "torch":
        obj = _torch_load(ref.path)
        t = obj.get(ref.name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape) \
                or t.dtype != dtype:
            raise TruncatedFileError("tensor changed or vanished since the file was "
                                     "validated", path=ref.path, tensor=ref.name)
        del obj            # only this tensor's pages of the file mapping get touched
        return t.contiguous()
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    if method not in ("mmap", "pread"):
        raise ValueError(f"method must be 'mmap' or 'pread', got {method!r}")
    try:
        fd = os.open(ref.path, os.O_RDONLY)
    except OSError as exc:
        raise TruncatedFileError(f"cannot open: {exc.strerror or exc}", path=ref.path,
                                 tensor=ref.name) from None
    try:
        size = os.fstat(fd).st_size
        if ref.offset + ref.nbytes > size:
            raise TruncatedFileError(
                f"bytes {ref.offset}..{ref.offset + ref.nbytes} lie past the end of the "
                f"{size}-byte file (changed since validation?)", path=ref.path,
                tensor=ref.name)
        item = torch.empty(0, dtype=dtype).element_size()
        if method == "mmap" and ref.offset % item == 0:
            start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, ref.offset + ref.nbytes - start, offset=start,
                           access=mmap.ACCESS_COPY)
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
                mm.madvise(mmap.MADV_WILLNEED)      # read ahead on a cold page cache
            arr = np.frombuffer(mm, dtype=np.uint8, count=ref.nbytes,
                                offset=ref.offset - start)
            return torch.from_numpy(arr).view(dtype).reshape(ref.shape)
        buf = _scratch(slot, ref.nbytes)[: ref.nbytes] if slot else \
            np.empty(ref.nbytes, dtype=np.uint8)
        mv = memoryview(buf)
        done = 0
        while done < ref.nbytes:
            n = os.preadv(fd, [mv[done: done + _READ_PIECE]], ref.offset + done)
            if n <= 0:
                raise TruncatedFileError(
                    f"read {done} of {ref.nbytes} bytes at offset {ref.offset}: the file "
                    "is shorter than its header says (changed since validation?)",
                    path=ref.path, tensor=ref.name)
            done += n
        return torch.from_numpy(buf).view(dtype).reshape(ref.shape)
    finally:
        os.close(fd)
