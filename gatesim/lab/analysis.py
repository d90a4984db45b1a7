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

**Random baselines** (schema ``gatesim.lab.results/2``). Every per-tensor metric sits next
to one:

* overlaps: the update density (:func:`gatesim.metrics.overlap`); energy in the top-k
  subspace: ``(k/m)(k/n)`` (:func:`gatesim.metrics.energy_baseline`);
* bitwise sparsity, NSS, singular-value drift, principal angles (and, again, energy and the
  overlaps): the **precision-only null** of the gate simulation (:mod:`gatesim.sim.run`)
  taken to the checkpoint. Per matrix, the cell's own fp32 update ``Delta W`` with its
  entries moved by a random permutation ``pi`` and multiplied by random signs ``s``
  (:func:`null_update`, drawn from the cell's seed and the tensor's name), added to the
  cell's starting weights and stored the way the cell stores (:func:`null_tensors`: bf16
  round-to-nearest for the bf16 policies, nothing for fp32), then measured by the same
  :func:`gatesim.diff` against the same base. The null keeps every |update| value and the
  storage, and changes only *where* the update lands, so a metric that differs from its
  null measures the update's direction and placement, not its size or the rounding. For
  ``bf16+master`` and ``fp32`` this is exactly what the storage does to the accumulated
  update; pure ``bf16`` has no per-step record, so its null rounds the accumulated stored
  update once (its per-step absorption is not replayed). Vectors (biases, LayerNorm) have
  no recorded update: the null leaves them as the run stored them.

