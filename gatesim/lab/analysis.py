"""Per-cell analysis (``gatesim diff`` + the fp32-ranked overlaps) and cross-run consistency.

**Keeping Gate III apart from Gate II.** A bf16 weight changes only when its update reaches
half an ULP, and ULPs are small for small weights, so the *stored* update mask of any bf16
fine-tune is over-represented among low-magnitude weights and under-represented among large
(principal) ones, RL or not. The geometry question ("does the update avoid principal
weights?") is therefore also asked of the fp32 update: the entries with the largest
``|Delta W|`` (fp32 accumulated update, :mod:`gatesim.lab.train`), as many as the stored
mask has changed entries (same density, so the same random baseline), overlapped with the
same principal and low-magnitude masks. Ranked that way no rounding threshold takes part.

:func:`analyze_cell` (one executor task per cell) runs :func:`gatesim.diff` of the cell's
base and tuned checkpoints into ``cells/<id>/diff/`` (rows.csv, summaries, figures,
report.md) and returns, per tensor, the diff's columns the lab uses plus
``fp32_density`` (non-zero fp32 update entries over entries) and
``ranked_overlap_principal`` / ``ranked_overlap_low`` (the fp32-ranked overlaps; baseline:
the stored update density). It also writes ``cells/<id>/update_mask.npz``: the stored update
mask of every matrix (packed bits) for the consistency pairs.

:func:`pair_consistency` compares two cells: per module kind and for the whole network
(every 2-D matrix), the Jaccard of the stored update masks (pooled counts; baseline
``pq/(p+q-pq)`` from the pooled densities, :func:`gatesim.metrics.jaccard_baseline`) and the
cosine of the fp32 updates (:func:`gatesim.metrics.cosine` semantics: baseline 0, sd
``1/sqrt(N)``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["save_base_masks", "analyze_cell", "pair_consistency", "DIFF_KEEP"]

#: Diff columns kept in the lab's per-tensor rows.
DIFF_KEEP = ("name", "layer", "module", "shape", "numel", "changed", "sparsity_bitwise",
             "update_density", "spectral", "k", "nss", "angle_left_max_deg",
             "angle_right_max_deg", "energy_topk", "energy_topk_baseline",
             "overlap_principal", "overlap_principal_baseline", "overlap_low",
             "overlap_low_baseline")


def _matrices(folder: Path) -> dict:
    from safetensors import safe_open
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dim() == 2 and t.is_floating_point():
                out[name] = t.float()
    return out


def save_base_masks(base_folder: Path, path: Path, *, k: Optional[int] = None,
                    alpha: float = 0.05) -> None:
    """Principal and low-magnitude masks of every matrix of a base checkpoint (packed
    bits, exact SVD), at the diff's ``k`` (``gatesim.diff.default_k`` unless given)."""
    from gatesim.diff import default_k
    from gatesim.metrics import base_svd, low_magnitude_mask, principal_mask
    arrays = {}
    for name, W in _matrices(Path(base_folder)).items():
        kk = min(k, *W.shape) if k is not None else default_k(*W.shape)
        svd0 = base_svd(W, name=name, cache=False)
        arrays[f"principal::{name}"] = np.packbits(principal_mask(W, kk, alpha, svd0=svd0)
                                                   .numpy().reshape(-1))
        arrays[f"low::{name}"] = np.packbits(low_magnitude_mask(W, alpha).numpy().reshape(-1))
        arrays[f"k::{name}"] = np.array([kk])
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _unpack(packed: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, count=n).astype(bool))


def _stored_masks(base: Path, tuned: Path) -> dict:
    from gatesim.metrics import update_mask
    from safetensors import safe_open
    out = {}
    with safe_open(str(base / "model.safetensors"), "pt") as fb, \
            safe_open(str(tuned / "model.safetensors"), "pt") as ft:
        for name in fb.keys():
            a = fb.get_tensor(name)
            if a.dim() != 2 or name not in ft.keys():
                continue
            out[name] = update_mask(a, ft.get_tensor(name)).reshape(-1)
    return out


