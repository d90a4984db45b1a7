"""``table.md`` and PNG figures of a gate-simulation results document."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Union

from gatesim.update import HIST_EDGES_LOG2

__all__ = ["gate_table", "write_table", "write_figures"]


def _groups(doc: dict) -> "OrderedDict[tuple, list]":
    """Cells grouped by (variant, geometry), seeds pooled, in sweep order."""
    g: "OrderedDict[tuple, list]" = OrderedDict()
    for c in doc["cells"]:
        g.setdefault((c["variant"], c["config"]["geometry"]), []).append(c)
    return g


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _stored_policy(doc: dict) -> str:
    pols = list(doc["cells"][0]["policies"])
    for p in ("bf16+master", "bf16"):
        if p in pols:
            return p
    return pols[0]


def gate_table(doc: dict) -> str:
    """The Markdown gate table, the geometry/mask table and the claim verdicts."""
    groups = _groups(doc)
    pols = list(doc["cells"][0]["policies"])
    sp = _stored_policy(doc)
    k = doc["cells"][0]["config"]["k"]
    alpha = doc["cells"][0]["config"]["alpha"]
    lines = [f"# Gate simulation: {doc['sweep']['name']}", "",
             f"{len(doc['cells'])} cells; values are means over seeds. Sparsity is the bitwise "
             "sparsity of the stored weights (fraction of entries whose stored bits did not "
             "change); 'true density' is the fraction of entries whose accumulated fp32 "
             "update is non-zero.", "",
             "## Gate III: bitwise sparsity of the stored weights, by precision policy", "",
             "| variant | geometry | true density | " + " | ".join(pols) + " |",
             "|---|---|---|" + "---|" * len(pols)]
    for (v, geo), cs in groups.items():
        row = [v, geo, f"{_mean(c['true_update_density'] for c in cs):.4f}"]
        row += [f"{_mean(c['policies'][p]['bitwise_sparsity'] for c in cs):.4f}" for p in pols]
        lines.append("| " + " | ".join(row) + " |")
    jac = {}
    for j in doc.get("jaccard", []):
        if j["policy"] == sp:
            jac.setdefault((j["variant"], j["geometry"]), []).append(j)
    lines += ["", f"## Gates I and II: geometry and masks of the stored update ({sp}; k={k}, "
              f"alpha={alpha}; baselines in parentheses)", "",
              "| variant | geometry | absorbed | NSS | max angle (deg) | principal overlap | "
              "low-magnitude overlap | cross-seed Jaccard | reward start -> end | KL end |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (v, geo), cs in groups.items():
        P = [c["policies"][sp] for c in cs]
        js = jac.get((v, geo), [])
        jtxt = (f"{_mean(j['value'] for j in js):.3f} ({_mean(j['baseline'] for j in js):.3f})"
                if js else "-")
        lines.append("| " + " | ".join([
            v, geo, f"{_mean(p['absorbed_fraction'] for p in P):.3f}",
            f"{_mean(p['nss'] for p in P):.2e}",
            f"{_mean(p['angle_left_max_deg'] for p in P):.3f}",
            f"{_mean(p['principal_overlap'] for p in P):.3f} "
            f"({_mean(p['overlap_baseline'] for p in P):.3f})",
            f"{_mean(p['low_overlap'] for p in P):.3f} "
            f"({_mean(p['overlap_baseline'] for p in P):.3f})",
            jtxt,
            f"{_mean(c['trajectory']['reward'][0] for c in cs):.4f} -> "
            f"{_mean(c['trajectory']['reward'][-1] for c in cs):.4f}",
            f"{_mean(c['trajectory']['kl'][-1] for c in cs):.2e}"]) + " |")
    lines += ["", "## Claims", "", "| claim | statistic | baseline | verdict | detail |",
              "|---|---|---|---|---|"]
    for c in doc.get("claims", []):
        st = "-" if c["statistic"] is None else f"{c['statistic']:.4g}"
        bs = "-" if c["baseline"] is None else f"{c['baseline']:.4g}"
        lines.append(f"| {c['name']} | {st} | {bs} | **{c['verdict']}** | {c['detail']} |")
    return "\n".join(lines) + "\n"


def write_table(doc: dict, path: Union[str, os.PathLike]) -> None:
    Path(path).write_text(gate_table(doc), encoding="utf-8")


def write_figures(doc: dict, directory: Union[str, os.PathLike]) -> list[Path]:
    """sparsity.png (per gate cell and policy), hist.png (|u|/ulp of one RL and one SFT
    cell), sv_drift.png (singular-value drift), angles.png (largest principal angle,
    reward and KL over steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    groups = _groups(doc)
    pols = list(doc["cells"][0]["policies"])
    written = []

    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(groups) * len(pols) / 3), 4.5))
    width = 0.8 / len(pols)
    labels = [f"{v}\n{g}" for v, g in groups]
    for i, p in enumerate(pols):
        ys = [_mean(c["policies"][p]["bitwise_sparsity"] for c in cs) for cs in groups.values()]
        ax.bar([x + i * width for x in range(len(groups))], ys, width, label=p)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], labels, fontsize=7)
    ax.set_ylabel("bitwise sparsity of stored weights")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("Sparsity per gate cell and precision policy")
    fig.tight_layout()
    written.append(d / "sparsity.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    pick = {}
    for c in doc["cells"]:
        kind = "RL" if c["config"]["algo"] != "sft" else "SFT"
        if c["config"]["geometry"] == "real" and kind not in pick:
            pick[kind] = c
    centers = [HIST_EDGES_LOG2[0] - 0.5] + [e + 0.5 for e in HIST_EDGES_LOG2]
    if pick:
        fig, axes = plt.subplots(1, len(pick), figsize=(6 * len(pick), 4), squeeze=False)
        for ax, (kind, c) in zip(axes[0], pick.items()):
            for p in pols:
                h = c["policies"][p]["hist"]
                tot = sum(h) or 1
                ax.plot(centers, [x / tot for x in h], marker=".", label=p)
            ax.axvline(-1, color="k", lw=0.8, ls="--")
            ax.set_xlabel("log2(|update| / ULP of the stored weight)")
            ax.set_ylabel("fraction of non-zero updates (all steps)")
            ax.set_title(f"{kind}: {c['key']}", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(d / "hist.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        ref = "fp32" if "fp32" in pols else pols[0]
        for kind, c in pick.items():
            drift = c["policies"][ref]["sv_drift"]
            ax.plot(range(1, len(drift) + 1), drift, label=f"{kind} ({ref})")
        ax.set_xscale("log")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("sigma_i(W1) - sigma_i(W0)")
        ax.set_title("Singular-value drift")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(d / "sv_drift.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (v, geo), cs in groups.items():
        if geo != "real":
            continue
        t = cs[0]["trajectory"]
        axes[0].plot(t["step"], t["angle_left_max_deg"], label=v)
        axes[1].plot(t["step"], t["reward"], label=v)
        axes[2].plot(t["step"], t["kl"], label=v)
    k = doc["cells"][0]["config"]["k"]
    for ax, yl in zip(axes, (f"largest principal angle, top-{k} left (deg)",
                             "expected reward", "KL(pi || pi_ref)")):
        ax.set_xlabel("step")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.suptitle("Trajectories on the real weights (training policy, seed of the first cell)")
    fig.tight_layout()
    written.append(d / "angles.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
