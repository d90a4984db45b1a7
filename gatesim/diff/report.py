"""Summaries, figures and the Markdown report of a checkpoint diff.

:func:`summarize` aggregates the paired rows per module kind, per layer and for the whole
model. Sparsities are pooled over entries (``1 - sum(changed) / sum(numel)``, so a large
matrix weighs more than a bias); spectral columns give the median and maximum NSS, the
largest principal angle (left or right) and the mean of each overlap's ratio to its random
baseline over the matrices that have them. :func:`write_outputs` writes
``summary_{module,layer,model}.csv``, the figures (matplotlib, Agg backend):

* ``fig_sparsity.png``: bitwise sparsity by layer, one line per module kind;
* ``fig_ulp.png``: how far the changed entries moved, in ULPs of the compared format
  (pooled histogram, log scale);
* ``fig_angles.png``: largest principal angle per layer and module kind (heatmap),

and ``report.md``, which states the inputs, the settings (k, alpha, eta, atol, SVD path),
the answer to the precision question, the tables and the unpaired or mismatched tensors.

The per-tensor rows and the three summaries are also written as Parquet beside their CSVs
(``rows.parquet``, ``summary_{module,layer,model}.parquet``; pyarrow), for the tools that
read it (pandas, polars, DuckDB, Spark). The rows keep one schema for every run
(:data:`ROW_STRING_COLUMNS`, :data:`ROW_INT_COLUMNS`, every other column float64), so the
files of many diffs concatenate; missing values are nulls. Like the CSVs, they hold no wall
times and are the same bytes on every run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from gatesim.diff.names import KINDS

__all__ = ["summarize", "write_outputs", "write_parquet", "rows_arrow_schema",
           "plot_sparsity", "plot_ulp", "plot_angles", "markdown_table",
           "ROW_STRING_COLUMNS", "ROW_INT_COLUMNS"]

#: Row columns stored as strings in ``rows.parquet`` (lists and histograms stay the JSON text
#: they are in ``rows.csv``).
ROW_STRING_COLUMNS = frozenset({
    "name", "base_name", "tuned_name", "status", "module", "param", "shape", "dtype",
    "tuned_dtype", "compared_dtype", "ulp_hist", "spectral", "angles_left_deg",
    "angles_right_deg", "svd", "base_checksum", "tuned_checksum", "note"})
#: Row columns stored as (nullable) 64-bit integers: counts and indices. Every other column
#: is float64.
ROW_INT_COLUMNS = frozenset({
    "layer", "expert", "numel", "bytes", "changed", "changed_relative", "changed_atol",
    "nan_base", "inf_base", "nan_tuned", "inf_tuned", "nan_pairs", "inf_pairs", "ulp_1",
    "if_bf16_changed", "if_bf16_ulp_1", "if_fp16_changed", "if_fp16_ulp_1", "k"})


def _sum(s):
    return s.sum(min_count=1)


def _agg(g) -> dict:
    numel = int(g["numel"].sum())
    changed = int(g["changed"].sum())
    out = {"tensors": len(g), "numel": numel, "changed": changed,
           "sparsity_bitwise": 1 - changed / numel if numel else math.nan}
    for col, name in (("changed_relative", "sparsity_relative"),
                      ("changed_atol", "sparsity_atol"),
                      ("if_bf16_changed", "if_bf16_sparsity"),
                      ("if_fp16_changed", "if_fp16_sparsity")):
        v = _sum(g[col].astype(float))
        out[name] = 1 - v / numel if numel and not math.isnan(v) and g[col].notna().all() \
            else math.nan
    for col in ("nan_base", "inf_base", "nan_tuned", "inf_tuned", "ulp_1"):
        v = _sum(g[col].astype(float))
        out[col] = int(v) if not math.isnan(v) else None
    out["ulp_1_frac"] = out["ulp_1"] / changed if out["ulp_1"] is not None and changed \
        else math.nan
    sp = g[g["spectral"] == "ok"]
    out["matrices"] = len(sp)
    if len(sp):
        nss = sp["nss"].astype(float)
        ang = np.maximum(sp["angle_left_max_deg"].astype(float),
                         sp["angle_right_max_deg"].astype(float))
        out.update(nss_median=float(nss.median()), nss_max=float(nss.max()),
                   angle_max_deg=float(ang.max()), angle_median_deg=float(ang.median()))
        for c in ("overlap_principal_ratio", "overlap_low_ratio",
                  "overlap_principal_not_low_ratio"):
            out[c + "_mean"] = float(sp[c].astype(float).mean())
        e = sp["energy_topk"].astype(float) / sp["energy_topk_baseline"].astype(float)
        out["energy_ratio_mean"] = float(e.mean())
    return out


def summarize(df) -> dict:
    """``{"module": ..., "layer": ..., "model": ...}`` DataFrames (module docstring)."""
    import pandas as pd
    ok = df[(df["status"] == "paired") & df["changed"].notna()]
    mods = [m for m in KINDS if m in set(ok["module"])]
    by_mod = pd.DataFrame([{"module": m, **_agg(ok[ok["module"] == m])} for m in mods])
    lay = ok[ok["layer"].notna()]
    layers = sorted({int(x) for x in lay["layer"]})
    by_layer = pd.DataFrame([{"layer": i, **_agg(lay[lay["layer"].astype(int) == i])}
                             for i in layers])
    model = _agg(ok) if len(ok) else {"tensors": 0}
    for s in ("paired", "only_base", "only_tuned", "shape_mismatch", "dtype_mismatch"):
        model[f"n_{s}"] = int((df["status"] == s).sum())
    return {"module": by_mod, "layer": by_layer, "model": pd.DataFrame([model])}


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _pooled(ok, by_cols):
    g = ok.groupby(by_cols)
    return (1 - g["changed"].sum() / g["numel"].sum())


def plot_sparsity(df, path) -> Optional[Path]:
    """Bitwise sparsity by layer, one line per module kind (None if no layered rows)."""
    ok = df[(df["status"] == "paired") & df["changed"].notna() & df["layer"].notna()].copy()
    if not len(ok):
        return None
    ok["layer"] = ok["layer"].astype(int)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    s = _pooled(ok, ["module", "layer"])
    for m in [m for m in KINDS if m in set(ok["module"])]:
        ser = s.loc[m]
        ax.plot(ser.index, ser.values, marker="o", ms=3, label=m)
    ax.set_xlabel("layer")
    ax.set_ylabel("bitwise sparsity (fraction unchanged)")
    ax.set_title("Update sparsity by layer and module (stored bits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pooled_ulp(df) -> dict:
    """``{compared dtype: {bin label: count}}`` pooled over the paired rows."""
    out: dict = {}
    ok = df[(df["status"] == "paired") & df["ulp_hist"].notna()]
    for dt, h in zip(ok["compared_dtype"], ok["ulp_hist"]):
        d = out.setdefault(dt, {})
        for lab, c in json.loads(h).items():
            d[lab] = d.get(lab, 0) + int(c)
    return out


def plot_ulp(df, path) -> Optional[Path]:
    """Histogram of the changed entries' ULP distances (bin 0, unchanged, left out)."""
    pooled = pooled_ulp(df)
    if not pooled:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(pooled), figsize=(7 * len(pooled), 4), squeeze=False)
    for ax, (dt, h) in zip(axes[0], sorted(pooled.items())):
        labs = [lab for lab in h if lab != "0"]
        last = max([i for i, lab in enumerate(labs) if h[lab]] or [0])
        labs = labs[: last + 1]
        ax.bar(range(len(labs)), [h[lab] for lab in labs], color="tab:blue")
        ax.set_xticks(range(len(labs)))
        ax.set_xticklabels(labs, rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel(f"ULP distance ({dt})")
        ax.set_ylabel("changed entries")
        ax.set_title(f"How far changed {dt} entries moved")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_angles(df, path) -> Optional[Path]:
    """Heatmap of the largest principal angle (left or right, degrees) by layer and module."""
    sp = df[(df["spectral"] == "ok") & df["layer"].notna()].copy()
    if not len(sp):
        return None
    sp["layer"] = sp["layer"].astype(int)
    sp["angle"] = np.maximum(sp["angle_left_max_deg"].astype(float),
                             sp["angle_right_max_deg"].astype(float))
    tab = sp.groupby(["module", "layer"])["angle"].max().unstack("layer")
    mods = [m for m in KINDS if m in tab.index]
    tab = tab.loc[mods]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * tab.shape[1] + 2), 0.45 * len(mods) + 1.8))
    im = ax.imshow(tab.values.astype(float), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(mods)))
    ax.set_yticklabels(mods)
    ax.set_xticks(range(tab.shape[1]))
    ax.set_xticklabels([str(c) for c in tab.columns], fontsize=7)
    ax.set_xlabel("layer")
    k = sorted({int(x) for x in sp["k"]})
    ks = str(k[0]) if len(k) == 1 else f"{k[0]}..{k[-1]}"
    ax.set_title(f"Largest principal angle, top-k subspaces (degrees, k={ks})", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if v == 0:
            return "0"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (np.integer,)):
        return str(int(v))
    if isinstance(v, (np.floating,)):
        return _fmt(float(v))
    return str(v)


