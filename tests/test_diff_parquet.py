"""`gatesim diff`'s Parquet outputs: ``rows.parquet`` and ``summary_*.parquet`` hold the
same values as their CSVs, read back with pandas and with pyarrow, under the declared row
schema, and are the same bytes on every run."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import gatesim.diff as gd
from gatesim.diff.core import COLUMNS
from gatesim.diff.report import (ROW_INT_COLUMNS, ROW_STRING_COLUMNS, rows_arrow_schema,
                                 write_parquet)
from gatesim.diff.synthetic import save_sharded


def _pair(root):
    """A small pair whose rows cover nulls and every status: an embedding (no layer), bf16
    matrices with planted updates, a 1-D fp32 norm (no spectral block), a tensor only in
    base, one only in tuned and a shape mismatch."""
    g = torch.Generator().manual_seed(7)
    base, tuned = {}, {}
    for i in range(2):
        w = (0.02 * torch.randn(40, 32, generator=g)).to(torch.bfloat16)
        t = w.clone()
        idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 4]
        t.view(-1)[idx] = (t.view(-1)[idx].float() * 1.05).to(torch.bfloat16)
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = w
        tuned[f"model.layers.{i}.self_attn.q_proj.weight"] = t
    e = (0.02 * torch.randn(64, 32, generator=g)).to(torch.bfloat16)
    base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"] = e, e.clone()
    base["model.norm.weight"] = torch.ones(32)
    tuned["model.norm.weight"] = torch.ones(32) * 1.01
    base["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(8, 32, dtype=torch.bfloat16)
    tuned["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 32, dtype=torch.bfloat16)
    base["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 8, dtype=torch.bfloat16)
    tuned["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 9, dtype=torch.bfloat16)
    save_sharded(base, root / "base")
    save_sharded(tuned, root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    b, t = _pair(root)
    first = gd.diff(b, t, out=root / "a", progress=False, figures=False)
    second = gd.diff(b, t, out=root / "b", progress=False, figures=False)
    return first, second


def _same(got, want) -> bool:
    """One cell of the Parquet file against the CSV's: missing on both sides, equal strings,
    or equal numbers (CSV writes floats with repr, which round-trips exactly)."""
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) for v in (got, want)]
    if any(missing):
        return all(missing)
    if isinstance(want, str) or isinstance(got, str):
        return str(got) == str(want)
    return float(got) == float(want)


def test_rows_parquet_equals_rows_csv(runs):
    res = runs[0]
    path = res.out / "rows.parquet"
    assert res.files["rows_parquet"] == path
    # strings as written ("" is missing); numbers: "" is None, "nan" a NaN value
    csv = pd.read_csv(res.out / "rows.csv", keep_default_na=False,
                      na_values={c: [""] if c in ROW_STRING_COLUMNS else ["", "nan"]
                                 for c in COLUMNS},
                      dtype={c: str for c in ROW_STRING_COLUMNS})
    for frame in (pd.read_parquet(path), pq.read_table(path).to_pandas()):
        assert list(frame.columns) == list(csv.columns) == list(COLUMNS)
        assert len(frame) == len(csv) == len(res.rows)
        for col in COLUMNS:
            bad = [(i, a, b) for i, (a, b) in enumerate(zip(frame[col], csv[col]))
                   if not _same(a, b)]
            assert not bad, (col, bad[:3])
    statuses = set(csv["status"])
    assert {"paired", "only_base", "only_tuned", "shape_mismatch"} <= statuses
    assert csv["layer"].isna().any() and csv["nss"].isna().any()    # nulls were exercised


def test_rows_parquet_schema(runs):
    schema = pq.read_schema(runs[0].out / "rows.parquet")
    assert schema.names == list(COLUMNS)
    want = rows_arrow_schema(COLUMNS)
    assert schema.remove_metadata().equals(want)
    assert str(schema.field("changed").type) == "int64"
    assert str(schema.field("name").type) == "string"
    assert str(schema.field("nss").type) == "double"
    assert ROW_STRING_COLUMNS <= set(COLUMNS) and ROW_INT_COLUMNS <= set(COLUMNS)


def test_summary_parquet_equals_summary_csv(runs):
    res = runs[0]
    for key in ("module", "layer", "model"):
        csv = pd.read_csv(res.out / f"summary_{key}.csv")
        assert res.files[f"summary_{key}_parquet"] == res.out / f"summary_{key}.parquet"
        got = pd.read_parquet(res.out / f"summary_{key}.parquet")
        assert list(got.columns) == list(csv.columns) == list(res.summary[key].columns)
        assert len(got) == len(csv) > 0
        for col in csv.columns:
            bad = [(a, b) for a, b in zip(got[col], csv[col]) if not _same(a, b)]
            assert not bad, (key, col, bad[:3])


def test_parquet_same_bytes_every_run(runs):
    a, b = runs
    for name in ("rows.parquet", "summary_module.parquet", "summary_layer.parquet",
                 "summary_model.parquet"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name


def test_value_that_does_not_fit_its_column_is_refused(tmp_path):
    df = pd.DataFrame({"name": ["w"], "changed": [np.float64(2.5)]})
    with pytest.raises(ValueError, match="rows.parquet.*column type"):
        write_parquet(tmp_path / "rows.parquet", df, rows_arrow_schema(df.columns))
    assert not (tmp_path / "rows.parquet").exists()