def analyze_cell(payload: dict) -> dict:
    """Diff + fp32-ranked overlaps of one cell (module docstring). ``payload``: ``cell``
    (CellConfig dict), ``lab`` (lab folder), ``base`` (base checkpoint folder), ``masks``
    (the base's mask file), ``k``, ``alpha``, and ``ranked_update``: the fp32 update file
    to rank (default the cell's own; a pure-bf16 cell has no fp32 update of its own, so the
    lab passes the fp32 cell of the same method, family and seed when it has one)."""
    import gatesim.diff
    from gatesim.lab.train import CellConfig
    from gatesim.metrics import overlap, top_alpha
    from safetensors import safe_open
    cfg = CellConfig.from_dict(payload["cell"])
    cell_dir = Path(payload["lab"]) / "cells" / cfg.id
    res = gatesim.diff(payload["base"], cell_dir / "checkpoint", out=cell_dir / "diff",
                       k=payload.get("k"), alpha=payload.get("alpha", 0.05), progress=False,
                       figures=payload.get("figures", True), workers=1)
    masks = np.load(payload["masks"])
    stored = _stored_masks(Path(payload["base"]), cell_dir / "checkpoint")
    np.savez(cell_dir / "update_mask.npz",
             **{name: np.packbits(m.numpy()) for name, m in stored.items()})
    rows = []
    own = cell_dir / "update_fp32.safetensors"
    ranked_src = Path(payload.get("ranked_update") or own)
    with safe_open(str(own), "pt") as fo, safe_open(str(ranked_src), "pt") as fu:
        upd_names = set(fu.keys()) & set(fo.keys())
        for r in res.rows.to_dict("records"):
            if r["status"] != "paired":
                continue
            row = {c: _plain(r.get(c)) for c in DIFF_KEEP}
            name = r["name"]
            if name in upd_names and f"principal::{name}" in masks.files:
                n = r["numel"]
                row["fp32_density"] = int((fo.get_tensor(name) != 0).sum()) / n
                d = fu.get_tensor(name).reshape(-1)
                changed = int(r["changed"])
                if changed > 0 and bool(torch.isfinite(d).all()):
                    ranked = top_alpha(d.abs(), changed / n)
                    pm = _unpack(masks[f"principal::{name}"], n)
                    lm = _unpack(masks[f"low::{name}"], n)
                    row["ranked_overlap_principal"] = overlap(ranked, pm).value
                    row["ranked_overlap_low"] = overlap(ranked, lm).value
                    row["mask_size"] = int(pm.sum())
            rows.append(row)
    return {"rows": rows, "ranked_source": ranked_src.parent.name, "diff_seconds": res.seconds}


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _kind(name: str) -> str:
    from gatesim.diff.names import module_kind
    return module_kind(name)


def pair_consistency(lab: Path, a: str, b: str) -> dict:
    """Jaccard of stored update masks and cosine of fp32 updates of cells ``a`` and ``b``,
    per module kind and ``"all"`` (module docstring)."""
    from gatesim.metrics import cosine_baseline_sd, jaccard_baseline
    from safetensors import safe_open
    lab = Path(lab)
    ma, mb = (np.load(lab / "cells" / c / "update_mask.npz") for c in (a, b))
    acc: dict = {}
    with safe_open(str(lab / "cells" / a / "update_fp32.safetensors"), "pt") as fa, \
            safe_open(str(lab / "cells" / b / "update_fp32.safetensors"), "pt") as fb:
        for name in sorted(set(ma.files) & set(mb.files) & set(fa.keys()) & set(fb.keys())):
            da = fa.get_tensor(name).reshape(-1).to(torch.float64)
            db = fb.get_tensor(name).reshape(-1).to(torch.float64)
            n = da.numel()
            ua, ub = _unpack(ma[name], n), _unpack(mb[name], n)
            s = [int((ua & ub).sum()), int((ua | ub).sum()), int(ua.sum()), int(ub.sum()), n,
                 float(da @ db), float(da @ da), float(db @ db)]
            for key in (_kind(name), "all"):
                t = acc.setdefault(key, [0, 0, 0, 0, 0, 0.0, 0.0, 0.0])
                for i, v in enumerate(s):
                    t[i] += v
    out = {}
    for key, (inter, union, pa, pb, n, dot, na, nb) in acc.items():
        p, q = pa / n, pb / n
        cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else None
        out[key] = {"jaccard": inter / union if union else None,
                    "jaccard_baseline": jaccard_baseline(p, q) if p + q > 0 else None,
                    "p": p, "q": q, "cosine": cos, "cosine_baseline": 0.0,
                    "cosine_baseline_sd": cosine_baseline_sd(n), "n": n}
    return out
