"""gatesim.diff on a generated pair of sharded checkpoints with planted changes: every count
is known by construction and must come out exactly."""
import json
import math
import pandas as pd
import pytest
import torch

import gatesim
import gatesim.diff as gd
import gatesim.metrics as gm
from gatesim.diff.synthetic import save_sharded

N_BIAS = 400


def _bits16(t):
    return t.view(torch.int16)


def _from16(bits):
    return torch.tensor(bits, dtype=torch.int16).view(torch.bfloat16)


def _ulp_label(d, width):
    for lab, hi in zip(gm.ulp_bin_labels(width), gm.ulp_bin_edges(width)):
        if d <= hi:
            return lab
    raise AssertionError(d)


def build_pair():
    """Returns (base dict, tuned dict (names without 'model.'), expected rows by key)."""
    g = torch.Generator().manual_seed(1234)

    def vals(n, lo=0.01, hi=0.03):
        mag = lo + (hi - lo) * torch.rand(n, generator=g)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return (mag * sign).to(torch.bfloat16)

    base, tuned, exp = {}, {}, {}

    # A: 1-D bf16 with every special case
    a = vals(N_BIAS)
    ab = _bits16(a).clone()
    tb = ab.clone()
    tb[0:20] += 1                                   # one-ULP moves (away from zero)
    tb[20:30] += 3                                  # three-ULP moves -> bin "3-4"
    small = torch.tensor([1e-6 * (1 + i / 100) for i in range(10)]).to(torch.bfloat16)
    ab[30:40] = _bits16(small)
    tb[30:40] = ab[30:40] + 1                       # one-ULP moves of tiny weights (< atol)
    ab[40:50] = 0x0000
    tb[40:50] = -0x8000                             # +0 -> -0: unchanged
    ab[50:55] = 0x7FC0
    tb[50:55] = 0x7FC0                              # same NaN bits: changed, NaN pair
    tb[55:58] = 0x7FC0                              # NaN only in tuned
    ab[58:61] = 0x7F80
    tb[58:61] = 0x7F80                              # +inf both: unchanged, inf pair
    ab[61:63] = _bits16(torch.tensor([0.02], dtype=torch.bfloat16))[0]
    tb[61:63] = -0x0080                             # 0xFF80 = -inf: changed, inf pair
    base["model.layers.0.self_attn.q_proj.bias"] = ab.view(torch.bfloat16)
    tuned["layers.0.self_attn.q_proj.bias"] = tb.view(torch.bfloat16)
    d_inf = 0x7F80 + int(_bits16(torch.tensor([0.02], dtype=torch.bfloat16))[0])
    hist = {lab: 0 for lab in gm.ulp_bin_labels(16)}
    hist["0"] = N_BIAS - 50
    hist["1"] = 30
    hist["3-4"] = 10
    hist[_ulp_label(d_inf, 16)] += 2
    exp["layers.0.self_attn.q_proj.bias"] = dict(
        status="paired", layer=0, module="q", param="bias", numel=N_BIAS, changed=50,
        changed_relative=50, changed_atol=40, nan_base=5, nan_tuned=8, inf_base=3,
        inf_tuned=5, nan_pairs=8, inf_pairs=5, ulp_1=30, ulp_hist=hist,
        spectral="skipped: 1-D")

    # B: 2-D bf16 q_proj (48 x 32): 100 one-ULP moves, 50 five-ULP moves, 10 zero flips
    w = vals(48 * 32)
    wb = _bits16(w).clone()
    perm = torch.randperm(48 * 32, generator=g)
    wb[perm[160:180]] = 0                            # exact zeros in the base
    tb = wb.clone()
    tb[perm[:100]] += 1
    tb[perm[100:150]] += 5
    tb[perm[160:170]] = -0x8000                      # -0 where the base has +0
    base["model.layers.0.self_attn.q_proj.weight"] = wb.view(torch.bfloat16).reshape(48, 32)
    tuned["layers.0.self_attn.q_proj.weight"] = tb.view(torch.bfloat16).reshape(48, 32)
    hist = {lab: 0 for lab in gm.ulp_bin_labels(16)}
    hist.update({"0": 48 * 32 - 150, "1": 100, "5-8": 50})
    exp["layers.0.self_attn.q_proj.weight"] = dict(
        layer=0, module="q", param="weight", changed=150, changed_relative=150,
        changed_atol=150, nan_base=0, nan_tuned=0, nan_pairs=0, inf_pairs=0, ulp_1=100,
        ulp_hist=hist, spectral="ok", k=8)

    # C: wide bf16 down_proj (32 x 64): 300 one-ULP moves
    w = vals(32 * 64)
    wb = _bits16(w).clone()
    tb = wb.clone()
    tb[torch.randperm(32 * 64, generator=g)[:300]] += 1
    base["model.layers.1.mlp.down_proj.weight"] = wb.view(torch.bfloat16).reshape(32, 64)
    tuned["layers.1.mlp.down_proj.weight"] = tb.view(torch.bfloat16).reshape(32, 64)
    exp["layers.1.mlp.down_proj.weight"] = dict(layer=1, module="down", changed=300,
                                                ulp_1=300, spectral="ok", k=8)

    # D: v_proj with one NaN in the tuned copy: counted, spectral block skipped
    w = vals(16 * 32).reshape(16, 32)
    t = w.clone()
    t[3, 4] = float("nan")
    base["model.layers.1.self_attn.v_proj.weight"] = w
    tuned["layers.1.self_attn.v_proj.weight"] = t
    exp["layers.1.self_attn.v_proj.weight"] = dict(
        module="v", changed=1, nan_base=0, nan_tuned=1, nan_pairs=1,
        spectral="skipped: non-finite values")

    # E: fp32 lm_head: 30 fp32-ULP moves (hidden by bf16 and fp16), 20 bf16-ULP moves,
    # 25 fp16-ULP moves (hidden by bf16); bf16-representable values in [1/16, 1/8)
    mag = (0.0625 + 0.055 * torch.rand(40 * 32, generator=g)).to(torch.bfloat16).float()
    mag = torch.where(mag <= 0.0625, torch.tensor(0.07).to(torch.bfloat16).float(), mag)
    sign = torch.where(torch.rand(40 * 32, generator=g) < 0.5, -1.0, 1.0)
    x = mag * sign
    y = x.clone()
    p = torch.randperm(40 * 32, generator=g)
    y[p[:30]] = x[p[:30]] + 2.0 ** -27
    y[p[30:50]] = x[p[30:50]] + 2.0 ** -11
    y[p[50:75]] = x[p[50:75]] + 2.0 ** -14
    base["lm_head.weight"] = x.reshape(40, 32)
    tuned["lm_head.weight"] = y.reshape(40, 32)
    exp["lm_head.weight"] = dict(module="lm_head", layer=None, dtype="float32", changed=75,
                                 ulp_1=30, if_bf16_changed=20, if_bf16_ulp_1=20,
                                 if_fp16_changed=45, if_fp16_ulp_1=25, spectral="ok")

    # F: unchanged norm in bf16 vs fp32 on the tuned side (dtype mismatch)
    nrm = (1 + 0.1 * torch.randn(32, generator=g)).to(torch.bfloat16)
    base["model.norm.weight"] = nrm
    tuned["norm.weight"] = nrm.float()
    exp["norm.weight"] = dict(status="dtype_mismatch", module="norm", changed=None)

    # G: shape mismatch (vocabulary resized), only-base and only-tuned tensors
    base["model.embed_tokens.weight"] = vals(64 * 32).reshape(64, 32)
    tuned["embed_tokens.weight"] = vals(66 * 32).reshape(66, 32)
    exp["embed_tokens.weight"] = dict(status="shape_mismatch", module="embed")
    base["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.rand(16, generator=g)
    exp["layers.1.self_attn.rotary_emb.inv_freq"] = dict(status="only_base", module="other",
                                                         tuned_name=None)
    tuned["value_head.weight"] = torch.randn(1, 32, generator=g)
    exp["value_head.weight"] = dict(status="only_tuned", base_name=None)
    return base, tuned, exp


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, tuned, exp = build_pair()
    save_sharded(base, root / "base", shard_bytes=6000)     # several shards + index
    save_sharded(tuned, root / "tuned", shard_bytes=9000)
    return root, base, tuned, exp


@pytest.fixture(scope="module")
def result(pair):
    root, *_ = pair
    return gd.diff(root / "base", root / "tuned", root / "out", map="model.=",
                   progress=False)


def _row(res, key):
    r = res.rows[res.rows["name"] == key]
    assert len(r) == 1, key
    return r.iloc[0]


def _eq(got, want):
    if want is None:
        return got is None or (isinstance(got, float) and math.isnan(got))
    if isinstance(want, dict):
        return json.loads(got) == want
    return got == want


def test_planted_counts_exact(result, pair):
    _, base, tuned, exp = pair
    assert len(result.rows) == len(exp)
    for key, want in exp.items():
        row = _row(result, key)
        for col, v in want.items():
            assert _eq(row[col], v), f"{key}.{col}: got {row[col]!r}, want {v!r}"


def test_rows_match_metrics_sparsity(result, pair):
    """Every paired row's counts equal gatesim.metrics.sparsity on the full tensors."""
    _, base, tuned, _ = pair
    for _, row in result.rows[result.rows["status"] == "paired"].iterrows():
        w0, w1 = base[row["base_name"]], tuned[row["tuned_name"]]
        r = gm.sparsity(w0, w1, eta=1e-3, atol=(1e-5,))
        n = w0.numel()
        assert row["changed"] == n - r.counts["bitwise"], row["name"]
        assert row["changed_relative"] == n - r.counts["relative"]
        assert row["changed_atol"] == n - r.counts["atol=1e-05"]
        assert row["nan_pairs"] == r.nan_pairs and row["inf_pairs"] == r.inf_pairs
        assert list(json.loads(row["ulp_hist"]).values()) == r.ulp_hist


def test_spectral_matches_full_svd(result, pair):
    """The gram path agrees with the metrics' full exact SVD on every spectral column."""
    _, base, tuned, _ = pair
    # k = min(64, max(1, min(m, n) // 4)) by hand: 48 x 32, 32 x 64, 40 x 32 -> 8
    for key, k in (("layers.0.self_attn.q_proj.weight", 8),
                   ("layers.1.mlp.down_proj.weight", 8), ("lm_head.weight", 8)):
        row = _row(result, key)
        W0, W1 = base[row["base_name"]], tuned[row["tuned_name"]]
        assert row["k"] == k
        ref = gm.compare(W0, W1, k=k, alpha=0.05)
        assert row["nss"] == pytest.approx(ref["nss"], rel=1e-7, abs=1e-15)
        assert row["angle_left_max_deg"] == pytest.approx(ref["angle_left_max_deg"], abs=1e-6)
        assert row["angle_right_max_deg"] == pytest.approx(ref["angle_right_max_deg"], abs=1e-6)
        assert row["energy_topk"] == pytest.approx(ref["energy_topk"], rel=1e-9, abs=1e-15)
        assert row["energy_topk_baseline"] == ref["energy_topk_baseline"]
        for c in ("overlap_low", "overlap_low_baseline", "overlap_principal_baseline",
                  "overlap_principal", "overlap_principal_not_low",
                  "overlap_principal_not_low_cond_baseline"):
            assert row[c] == pytest.approx(ref[c], abs=1e-12), c
        assert row["update_normF"] == pytest.approx(ref["update_normF"], rel=1e-12)
        assert len(json.loads(row["angles_left_deg"])) == k


def test_summary_and_files(result):
    files = result.files
    for name in ("rows_csv", "rows_jsonl", "config", "summary_module", "summary_layer",
                 "summary_model", "report", "fig_sparsity", "fig_ulp", "fig_angles"):
        assert files[name].exists(), name
    csv = pd.read_csv(files["rows_csv"])
    assert list(csv["name"]) == list(result.rows["name"])
    assert list(csv["changed"].fillna(-1)) == list(result.rows["changed"].fillna(-1))
    m = result.summary["model"].iloc[0]
    # the planted pairs (build_pair): q bias 400 entries / 50 changed, q 48 x 32 / 150,
    # down 32 x 64 / 300, v 16 x 32 / 1, lm_head 40 x 32 / 75
    assert m["changed"] == 50 + 150 + 300 + 1 + 75
    assert m["numel"] == 400 + 48 * 32 + 32 * 64 + 16 * 32 + 40 * 32
    assert m["sparsity_bitwise"] == pytest.approx(1 - 576 / 5776, rel=1e-12)
    assert (m["n_only_base"], m["n_only_tuned"], m["n_shape_mismatch"],
            m["n_dtype_mismatch"]) == (1, 1, 1, 1)
    mods = result.summary["module"].set_index("module")
    assert mods.loc["q", "changed"] == 200
    rep = files["report"].read_text()
    assert "Precision" in rep and "exactly one bfloat16 ULP" in rep
    assert "hidden by bf16" in rep and "only_tuned" in rep


def test_cast_pairs_dtypes(pair, tmp_path):
    root, *_ = pair
    res = gd.diff(root / "base", root / "tuned", map="model.=", cast="bf16",
                  sparsity_only=True, progress=False)
    row = _row(res, "norm.weight")
    assert row["status"] == "paired" and row["changed"] == 0
    assert row["compared_dtype"] == "bfloat16"
    lm = _row(res, "lm_head.weight")          # fp32 pair compared after rounding to bf16
    assert lm["changed"] == 20 and lm["spectral"] == "skipped: sparsity-only"


def test_no_map_and_bitwise_only(pair):
    root, *_ = pair
    res = gd.diff(root / "base", root / "tuned", bitwise_only=True, progress=False)
    st = res.rows["status"].value_counts()
    assert st.get("paired", 0) == 1          # only lm_head.weight shares its name
    row = _row(res, "lm_head.weight")
    assert row["changed"] == 75 and pd.isna(row["changed_relative"])


def test_torch_bin_reads_same(pair, tmp_path):
    """pytorch_model.bin (zip format) through torch.load(weights_only=True, mmap=True)."""
    root, base, tuned, _ = pair
    (tmp_path / "tb").mkdir()
    torch.save(tuned, tmp_path / "tb" / "pytorch_model.bin")
    a = gd.diff(root / "base", root / "tuned", map="model.=", sparsity_only=True,
                progress=False).rows
    b = gd.diff(root / "base", tmp_path / "tb", map="model.=", sparsity_only=True,
                progress=False).rows
    cols = ["name", "status", "changed", "changed_atol", "nan_pairs", "ulp_hist"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_callable_module_and_workers(pair):
    """gatesim.diff(...) works; a process pool gives the same rows as the serial run."""
    root, *_ = pair
    a = gatesim.diff(root / "base", root / "tuned", map=["model.="], progress=False).rows
    b = gd.diff(root / "base", root / "tuned", map={"model.": ""}, workers=2,
                progress=False).rows
    pd.testing.assert_frame_equal(a, b)


def test_cli(pair, tmp_path, capsys):
    from gatesim.diff.cli import main
    root, *_ = pair
    out = tmp_path / "cli_out"
    code = main([str(root / "base"), str(root / "tuned"), "--out", str(out), "--map",
                 "model.=", "--sparsity-only", "--no-progress", "--no-figures"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "sparsity_bitwise" in cap.out and "only in tuned 1" in cap.out
    assert (out / "rows.csv").exists() and (out / "report.md").exists()
    assert not (out / "fig_ulp.png").exists()
    code = main([str(root / "nope"), str(root / "tuned"), "--out", str(tmp_path / "o2")])
    cap = capsys.readouterr()
    assert code == 2 and "no such file" in cap.err and not (tmp_path / "o2").exists()
