"""The lab's ``results.json``, ``table.md`` and figures.

``results.json`` (schema ``gatesim.lab.results/3``; no timings, so the same lab gives the
same bytes for any executor or worker count)::

    {"schema": "gatesim.lab.results/3",
     "lab": LabConfig fields,
     "cells": [{"id", "config": CellConfig fields, "task": {family, candidates, train, heldout},
                "curve": {"step", "reward", "kl", "loss"},            # every step
                "evals": {"step", "heldout_acc", "heldout_expected",  # every eval_every
                          "train_acc", "train_expected"},
                "absorbed": {kind: absorbed / non-zero intended updates over the run},
                "changed": {param: stored entries changed}, "numel": {param: entries},
                "final": {heldout_acc0, heldout_acc, heldout_expected0, heldout_expected,
                          train_acc0, train_acc, kl, reward_first, reward_last,
                          changed_fraction},
                "trainable": parameters the arm trains}],
     "analysis": {cell id: {"network" | "kinds"[kind] | "layers"[layer]: AGG,
                            "rows": [per-tensor rows, gatesim.lab.analysis]}},
     "consistency": [{"axis": "seed"|"family"|"recipe", "method", "precision", "a", "b",
                      "kinds": {kind | "all": {jaccard, jaccard_baseline, p, q, cosine,
                                               cosine_baseline, cosine_baseline_sd, n}}}],
     "learning": [{"method", "family", "precision", "n", "heldout_acc0", "heldout_acc",
                   "gain", "heldout_expected0", "heldout_expected", "kl"}],  # intervals
     "claims": [gatesim.claims.Claim.to_dict(): {"name", "statement", "statistic" (mean
                 across seeds), "lo", "hi" (95% interval), "n", "threshold", "side",
                 "baseline", "verdict", "detail", "per_seed"}]}

AGG (one run, a group of tensors): ``numel``, ``changed``, ``sparsity`` (bitwise, pooled
over every tensor of the group, biases and norms included), ``fp32_density`` (non-zero
fp32 update entries, pooled over matrices), ``nss_median``, ``sv_drift_median``
(singular-value drift, :func:`gatesim.lab.analysis.sv_drift`: median over matrices),
``angle_median`` / ``angle_max`` (the largest principal angle of each matrix, left or
right, at the diff's ``k``: median and maximum over matrices), ``energy_ratio`` (mean over
matrices of the update energy in the top-k subspace over its baseline (k/m)(k/n)),
``density`` (stored update density of the matrices: the random baseline of every overlap),
and the overlaps pooled over matrices, each also as a ratio to its density (1 = chance):
``stored_principal`` / ``stored_low`` (stored bitwise mask) and ``ranked_principal`` /
``ranked_low`` (fp32 update ranked by |dW| at the same density), with ``*_ratio``.

Random baselines in AGG: the ``null_*`` keys are the same quantities for the cell's
precision-only null (:mod:`gatesim.lab.analysis`: the run's fp32 update at random
positions with random signs, stored the same way, measured by the same diff):
``null_sparsity``, ``null_nss_median``, ``null_sv_drift_median``, ``null_angle_median``,
``null_angle_max``, ``null_energy_ratio``, ``null_density`` (the null's stored update
density over the matrices) and ``null_principal`` / ``null_low`` with ``*_ratio`` (over
``null_density``). Per-tensor rows carry ``sv_drift`` and ``null_changed``, ``null_nss``,
``null_sv_drift``, ``null_angle_left_max_deg``, ``null_angle_right_max_deg``,
``null_energy_topk``, ``null_overlap_principal``, ``null_overlap_low``.

"arms" (only when the lab has ``arms``, :mod:`gatesim.lab.arms`): one entry per method,
family and arm from :func:`gatesim.lab.arms.arms_summary` (``n``, ``seeds``, ``trainable``,
intervals of ``heldout_acc``, ``gain``, ``kl``, ``reward_last``; seed-mean ``curve`` and
``evals``; ``network``: seed means of the merged checkpoints' AGG keys). "consistency",
"learning" and the lab's own claims read only the full-arm cells; the arms' claims
(``arms_*``) are in "claims".

Version 3 (was 2) added ``trainable`` to every cell, the cell settings ``arm``, ``rank``,
``mask_file``, the lab settings ``arms``, ``rank``, ``mask_file`` and "arms"; nothing was
removed. Version 2 (was 1) added ``sv_drift*`` and every ``null_*`` key; nothing was removed.
An interval in "learning" is ``{mean, lo, hi, n, sd, level}`` over seeds.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Sequence

from gatesim.stats import mean_interval

__all__ = ["build_results", "aggregate", "write_table", "SCHEMA"]

SCHEMA = "gatesim.lab.results/3"
KIND_ORDER = ("q", "k", "v", "o", "up", "down", "embed", "pos_embed", "type_embed", "norm",
              "lm_head", "other")


def _median(rows: list, key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _angles(rows: list, prefix: str = "") -> list:
    """The largest principal angle (left or right) of each matrix."""
    return [max(r[f"{prefix}angle_left_max_deg"], r[f"{prefix}angle_right_max_deg"])
            for r in rows if r.get(f"{prefix}angle_left_max_deg") is not None
            and r.get(f"{prefix}angle_right_max_deg") is not None]


def _energy_ratios(rows: list, prefix: str = "") -> list:
    return [r[f"{prefix}energy_topk"] / r["energy_topk_baseline"] for r in rows
            if r.get(f"{prefix}energy_topk") is not None and r.get("energy_topk_baseline")]


def aggregate(rows: list) -> dict:
    """AGG of a group of per-tensor rows (module docstring)."""
    numel = sum(r["numel"] for r in rows)
    changed = sum(r["changed"] for r in rows)
    mats = [r for r in rows if r.get("spectral") == "ok"]
    out = {"numel": numel, "changed": changed,
           "sparsity": 1 - changed / numel if numel else None}
    have_null = bool(rows) and all(r.get("null_changed") is not None for r in rows)
    out["null_sparsity"] = (1 - sum(r["null_changed"] for r in rows) / numel
                            if numel and have_null else None)
    fp = [r for r in rows if r.get("fp32_density") is not None]
    n_fp = sum(r["numel"] for r in fp)
    out["fp32_density"] = (sum(r["fp32_density"] * r["numel"] for r in fp) / n_fp
                           if n_fp else None)
    for pre in ("", "null_"):
        ang = _angles(mats, pre)
        en = _energy_ratios(mats, pre)
        out[f"{pre}nss_median"] = _median(mats, f"{pre}nss")
        out[f"{pre}sv_drift_median"] = _median(mats, f"{pre}sv_drift")
        out[f"{pre}angle_median"] = statistics.median(ang) if ang else None
        out[f"{pre}angle_max"] = max(ang) if ang else None
        out[f"{pre}energy_ratio"] = sum(en) / len(en) if en else None
    ov = [r for r in mats if r.get("mask_size")]
    n_ov = sum(r["numel"] for r in ov)
    dens = sum(r["changed"] for r in ov) / n_ov if n_ov else None
    out["density"] = dens
    null_dens = (sum(r["null_changed"] for r in ov) / n_ov
                 if n_ov and all(r.get("null_changed") is not None for r in ov) else None)
    out["null_density"] = null_dens
    for name, col, base in (("stored_principal", "overlap_principal", dens),
                            ("stored_low", "overlap_low", dens),
                            ("ranked_principal", "ranked_overlap_principal", dens),
                            ("ranked_low", "ranked_overlap_low", dens),
                            ("null_principal", "null_overlap_principal", null_dens),
                            ("null_low", "null_overlap_low", null_dens)):
        have = [r for r in ov if r.get(col) is not None]
        size = sum(r["mask_size"] for r in have)
        v = sum(r[col] * r["mask_size"] for r in have) / size if size and len(have) == len(ov) \
            else None
        out[name] = v
        out[f"{name}_ratio"] = v / base if v is not None and base else None
    return out


def _analysis_of(entry: dict) -> dict:
    rows = entry["rows"]
    kinds = {}
    for r in rows:
        kinds.setdefault(r["module"], []).append(r)
    layers = {}
    for r in rows:
        if r.get("layer") is not None:
            layers.setdefault(str(int(r["layer"])), []).append(r)
    return {"network": aggregate(rows),
            "kinds": {k: aggregate(v) for k, v in kinds.items()},
            "layers": {k: aggregate(v) for k, v in sorted(layers.items(), key=lambda x: int(x[0]))},
            "rows": rows}


def _consistency_pairs(cells: list) -> list:
    """(axis, method, precision, a, b) for every comparison the lab's cells allow."""
    by = {(c.method, c.family, c.precision, c.seed): c.id for c in cells}
    out = []
    groups: dict = {}
    for c in cells:
        groups.setdefault((c.method, c.family, c.precision), []).append(c.seed)
    for (m, f, p), seeds in sorted(groups.items()):
        for s1, s2 in itertools.combinations(sorted(seeds), 2):
            out.append(("seed", m, p, by[(m, f, p, s1)], by[(m, f, p, s2)]))
    fams = sorted({c.family for c in cells})
    for (m, f, p, s), cid in sorted(by.items()):
        for f2 in fams:
            if f2 > f and (m, f2, p, s) in by:
                out.append(("family", m, p, cid, by[(m, f2, p, s)]))
        if m == "grpo" and ("reinforce", f, p, s) in by:
            out.append(("recipe", m, p, cid, by[("reinforce", f, p, s)]))
    return out


