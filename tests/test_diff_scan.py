"""The diff's fast paths against the metrics' definitions: the one-pass scan equals
gatesim.metrics.sparsity exactly; gram_svd equals a full LAPACK SVD to rounding; names."""
import numpy as np
import pytest
import torch

import gatesim.metrics as gm
from gatesim.diff.gram import gram_svd
from gatesim.diff.names import apply_map, parse_map, parse_name
from gatesim.diff.scan import scan, sparsity_fast
from gatesim.diff.errors import NameMapError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
          torch.float8_e5m2]
VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _pair(dtype, n=20000, seed=0):
    """Random bit patterns (many NaN/inf/zero/subnormal) and a mutated copy: identical,
    +-0 swaps, sign flips, small and large integer moves, NaNs, infinities."""
    g = np.random.default_rng(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    bits = 8 * size
    iv = VIEW[size]
    npv = {1: np.int8, 2: np.int16, 4: np.int32}[size]
    lo, hi = np.iinfo(npv).min, np.iinfo(npv).max
    a = g.integers(lo, hi, n, endpoint=True).astype(npv)
    # a tenth are special values, some exact zeros of both signs
    sign = np.array(1 << (bits - 1)).astype(np.int64).astype(npv)
    a[g.random(n) < 0.05] = 0
    a[g.random(n) < 0.05] = sign
    b = a.copy()
    r = g.random(n)
    b[r < 0.2] = a[r < 0.2] + 1
    m = (r >= 0.2) & (r < 0.3)
    b[m] = a[m] - g.integers(1, 1000, m.sum()).astype(npv)
    m = (r >= 0.3) & (r < 0.35)
    b[m] = a[m] ^ sign                                  # sign flips (+0 <-> -0 among them)
    m = (r >= 0.35) & (r < 0.4)
    b[m] = g.integers(lo, hi, m.sum(), endpoint=True).astype(npv)
    ta = torch.from_numpy(a).view(dtype)
    tb = torch.from_numpy(b).view(dtype)
    return ta, tb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsity_fast_equals_metrics(dtype, seed):
    a, b = _pair(dtype, seed=seed)
    ref = gm.sparsity(a, b, eta=1e-3, atol=(1e-5,))
    got = sparsity_fast(a, b, eta=1e-3, atol=1e-5)
    assert got.bitwise_equal == ref.counts["bitwise"]
    assert got.relative_equal == ref.counts["relative"]
    assert got.atol_equal == ref.counts["atol=1e-05"]
    assert got.nan_pairs == ref.nan_pairs
    assert got.inf_pairs == ref.inf_pairs
    assert got.ulp_hist == ref.ulp_hist
    fast = sparsity_fast(a, b, bitwise_only=True)
    assert fast.bitwise_equal == ref.counts["bitwise"]
    assert fast.nan_pairs == ref.nan_pairs and fast.inf_pairs == ref.inf_pairs
    x, y = a.float(), b.float()
    assert got.counts.nan_a == int(torch.isnan(x).sum())
    assert got.counts.inf_b == int(torch.isinf(y).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_other_dtypes_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.float64:
        a = torch.randn(5000, generator=g, dtype=torch.float64)
        a[:10] = 0.0
        a[10:20] = float("nan")
        b = a.clone()
        b[:5] = -0.0
        b[20:300] += 1e-12
        want = 5000 - 280 - 10                     # moves changed, NaN never equal
    else:
        a = torch.randint(0, 2, (5000,), generator=g).to(dtype)
        b = a.clone()
        b[:300] = (b[:300].to(torch.int64) + 1).remainder(2).to(dtype)
        want = 5000 - 300
    got = sparsity_fast(a, b)
    assert got.bitwise_equal == want
    assert got.relative_equal is None and got.ulp_hist is None


def test_scan_gather_returns_changed_pairs():
    a = torch.arange(100, dtype=torch.float32).to(torch.bfloat16)
    b = a.clone()
    b[[3, 50, 99]] = -1.0
    c = scan(a, b)
    assert c.n_diff == 3 and c.changed_a.tolist() == [3.0, 50.0, 99.0]
    assert c.changed_b.tolist() == [-1.0, -1.0, -1.0]


# -------------------------------------------------------------------------------------
# gram_svd
# -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200), (64, 512)])
def test_gram_svd_matches_full_svd(shape):
    g = torch.Generator().manual_seed(sum(shape))
    # a trained-looking spectrum: decaying singular values plus noise
    m, n = shape
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, r, dtype=torch.float64)
    W = ((U * s) @ V.T * 0.5).to(torch.bfloat16)
    k = min(32, r // 4)
    got = gram_svd(W, k)
    ref = gm.compute_svd(W)
    assert got.backend == "gram" and got.full_spectrum and got.kept == k
    assert float((got.S - ref.S).abs().max()) <= 1e-12 * float(ref.S[0])
    Ug, _, Vg = got.top(k)
    Ur, _, Vr = ref.top(k)
    assert float(gm.subspace_angles(Ug, Ur)[-1]) < 1e-7
    assert float(gm.subspace_angles(Vg.T, Vr.T)[-1]) < 1e-7
    # orthonormal columns and W v = s u
    assert torch.allclose(Ug.T @ Ug, torch.eye(k, dtype=torch.float64), atol=1e-10)
    R = W.double() @ Vg.T - Ug * got.S[:k]
    assert float(R.abs().max()) < 1e-10 * float(got.S[0])


def test_gram_nss_of_a_tiny_update():
    """NSS of a sparse one-ULP update (RLVR-sized, ~1e-4..1e-6) agrees with the full SVD."""
    g = torch.Generator().manual_seed(5)
    W0 = (0.02 * torch.randn(256, 128, generator=g)).to(torch.bfloat16)
    bits = W0.view(torch.int16).clone()
    idx = torch.randperm(W0.numel(), generator=g)[:2000]
    bits.view(-1)[idx] += 1
    W1 = bits.view(torch.bfloat16)
    a = gm.nss(W0, W1, svd0=gram_svd(W0, 32), svd1=gram_svd(W1, 32))
    b = gm.nss(W0, W1, svd0=gm.compute_svd(W0), svd1=gm.compute_svd(W1))
    assert b < 1e-3 and a == pytest.approx(b, rel=1e-6)


def test_gram_fallback_rank_deficient_and_zero():
    g = torch.Generator().manual_seed(1)
    W = torch.zeros(64, 48)
    W[:, :3] = torch.randn(64, 3, generator=g)           # rank 3, k = 8 > rank
    s = gram_svd(W, 8)
    assert s.backend == "torch"                           # full SVD fallback
    assert torch.allclose(s.S, gm.compute_svd(W).S, atol=1e-12)
    z = gram_svd(torch.zeros(10, 20), 2)
    assert z.backend == "torch" and float(z.S.abs().max()) == 0.0
    full = gram_svd(torch.randn(12, 9, generator=g), 9)   # k = min(m, n)
    assert full.kept == 9


# -------------------------------------------------------------------------------------
# names
# -------------------------------------------------------------------------------------
NAMES = [
    ("model.layers.7.self_attn.q_proj.weight", 7, "q", "weight"),
    ("model.layers.7.self_attn.k_proj.bias", 7, "k", "bias"),
    ("model.layers.0.self_attn.v_proj.weight", 0, "v", "weight"),
    ("model.layers.27.self_attn.o_proj.weight", 27, "o", "weight"),
    ("model.layers.3.mlp.gate_proj.weight", 3, "gate", "weight"),
    ("model.layers.3.mlp.up_proj.weight", 3, "up", "weight"),
    ("model.layers.3.mlp.down_proj.weight", 3, "down", "weight"),
    ("model.layers.3.input_layernorm.weight", 3, "norm", "weight"),
    ("model.layers.3.post_attention_layernorm.weight", 3, "norm", "weight"),
    ("model.layers.3.self_attn.q_norm.weight", 3, "norm", "weight"),
    ("model.embed_tokens.weight", None, "embed", "weight"),
    ("model.norm.weight", None, "norm", "weight"),
    ("lm_head.weight", None, "lm_head", "weight"),
    ("transformer.h.5.attn.c_attn.weight", 5, "qkv", "weight"),           # GPT-2
    ("transformer.h.5.attn.c_proj.weight", 5, "o", "weight"),
    ("transformer.h.5.mlp.c_fc.weight", 5, "up", "weight"),
    ("transformer.h.5.mlp.c_proj.weight", 5, "down", "weight"),
    ("transformer.h.5.ln_1.weight", 5, "norm", "weight"),
    ("transformer.wte.weight", None, "embed", "weight"),
    ("transformer.wpe.weight", None, "pos_embed", "weight"),
    ("transformer.ln_f.bias", None, "norm", "bias"),
    ("encoder.layer.2.attention.self.query.weight", 2, "q", "weight"),   # BERT
    ("encoder.layer.2.attention.self.key.bias", 2, "k", "bias"),
    ("encoder.layer.2.attention.output.dense.weight", 2, "o", "weight"),
    ("encoder.layer.2.attention.output.LayerNorm.weight", 2, "norm", "weight"),
    ("encoder.layer.2.intermediate.dense.weight", 2, "up", "weight"),
    ("encoder.layer.2.output.dense.weight", 2, "down", "weight"),
    ("embeddings.word_embeddings.weight", None, "embed", "weight"),
    ("embeddings.position_embeddings.weight", None, "pos_embed", "weight"),
    ("embeddings.token_type_embeddings.weight", None, "type_embed", "weight"),
    ("pooler.dense.weight", None, "pooler", "weight"),
    ("encoder.block.1.layer.0.SelfAttention.q.weight", 1, "q", "weight"),  # T5
    ("decoder.block.1.layer.1.EncDecAttention.o.weight", 1, "o", "weight"),
    ("encoder.block.1.layer.1.DenseReluDense.wi_0.weight", 1, "gate", "weight"),
    ("encoder.block.1.layer.1.DenseReluDense.wo.weight", 1, "down", "weight"),
    ("shared.weight", None, "embed", "weight"),
    ("gpt_neox.layers.4.attention.query_key_value.weight", 4, "qkv", "weight"),
    ("gpt_neox.layers.4.attention.dense.weight", 4, "o", "weight"),
    ("gpt_neox.layers.4.mlp.dense_h_to_4h.weight", 4, "up", "weight"),
    ("gpt_neox.layers.4.mlp.dense_4h_to_h.weight", 4, "down", "weight"),
    ("gpt_neox.embed_in.weight", None, "embed", "weight"),
    ("embed_out.weight", None, "lm_head", "weight"),
    ("transformer.h.2.self_attention.dense.weight", 2, "o", "weight"),    # Falcon/BLOOM
    ("model.layers.1.block_sparse_moe.gate.weight", 1, "router", "weight"),  # Mixtral
    ("model.layers.1.block_sparse_moe.experts.6.w1.weight", 1, "gate", "weight"),
    ("model.layers.1.block_sparse_moe.experts.6.w2.weight", 1, "down", "weight"),
    ("model.layers.1.block_sparse_moe.experts.6.w3.weight", 1, "up", "weight"),
    ("model.layers.1.mlp.gate.weight", 1, "router", "weight"),              # Qwen-MoE
    ("model.layers.1.mlp.shared_expert_gate.weight", 1, "router", "weight"),
    ("model.layers.1.self_attn.qkv_proj.weight", 1, "qkv", "weight"),       # Phi-3
    ("model.layers.1.mlp.gate_up_proj.weight", 1, "gate_up", "weight"),
    ("model.decoder.layers.1.fc1.weight", 1, "up", "weight"),               # OPT
    ("model.decoder.layers.1.self_attn.out_proj.weight", 1, "o", "weight"),
    ("transformer.blocks.1.attn.Wqkv.weight", 1, "qkv", "weight"),          # MPT
    ("layers.0.attention.wq.weight", 0, "q", "weight"),                     # Meta Llama
    ("layers.0.feed_forward.w2.weight", 0, "down", "weight"),
    ("tok_embeddings.weight", None, "embed", "weight"),
    ("output.weight", None, "lm_head", "weight"),
    ("model.layers.2.self_attn.rotary_emb.inv_freq", 2, "other", "inv_freq"),
]


@pytest.mark.parametrize("name,layer,kind,param", NAMES)
def test_parse_name(name, layer, kind, param):
    info = parse_name(name)
    assert (info.layer, info.module, info.param) == (layer, kind, param)


def test_expert_index_and_map():
    assert parse_name("model.layers.1.block_sparse_moe.experts.6.w1.weight").expert == 6
    rules = parse_map(["model.=", "base_model.model.model.=", "lm_head.=output."])
    got = apply_map(["model.a", "base_model.model.model.a2", "lm_head.weight", "x"], rules)
    assert got == {"a": "model.a", "a2": "base_model.model.model.a2",
                   "output.weight": "lm_head.weight", "x": "x"}
    assert parse_map({"model.": ""}) == (("model.", ""),)
    with pytest.raises(NameMapError):
        parse_map("=x")
    with pytest.raises(NameMapError):
        apply_map(["model.a", "a"], parse_map("model.="))


# -------------------------------------------------------------------------------------
# matrix metrics: the metrics' cores (which the diff calls) give the public functions'
# numbers exactly
# -------------------------------------------------------------------------------------
from gatesim.diff import matrix as dm  # noqa: E402


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0, 1e-6])
@pytest.mark.parametrize("largest", [True, False])
def test_select_mask_equals_metrics_with_ties(alpha, largest):
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 7, (3000,), generator=g).to(torch.float64)   # heavy ties
    s[::5] = torch.rand(600, generator=g, dtype=torch.float64)
    got = gm.select_core(s.numpy().copy(), alpha, largest)
    want = (gm.top_alpha if largest else gm.bottom_alpha)(s, alpha)
    assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_matrix_metrics_equal_metrics(dtype):
    g = torch.Generator().manual_seed(9)
    W0 = (0.02 * torch.randn(96, 64, generator=g)).to(dtype)
    W0.view(-1)[:50] = 0.0                                  # ties in |W0|
    W1 = W0.clone()
    idx = torch.randperm(W0.numel(), generator=g)[:900]
    W1.view(-1)[idx] = (W1.view(-1)[idx].float() * 1.05).to(dtype)
    W1.view(-1)[:10] = -0.0                                 # +0 -> -0: not an update
    k, alpha = 16, 0.05
    s0, s1 = gm.compute_svd(W0), gm.compute_svd(W1)
    upd = gm.update_mask_core(W0, W1)
    assert np.array_equal(upd, gm.update_mask(W0, W1).reshape(-1).numpy())
    princ = gm.principal_mask_core(s0, k, alpha)
    assert np.array_equal(princ, gm.principal_mask(W0, k, alpha, svd0=s0).reshape(-1).numpy())
    low = gm.low_magnitude_mask_core(W0, alpha)
    want_low = gm.low_magnitude_mask(W0, alpha)
    assert np.array_equal(low, want_low.reshape(-1).numpy())
    ov = dm.overlaps(upd, princ, low)
    U = gm.update_mask(W0, W1)
    P = gm.principal_mask(W0, k, alpha, svd0=s0)
    assert ov["overlap_principal"] == gm.overlap(U, P)
    assert ov["overlap_low"] == gm.overlap(U, want_low)
    assert ov["overlap_principal_not_low"] == gm.overlap_excluding(U, P, want_low)
    assert gm.nss_core(s0.S, s1.S) == gm.nss(W0, W1, svd0=s0, svd1=s1)
    a, b = gm.principal_angles_core(s0, s1, k), gm.principal_angles(W0, W1, k, svd0=s0, svd1=s1)
    assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    from gatesim.diff.gram import _rows64
    e, normF = gm.update_energy_core(W0, W1, s0, k, rows64=_rows64)
    ref = gm.update_energy(W0, W1, k, svd0=s0)
    assert e == pytest.approx(ref.value, rel=1e-12)
    assert normF == pytest.approx(float(torch.linalg.vector_norm(W1.double() - W0.double())),
                                  rel=1e-14)
