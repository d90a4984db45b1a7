"""The batched form: compare() rows and table() DataFrames agree with the single metrics."""
import math

import pandas as pd
import pytest
import torch

import gatesim
import gatesim.metrics as gm
from gatesim.weights import load_matrix

NAMES = ["encoder.layer.0.attention.self.query.weight",
         "encoder.layer.0.output.dense.weight"]


pytestmark = pytest.mark.usefixtures("one_lapack_thread")  # see conftest.py


def bf16_pair(name: str, seed: int = 0):
    W = load_matrix(name)
    g = torch.Generator().manual_seed(seed)
    D = 3e-4 * torch.randn(W.shape, generator=g) * (torch.rand(W.shape, generator=g) < 0.5)
    W0 = gatesim.to_dtype(W, torch.bfloat16)
    return W0, gatesim.to_dtype((W0.float() + D).contiguous(), torch.bfloat16)


def test_compare_row_equals_single_metrics():
    W0, W1 = bf16_pair(NAMES[0])
    k, alpha = 16, 0.05
    row = gm.compare(W0, W1, k=k, alpha=alpha)
    sp = gm.sparsity(W0, W1)
    assert row["sparsity_bitwise"] == sp.bitwise
    assert row["sparsity_relative_eta=0.001"] == sp.relative
    assert row["sparsity_atol=1e-05"] == sp.atol[1e-5]
    assert (row["m"], row["n"], row["k"], row["alpha"]) == (384, 384, k, alpha)
    assert row["nss"] == pytest.approx(gm.nss(W0, W1), rel=1e-12)
    a = gm.principal_angles(W0, W1, k)
    assert row["angle_left_max_deg"] == pytest.approx(a.left_max, rel=1e-9)
    assert row["angle_right_deg"] == pytest.approx(a.right.tolist(), rel=1e-9)
    assert row["energy_topk"] == pytest.approx(gm.update_energy(W0, W1, k).value, rel=1e-12)
    assert row["energy_topk_baseline"] == (k / 384) ** 2
    D = W1.double() - W0.double()
    assert row["update_erank"] == pytest.approx(gm.effective_rank(D), rel=1e-12)
    assert row["update_srank"] == pytest.approx(gm.stable_rank(D), rel=1e-12)
    U = gm.update_mask(W0, W1)
    P, L = gm.principal_mask(W0, k, alpha), gm.low_magnitude_mask(W0, alpha)
    o = gm.overlap(U, P)
    assert (row["overlap_principal"], row["overlap_principal_baseline"]) == (o.value, o.baseline)
    assert row["update_density"] == o.baseline == 1 - sp.bitwise
    assert row["overlap_low"] == gm.overlap(U, L).value
    ox = gm.overlap_excluding(U, P, L)
    assert row["overlap_principal_not_low"] == ox.value
    assert row["overlap_principal_not_low_cond_baseline"] == ox.cond_baseline
    assert row["svd0_method"] == "exact" and row["svd0_residual"] is None


def test_compare_rule_changes_the_update_mask():
    W0, W1 = bf16_pair(NAMES[0])
    W0f, W1f = W0.float(), W1.float()
    a = gm.compare(W0f, W1f, k=4, rule="bitwise")
    b = gm.compare(W0f, W1f, k=4, rule="atol", atol=1e-3)
    assert b["overlap_principal_baseline"] == pytest.approx(1 - b["sparsity_atol=0.001"], rel=1e-12)
    assert b["update_density"] == a["update_density"]       # sparsity columns: bitwise
    assert b["overlap_principal_baseline"] < a["overlap_principal_baseline"]


def test_table_rows_loaders_and_randomized():
    pairs = {n: bf16_pair(n) for n in NAMES}
    pairs["lazy"] = lambda: bf16_pair(NAMES[0], seed=1)
    df = gm.table(pairs, k=32, alpha=0.1, progress=False)
    assert isinstance(df, pd.DataFrame) and list(df.index) == NAMES + ["lazy"]
    assert df.index.name == "name"
    assert df.loc[NAMES[1], "m"] == 384 and df.loc[NAMES[1], "n"] == 1536
    for n in NAMES:
        row = gm.compare(*pairs[n], k=32, alpha=0.1)
        assert df.loc[n, "nss"] == pytest.approx(row["nss"], rel=1e-12)
        assert df.loc[n, "overlap_low"] == row["overlap_low"]
    rows = gm.table([("q", *pairs[NAMES[0]])], k=32, method="randomized", progress=False)
    r = rows.iloc[0]
    assert r["svd0_method"] == "randomized" and r["svd0_q"] == 64 and r["svd0_niter"] == 8
    assert 0 < r["svd0_residual"] < 1 and 0 <= r["svd0_sketch_error"] < 1
    assert r["nss_values"] == 64 and r["update_values"] == 64
    assert abs(r["angle_left_max_deg"] - df.loc[NAMES[0], "angle_left_max_deg"]) < 1.0
    with pytest.raises(ValueError, match="q=40 < 2k=64"):
        gm.table({"q": pairs[NAMES[0]]}, k=32, method="randomized", q=40, progress=False)


def test_identical_checkpoints():
    W0, _ = bf16_pair(NAMES[0])
    row = gm.compare(W0, W0.clone(), k=8)
    assert row["sparsity_bitwise"] == 1.0 and row["update_density"] == 0.0
    assert row["nss"] == 0.0 and math.isnan(row["energy_topk"])
    assert row["overlap_principal"] == 0.0 and row["overlap_principal_baseline"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_compare_on_other_storage_formats(dtype):
    """Every metric works on fp16/fp8 storage and equals the same values given as fp32
    (all formats convert to float64 exactly); NaN in fp8 is caught like anywhere else."""
    g = torch.Generator().manual_seed(5)
    W0 = (torch.randn(48, 40, generator=g) * 0.5).to(dtype)
    W1 = (W0.float() * (1 + 0.1 * torch.randn(48, 40, generator=g))).to(dtype)
    row = gm.compare(W0, W1, k=4, alpha=0.1)
    ref = gm.compare(W0.float(), W1.float(), k=4, alpha=0.1)
    for key in ("nss", "angle_left_max_deg", "energy_topk", "update_erank",
                "overlap_principal", "overlap_low", "sparsity_bitwise",
                "sparsity_relative_eta=0.001"):
        assert row[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    bad = W1.clone()
    bad.view(torch.uint8)[0, 0] = 0x7F    # NaN in both fp8 formats
    if dtype != torch.float16:
        with pytest.raises(ValueError, match="W1 holds 1 non-finite"):
            gm.nss(W0, bad)