**Singular-value drift** (``sv_drift``): the gate simulation's ``sv_drift`` vector
``sigma(W1) - sigma(W0)`` (:func:`gatesim.metrics.singular_values`, exact, float64), summed
up per matrix as the largest relative shift of the top-``k`` singular values,
``max_{i<=k} |sigma_i(W1) - sigma_i(W0)| / sigma_i(W0)`` (:func:`sv_drift`), at the diff's
``k`` (the angles' ``k``). NSS is the whole spectrum's shift in norm, dominated by the
largest values; ``sv_drift`` says how far the principal values themselves moved,
relative to their size.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["save_base_masks", "analyze_cell", "pair_consistency", "null_update",
           "null_tensors", "sv_drift", "DIFF_KEEP", "NULL_KEEP", "ANALYSIS_VERSION"]

#: Version of an ``analysis.jsonl`` entry: a resumed lab recomputes the analysis (not the
#: training) of entries of another version.
ANALYSIS_VERSION = 2

#: Diff columns kept in the lab's per-tensor rows.
DIFF_KEEP = ("name", "layer", "module", "shape", "numel", "changed", "sparsity_bitwise",
             "update_density", "spectral", "k", "nss", "angle_left_max_deg",
             "angle_right_max_deg", "energy_topk", "energy_topk_baseline",
             "overlap_principal", "overlap_principal_baseline", "overlap_low",
             "overlap_low_baseline")
#: Diff columns of the precision-only null kept in the rows, as ``null_<column>``.
NULL_KEEP = ("changed", "nss", "angle_left_max_deg", "angle_right_max_deg", "energy_topk",
             "overlap_principal", "overlap_low")


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
    bits, exact SVD), at the diff's ``k`` (``gatesim.diff.default_k`` unless given), and
    its singular values (``sv::<name>``, for :func:`sv_drift`)."""
    from gatesim.diff import default_k
    from gatesim.metrics import base_svd, low_magnitude_mask, principal_mask, singular_values
    arrays = {}
    for name, W in _matrices(Path(base_folder)).items():
        kk = min(k, *W.shape) if k is not None else default_k(*W.shape)
        svd0 = base_svd(W, name=name, cache=False)
        arrays[f"principal::{name}"] = np.packbits(principal_mask(W, kk, alpha, svd0=svd0)
                                                   .numpy().reshape(-1))
        arrays[f"low::{name}"] = np.packbits(low_magnitude_mask(W, alpha).numpy().reshape(-1))
        arrays[f"k::{name}"] = np.array([kk])
        # the same function as the tuned side's (sv_drift compares like with like)
        arrays[f"sv::{name}"] = singular_values(W).cpu().numpy()
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def null_update(delta: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """The precision-only null of one matrix's update (module docstring): ``s * delta[pi]``,
    a random permutation ``pi`` of the entries and random signs ``s``, both drawn from
    ``seed`` and ``name`` (the same null on every run and in every worker). Keeps the
    multiset of |update| values exactly."""
    mix = (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8")) * 31 + 29) % 2 ** 63
    gen = torch.Generator().manual_seed(mix)
    flat = delta.reshape(-1)
    perm = torch.randperm(flat.numel(), generator=gen)
    sign = torch.randint(0, 2, (flat.numel(),), generator=gen).to(flat.dtype) * 2 - 1
    return (flat[perm] * sign).reshape(delta.shape)


def null_tensors(start: Path, update: Path, storage: str, seed: int) -> dict:
    """The null checkpoint of a cell (module docstring): for every matrix in the fp32
    ``update`` file, ``store(W_start + null_update(Delta W))`` with ``W_start`` read from the
    ``start`` checkpoint (the cell's fp32 starting weights, or its bf16 ones for pure bf16)
    and ``store`` round-to-nearest bf16 (``storage == "bf16"``) or nothing (``"fp32"``)."""
    from safetensors import safe_open
    if storage not in ("bf16", "fp32"):
        raise ValueError(f"storage must be 'bf16' or 'fp32', got {storage!r}")
    out = {}
    with safe_open(str(start), "pt") as fs, safe_open(str(update), "pt") as fu:
        have = set(fs.keys())
        for name in fu.keys():
            if name not in have:
                raise ValueError(f"{update} holds {name!r}, which {start} does not")
            w0 = fs.get_tensor(name).float()
            d = fu.get_tensor(name).float()
            if d.shape != w0.shape:
                raise ValueError(f"{name}: update shape {tuple(d.shape)} != weights shape "
                                 f"{tuple(w0.shape)}")
            w = w0 + null_update(d, seed, name)
            out[name] = (w.to(torch.bfloat16) if storage == "bf16" else w).contiguous()
    return out


def sv_drift(s0: torch.Tensor, s1: torch.Tensor, k: int) -> Optional[float]:
    """Singular-value drift of one matrix (module docstring): ``max_{i<=k} |s1_i - s0_i| /
    s0_i`` over the top ``k`` of two descending spectra (the indices where ``s0_i > 0``;
    None when there is none)."""
    kk = min(int(k), s0.numel(), s1.numel())
    a = s0[:kk].to(torch.float64)
    b = s1[:kk].to(torch.float64).to(a.device)
    pos = a > 0
    if kk < 1 or not bool(pos.any()):
        return None
    return float(((b[pos] - a[pos]).abs() / a[pos]).max())


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
    """Diff, fp32-ranked overlaps, singular-value drift and the precision-only null of one
    cell (module docstring). ``payload``: ``cell`` (CellConfig dict), ``lab`` (lab folder),
    ``base`` (base checkpoint folder, in the cell's storage format), ``start`` (the
    checkpoint the cell's fp32 update starts from: the fp32 base for ``bf16+master`` and
    ``fp32``, the bf16 base for pure ``bf16``), ``masks`` (the base's mask file), ``k``,
    ``alpha``, and ``ranked_update``: the fp32 update file to rank (default the cell's own;
    a pure-bf16 cell's own is the stored difference, already cut by the rounding, so the
    lab passes the fp32 cell of the same method, family and seed when it has one)."""
    import gatesim.diff
    from gatesim.lab.train import CellConfig, storage_dtype
    from gatesim.metrics import overlap, singular_values, top_alpha
    from safetensors import safe_open
    from safetensors.torch import save_file
    cfg = CellConfig.from_dict(payload["cell"])
    cell_dir = Path(payload["lab"]) / "cells" / cfg.id
    base = Path(payload["base"])
    k, alpha = payload.get("k"), payload.get("alpha", 0.05)
    res = gatesim.diff(base, cell_dir / "checkpoint", out=cell_dir / "diff", k=k,
                       alpha=alpha, progress=False, figures=payload.get("figures", True),
                       workers=1)
    masks = np.load(payload["masks"])
    stored = _stored_masks(base, cell_dir / "checkpoint")
    np.savez(cell_dir / "update_mask.npz",
             **{name: np.packbits(m.numpy()) for name, m in stored.items()})
    own = cell_dir / "update_fp32.safetensors"
    # the precision-only null: written next to the cell, diffed against the same base by
    # the same code, then deleted (only its rows are kept)
    null = null_tensors(Path(payload["start"]) / "model.safetensors", own,
                        storage_dtype(cfg.precision), cfg.seed)
    null_file = cell_dir / "null.tmp.safetensors"
    save_file(null, str(null_file))
    try:
        null_res = gatesim.diff(base, null_file, out=None, k=k, alpha=alpha, progress=False,
                                figures=False, workers=1)
    finally:
        null_file.unlink(missing_ok=True)
    null_rows = {r["name"]: r for r in null_res.rows.to_dict("records")
                 if r["status"] == "paired"}
    rows = []
    ranked_src = Path(payload.get("ranked_update") or own)
    with safe_open(str(own), "pt") as fo, safe_open(str(ranked_src), "pt") as fu, \
            safe_open(str(cell_dir / "checkpoint" / "model.safetensors"), "pt") as ft:
        upd_names = set(fu.keys()) & set(fo.keys())
        for r in res.rows.to_dict("records"):
            if r["status"] != "paired":
                continue
            row = {c: _plain(r.get(c)) for c in DIFF_KEEP}
            name = r["name"]
            nr = null_rows.get(name)
            if nr is None:   # a vector: the null leaves it as the run stored it
                row["null_changed"] = row["changed"]
            else:
                for c in NULL_KEEP:
                    row[f"null_{c}"] = _plain(nr.get(c))
            if f"sv::{name}" in masks.files and r.get("spectral") == "ok":
                s0 = torch.from_numpy(masks[f"sv::{name}"])
                kk = int(r["k"])
                row["sv_drift"] = sv_drift(s0, singular_values(ft.get_tensor(name)), kk)
                if name in null:
                    row["null_sv_drift"] = sv_drift(s0, singular_values(null[name]), kk)
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
    return {"version": ANALYSIS_VERSION, "rows": rows, "ranked_source": ranked_src.parent.name,
            "diff_seconds": res.seconds, "null_seconds": null_res.seconds}


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
    from gatesim.metrics.similarity import dot64
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
                 dot64(da, db), dot64(da, da), dot64(db, db)]
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