def _learning(doc: dict) -> list:
    groups: dict = {}
    for c in doc["cells"]:
        cf = c["config"]
        groups.setdefault((cf["method"], cf["family"], cf["precision"]), []).append(c["final"])
    out = []
    for (m, f, p), fins in sorted(groups.items()):
        iv = lambda key: _iv([x[key] for x in fins])  # noqa: E731
        out.append({"method": m, "family": f, "precision": p, "n": len(fins),
                    "heldout_acc0": iv("heldout_acc0"), "heldout_acc": iv("heldout_acc"),
                    "gain": _iv([x["heldout_acc"] - x["heldout_acc0"] for x in fins]),
                    "heldout_expected0": iv("heldout_expected0"),
                    "heldout_expected": iv("heldout_expected"), "kl": iv("kl")})
    return out


def _iv(values):
    i = mean_interval(values)
    return i.to_dict() if i is not None else None


def build_results(config, root: Path, cells: list, results: dict, analysis: dict, *,
                  progress: bool = True) -> dict:
    """Assembles, writes and returns the results document (module docstring)."""
    from gatesim.lab.analysis import pair_consistency
    from gatesim.lab.claims import check_lab_claims
    root = Path(root)
    doc = {"schema": SCHEMA, "lab": config.to_dict(), "cells": [], "analysis": {},
           "consistency": [], "learning": [], "claims": []}
    if config.arms:
        doc["arms"] = []
    timings = {}
    for c in cells:
        r = dict(results[c.id])
        timings[c.id] = {"train_seconds": r.pop("seconds", None),
                         "diff_seconds": analysis[c.id].get("diff_seconds"),
                         "null_seconds": analysis[c.id].get("null_seconds")}
        doc["cells"].append(r)
        doc["analysis"][c.id] = _analysis_of(analysis[c.id])
    # the lab's own sections (consistency, learning, its claims, table, figures) read the
    # full-arm cells; restricted arms get their own section
    full_ids = {c.id for c in cells if c.arm == "full"}
    pairs = _consistency_pairs([c for c in cells if c.id in full_ids])
    it = pairs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(pairs, desc="consistency pairs", unit="pair")
    for axis, m, p, a, b in it:
        doc["consistency"].append({"axis": axis, "method": m, "precision": p, "a": a, "b": b,
                                   "kinds": pair_consistency(root, a, b)})
    full = dict(doc, cells=[c for c in doc["cells"] if c["id"] in full_ids])
    doc["learning"] = _learning(full)
    claims = check_lab_claims(full)
    if config.arms:
        from gatesim.lab.arms import arms_summary
        from gatesim.lab.claims import check_arm_claims
        doc["arms"] = arms_summary(doc)
        claims += check_arm_claims(doc)
    doc["claims"] = [c.to_dict() for c in claims]
    tmp = root / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / "results.json")
    (root / "timings.json").write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    full = dict(doc, cells=full["cells"])
    figs = write_figures(full, root / "figures")
    arms_lines: list = []
    if config.arms:
        from gatesim.lab.arms import write_arms_figure, write_arms_table
        arms_lines = write_arms_table(doc, write_arms_figure(doc, root / "figures"))
    write_table(full, root / "table.md", figs, arms_lines)
    return doc