def markdown_table(df, cols=None) -> str:
    """A GitHub-Markdown table of ``df`` (the chosen columns, empty cells for NaN)."""
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


_SUM_COLS = ["tensors", "numel", "changed", "sparsity_bitwise", "sparsity_relative",
             "sparsity_atol", "ulp_1_frac", "if_bf16_sparsity", "if_fp16_sparsity",
             "matrices", "nss_median", "angle_max_deg", "overlap_principal_ratio_mean",
             "overlap_low_ratio_mean", "energy_ratio_mean"]


def _precision_text(df, model: dict) -> list:
    out = []
    ok = df[(df["status"] == "paired") & df["changed"].notna()]
    for dt in sorted(set(ok["compared_dtype"].dropna())):
        g = ok[ok["compared_dtype"] == dt]
        numel, changed = int(g["numel"].sum()), int(g["changed"].sum())
        line = (f"- **{dt}** ({len(g)} tensors, {numel:,} entries): {changed:,} entries "
                f"changed (bitwise sparsity {1 - changed / numel:.4f}).")
        if g["ulp_1"].notna().all() and changed:
            one = int(g["ulp_1"].sum())
            line += (f" {one:,} of the changed entries ({one / changed:.1%}) moved by exactly "
                     f"one {dt} ULP, the smallest change the format can store; an update "
                     "below half an ULP leaves no trace at all.")
        if dt == "float32" and g["if_bf16_changed"].notna().all():
            b16 = int(g["if_bf16_changed"].sum())
            f16 = int(g["if_fp16_changed"].sum())
            line += (f" Saved in bf16 (round to nearest even) the same pair would show "
                     f"sparsity {1 - b16 / numel:.4f} ({b16:,} changed); in fp16 "
                     f"{1 - f16 / numel:.4f} ({f16:,} changed): "
                     f"{changed - b16:,} of the fp32 changes would be hidden by bf16.")
        out.append(line)
    return out


