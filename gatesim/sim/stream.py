"""Update streams: a run's exact fp32 per-step updates on disk, and their replay.

Layout of a stream directory::

    manifest.json              format, the cell config, policy, seed, shape, per-step
                               alpha/decay, init and shard files with their sizes and
                               checksums, "complete", and the manifest's own checksum
    init.safetensors           W0: the fp32 weights before any rounding
    updates-00000.safetensors  step_000000 ... step_000049: fp32 deltas, as applied

Shards and the manifest are written atomically (temporary file, then rename), so a killed
run leaves a valid stream of the steps flushed so far. :func:`replay` drives a stream
through any precision policy with exactly the call the optimizer made, so replaying in the
original policy reproduces the original run's stored weights bit-for-bit.

**Integrity** (format ``gatesim.stream/2``). Every file's size and
:mod:`gatesim.integrity` checksum is in the manifest, and the manifest carries the
checksum of its own canonical JSON (``manifest_checksum``). Opening a :class:`Stream`
checks, before a single step is replayed: the manifest's JSON, every field's type and
value (shape, seed, step counts, ``first``/``count`` of every shard, one finite alpha and
decay per step), the manifest checksum (an edited value is refused), then every file: a
plain name inside the directory, its size, its checksum (a flipped bit, a truncated or
empty shard is refused), a valid safetensors header (:mod:`gatesim.diff.io`) holding
exactly the expected float32 tensors of the stream's shape. Every error is a
:class:`StreamError` naming the file and the field. A file changed *after* the checks
(while a replay runs) is not detected. Streams of format ``gatesim.stream/1`` (no
checksums) are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gatesim.checks import check_real, strict_json_loads
from gatesim.integrity import checksum_bytes, checksum_file
from gatesim.shadow import ShadowWeights
from gatesim.sim.policies import sim_policy, sim_shadow

__all__ = ["StreamWriter", "Stream", "StreamError", "replay", "STREAM_FORMAT"]

STREAM_FORMAT = "gatesim.stream/2"
#: Largest manifest accepted (a million steps of alpha and decay fit in about 50 MB).
MAX_MANIFEST_BYTES = 256 * 2 ** 20


class StreamError(ValueError):
    """A stream that cannot be trusted: names the file (and the field)."""

    def __init__(self, path, message: str, field: Optional[str] = None):
        self.path = str(path)
        self.field = field
        super().__init__(f"{path}: {field + ': ' if field else ''}{message}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


class StreamWriter:
    """Records ``(delta, alpha, decay)`` per step; flushes a shard every ``shard_steps``."""

    def __init__(self, directory: Union[str, os.PathLike], w0: torch.Tensor, *, config: dict,
                 policy: str, seed: int, shard_steps: int = 50):
        if isinstance(shard_steps, bool) or not isinstance(shard_steps, int) or shard_steps < 1:
            raise ValueError(f"shard_steps must be an int >= 1, got {shard_steps!r}")
        self.dir = Path(directory)
        if (self.dir / "manifest.json").exists():
            raise FileExistsError(f"{self.dir} already holds a stream; choose a new directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shape = list(w0.shape)
        self.shard_steps = shard_steps
        tmp = self.dir / "init.safetensors.tmp"
        save_file({"W0": w0.detach().to(torch.float32).contiguous().clone()}, str(tmp))
        init_info = {"bytes": tmp.stat().st_size, "checksum": checksum_file(tmp)}
        os.replace(tmp, self.dir / "init.safetensors")
        self.manifest = {"format": STREAM_FORMAT, "config": config, "policy": policy,
                         "seed": seed, "shape": self.shape, "init": "init.safetensors",
                         "init_bytes": init_info["bytes"],
                         "init_checksum": init_info["checksum"],
                         "steps": 0, "alpha": [], "decay": [], "shards": [],
                         "complete": False}
        self._pending: dict[str, torch.Tensor] = {}
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["manifest_checksum"] = checksum_bytes(_canonical(self.manifest))
        _atomic_write_bytes(self.dir / "manifest.json",
                            json.dumps(self.manifest, indent=1).encode("utf-8"))

    def add(self, delta: torch.Tensor, alpha: float, decay: float, step: int) -> None:
        expected = self.manifest["steps"] + len(self._pending)
        if step != expected:
            raise ValueError(f"stream steps must be consecutive: got {step}, expected {expected}")
        if list(delta.shape) != self.shape:
            raise ValueError(f"delta shape {list(delta.shape)} != stream shape {self.shape}")
        alpha = check_real(alpha, "alpha", dtype=np.float32)   # applied as float32
        decay = check_real(decay, "decay", dtype=np.float32)
        self._pending[f"step_{step:06d}"] = delta.detach().to(torch.float32).contiguous().clone()
        self.manifest["alpha"].append(float(alpha))
        self.manifest["decay"].append(float(decay))
        if len(self._pending) >= self.shard_steps:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"updates-{len(self.manifest['shards']):05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file(self._pending, str(tmp))
        info = {"bytes": tmp.stat().st_size, "checksum": checksum_file(tmp)}
        os.replace(tmp, self.dir / name)
        self.manifest["shards"].append({"file": name, "first": self.manifest["steps"],
                                        "count": len(self._pending), **info})
        self.manifest["steps"] += len(self._pending)
        self._pending = {}
        self._write_manifest()

    def close(self) -> None:
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()




def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Stream:
    """A recorded stream, verified completely on opening (module docstring, "Integrity"):
    nothing of a stream that fails a check is ever replayed."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.dir = Path(directory)
        mpath = self.dir / "manifest.json"
        self._mpath = mpath
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.dir} is not an update stream (no manifest.json)")
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise StreamError(mpath, f"{size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            m = strict_json_loads(mpath.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise StreamError(mpath, f"not valid JSON ({exc})") from None
        if not isinstance(m, dict):
            raise StreamError(mpath, "not a JSON object")
        fmt = m.get("format")
        if fmt != STREAM_FORMAT:
            old = isinstance(fmt, str) and fmt.startswith("gatesim.stream/")
            raise StreamError(mpath, f"is {fmt!r}, not {STREAM_FORMAT!r}" + (
                " (recorded without checksums: record it again)" if old else ""), "format")
        self.manifest = m
        self._check_fields(m)
        self._verify_manifest(m)
        self.shape = list(m["shape"])
        self.steps = m["steps"]
        self._verify_file(m["init"], m["init_bytes"], m["init_checksum"], "init", {"W0"})
        for i, sh in enumerate(m["shards"]):
            names = {f"step_{s:06d}" for s in range(sh["first"], sh["first"] + sh["count"])}
            self._verify_file(sh["file"], sh["bytes"], sh["checksum"], f"shards[{i}]", names)

    # -- checks -----------------------------------------------------------------------
    def _verify_manifest(self, m: dict) -> None:
        got = checksum_bytes(_canonical(m))
        if m["manifest_checksum"] != got:
            self._fail("manifest_checksum", f"stored {m['manifest_checksum']}, the content "
                       f"gives {got}: the manifest was edited or damaged")

    def _fail(self, field: str, message: str):
        raise StreamError(self._mpath, message, field)

    def _check_fields(self, m: dict) -> None:
        need = {"config": dict, "policy": str, "seed": int, "shape": list, "init": str,
                "init_bytes": int, "init_checksum": str, "steps": int, "alpha": list,
                "decay": list, "shards": list, "complete": bool, "manifest_checksum": str}
        for key, tp in need.items():
            if key not in m:
                self._fail(key, "missing")
            v = m[key]
            ok = _is_int(v) if tp is int else isinstance(v, tp)
            if not ok:
                self._fail(key, f"must be a {tp.__name__}, got {type(v).__name__} {v!r}")
        try:
            sim_policy(m["policy"])
        except ValueError as exc:
            self._fail("policy", str(exc))
        if not 0 <= m["seed"] < 2 ** 63:
            self._fail("seed", f"must be in [0, 2**63), got {m['seed']}")
        shape = m["shape"]
        if len(shape) != 2 or not all(_is_int(x) and x >= 1 for x in shape):
            self._fail("shape", f"must be two positive ints, got {shape!r}")
        if m["steps"] < 0:
            self._fail("steps", f"must be >= 0, got {m['steps']}")
        for key in ("alpha", "decay"):
            vals = m[key]
            if len(vals) != m["steps"]:
                self._fail(key, f"has {len(vals)} values for {m['steps']} steps")
            for i, v in enumerate(vals):
                try:                       # applied as float32: finite there
                    check_real(v, f"{key}[{i}]", dtype=np.float32)
                except ValueError as exc:
                    self._fail(f"{key}[{i}]", str(exc))
        if m["init_bytes"] < 0:
            self._fail("init_bytes", f"must be >= 0, got {m['init_bytes']}")
        first = 0
        for i, sh in enumerate(m["shards"]):
            f = f"shards[{i}]"
            if not isinstance(sh, dict):
                self._fail(f, "must be an object")
            for key, tp in (("file", str), ("first", int), ("count", int), ("bytes", int),
                            ("checksum", str)):
                if key not in sh:
                    self._fail(f"{f}.{key}", "missing")
                v = sh[key]
                if not (_is_int(v) if tp is int else isinstance(v, tp)):
                    self._fail(f"{f}.{key}", f"must be a {tp.__name__}, got {v!r}")
            if sh["count"] < 1:
                self._fail(f"{f}.count", f"must be >= 1, got {sh['count']}")
            if sh["first"] != first:
                self._fail(f"{f}.first", f"is {sh['first']}, expected {first} (steps must be "
                           "consecutive)")
            if sh["bytes"] < 0:
                self._fail(f"{f}.bytes", f"must be >= 0, got {sh['bytes']}")
            self._plain_name(sh["file"], f"{f}.file")
            first += sh["count"]
        if first != m["steps"]:
            self._fail("steps", f"is {m['steps']}, the shards hold {first}")
        self._plain_name(m["init"], "init")

    def _plain_name(self, name, field: str) -> Path:
        if not isinstance(name, str) or not name or Path(name).name != name \
                or name in (".", "..") or "\\" in name or "\x00" in name:
            self._fail(field, f"file name {name!r} must be a plain name inside the stream "
                       "directory")
        return self.dir / name

    def _verify_file(self, name: str, nbytes: int, checksum: str, field: str,
                     tensors: set) -> None:
        from gatesim.diff.errors import CheckpointError
        from gatesim.diff.io import read_safetensors_header
        p = self._plain_name(name, field)
        if not p.is_file():
            raise StreamError(p, "missing (or not a regular file)", f"{field} of manifest.json")
        size = p.stat().st_size
        if size != nbytes:
            raise StreamError(p, f"has {size} bytes, the manifest says {nbytes} (truncated, "
                              "or replaced)", f"{field}.bytes")
        got = checksum_file(p)
        if got != checksum:
            raise StreamError(p, f"checksum {got} differs from the manifest's {checksum} "
                              "(the file was damaged or replaced)", f"{field}.checksum")
        try:
            refs, _meta, _sha = read_safetensors_header(p)
        except CheckpointError as exc:
            raise StreamError(p, f"not a valid safetensors file ({exc})", field) from None
        if set(refs) != tensors:
            missing = sorted(tensors - set(refs))[:3]
            extra = sorted(set(refs) - tensors)[:3]
            raise StreamError(p, f"holds other tensors than expected (missing {missing}, "
                              f"unexpected {extra})", field)
        for r in refs.values():
            if r.dtype != "float32" or list(r.shape) != self.shape:
                raise StreamError(p, f"tensor {r.name!r} is {r.dtype} {list(r.shape)}, "
                                  f"expected float32 {self.shape}", field)

    # -- reading ----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _open(self, name: str):
        p = self.dir / name
        try:
            return safe_open(str(p), "pt")
        except Exception as exc:  # SafetensorError, OSError: changed since verification
            raise StreamError(p, f"cannot be read ({exc}); it changed after the stream was "
                              "verified") from None

    def initial(self) -> torch.Tensor:
        with self._open(self.manifest["init"]) as f:
            return f.get_tensor("W0")

    def updates(self) -> Iterator[tuple[int, torch.Tensor, float, float]]:
        """Yields ``(step, delta, alpha, decay)`` in order."""
        m = self.manifest
        for sh in m["shards"]:
            with self._open(sh["file"]) as f:
                for step in range(sh["first"], sh["first"] + sh["count"]):
                    yield (step, f.get_tensor(f"step_{step:06d}"), float(m["alpha"][step]),
                           float(m["decay"][step]))


def replay(stream: Union[str, os.PathLike, Stream], policy: str, *, seed: Optional[int] = None,
           on_step: Optional[Callable[[int, ShadowWeights], None]] = None) -> ShadowWeights:
    """Drives a recorded stream through precision policy ``policy`` (a name, see
    :mod:`gatesim.policy`); ``seed`` defaults to the run's seed.
    Returns the policy's weights after the last step, with summed statistics. The stream
    is verified completely (:class:`Stream`) and the arguments checked before the first
    step."""
    s = stream if isinstance(stream, Stream) else Stream(stream)
    pol = sim_policy(policy)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= int(seed) < 2 ** 63):
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    shadow = sim_shadow(pol, s.initial(),
                        int(s.manifest["seed"]) if seed is None else int(seed))
    for step, delta, alpha, decay in s.updates():
        shadow.apply(delta, alpha, decay, step)
        if on_step is not None:
            on_step(step, shadow)
    return shadow