# ---------------------------------------------------------------------------------------
# table.md
# ---------------------------------------------------------------------------------------
def _f(v, fmt="{:.3g}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def _ivs(iv, pct=False):
    if iv is None:
        return "-"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    if iv["n"] < 2:
        return f(iv["mean"])
    return f"{f(iv['mean'])} [{f(iv['lo'])}, {f(iv['hi'])}]"


def _seed_iv(doc, method, family, precision, getter):
    vals = [getter(doc["analysis"][c["id"]]) for c in doc["cells"]
            if c["config"]["method"] == method and c["config"]["family"] == family
            and c["config"]["precision"] == precision]
    return _iv([v for v in vals if v is not None])


def _learning_verdicts(doc: dict) -> list:
    """One plain sentence per family from the ``rlvr_learns[...]`` claims: by how much
    RLVR's held-out accuracy rose, or that it did not learn (the issue's budget rule: the
    lab says so plainly rather than tabulating a run that barely moved)."""
    out = []
    for c in doc["claims"]:
        if not c["name"].startswith("rlvr_learns[") or c["statistic"] is None:
            continue
        fam = c["name"][len("rlvr_learns["):-1]
        gain = (f"{100 * c['statistic']:+.1f} points" + (
            f" [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]" if c["n"] > 1 else "") +
            f" over {c['n']} seed{'s' if c['n'] != 1 else ''}")
        need = f"{100 * c['threshold']:.0f} points"
        if c["verdict"] == "holds":
            out.append(f"- RLVR learned `{fam}`: held-out accuracy {gain} (more than {need}: "
                       "holds).")
        else:
            out.append(f"- **RLVR did not learn `{fam}` materially**: held-out accuracy "
                       f"{gain} (needed more than {need}: {c['verdict']}). Its "
                       "parameter-level rows below describe a run that barely moved.")
    return out


def write_table(doc: dict, path: Path, figs: dict, extra: Sequence[str] = ()) -> None:
    lab = doc["lab"]
    prec = lab["precision"]
    layers = "" if lab["layers"] is None else f", first {lab['layers']} layers"
    L = [f"# gatesim lab: {lab['name']}", "",
         f"Model: {lab['model'] or 'bundled MiniLM (all-MiniLM-L6-v2)'}{layers}; "
         f"{lab['steps']} AdamW steps, lr {lab['lr']:g}, {lab['batch']} prompts/step "
         f"(x {lab['group']} samples for RL), beta {lab['beta']:g}; seeds {lab['seeds']}; "
         f"default precision `{prec}`, optimizer `{lab['optimizer']}`. "
         f"Values are mean [95% interval] over seeds (Student t); `-` = not available.", ""]
    L += ["## Learning (held-out accuracy, greedy, and expected reward = mean p(correct))", "",
          "| method | family | precision | n | acc before | acc after | gain (points) | "
          "E[reward] before | after | final KL |", "|" + "---|" * 10]
    for r in doc["learning"]:
        L.append(f"| {r['method']} | {r['family']} | {r['precision']} | {r['n']} | "
                 f"{_ivs(r['heldout_acc0'], True)} | {_ivs(r['heldout_acc'], True)} | "
                 f"{_ivs(r['gain'], True)} | {_ivs(r['heldout_expected0'], True)} | "
                 f"{_ivs(r['heldout_expected'], True)} | {_ivs(r['kl'])} |")
    L += [""] + _learning_verdicts(doc)
    fams = lab["families"]
    methods = [m for m in lab["methods"]]
    kdesc = lab["k"] or "the diff's default min(64, min(m,n)//4)"
    L += ["", f"## Per module kind, RLVR beside SFT, precision `{prec}`", "",
          "Every metric next to its random baseline. `null`: the precision-only null, the "
          "run's own fp32 update with its entries at random positions and random signs, "
          "stored the same way and measured by the same diff (same |dW| values, same "
          "storage; only where the update lands differs). Sparsity: bitwise, stored "
          "checkpoint; fp32 density: entries the optimizer touched. NSS and sv drift "
          "(largest relative shift of the top-k singular values): median over matrices. "
          f"Angle: median over matrices of the largest principal angle (degrees, k = {kdesc})."
          " Energy: update energy in the top-k subspace over its random baseline (k/m)(k/n) "
          "(1 = chance).", "",
          "| family | kind | method | sparsity | null | fp32 density | NSS | null | sv drift | "
          "null | angle | null | energy/base |", "|" + "---|" * 13]
    kinds_present = sorted({k for a in doc["analysis"].values() for k in a["kinds"]},
                           key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99)

    def getter(group, key):
        if group == "(network)":
            return lambda a: a["network"].get(key)
        if isinstance(group, int):
            return lambda a: a["layers"].get(str(group), {}).get(key)
        return lambda a: a["kinds"].get(group, {}).get(key)

    def row(fam, group, m, keys, p=prec):
        return [_ivs(_seed_iv(doc, m, fam, p, getter(group, key))) for key in keys]

    for fam in fams:
        for k in kinds_present:
            for m in methods:
                cells = row(fam, k, m, ("sparsity", "null_sparsity", "fp32_density",
                                        "nss_median", "null_nss_median", "sv_drift_median",
                                        "null_sv_drift_median", "angle_median",
                                        "null_angle_median", "energy_ratio"))
                L.append(f"| {fam} | {k} | {m} | " + " | ".join(cells) + " |")
    L += ["", "## Mask overlaps: stored bf16 mask, the fp32 update ranked by |dW| at the same "
          "density, and the precision-only null", "",
          "Overlap / random baseline (the mask's own update density; 1 = chance) with the "
          f"principal weights Top_{lab['alpha']:g}(|W0^(k)|) and the low-magnitude weights "
          f"Bottom_{lab['alpha']:g}(|W0|). The stored mask mixes Gate II (geometry) with Gate "
          "III (bf16's ULP is smaller for small weights); the fp32-ranked mask has no rounding "
          "threshold, so it isolates geometry; the null's stored mask has the rounding without "
          "the geometry, so it shows what storage alone does.", "",
          "| family | kind | method | density | princ. stored | princ. ranked | princ. null | "
          "low stored | low ranked | low null |", "|" + "---|" * 10]
    ov_keys = ("density", "stored_principal_ratio", "ranked_principal_ratio",
               "null_principal_ratio", "stored_low_ratio", "ranked_low_ratio",
               "null_low_ratio")
    for fam in fams:
        for k in kinds_present + ["(network)"]:
            for m in methods:
                cells = row(fam, k, m, ov_keys)
                if all(c == "-" for c in cells[1:]):
                    continue
                L.append(f"| {fam} | {k} | {m} | " + " | ".join(cells) + " |")
    L += ["", "## Per layer (transformer layers; network rows above; `null` as above)", "",
          "| family | layer | method | sparsity | null | NSS | null | sv drift | null | angle | "
          "null | princ. ranked |", "|" + "---|" * 12]
    layers = sorted({int(k) for a in doc["analysis"].values() for k in a["layers"]})
    for fam in fams:
        for li in layers:
            for m in methods:
                cells = row(fam, li, m, ("sparsity", "null_sparsity", "nss_median",
                                         "null_nss_median", "sv_drift_median",
                                         "null_sv_drift_median", "angle_median",
                                         "null_angle_median", "ranked_principal_ratio"))
                L.append(f"| {fam} | {li} | {m} | " + " | ".join(cells) + " |")
    precs = sorted({c["config"]["precision"] for c in doc["cells"]})
    if len(precs) > 1:
        L += ["", f"## Every precision ({fams[0]}; seeds as available; whole network)", "",
              "| method | precision | n | sparsity | null | fp32 density | princ. stored | "
              "princ. ranked | princ. null | low stored | low ranked | low null | "
              "absorbed (mean over kinds) |", "|" + "---|" * 13]
        for m in methods:
            for p in precs:
                runs = [c for c in doc["cells"] if c["config"]["method"] == m
                        and c["config"]["family"] == fams[0] and c["config"]["precision"] == p]
                if not runs:
                    continue
                cells = row(fams[0], "(network)", m,
                            ("sparsity", "null_sparsity", "fp32_density",
                             "stored_principal_ratio", "ranked_principal_ratio",
                             "null_principal_ratio", "stored_low_ratio", "ranked_low_ratio",
                             "null_low_ratio"), p=p)
                ab = _iv([statistics.mean(c["absorbed"].values()) for c in runs
                          if c["absorbed"]])
                L.append(f"| {m} | {p} | {len(runs)} | " + " | ".join(cells) +
                         f" | {_ivs(ab)} |")
    L += ["", "## Consistency of update masks (Jaccard) and updates (cosine)", "",
          "Whole network (every matrix). Jaccard next to the independent-Bernoulli baseline "
          "pq/(p+q-pq); cosine next to its random sd 1/sqrt(N) (mean 0).", "",
          "| axis | method | precision | pairs | Jaccard | baseline | cosine | random sd |",
          "|" + "---|" * 8]
    groups: dict = {}
    for p in doc["consistency"]:
        groups.setdefault((p["axis"], p["method"], p["precision"]), []).append(
            p["kinds"].get("all", {}))
    for (axis, m, p), xs in sorted(groups.items()):
        L.append(f"| {axis} | {m} | {p} | {len(xs)} | "
                 f"{_ivs(_iv([x.get('jaccard') for x in xs]))} | "
                 f"{_ivs(_iv([x.get('jaccard_baseline') for x in xs]))} | "
                 f"{_ivs(_iv([x.get('cosine') for x in xs]))} | "
                 f"{_f(xs[0].get('cosine_baseline_sd'))} |")
    L += ["", "## Claims (thresholds fixed in gatesim/lab/claims.py before the run)", "",
          "| claim | mean [95% interval] | n | threshold | verdict |", "|---|---|---|---|---|"]
    for c in doc["claims"]:
        iv = None if c["statistic"] is None else {"mean": c["statistic"], "lo": c["lo"],
                                                  "hi": c["hi"], "n": c["n"]}
        L.append(f"| {c['name']} | {_ivs(iv)} | {c['n']} | "
                 f"{c['side']} {c['threshold']:g} | **{c['verdict']}** |")
    L += [""] + [f"- {c['name']}: {c['statement']}" for c in doc["claims"]]
    if extra:   # sections of other modules (the restricted arms), before the figures
        L += [""] + list(extra[:-1] if extra[-1] == "" else extra)
    if figs:
        L += ["", "## Figures", ""] + [f"![{k}]({Path(v).relative_to(path.parent)})"
                                        for k, v in figs.items()]
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def write_figures(doc: dict, folder: Path) -> dict:
    """``learning.png`` (held-out accuracy and sampled reward over steps) and
    ``layers.png`` (bitwise sparsity per layer, RLVR vs SFT); returns name -> path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    prec = doc["lab"]["precision"]
    out = {}
    fams = doc["lab"]["families"]
    fig, axes = plt.subplots(2, len(fams), figsize=(5 * len(fams), 7), squeeze=False)
    colors = {"grpo": "C0", "reinforce": "C2", "sft": "C1"}
    for j, fam in enumerate(fams):
        for c in doc["cells"]:
            cf = c["config"]
            if cf["family"] != fam or cf["precision"] != prec:
                continue
            col = colors.get(cf["method"], "C3")
            lab = f"{cf['method']}" if cf["seed"] == doc["lab"]["seeds"][0] else None
            axes[0, j].plot(c["evals"]["step"], c["evals"]["heldout_acc"], color=col,
                            alpha=0.8, label=lab)
            axes[1, j].plot(c["curve"]["step"], c["curve"]["reward"], color=col, alpha=0.5,
                            label=lab)
        axes[0, j].set_title(f"{fam}: held-out accuracy")
        axes[1, j].set_title(f"{fam}: sampled reward (train batch)")
        axes[1, j].set_xlabel("step")
        axes[0, j].legend()
    fig.tight_layout()
    out["learning"] = folder / "learning.png"
    fig.savefig(out["learning"], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.5), squeeze=False)
    for j, fam in enumerate(fams):
        for m in ("grpo", "sft"):
            runs = [c for c in doc["cells"] if c["config"]["method"] == m
                    and c["config"]["family"] == fam and c["config"]["precision"] == prec]
            if not runs:
                continue
            layers = sorted(doc["analysis"][runs[0]["id"]]["layers"], key=int)
            ys = [statistics.mean(doc["analysis"][c["id"]]["layers"][li]["sparsity"]
                                  for c in runs) for li in layers]
            axes[0, j].plot([int(x) for x in layers], ys, "o-", color=colors[m], label=m)
        axes[0, j].set_title(f"{fam}: stored bitwise sparsity per layer")
        axes[0, j].set_xlabel("layer")
        axes[0, j].legend()
    fig.tight_layout()
    out["layers"] = folder / "layers.png"
    fig.savefig(out["layers"], dpi=100)
    plt.close(fig)
    return {k: str(v) for k, v in out.items()}