def write_report(path, df, summary, base, tuned, rules, opts, figs: dict,
                 seconds: Optional[float] = None) -> Path:
    """Writes ``report.md``."""
    m = {c: (int(v) if c.startswith("n_") else v)
         for c, v in summary["model"].iloc[0].to_dict().items()}
    L = ["# Checkpoint diff", ""]
    L += [f"- base: `{base.path}` ({base.kind}, {len(base.files)} file(s), "
          f"{len(base.tensors)} tensors, {base.nbytes / 2**30:.2f} GiB)",
          f"- tuned: `{tuned.path}` ({tuned.kind}, {len(tuned.files)} file(s), "
          f"{len(tuned.tensors)} tensors, {tuned.nbytes / 2**30:.2f} GiB)",
          f"- prefix map: {', '.join(f'`{a}` -> `{b}`' for a, b in rules) or 'none'}",
          f"- paired {m.get('n_paired', 0)}, only in base {m.get('n_only_base', 0)}, only in "
          f"tuned {m.get('n_only_tuned', 0)}, shape mismatches {m.get('n_shape_mismatch', 0)}, "
          f"dtype mismatches {m.get('n_dtype_mismatch', 0)}"]
    mode = ("bitwise only" if opts.bitwise_only else "sparsity only (no SVD)"
            if opts.sparsity_only else f"full (SVD: {opts.svd})")
    kdesc = f"k = {opts.k}" if opts.k else "k = min(64, max(1, min(m, n) // 4)) per matrix"
    L += [f"- metrics: {mode}; {kdesc}; alpha = {opts.alpha}; eta = {opts.eta} (relative "
          f"probe); atol = {opts.atol}; cast = {opts.cast or 'none (as stored)'}"]
    if seconds is not None:
        L.append(f"- wall time: {seconds:.1f} s")
    L += ["", "Definitions: gatesim's docs/metrics.md. Bitwise sparsity = fraction of "
          "entries with identical stored bits (+0 == -0, NaN never equal); relative probe "
          "|w1-w0| <= eta*max(|w0|,|w1|); atol |w1-w0| <= atol (over-reports sparsity for "
          "small weights). Every overlap is next to its random baseline, the update density.",
          "", "## Precision", ""]
    L += _precision_text(df, m) or ["- no paired tensors"]
    L += ["", "## Whole model", "", markdown_table(summary["model"], _SUM_COLS), "",
          "## By module kind", "", markdown_table(summary["module"], ["module"] + _SUM_COLS),
          "", "## By layer", "", markdown_table(summary["layer"], ["layer"] + _SUM_COLS), ""]
    for name, title in (("fig_sparsity", "Sparsity by layer and module"),
                        ("fig_ulp", "ULP distances of the changed entries"),
                        ("fig_angles", "Principal angles")):
        if figs.get(name):
            L += [f"## {title}", "", f"![{title}]({Path(figs[name]).name})", ""]
    odd = df[df["status"] != "paired"]
    if len(odd):
        L += ["## Unpaired and mismatched tensors", "",
              markdown_table(odd, ["name", "status", "base_name", "tuned_name", "shape",
                                   "dtype", "tuned_dtype", "note"]), ""]
    skipped = df[(df["status"] == "paired") & df["spectral"].fillna("").str.startswith(
        ("skipped: non-finite", "error"))]
    if len(skipped):
        L += ["## Spectral metrics not computed", "",
              markdown_table(skipped, ["name", "spectral", "nan_base", "inf_base",
                                       "nan_tuned", "inf_tuned"]), ""]
    notes = list(base.notes) + list(tuned.notes)
    if notes:
        L += ["## Notes on the inputs", ""] + [f"- {n}" for n in notes] + [""]
    L += ["Rows: `rows.csv` and `rows.parquet` (one per tensor; `ulp_hist` and the angle "
          "lists are JSON).", ""]
    Path(path).write_text("\n".join(L), encoding="utf-8")
    return Path(path)


