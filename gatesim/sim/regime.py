"""The Gate III reference of real RLVR: the per-step update of a typical recipe relative to
the bf16 spacing of the weights it hits.

A typical RLVR recipe trains with AdamW at lr 1e-6 to 3e-6. Adam's per-entry step is
``lr * m_hat / (sqrt(v_hat) + eps)``, at most about ``lr`` in size (|m_hat / sqrt(v_hat)|
<= 1 for a steady gradient and smaller for a noisy one), so ``lr / ulp_bf16(w)`` over the
weights of a model is an upper estimate of the ratio ``|u| / ulp_bf16(w)`` that real RLVR
has per step. :func:`rlvr_reference` gives its quantiles over every 2-D weight matrix of
the bundled MiniLM (or any safetensors file), next to which the simulation reports its own
realized per-step ratio (``step_ratio``) and its nominal ``lr / ulp`` (``nominal_step_ratio``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["rlvr_reference", "RLVR_LRS"]

#: the learning rates of typical RLVR recipes (AdamW)
RLVR_LRS = (1e-6, 3e-6)


@functools.lru_cache(maxsize=4)
def _reference(lrs: tuple, path: Optional[str]) -> dict:
    from safetensors import safe_open
    from gatesim.formats import BF16
    from gatesim.precision import ulp
    from gatesim.sim.run import _log2_hist, ratio_quantiles
    from gatesim.weights import bundled_model_path
    p = Path(path) if path is not None else bundled_model_path()
    hists = {lr: None for lr in lrs}
    n = 0
    with safe_open(str(p), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dim() != 2 or not t.is_floating_point():
                continue
            w = t.to(torch.float32).reshape(-1)
            w = w[(w != 0) & torch.isfinite(w)]
            n += w.numel()
            inv = 1.0 / ulp(w.contiguous(), BF16).double()
            for lr in lrs:
                h = _log2_hist(inv * lr)
                hists[lr] = h if hists[lr] is None else hists[lr] + h
    out = {"model": p.name if path is None else str(p), "weights": n,
           "bound": "lr / ulp_bf16(w): an upper estimate of Adam's per-step |u| / ulp",
           "lrs": {}}
    for lr in lrs:
        out["lrs"][f"{lr:g}"] = ratio_quantiles(hists[lr].numpy())
    return out


def rlvr_reference(lrs: tuple = RLVR_LRS,
                   path: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Quantiles (p10, p50, p90) of ``lr / ulp_bf16(w)`` over the non-zero entries of every
    2-D weight matrix of the bundled MiniLM (``path``: another safetensors file), for each
    learning rate of ``lrs``."""
    lrs = tuple(float(x) for x in lrs)
    if not lrs or any(not (x > 0) for x in lrs):
        raise ValueError(f"lrs must be positive learning rates, got {lrs!r}")
    return _reference(lrs, None if path is None else str(path))
