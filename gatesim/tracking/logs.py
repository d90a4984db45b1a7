"""Reading a tracker's log and summarizing records: :func:`read_log`, :func:`summarize`,
:func:`plot_absorbed`, and :func:`write_table` (CSV and Parquet side by side, for the tools
users load tables with)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

from gatesim.tracking.records import RECORD_KEYS

__all__ = ["read_log", "summarize", "plot_absorbed", "write_table"]


def read_log(path: Union[str, os.PathLike]):
    """A tracker log as a pandas DataFrame, one row per record (columns
    :data:`RECORD_KEYS`). Lines that are not complete JSON (a run killed mid-write) are
    skipped with a warning."""
    import pandas as pd
    rows = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        warnings.warn(f"read_log: skipped {bad} incomplete line(s) in {path}", RuntimeWarning,
                      stacklevel=2)
    return pd.DataFrame(rows, columns=list(RECORD_KEYS)) if rows else pd.DataFrame(
        columns=list(RECORD_KEYS))


def summarize(df, by: str = "kind", steps_column: Optional[str] = None):
    """Summary table from records (:func:`read_log`) or aggregates (:meth:`Tracker.frame`):
    one row per ``by`` (``"kind"``, ``"param"`` or any column) and ``policy`` with ``steps``
    (tracked steps), ``elements`` (sum of ``n`` over steps), ``changed_fraction`` (changed /
    elements: mean per-step fraction of stored values that changed), ``absorbed_fraction``
    (absorbed / non-zero updates), ``absorbed``, ``absorbed_mass`` (sum over steps),
    ``nonfinite`` (non-finite updates plus non-finite results)."""
    import pandas as pd
    cols = [by, "policy", "steps", "elements", "changed_fraction", "absorbed_fraction",
            "absorbed", "absorbed_mass", "nonfinite"]
    if len(df) == 0:
        return pd.DataFrame(columns=cols)
    keys = [by, "policy"]
    if "optimizer" in df.columns and df["optimizer"].nunique() > 1:
        keys = ["optimizer"] + keys
        cols = ["optimizer"] + cols
    g = df.groupby(keys, sort=True)
    out = g[["n", "changed", "absorbed", "zero", "absorbed_mass", "nonfinite_delta",
             "nonfinite_result"]].sum()
    steps = g[steps_column].max() if steps_column else g["step"].nunique()
    res = pd.DataFrame({
        "steps": steps,
        "elements": out["n"],
        "changed_fraction": out["changed"] / out["n"].where(out["n"] > 0),
        "absorbed_fraction": out["absorbed"] / (out["n"] - out["zero"]).where(
            out["n"] - out["zero"] > 0),
        "absorbed": out["absorbed"],
        "absorbed_mass": out["absorbed_mass"],
        "nonfinite": out["nonfinite_delta"] + out["nonfinite_result"],
    }).reset_index()
    return res[cols]


def plot_absorbed(df, path: Union[str, os.PathLike], by: str = "kind",
                  title: Optional[str] = None) -> str:
    """Writes a PNG: absorbed fraction (absorbed / non-zero updates) over steps, one line per
    ``by`` value (module kind), one panel per policy. ``df``: records (:func:`read_log`) or
    :meth:`Tracker.frame`. Returns the path. Uses matplotlib's Agg canvas directly (no pyplot,
    no change of the global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(df) == 0:
        raise ValueError("nothing to plot: no records")
    keys = ["policy", by, "step"]
    agg = df.groupby(keys, sort=True)[["n", "zero", "absorbed"]].sum().reset_index()
    agg["fraction"] = agg["absorbed"] / (agg["n"] - agg["zero"]).where(agg["n"] > agg["zero"])
    policies = list(dict.fromkeys(["own"] + sorted(agg["policy"].unique())))
    policies = [p for p in policies if p in set(agg["policy"])]
    import matplotlib

    kinds = sorted(agg[by].astype(str).unique())
    cmap = matplotlib.colormaps["tab20"]
    style = {k: dict(color=cmap(i % 20), ls=("-", "--", ":")[(i // 20) % 3])
             for i, k in enumerate(kinds)}
    fig = Figure(figsize=(10, 2.6 * len(policies) + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(policies), 1, squeeze=False, sharex=True)[:, 0]
    for ax, pol in zip(axes, policies):
        sub = agg[agg["policy"] == pol]
        for k, rows in sub.groupby(by, sort=True):
            ax.plot(rows["step"], rows["fraction"], label=str(k), lw=1.1, **style[str(k)])
        ax.set_ylabel("absorbed fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"policy: {pol}" if pol != "own" else "own storage (observed)",
                     fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=by)
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(os.fspath(path), dpi=110)
    return os.fspath(path)


def write_table(df, stem: Union[str, os.PathLike]) -> dict:
    """Writes a DataFrame as ``<stem>.csv`` and ``<stem>.parquet`` (pyarrow; list columns
    such as ``hist`` stay lists there, CSV writes their text). Returns
    ``{"csv": path, "parquet": path}``; the folder is created if needed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": stem.with_name(stem.name + ".csv"),
             "parquet": stem.with_name(stem.name + ".parquet")}
    df.to_csv(paths["csv"], index=False)
    df.to_parquet(paths["parquet"], index=False, engine="pyarrow")
    return {k: os.fspath(v) for k, v in paths.items()}
