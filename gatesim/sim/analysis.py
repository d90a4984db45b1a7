"""Sweep-level measurements that pair cells: families of cells found by how their configs
differ, mask overlaps across runs and frames, cosines of accumulated updates.

Cells are related by their configs, not by names, except for three anchor variants a
sweep names (absent anchors leave their families empty, and the claims say "not tested"):

* ``rl_kl``: RL with the explicit KL penalty (the Gate I arm);
* ``rl_nokl``: the same RL without penalty or clipping (only on-policy sampling);
* ``sft``: supervised fine-tuning on the same task.

Families, always on the same seed (``geometry`` real unless said):

* ``geometry``: a cell and the cell equal to it except ``geometry`` = real (cross-frame
  overlap of update masks, in the stored coordinates: :func:`cross_frame`).
* ``beta``: cells equal to ``rl_kl`` except ``beta`` (the beta sweep; ``beta`` 0 is
  ``rl_nokl``).
* ``lr``: cells equal to ``rl_nokl`` or ``sft`` except ``lr`` (the Gate III response).
* ``recipes``: RL cells equal to ``rl_nokl`` except ``algo``, ``clip``, ``inner_steps``;
  ``datasets``: equal to ``rl_nokl`` except ``dataset``. Their union, per seed, is the
  run-pair matrix of :func:`run_pairs`.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

__all__ = ["ANCHORS", "anchor_cells", "family", "cross_frame", "run_pairs", "load_cell_arrays",
           "mask_jaccard", "run_label"]

ANCHORS = ("rl_kl", "rl_nokl", "sft")
RECIPE_FIELDS = ("algo", "clip", "inner_steps")


def _sig(cfg: dict, drop: Iterable[str]) -> str:
    d = {k: v for k, v in cfg.items() if k not in set(drop) | {"seed"}}
    return json.dumps(d, sort_keys=True)


def anchor_cells(cells: list[dict], variant: str) -> dict:
    """seed -> the cell of anchor ``variant`` on the real geometry."""
    return {c["config"]["seed"]: c for c in cells
            if c["variant"] == variant and c["config"]["geometry"] == "real"}


def family(cells: list[dict], anchor: str, fields: Iterable[str]) -> dict:
    """seed -> cells (sweep order, de-duplicated by config) equal to the ``anchor`` cell of
    that seed except in ``fields``; the anchor itself first."""
    fields = tuple(fields)
    out: dict = {}
    for seed, a in anchor_cells(cells, anchor).items():
        sig = _sig(a["config"], fields)
        seen, members = set(), [a]
        seen.add(json.dumps(a["config"], sort_keys=True))
        for c in cells:
            if c["config"]["seed"] != seed or _sig(c["config"], fields) != sig:
                continue
            key = json.dumps(c["config"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                members.append(c)
        out[seed] = members
    return out


def run_label(c: dict, anchor_cfg: dict) -> str:
    """A short name of a cell by how its config differs from the anchor's."""
    cfg = c["config"]
    diffs = [f"{k}={cfg[k]}" for k in sorted(cfg) if k != "seed" and cfg[k] != anchor_cfg.get(k)]
    if not diffs:
        return c["variant"]
    if cfg.get("clip") is not None and cfg.get("inner_steps", 1) > 1 and cfg["algo"] == "grpo":
        diffs = [d for d in diffs if not d.startswith(("clip=", "inner_steps="))] + ["ppo"]
    return ",".join(diffs)


def load_cell_arrays(path: Path) -> dict:
    """A cell's ``.npz``: policy masks (bool, flat), ``null:<policy>`` masks and the
    accumulated fp32 update (``accumulated_update``, float32, the matrix's shape)."""
    from gatesim.sim.run import DELTA_KEY
    with np.load(path) as z:
        shape = tuple(int(x) for x in z["shape"])
        n = int(np.prod(shape))
        out = {k: np.unpackbits(z[k])[:n].astype(bool) for k in z.files
               if k not in ("shape", DELTA_KEY)}
        if DELTA_KEY in z.files:
            out[DELTA_KEY] = np.asarray(z[DELTA_KEY], dtype=np.float32)
    return out


