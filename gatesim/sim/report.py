"""``table.md`` and PNG figures of a gate-simulation results document.

Every number is a mean over seeds with its 95% Student-t interval
(:func:`gatesim.stats.mean_interval`), written ``mean [lo, hi]`` or as error bars.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Union

from gatesim.stats import mean_interval

__all__ = ["gate_table", "regime_line", "claims_text", "write_table", "write_figures"]


def _groups(doc: dict) -> "OrderedDict[str, list]":
    """Cells grouped by variant (seeds pooled), in sweep order."""
    g: "OrderedDict[str, list]" = OrderedDict()
    for c in doc["cells"]:
        g.setdefault(c["variant"], []).append(c)
    return g


def _iv(values):
    return mean_interval([v for v in values if v is not None])


def _ci(values, fmt: str = ".3f") -> str:
    iv = _iv(values)
    if iv is None:
        return "-"
    if iv.n == 1:
        return format(iv.mean, fmt)
    return f"{format(iv.mean, fmt)} [{format(iv.lo, fmt)}, {format(iv.hi, fmt)}]"


def _pm(values, fmt: str = ".3f") -> str:
    """mean +- half-width of the 95% interval (compact, for wide tables)."""
    iv = _iv(values)
    if iv is None:
        return "-"
    if iv.n == 1:
        return format(iv.mean, fmt)
    return f"{format(iv.mean, fmt)}±{format((iv.hi - iv.lo) / 2, fmt)}"


def _stored(doc: dict) -> Optional[str]:
    from gatesim.sim.sweep import stored_policy
    return doc.get("stored_policy") or stored_policy(doc["cells"])


def _shown(doc: dict) -> str:
    """The policy the report's storage sections show: the stored-checkpoint policy, or,
    in a sweep without bf16 storage, its first policy (the claims that need bf16 then say
    "not tested")."""
    return _stored(doc) or next(iter(doc["cells"][0]["policies"]))


def regime_line(doc: dict) -> str:
    """One line: the default arms' learning and their per-step |u|/ulp next to RLVR's."""
    from gatesim.sim.analysis import anchor_cells
    parts = []
    base = None
    for v in ("rl_kl", "rl_nokl", "rl_clip", "sft"):
        cs = list(anchor_cells(doc["cells"], v).values())
        if not cs:
            continue
        base = base or cs[0]["config"]
        r0 = _iv(c["trajectory"]["reward"][0] for c in cs)
        r1 = _iv(c["trajectory"]["reward"][-1] for c in cs)
        st = _iv(c["step_ratio"]["p50"] for c in cs)
        parts.append(f"{v} reward {r0.mean:.3f}->{r1.mean:.3f} (x{r1.mean / r0.mean:.1f}), "
                     f"step |u|/ulp p50 {st.mean:.3g}")
    if base is None:
        return "Regime: no rl_kl/rl_nokl/rl_clip/sft cells on the real weights."
    ref = doc.get("rlvr_reference", {}).get("lrs", {})
    reftxt = ", ".join(f"lr {lr}: p50 {q['p50']:.3g} (p10 {q['p10']:.3g}, p90 {q['p90']:.3g})"
                       for lr, q in ref.items())
    return (f"Regime: AdamW lr {base['lr']:g}, {base['steps']} steps, {base['rows']} rows of "
            f"{base['matrix']}, {base['n_contexts']} contexts; " + "; ".join(parts) +
            f". Typical RLVR (upper estimate lr/ulp_bf16(w) over MiniLM's weights): {reftxt}.")


def claims_text(doc: dict) -> str:
    lines = []
    for c in doc.get("claims", []):
        iv = ("-" if c["statistic"] is None else
              f"{c['statistic']:.4g} [{c['lo']:.4g}, {c['hi']:.4g}] (n={c['n']})")
        lines.append(f"  {c['verdict'].upper():12s} {c['name']}: {iv} vs threshold "
                     f"{c['threshold']:g} ({c['side']})  {c['detail']}")
    return "\n".join(lines)


def gate_table(doc: dict) -> str:
    """The Markdown report: regime, Gate III, Gate I, Gate II, rotation control, response
    curve, run pairs and the claim verdicts."""
    from gatesim.sim.analysis import family
    groups = _groups(doc)
    cells = doc["cells"]
    pols = list(cells[0]["policies"])
    sp = _shown(doc)
    c0 = cells[0]["config"]
    k, alpha = c0["k"], c0["alpha"]
    seeds = sorted({c["config"]["seed"] for c in cells})
    L = [f"# Gate simulation: {doc['sweep']['name']}", "",
         f"{len(cells)} cells, seeds {seeds}. Each value: mean over seeds with its 95% "
         "Student-t interval (`mean [lo, hi]` or `mean±half-width`). Sparsity: bitwise "
         "sparsity of the stored weights. |u|/ulp: per-step update over the bf16 spacing of "
         "the initial weight it hits (quantiles over all non-zero entry-steps); acc/ulp: the "
         "accumulated fp32 update over the same spacing.", "", regime_line(doc), "",
         "## Regime: learning and update sizes", "",
         "| variant | geometry | reward start | reward end | KL end | update norm | "
         "step \\|u\\|/ulp p10 / p50 / p90 | acc/ulp p50 | acc below ulp/2 |",
         "|---|---|---|---|---|---|---|---|---|"]
    for v, cs in groups.items():
        L.append("| " + " | ".join([
            v, cs[0]["config"]["geometry"],
            _ci((c["trajectory"]["reward"][0] for c in cs), ".4f"),
            _ci((c["trajectory"]["reward"][-1] for c in cs), ".4f"),
            _ci((c["trajectory"]["kl"][-1] for c in cs), ".3g"),
            _pm((c["update_norm"] for c in cs), ".3g"),
            " / ".join(_pm((c["step_ratio"][q] for c in cs), ".3g")
                       for q in ("p10", "p50", "p90")),
            _pm((c["acc_ratio"]["p50"] for c in cs), ".3g"),
            _pm((c["acc_ratio"]["below_half"] for c in cs), ".3f")]) + " |")
    L += ["", "Per-step |u|/ulp of each policy's own stored format, p50 (p10-p90 in the "
          "factor-2 bins of the update kernel's histogram):", "",
          "| variant | " + " | ".join(pols) + " |", "|---|" + "---|" * len(pols)]
    for v, cs in groups.items():
        row = [v]
        for p in pols:
            q = [c["policies"][p]["step_ratio_own_ulp"] for c in cs]
            row.append(f"{_mean([x['p50'] for x in q]):.3g} ({_mean([x['p10'] for x in q]):.2g}"
                       f"-{_mean([x['p90'] for x in q]):.2g})")
        L.append("| " + " | ".join(row) + " |")

    L += ["", "## Gate III: bitwise sparsity of the stored weights, by precision policy", "",
          "| variant | geometry | true density | " +
          " | ".join(pols + [f"null {p}" for p in cells[0].get("null", {})]) + " |",
          "|---|---|---|" + "---|" * (len(pols) + len(cells[0].get("null", {})))]
    for v, cs in groups.items():
        row = [v, cs[0]["config"]["geometry"], _pm((c["true_update_density"] for c in cs), ".4f")]
        row += [_pm((c["policies"][p]["bitwise_sparsity"] for c in cs), ".4f") for p in pols]
        row += [_pm((c["null"][p]["bitwise_sparsity"] for c in cs), ".4f")
                for p in cells[0].get("null", {})]
        L.append("| " + " | ".join(row) + " |")

    resp = _response(doc)
    if resp:
        L += ["", "### Gate III response curve (lr sweep; x = accumulated update / ulp, p50)",
              "", "| algo | lr | acc/ulp p50 | reward end / start | " +
              " | ".join(f"sparsity {p}" for p in _resp_pols(pols)) + " |",
              "|---|---|---|---|" + "---|" * len(_resp_pols(pols))]
        for algo, lr, cs in resp:
            L.append("| " + " | ".join([algo, f"{lr:g}", _pm((c["acc_ratio"]["p50"] for c in cs),
                                                               ".3g"),
                                        _pm((c["trajectory"]["reward"][-1] /
                                             c["trajectory"]["reward"][0] for c in cs), ".2f")]
                                       + [_pm((c["policies"][p]["bitwise_sparsity"] for c in cs),
                                              ".4f") for p in _resp_pols(pols)]) + " |")

    beta = _series(family(cells, "rl_kl", ("beta",)), "beta")
    if beta:
        L += ["", f"## Gate I: the KL anchor (beta sweep of rl_kl; stored policy {sp})", "",
              "| beta | KL end | reward end | update norm | sparsity bf16 | sparsity "
              f"{sp} |", "|---|---|---|---|---|---|"]
        for b, cs in beta:
            L.append("| " + " | ".join([f"{b:g}", _ci((c["trajectory"]["kl"][-1] for c in cs),
                                                      ".3g"),
                                        _ci((c["trajectory"]["reward"][-1] for c in cs), ".3f"),
                                        _ci((c["update_norm"] for c in cs), ".3g"),
                                        _ci((c["policies"].get("bf16", {}).get(
                                            "bitwise_sparsity") for c in cs), ".4f"),
                                        _ci((c["policies"][sp]["bitwise_sparsity"] for c in cs),
                                            ".4f")]) + " |")
    from gatesim.sim.analysis import anchor_cells
    leash = [(v, list(anchor_cells(cells, v).values())) for v in ("rl_kl", "rl_nokl",
                                                                   "rl_clip", "sft")]
    leash = [(v, cs) for v, cs in leash if cs]
    if leash:
        L += ["", "### Explicit penalty vs implicit leash", "",
              "rl_kl: penalty only; rl_nokl: neither penalty nor clipping (only on-policy "
              "sampling); rl_clip: PPO-style clipping with the batch reused, no penalty; sft: "
              "no sampling at all. KL per unit of reward gained says how far each moved from "
              "the reference for what it learned.", "",
              "| arm | beta | clip | inner steps | KL end | reward gain | KL / reward gain | "
              "update norm |", "|---|---|---|---|---|---|---|---|"]
        for v, cs in leash:
            cf = cs[0]["config"]
            gain = [c["trajectory"]["reward"][-1] - c["trajectory"]["reward"][0] for c in cs]
            L.append("| " + " | ".join([
                v, f"{cf['beta']:g}", str(cf["clip"]), str(cf["inner_steps"]),
                _ci((c["trajectory"]["kl"][-1] for c in cs), ".3g"), _ci(gain, ".3f"),
                _ci((c["trajectory"]["kl"][-1] / g for c, g in zip(cs, gain) if g > 0), ".3g"),
                _ci((c["update_norm"] for c in cs), ".3g")]) + " |")

    jac = {}
    for j in doc.get("jaccard", []):
        if j["policy"] == sp:
            jac.setdefault(j["variant"], []).append(j)
    cf = {}
    for j in doc.get("cross_frame", []):
        if j["policy"] == sp:
            cf.setdefault(j["variant"], []).append(j)
    nul = sp in cells[0].get("null", {})
    L += ["", f"## Gate II: where the stored update lands ({sp}; k={k}, alpha={alpha})", "",
          "Each metric: RL/SFT value, then (random baseline" + (", precision-only null)"
                                                              if nul else ")") + ".", "",
          "| variant | geometry | principal overlap | low-magnitude overlap | max angle (deg) "
          "| energy top-k | cross-seed J (baseline) | J vs real run, same seed (baseline) |",
          "|---|---|---|---|---|---|---|---|"]

    def trio(cs, metric, base):
        txt = _pm((c["policies"][sp][metric] for c in cs), ".3g")
        extras = []
        if base:
            extras.append(_pm((c["policies"][sp][base] for c in cs), ".3g"))
        if nul:
            extras.append("null " + _pm((c["null"][sp][metric] for c in cs), ".3g"))
        return txt + (f" ({', '.join(extras)})" if extras else "")

    for v, cs in groups.items():
        js, fs = jac.get(v, []), cf.get(v, [])
        L.append("| " + " | ".join([
            v, cs[0]["config"]["geometry"], trio(cs, "principal_overlap", "overlap_baseline"),
            trio(cs, "low_overlap", "overlap_baseline"), trio(cs, "angle_left_max_deg", None),
            trio(cs, "energy_topk", "energy_baseline"),
            (f"{_pm(j['value'] for j in js)} ({_pm(j['baseline'] for j in js)})" if js else "-"),
            (f"{_pm(j['value'] for j in fs)} ({_pm(j['baseline'] for j in fs)})" if fs else "-"),
        ]) + " |")
    L += ["", "Rotation control (rl_kl): (a) the rotated/random run's mask against the real "
          "run's, same seed, stored coordinates: the column 'J vs real run'; (b) cross-seed "
          "Jaccard within the rotated basis: the column 'cross-seed J' of the rotated row; "
          "(c) principal overlap against the rotated (random) matrix's own principal mask: "
          "the 'principal overlap' column of that row."]

    pairs = doc.get("run_pairs", [])
    if pairs:
        L += ["", f"## Consistency across recipes and datasets ({sp}; accumulated fp32 ΔW "
              "cosine, random pairs: 0 ± sd)", "",
              "| run a | run b | kind | Jaccard | baseline | J/baseline | cosine | random sd |",
              "|---|---|---|---|---|---|---|---|"]
        agg: "OrderedDict[tuple, list]" = OrderedDict()
        for r in pairs:
            agg.setdefault((r["a"], r["b"], r["kind"]), []).append(r)
        for (a, b, kind), rs in agg.items():
            L.append("| " + " | ".join([
                a, b, kind, _pm((r["jaccard"]["value"] for r in rs)),
                _pm((r["jaccard"]["baseline"] for r in rs)),
                _pm((r["jaccard"]["ratio"] for r in rs), ".3f"),
                _pm((r["cosine"] for r in rs), ".3f"), f"{rs[0]['cosine_baseline_sd']:.2g}"])
                     + " |")

    L += ["", "## Claims (thresholds fixed in gatesim/claims.py)", "",
          "| claim | mean [95% interval] (n) | threshold | verdict | detail |",
          "|---|---|---|---|---|"]
    for c in doc.get("claims", []):
        st = ("-" if c["statistic"] is None else
              f"{c['statistic']:.4g} [{c['lo']:.4g}, {c['hi']:.4g}] ({c['n']})")
        L.append(f"| {c['name']} | {st} | {c['side']} {c['threshold']:g} | "
                 f"**{c['verdict']}** | {c['detail']} |")
    return "\n".join(L) + "\n"


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _resp_pols(pols):
    return [p for p in ("bf16", "bf16+master", "bf16_sr") if p in pols]


def _series(fam: dict, field: str) -> list:
    """[(value, cells across seeds)] sorted by the config field ``field``."""
    by: dict = {}
    for members in fam.values():
        for c in members:
            by.setdefault(c["config"][field], []).append(c)
    return sorted(by.items()) if len(by) > 1 else []


def _response(doc: dict) -> list:
    from gatesim.sim.analysis import family
    out = []
    for anchor, name in (("rl_nokl", "RL"), ("sft", "SFT")):
        for lr, cs in _series(family(doc["cells"], anchor, ("lr",)), "lr"):
            out.append((name, lr, cs))
    return out


def write_table(doc: dict, path: Union[str, os.PathLike]) -> None:
    Path(path).write_text(gate_table(doc), encoding="utf-8")


def _err(values):
    iv = _iv(values)
    if iv is None:
        return float("nan"), 0.0
    return iv.mean, (0.0 if iv.n == 1 else (iv.hi - iv.lo) / 2)


def write_figures(doc: dict, directory: Union[str, os.PathLike]) -> list[Path]:
    """gates.png (one panel per gate), response.png (Gate III response curve), beta.png
    (the beta sweep), consistency.png (run-pair matrices), trajectories.png (reward and KL
    over steps), hist.png (per-step |u|/ulp per policy). Error bars: 95% intervals across
    seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gatesim.sim.analysis import anchor_cells, family

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cells = doc["cells"]
    pols = list(cells[0]["policies"])
    sp = _shown(doc)
    written = []

    def save(fig, name):
        fig.tight_layout()
        written.append(d / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    arms = [v for v in ("rl_kl", "rl_nokl", "rl_clip", "sft") if anchor_cells(cells, v)]
    # ---- gates.png: one panel per gate
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    ys = [_err(c["trajectory"]["kl"][-1] for c in anchor_cells(cells, v).values()) for v in arms]
    ax[0].bar(range(len(arms)), [y for y, _ in ys], yerr=[e for _, e in ys], capsize=4,
              color="tab:blue")
    ax[0].set_xticks(range(len(arms)), arms)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("final KL(pi || pi_ref)")
    ax[0].set_title("Gate I: KL anchor vs implicit leash")
    geos = [g for g in ("real", "rotated", "random")
            if any(c["variant"].split("@")[0] == "rl_kl" and c["config"]["geometry"] == g
                   for c in cells)]
    width = 0.25
    for i, (lab, get) in enumerate((
            ("RL (rl_kl)", lambda c: c["policies"][sp]["principal_overlap"]),
            ("precision-only null", lambda c: c.get("null", {}).get(sp, {}).get(
                "principal_overlap")),
            ("random baseline", lambda c: c["policies"][sp]["overlap_baseline"]))):
        vals = []
        for g in geos:
            cs = [c for c in cells if c["variant"].split("@")[0] == "rl_kl"
                  and c["config"]["geometry"] == g]
            vals.append(_err(get(c) for c in cs))
        ax[1].bar([x + (i - 1) * width for x in range(len(geos))], [v for v, _ in vals], width,
                  yerr=[e for _, e in vals], capsize=3, label=lab)
    sft_real = list(anchor_cells(cells, "sft").values())
    if sft_real:
        m, e = _err(c["policies"][sp]["principal_overlap"] for c in sft_real)
        ax[1].errorbar([-0.45], [m], yerr=[e], fmt="D", color="k", label="SFT (real)")
    ax[1].set_xticks(range(len(geos)), geos)
    ax[1].set_ylabel(f"overlap with principal mask ({sp})")
    lo = min((b.get_height() for b in ax[1].patches), default=0)
    ax[1].set_ylim(max(0.0, lo - 0.1), 1.0 + 0.15 * (1.0 - max(0.0, lo - 0.1)))
    ax[1].legend(fontsize=7, loc="upper center", ncol=2)
    ax[1].set_title(f"Gate II: principal overlap (k={cells[0]['config']['k']})")
    rl = list(anchor_cells(cells, "rl_kl").values())
    if rl:
        vals = [_err(c["policies"][p]["bitwise_sparsity"] for c in rl) for p in pols]
        ax[2].bar(range(len(pols)), [v for v, _ in vals], yerr=[e for _, e in vals], capsize=4,
                  color="tab:green")
        ax[2].set_xticks(range(len(pols)), pols, rotation=30, ha="right", fontsize=8)
        ax[2].set_ylim(0, 1.05)
    ax[2].set_ylabel("bitwise sparsity of stored weights")
    ax[2].set_title("Gate III: the same rl_kl stream per policy")
    save(fig, "gates.png")

    # ---- response.png
    resp = _response(doc)
    if resp:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for algo, marker in (("RL", "o"), ("SFT", "s")):
            rows = [(lr, cs) for a, lr, cs in resp if a == algo]
            if not rows:
                continue
            xs = [_err(c["acc_ratio"]["p50"] for c in cs)[0] for _, cs in rows]
            for p, color in zip(_resp_pols(pols), ("tab:red", "tab:blue", "tab:purple")):
                ys = [_err(c["policies"][p]["bitwise_sparsity"] for c in cs) for _, cs in rows]
                ax.errorbar(xs, [y for y, _ in ys], yerr=[e for _, e in ys], marker=marker,
                            color=color, ls="-" if algo == "RL" else "--", capsize=3,
                            label=f"{algo} {p}")
        ax.set_xscale("log")
        ax.axvline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xlabel("accumulated |ΔW| / ulp_bf16(w0), median over entries (lr sweep)")
        ax.set_ylabel("bitwise sparsity of stored weights")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title("Gate III response: sparsity vs accumulated update")
        save(fig, "response.png")

    # ---- beta.png
    beta = _series(family(cells, "rl_kl", ("beta",)), "beta")
    if beta:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        bs = [b for b, _ in beta]
        xs = [max(b, 1e-3) for b in bs]
        for ax, (lab, get) in zip(axes, (
                ("final KL", lambda c: c["trajectory"]["kl"][-1]),
                ("final expected reward", lambda c: c["trajectory"]["reward"][-1]),
                ("||accumulated update||_F", lambda c: c["update_norm"]),
                (f"bitwise sparsity ({sp})", lambda c: c["policies"][sp]["bitwise_sparsity"]))):
            ys = [_err(get(c) for c in cs) for _, cs in beta]
            ax.errorbar(xs, [y for y, _ in ys], yerr=[e for _, e in ys], marker="o", capsize=3)
            ax.set_xscale("log")
            ax.set_xlabel("beta (0 drawn at 1e-3)")
            ax.set_ylabel(lab)
        fig.suptitle("Gate I: beta sweep of rl_kl (error bars: 95% across seeds)")
        save(fig, "beta.png")

    # ---- consistency.png
    pairs = doc.get("run_pairs", [])
    if pairs:
        import numpy as np
        labels = []
        for r in pairs:
            for x in (r["a"], r["b"]):
                if x not in labels:
                    labels.append(x)
        n = len(labels)
        J = np.full((n, n), np.nan)
        C = np.full((n, n), np.nan)
        for a in range(n):
            for b in range(n):
                rs = [r for r in pairs if {r["a"], r["b"]} == {labels[a], labels[b]}
                      and a != b]
                if rs:
                    J[a, b] = _mean(r["jaccard"]["ratio"] for r in rs)
                    C[a, b] = _mean(r["cosine"] for r in rs)
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
        for ax, M, title, cmap in ((axes[0], J, f"Jaccard / baseline ({sp})", "viridis"),
                                   (axes[1], C, "cosine of accumulated fp32 ΔW", "coolwarm")):
            if cmap == "viridis":  # chance is 1: a fixed scale, so noise does not shout
                lim = (1.0, max(1.5, float(np.nanmax(M)) if np.isfinite(M).any() else 1.5))
            else:
                lim = (-1.0, 1.0)
            im = ax.imshow(M, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_xticks(range(n), labels, rotation=40, ha="right", fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
            for a in range(n):
                for b in range(n):
                    if not np.isnan(M[a, b]):
                        ax.text(b, a, f"{M[a, b]:.2f}", ha="center", va="center", fontsize=7,
                                color="w" if cmap == "viridis" else "k")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, fraction=0.046)
        sd = pairs[0]["cosine_baseline_sd"]
        fig.suptitle(f"Recipes and datasets, mean over seeds (random pairs: J/baseline 1, "
                     f"cosine 0 ± {sd:.1g})")
        save(fig, "consistency.png")

    # ---- trajectories.png
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for v in arms:
        cs = list(anchor_cells(cells, v).values())
        steps = cs[0]["trajectory"]["step"]
        for ax, key in zip(axes, ("reward", "kl", "angle_left_max_deg")):
            ms = [_err(c["trajectory"][key][i] for c in cs) for i in range(len(steps))]
            m = [x for x, _ in ms]
            e = [x for _, x in ms]
            ax.plot(steps, m, label=v)
            ax.fill_between(steps, [a - b for a, b in zip(m, e)], [a + b for a, b in zip(m, e)],
                            alpha=0.2)
    k = cells[0]["config"]["k"]
    for ax, yl in zip(axes, ("expected reward", "KL(pi || pi_ref)",
                             f"largest principal angle, top-{k} left (deg)")):
        ax.set_xlabel("step")
        ax.set_ylabel(yl)
        if ax.get_legend_handles_labels()[0]:   # a sweep without the anchor arms has none
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Trajectories on the real weights (training weights; bands: 95% across seeds)")
    save(fig, "trajectories.png")

    # ---- hist.png
    from gatesim.update import HIST_EDGES_LOG2
    centers = [HIST_EDGES_LOG2[0] - 0.5] + [e + 0.5 for e in HIST_EDGES_LOG2]
    pick = [(v, list(anchor_cells(cells, v).values())) for v in ("rl_kl", "sft")]
    pick = [(v, cs) for v, cs in pick if cs]
    if pick:
        fig, axes = plt.subplots(1, len(pick), figsize=(6.5 * len(pick), 4), squeeze=False)
        for ax, (v, cs) in zip(axes[0], pick):
            for p in pols:
                h = [sum(c["policies"][p]["hist"][i] for c in cs) for i in range(len(centers))]
                tot = sum(h) or 1
                ax.plot(centers, [x / tot for x in h], marker=".", label=p)
            ax.axvline(-1, color="k", lw=0.8, ls="--")
            ax.set_xlabel("log2(|update| / ULP of the stored weight)")
            ax.set_ylabel("fraction of non-zero updates")
            ax.set_title(f"{v}: per-step update over the policy's own ULP (all seeds)",
                         fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        save(fig, "hist.png")
    return written