def rows_arrow_schema(columns):
    """The Arrow schema of ``rows.parquet`` for these row columns (module docstring)."""
    import pyarrow as pa
    return pa.schema([(c, pa.string() if c in ROW_STRING_COLUMNS else
                       pa.int64() if c in ROW_INT_COLUMNS else pa.float64())
                      for c in columns])


def write_parquet(path: Path, df, schema=None) -> Path:
    """``df`` as a Parquet file at ``path``, written whole to a temporary file and renamed
    (a reader never sees a torn file). With ``schema`` every column is converted to its
    type (``ValueError`` where a value does not fit, e.g. a fraction in an integer column);
    without, the types follow the DataFrame's. Missing values (None, NaN) become nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if schema is None:
        table = pa.Table.from_pandas(df, preserve_index=False)
    else:
        try:
            table = pa.Table.from_arrays(
                [pa.array(df[f.name], type=f.type, from_pandas=True) for f in schema],
                schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"{Path(path).name}: a value does not fit its column type "
                             f"({exc})") from exc
    path = Path(path)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_outputs(out: Path, df, summary, base, tuned, rules, opts, *, figures: bool = True,
                  seconds: Optional[float] = None) -> dict:
    """Summary CSVs, Parquet copies of the rows and summaries, figures and ``report.md``
    into ``out``; returns name -> path."""
    files = {}
    files["rows_parquet"] = write_parquet(out / "rows.parquet", df,
                                          rows_arrow_schema(df.columns))
    for key in ("module", "layer", "model"):
        p = out / f"summary_{key}.csv"
        tmp = p.with_suffix(".csv.tmp")
        summary[key].to_csv(tmp, index=False)
        os.replace(tmp, p)
        files[f"summary_{key}"] = p
        files[f"summary_{key}_parquet"] = write_parquet(out / f"summary_{key}.parquet",
                                                        summary[key])
    figs = {}
    if figures:
        for name, fn in (("fig_sparsity", plot_sparsity), ("fig_ulp", plot_ulp),
                         ("fig_angles", plot_angles)):
            p = fn(df, out / f"{name}.png")
            if p is not None:
                figs[name] = p
    files.update(figs)
    files["report"] = write_report(out / "report.md", df, summary, base, tuned, rules, opts,
                                   figs, seconds)
    return files
