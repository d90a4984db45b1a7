"""The factorial sweep: every cell through an executor, each result stored at once, then
cross-seed Jaccard, the claims, ``results.json``, ``table.md`` and figures.

Output directory ``<out>/<sweep name>/``:

* ``cells.jsonl``: one line per finished cell (:class:`gatesim.executor.ResultStore`); a
  rerun skips the cells already there, so a killed sweep loses only the cells in flight.
* ``masks/<cell id>.npz``: each policy's update mask (packed bits) for the Jaccard pairs.
* ``results.json`` (schema ``gatesim.sim.results/2``)::

      {"schema": "gatesim.sim.results/2",
       "sweep": {name, base, variants, grid},
       "stored_policy": "bf16+master" (or "bf16"),
       "cells": [{"key", "variant", "config": CellConfig fields,
                  "trajectory": {"step", "reward", "kl", "angle_left_max_deg"},
                  "true_update_density",  # fraction with a non-zero accumulated fp32 update
                  "mean_step_norm", "update_norm",  # ||accumulated fp32 update||_F
                  "step_ratio", "nominal_step_ratio": {p10, p50, p90},  # |u|/ulp_bf16(w0)
                  "acc_ratio": {p10, p50, p90, below_half},  # |acc|/ulp_bf16(w0)
                  "policies": {policy: {bitwise_sparsity, relative_sparsity, atol_sparsity,
                               update_density, absorbed_fraction, absorbed_updates,
                               nonzero_updates, absorbed_mass, hist (HIST_BINS = 34 bins of
                               log2(|u|/ulp), gatesim.update.HIST_EDGES_LOG2),
                               step_ratio_own_ulp {p10, p50, p90}, nss,
                               angle_left_max_deg, angle_right_max_deg (k = config k),
                               energy_topk, energy_baseline, sv_drift, principal_overlap,
                               low_overlap, principal_overlap_excl_low, overlap_baseline,
                               overlap_excl_low_baseline}},
                  "null": {policy: the same fields, for the precision-only null},
                  "final_weights_sha": {policy: sha256 prefix of the final fp32 bits}}],
       "jaccard": [{"variant", "geometry", "policy", "seeds": [a, b], "value", "baseline",
                    "p", "q"}],                      # cross-seed, same config
       "cross_frame": [{"variant", "geometry", "policy", "seed", "value", "baseline", "p",
                        "q", "ratio"}],              # non-real cell vs its real twin
       "run_pairs": [{"seed", "kind": "recipe"|"dataset", "policy", "a", "b",
                      "jaccard": {value, baseline, p, q, ratio}, "cosine",
                      "cosine_baseline", "cosine_baseline_sd"}],
       "rlvr_reference": {"model", "weights", "bound", "lrs": {lr: {p10, p50, p90}}},
       "claims": [{"name", "statement", "statistic", "lo", "hi", "n", "threshold", "side",
                   "baseline", "verdict", "detail", "per_seed"}]}

  Cells are in sweep order and the file holds no timings, so the same sweep gives the same
  bytes for any number of workers. Families of cells (beta sweep, lr sweep, recipes,
  datasets, geometry twins) are found by config: :mod:`gatesim.sim.analysis`.
* ``masks/<cell id>.npz`` also holds the null's masks (``null:<policy>``) and the
  accumulated fp32 update (``accumulated_update``) for the run-pair cosines.
* ``table.md``: the gate table and the claim verdicts. ``figures/*.png``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from gatesim.executor import Executor, ResultStore, make_executor, show_status
from gatesim.sim.config import CellConfig, SweepConfig
from gatesim.sim.validate import validate_sweep

__all__ = ["ablate", "RESULTS_SCHEMA", "cell_id", "jaccard_pairs", "stored_policy"]

RESULTS_SCHEMA = "gatesim.sim.results/2"


def cell_id(key: str) -> str:
    """A short file-name-safe id of a cell key."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def _run(payload: tuple) -> dict:
    """Executor task (module level, so a process pool can pickle it)."""
    from gatesim.sim.run import run_cell
    cfg_dict, mask_path = payload
    return run_cell(CellConfig.from_dict(cfg_dict), mask_path=mask_path)


def _load_masks(path: Path) -> dict:
    from gatesim.sim.analysis import load_cell_arrays
    return load_cell_arrays(path)


def stored_policy(cells: list[dict]) -> Optional[str]:
    """The policy that stands for a stored checkpoint: ``bf16+master`` when the cells have
    it (mixed-precision training saves bf16(master)), else ``bf16``, else None."""
    pols = cells[0]["policies"] if cells else {}
    for p in ("bf16+master", "bf16"):
        if p in pols:
            return p
    return None


