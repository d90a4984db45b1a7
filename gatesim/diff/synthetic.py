"""Generated checkpoints for tests and benchmarks: sharded safetensors folders in the Hugging
Face layout, and a base/tuned pair with Qwen2-1.5B shapes and planted sparse updates.

Nothing here is needed to diff real checkpoints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from gatesim.formats import int_view_dtype

__all__ = ["ShardWriter", "save_sharded", "qwen2_shapes", "write_planted_pair", "QWEN2_1_5B"]

#: Qwen2-1.5B: hidden 1536, intermediate 8960, 28 layers, 2 KV heads of 128 (k/v 256 rows),
#: vocabulary 151936, tied embeddings, q/k/v biases.
QWEN2_1_5B = dict(layers=28, hidden=1536, intermediate=8960, kv=256, vocab=151936)


class ShardWriter:
    """Writes tensors added one at a time into ``prefix-0000i-of-0000N.safetensors`` shards
    of at most ``shard_bytes`` (one ``prefix.safetensors`` if everything fits in one and
    ``shard_bytes`` is None), and ``prefix.safetensors.index.json`` on :meth:`close`. Only
    the current shard is held in memory."""

    def __init__(self, folder, *, shard_bytes: Optional[int] = None, index: bool = True,
                 prefix: str = "model"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.index, self.prefix = shard_bytes, index, prefix
        self._cur: dict = {}
        self._size = 0
        self._written: list = []

    def _flush(self) -> None:
        from safetensors.torch import save_file
        if self._cur:
            tmp = self.folder / f".shard{len(self._written)}.tmp"
            save_file({k: v.contiguous() for k, v in self._cur.items()}, str(tmp))
            self._written.append((tmp, list(self._cur)))
        self._cur, self._size = {}, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nb = t.numel() * t.element_size()
        if self.shard_bytes is not None and self._cur and self._size + nb > self.shard_bytes:
            self._flush()
        self._cur[name] = t
        self._size += nb

    def close(self) -> list[Path]:
        self._flush()
        n = len(self._written)
        paths, wmap = [], {}
        for i, (tmp, names) in enumerate(self._written):
            fname = f"{self.prefix}.safetensors" if self.shard_bytes is None and n == 1 \
                else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / fname)
            paths.append(self.folder / fname)
            for nm in names:
                wmap[nm] = fname
        if self.index:
            total = sum(p.stat().st_size for p in paths)
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
        return paths


def save_sharded(tensors: Union[dict, Iterable], folder: Union[str, os.PathLike], *,
                 shard_bytes: Optional[int] = None, index: bool = True,
                 prefix: str = "model") -> list[Path]:
    """Writes ``{name: tensor}`` (or ``(name, tensor)`` pairs) with a :class:`ShardWriter`."""
    w = ShardWriter(folder, shard_bytes=shard_bytes, index=index, prefix=prefix)
    for name, t in (tensors.items() if isinstance(tensors, dict) else tensors):
        w.add(name, t)
    return w.close()


def qwen2_shapes(layers: int = 28, hidden: int = 1536, intermediate: int = 8960,
                 kv: int = 256, vocab: int = 151936, embed: bool = True) -> list[tuple]:
    """``(name, shape)`` of a Qwen2-style checkpoint, in the order HF writes it."""
    out = []
    if embed:
        out.append(("model.embed_tokens.weight", (vocab, hidden)))
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.k_proj.weight", (kv, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "self_attn.q_proj.bias", (hidden,)),
                (p + "self_attn.q_proj.weight", (hidden, hidden)),
                (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, hidden))]
    out.append(("model.norm.weight", (hidden,)))
    return out


def _planted(shape, dtype, gen: torch.Generator, density: float, rel: float):
    """A base tensor (N(0, 0.02), norms around 1) and a tuned copy: a ``density`` fraction
    of the entries moved by a relative step of about ``rel`` (a few bf16 ULPs, so almost
    every planted move survives the rounding)."""
    if len(shape) == 1:
        w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        w = 0.02 * torch.randn(shape, generator=gen)
    base = w.to(dtype)
    mask = torch.rand(shape, generator=gen) < density
    step = rel * torch.randn(shape, generator=gen)
    tuned = torch.where(mask, (base.float() * (1 + step)).to(dtype), base)
    return base, tuned


def write_planted_pair(base_dir, tuned_dir, shapes: Iterable[tuple], *,
                       dtype: torch.dtype = torch.bfloat16, density: float = 0.3,
                       rel: float = 0.02, seed: int = 0,
                       shard_bytes: Optional[int] = 2 * 2 ** 30,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Writes a base/tuned pair with planted sparse updates, one tensor generated at a time
    (memory: one shard per side). Returns ``{"changed": ..., "numel": ...}`` (bitwise
    counts, +0 == -0)."""
    gen = torch.Generator().manual_seed(seed)
    stats = {"changed": 0, "numel": 0}
    wb = ShardWriter(base_dir, shard_bytes=shard_bytes)
    wt = ShardWriter(tuned_dir, shard_bytes=shard_bytes)
    for name, shape in shapes:
        b, t = _planted(shape, dtype, gen, density, rel)
        view = int_view_dtype(b.element_size())
        ib, it = b.view(view), t.view(view)
        mag = (1 << (8 * b.element_size() - 1)) - 1
        both_zero = ((ib & mag) == 0) & ((it & mag) == 0)
        stats["changed"] += int(((ib != it) & ~both_zero).sum())
        stats["numel"] += b.numel()
        wb.add(name, b)
        wt.add(name, t)
        if progress:
            progress(name)
    wb.close()
    wt.close()
    return stats
