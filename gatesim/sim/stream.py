"""Update streams: a run's exact fp32 per-step updates on disk, and their replay.

Layout of a stream directory::

    manifest.json              format, the cell config, policy, seed, shape, per-step
                               alpha/decay, the shard list, "complete"
    init.safetensors           W0: the fp32 weights before any rounding
    updates-00000.safetensors  step_000000 ... step_000049: fp32 deltas, as applied

Shards and the manifest are written atomically (temporary file, then rename), so a killed
run leaves a valid stream of the steps flushed so far. :func:`replay` drives a stream
through any precision policy with exactly the call the optimizer made, so replaying in the
original policy reproduces the original run's stored weights bit-for-bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gatesim.sim.policies import ShadowWeights, parse_policy

__all__ = ["StreamWriter", "Stream", "replay", "STREAM_FORMAT"]

STREAM_FORMAT = "gatesim.stream/1"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StreamWriter:
    """Records ``(delta, alpha, decay)`` per step; flushes a shard every ``shard_steps``."""

    def __init__(self, directory: Union[str, os.PathLike], w0: torch.Tensor, *, config: dict,
                 policy: str, seed: int, shard_steps: int = 50):
        if shard_steps < 1:
            raise ValueError(f"shard_steps must be >= 1, got {shard_steps}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "manifest.json").exists():
            raise FileExistsError(f"{self.dir} already holds a stream; choose a new directory")
        self.shape = list(w0.shape)
        self.shard_steps = shard_steps
        self.manifest = {"format": STREAM_FORMAT, "config": config, "policy": policy,
                         "seed": seed, "shape": self.shape, "init": "init.safetensors",
                         "steps": 0, "alpha": [], "decay": [], "shards": [],
                         "complete": False}
        tmp = self.dir / "init.safetensors.tmp"
        save_file({"W0": w0.detach().to(torch.float32).contiguous().clone()}, str(tmp))
        os.replace(tmp, self.dir / "init.safetensors")
        self._pending: dict[str, torch.Tensor] = {}
        self._first = 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        _atomic_write_bytes(self.dir / "manifest.json",
                            json.dumps(self.manifest, indent=1).encode("utf-8"))

    def add(self, delta: torch.Tensor, alpha: float, decay: float, step: int) -> None:
        expected = self.manifest["steps"] + len(self._pending)
        if step != expected:
            raise ValueError(f"stream steps must be consecutive: got {step}, expected {expected}")
        if list(delta.shape) != self.shape:
            raise ValueError(f"delta shape {list(delta.shape)} != stream shape {self.shape}")
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
        os.replace(tmp, self.dir / name)
        self.manifest["shards"].append({"file": name, "first": self.manifest["steps"],
                                        "count": len(self._pending)})
        self.manifest["steps"] += len(self._pending)
        self._pending = {}
        self._write_manifest()

    def close(self) -> None:
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()


class Stream:
    """A recorded stream, validated on opening (format, shard names inside the directory,
    consecutive steps, shapes)."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.dir = Path(directory)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.dir} is not an update stream (no manifest.json)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mpath}: not valid JSON: {exc}") from exc
        if not isinstance(m, dict) or m.get("format") != STREAM_FORMAT:
            raise ValueError(f"{mpath}: not a {STREAM_FORMAT} manifest")
        self.manifest = m
        self.shape = [int(x) for x in m["shape"]]
        self.steps = int(m["steps"])
        if len(m["alpha"]) < self.steps or len(m["decay"]) < self.steps:
            raise ValueError(f"{mpath}: alpha/decay lists shorter than {self.steps} steps")
        first = 0
        for sh in m["shards"]:
            self._safe_name(sh["file"])
            if int(sh["first"]) != first:
                raise ValueError(f"{mpath}: shard {sh['file']} starts at {sh['first']}, "
                                 f"expected {first}")
            first += int(sh["count"])
        if first != self.steps:
            raise ValueError(f"{mpath}: shards hold {first} steps, manifest says {self.steps}")
        self._safe_name(m["init"])

    def _safe_name(self, name: str) -> Path:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{self.dir}: file name {name!r} in the manifest must be a plain "
                             "name inside the stream directory")
        p = self.dir / name
        if not p.is_file():
            raise FileNotFoundError(f"{self.dir}: missing stream file {name}")
        return p

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def initial(self) -> torch.Tensor:
        with safe_open(str(self._safe_name(self.manifest["init"])), "pt") as f:
            w0 = f.get_tensor("W0")
        if list(w0.shape) != self.shape or w0.dtype != torch.float32:
            raise ValueError(f"{self.dir}: init.safetensors W0 is {w0.dtype} "
                             f"{list(w0.shape)}, expected float32 {self.shape}")
        return w0

    def updates(self) -> Iterator[tuple[int, torch.Tensor, float, float]]:
        """Yields ``(step, delta, alpha, decay)`` in order."""
        m = self.manifest
        for sh in m["shards"]:
            with safe_open(str(self._safe_name(sh["file"])), "pt") as f:
                for step in range(int(sh["first"]), int(sh["first"]) + int(sh["count"])):
                    key = f"step_{step:06d}"
                    if key not in f.keys():
                        raise ValueError(f"{sh['file']}: missing {key}")
                    d = f.get_tensor(key)
                    if list(d.shape) != self.shape or d.dtype != torch.float32:
                        raise ValueError(f"{sh['file']}:{key} is {d.dtype} {list(d.shape)}, "
                                         f"expected float32 {self.shape}")
                    yield step, d, float(m["alpha"][step]), float(m["decay"][step])


def replay(stream: Union[str, os.PathLike, Stream], policy: str, *, seed: Optional[int] = None,
           on_step: Optional[Callable[[int, ShadowWeights], None]] = None) -> ShadowWeights:
    """Drives a recorded stream through precision policy ``policy`` (a name, see
    :func:`gatesim.sim.policies.parse_policy`); ``seed`` defaults to the run's seed.
    Returns the policy's weights after the last step, with summed statistics."""
    s = stream if isinstance(stream, Stream) else Stream(stream)
    shadow = ShadowWeights(parse_policy(policy), s.initial(),
                           seed=int(s.manifest["seed"]) if seed is None else seed)
    for step, delta, alpha, decay in s.updates():
        shadow.apply(delta, alpha, decay, step)
        if on_step is not None:
            on_step(step, shadow)
    return shadow