def jaccard_pairs(cells: list[dict], mask_dir: Path) -> list[dict]:
    """Cross-seed Jaccard of update masks: for cells equal in everything but the seed,
    every pair of seeds, every policy. Baseline pq/(p+q-pq) (docs/metrics.md, "Cross-run
    consistency")."""
    from gatesim.metrics import jaccard_baseline
    groups: dict = {}
    for c in cells:
        cfg = dict(c["config"])
        seed = cfg.pop("seed")
        sig = json.dumps(cfg, sort_keys=True)
        groups.setdefault(sig, []).append((seed, c))
    out = []
    for sig, members in groups.items():
        members.sort(key=lambda x: x[0])
        for (sa, ca), (sb, cb) in itertools.combinations(members, 2):
            ma = _load_masks(mask_dir / f"{cell_id(ca['key'])}.npz")
            mb = _load_masks(mask_dir / f"{cell_id(cb['key'])}.npz")
            for pol in ca["policies"]:
                a, b = ma[pol], mb[pol]
                inter = int(np.count_nonzero(a & b))
                union = int(np.count_nonzero(a | b))
                p, q = float(a.mean()), float(b.mean())
                out.append({"variant": ca["variant"], "geometry": ca["config"]["geometry"],
                            "policy": pol, "seeds": [sa, sb],
                            "value": inter / union if union else 0.0,
                            "baseline": jaccard_baseline(p, q) if (p + q) > 0 else 0.0,
                            "p": p, "q": q})
    return out


def ablate(sweep: SweepConfig, out: Union[str, os.PathLike] = "results", *,
           workers: Optional[int] = None, executor: Optional[Executor] = None,
           progress: bool = True, figures: bool = True) -> dict:
    """Runs (or resumes) a sweep; writes the outputs described in the module docstring
    and returns the results dict. ``workers``: None/1 serial, n > 1 a local process pool
    (0: one per core); or pass any :class:`gatesim.executor.Executor`."""
    from gatesim.claims import check_claims
    from gatesim.sim.report import write_figures, write_table

    run_dir = Path(out) / sweep.name
    inputs = validate_sweep(sweep)   # every input of every cell, before anything is written
    ex = executor if executor is not None else make_executor(workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    mask_dir = run_dir / "masks"
    cfg_path = run_dir / "sweep.json"
    # the weights' checksums too: cells stored from other bytes are never reused
    cfg_text = json.dumps({**sweep.to_dict(), "inputs": inputs}, indent=1, sort_keys=True)
    if cfg_path.exists() and cfg_path.read_text(encoding="utf-8") != cfg_text:
        raise ValueError(f"{run_dir} holds results of a different sweep config (or of other "
                         "weights: sweep.json records their checksums); use another "
                         "--out or name, or delete it")
    cfg_path.write_text(cfg_text, encoding="utf-8")
    store = ResultStore(run_dir / "cells.jsonl")
    cells = sweep.cells()
    # a stored cell whose mask file went missing is rerun
    tasks = []
    for key, cfg in cells:
        mpath = mask_dir / f"{cell_id(key)}.npz"
        if key in store and not mpath.exists():
            store.discard(key)
        tasks.append((key, (cfg.to_dict(), str(mpath))))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), initial=sum(1 for k, _ in tasks if k in store),
                   desc=f"gatesim ablate {sweep.name}", unit="cell")
    show_status(ex, bar)
    try:
        results = store.run(ex, _run, tasks, progress=(lambda k: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    lost = [k for k, (_, mp) in tasks if not Path(mp).exists()]
    if lost:  # written by workers on another filesystem (a cluster without shared --out)
        raise FileNotFoundError(f"{len(lost)} finished cells have no mask file under "
                                f"{mask_dir} (first: {lost[0]}); the workers wrote them "
                                "where this machine cannot see: on a cluster, --out must be "
                                "on a filesystem every node shares")
    cell_rows = []
    for key, _ in cells:
        r = dict(results[key])
        variant = key.split(",", 1)[0].split("=", 1)[1]
        cell_rows.append({"key": key, "variant": variant, **r})
    from gatesim.sim.analysis import cross_frame, run_pairs
    from gatesim.sim.regime import rlvr_reference
    cache: dict = {}
    stored = stored_policy(cell_rows)
    doc = {"schema": RESULTS_SCHEMA, "sweep": sweep.to_dict(), "cells": cell_rows,
           "stored_policy": stored,
           "jaccard": jaccard_pairs(cell_rows, mask_dir),
           "cross_frame": cross_frame(cell_rows, mask_dir, cache),
           "run_pairs": run_pairs(cell_rows, mask_dir, stored, cache) if stored else [],
           "rlvr_reference": rlvr_reference()}
    doc["claims"] = [c.to_dict() for c in check_claims(doc)]
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True), encoding="utf-8")
    os.replace(tmp, run_dir / "results.json")
    write_table(doc, run_dir / "table.md")
    if figures:
        write_figures(doc, run_dir / "figures")
    return doc