def mask_jaccard(a: np.ndarray, b: np.ndarray) -> dict:
    """Jaccard of two flat bool masks and its independent-Bernoulli baseline
    pq/(p+q-pq) (docs/metrics.md, "Cross-run consistency"); ratio = value / baseline."""
    from gatesim.metrics import jaccard_baseline
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a | b))
    p, q = float(a.mean()), float(b.mean())
    base = jaccard_baseline(p, q) if p + q > 0 else float("nan")
    val = inter / union if union else float("nan")
    return {"value": val, "baseline": base, "p": p, "q": q,
            "ratio": val / base if base and base > 0 else float("nan")}


def _arrays(cache: dict, mask_dir: Path, cell: dict) -> dict:
    from gatesim.sim.sweep import cell_id
    cid = cell_id(cell["key"])
    if cid not in cache:
        cache[cid] = load_cell_arrays(mask_dir / f"{cid}.npz")
    return cache[cid]


def cross_frame(cells: list[dict], mask_dir: Path, cache: Optional[dict] = None) -> list[dict]:
    """For each non-real cell with a real twin (same config but ``geometry``, same seed):
    per policy, the Jaccard of its update mask with the twin's, entry by entry in the
    stored coordinates, with its baseline. This is the rotation claim's frame (a)."""
    cache = {} if cache is None else cache
    real = {json.dumps(c["config"], sort_keys=True): c for c in cells
            if c["config"]["geometry"] == "real"}
    out = []
    for c in cells:
        geo = c["config"]["geometry"]
        if geo == "real":
            continue
        twin = real.get(json.dumps(dict(c["config"], geometry="real"), sort_keys=True))
        if twin is None:
            continue
        a, b = _arrays(cache, mask_dir, c), _arrays(cache, mask_dir, twin)
        for pol in c["policies"]:
            out.append({"variant": c["variant"], "geometry": geo, "policy": pol,
                        "seed": c["config"]["seed"], **mask_jaccard(a[pol], b[pol])})
    return out


def run_pairs(cells: list[dict], mask_dir: Path, policy: str,
              cache: Optional[dict] = None) -> list[dict]:
    """The run-pair matrix of recipes and datasets, per seed: for every pair of runs in
    the union of the ``recipes`` and ``datasets`` families of ``rl_nokl``, the Jaccard of
    their ``policy`` update masks (with baseline) and the cosine of their accumulated fp32
    updates (with the sd 1/sqrt(N) of two independent random directions;
    :func:`gatesim.metrics.cosine`)."""
    import torch
    from gatesim.metrics import cosine
    from gatesim.sim.run import DELTA_KEY
    cache = {} if cache is None else cache
    rec = family(cells, "rl_nokl", RECIPE_FIELDS)
    dat = family(cells, "rl_nokl", ("dataset",))
    out = []
    for seed in sorted(rec):
        members = [c for c in rec[seed] if c["config"]["algo"] != "sft"]
        members += [c for c in dat.get(seed, [])[1:]]
        if len(members) < 2:
            continue
        anchor_cfg = members[0]["config"]
        for ca, cb in itertools.combinations(members, 2):
            a, b = _arrays(cache, mask_dir, ca), _arrays(cache, mask_dir, cb)
            if policy not in a or policy not in b:
                continue
            kind = "dataset" if ca["config"]["dataset"] != cb["config"]["dataset"] else "recipe"
            cos = cosine(torch.from_numpy(a[DELTA_KEY]), torch.from_numpy(b[DELTA_KEY]))
            out.append({"seed": seed, "kind": kind, "policy": policy,
                        "a": run_label(ca, anchor_cfg), "b": run_label(cb, anchor_cfg),
                        "jaccard": mask_jaccard(a[policy], b[policy]),
                        "cosine": cos.value, "cosine_baseline": cos.baseline,
                        "cosine_baseline_sd": cos.baseline_sd})
    return out
