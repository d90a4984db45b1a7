"""Every column of `gatesim diff` (the rows and the three summaries, in every output: the
returned DataFrames, rows.csv, rows.parquet, rows.jsonl, summary_*.csv / .parquet and the
summary the command prints) against values computed here, with plain numpy, from the
definitions (docs/diff.md, docs/metrics.md, docs/simulation.md), on a small
hand-built pair of safetensors files: entries equal, moved by one ULP or more, +0 vs -0,
NaN, inf, bf16 rounding ties, bf16 and fp32.

Nothing here calls gatesim to get an expected value: the bit patterns, ULP keys, rounding
to bf16 (nearest-even), SVDs, masks, overlaps, checksums and summaries are all recomputed
below. The list of checked columns must equal ``gatesim.diff.COLUMNS`` and the summaries'
columns, so a new column fails here until it gets its own check.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import gatesim.diff as gd
from gatesim.diff.core import COLUMNS
from hostile import run_cli

ETA, ATOL, ALPHA = 1e-3, 1e-5, 0.05          # the documented defaults

# ------------------------------------------------------------------------------------------
# numpy from the definitions
# ------------------------------------------------------------------------------------------
# dtype -> (unsigned view, bits, magnitude mask, +inf magnitude)
LAYOUT = {"bfloat16": (np.uint16, 16, 0x7FFF, 0x7F80),
          "float32": (np.uint32, 32, 0x7FFFFFFF, 0x7F800000)}


def bf16_bits(x) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest, ties to even (NaN stays NaN)."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    r[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return r


def bf16_value(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def values(bits, dtype) -> np.ndarray:
    """float64 values of stored bit patterns."""
    if dtype == "bfloat16":
        return bf16_value(bits).astype(np.float64)
    return np.asarray(bits, dtype=np.uint32).view(np.float32).astype(np.float64)


def ulp_labels(width):
    """Bin 0, then bin j >= 1 holding (2**(j-2), 2**(j-1)], up to 2**width."""
    labs = ["0", "1", "2"]
    j = 3
    while 2 ** (j - 2) < 2 ** width:
        labs.append(f"{2 ** (j - 2) + 1}-{2 ** (j - 1)}")
        j += 1
    return labs


def ulp_hist(d, width) -> dict:
    labs = ulp_labels(width)
    h = dict.fromkeys(labs, 0)
    for x in d.tolist():
        j = 0 if x == 0 else (1 if x == 1 else int(math.ceil(math.log2(x))) + 1)
        h[labs[j]] += 1
    return h


def pair_counts(b0, b1, dtype, eta=ETA, atol=ATOL) -> dict:
    """The sparsity columns of one pair of stored bit patterns."""
    _, width, mag, inf = LAYOUT[dtype]
    b0 = np.asarray(b0).reshape(-1).astype(np.int64)
    b1 = np.asarray(b1).reshape(-1).astype(np.int64)
    n = b0.size
    m0, m1 = b0 & mag, b1 & mag
    nan0, nan1 = m0 > inf, m1 > inf
    inf0, inf1 = m0 == inf, m1 == inf
    nan = nan0 | nan1
    bit_eq = ((b0 == b1) | ((m0 == 0) & (m1 == 0))) & ~nan
    v0, v1 = values(b0.astype(LAYOUT[dtype][0]), dtype), values(b1.astype(LAYOUT[dtype][0]),
                                                                 dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(v1 - v0)
        fin = np.isfinite(v0) & np.isfinite(v1)
        rel_eq = ~nan & ((v0 == v1) | (fin & (d <= eta * np.maximum(np.abs(v0),
                                                                       np.abs(v1)))))
        atol_eq = ~nan & ((v0 == v1) | (d <= atol))
    sign = 1 << (width - 1)
    k0 = np.where(b0 & sign, -m0, m0)
    k1 = np.where(b1 & sign, -m1, m1)
    dist = np.abs(k1 - k0)[~nan]
    changed = int(n - bit_eq.sum())
    h = ulp_hist(dist, width)
    return dict(
        changed=changed, sparsity_bitwise=bit_eq.sum() / n, update_density=changed / n,
        changed_relative=int(n - rel_eq.sum()), sparsity_relative=rel_eq.sum() / n,
        eta=eta, changed_atol=int(n - atol_eq.sum()), sparsity_atol=atol_eq.sum() / n,
        atol=atol, nan_base=int(nan0.sum()), inf_base=int(inf0.sum()),
        nan_tuned=int(nan1.sum()), inf_tuned=int(inf1.sum()), nan_pairs=int(nan.sum()),
        inf_pairs=int((~nan & (inf0 | inf1)).sum()), ulp_1=h["1"],
        ulp_1_frac=h["1"] / changed if changed else math.nan, ulp_hist=h,
        _mask=~bit_eq)


def checksum(raw: bytes) -> str:
    """gatesim.integrity's documented checksum, in numpy: little-endian 64-bit words
    (zero-padded), acc = sum mix(w_i ^ i*K), fmix64(acc ^ n*P)."""
    K, C, P, M = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1
    n = len(raw)
    w = np.frombuffer(raw + b"\0" * (-n % 8), dtype="<u8")
    pos = np.arange(w.size, dtype=np.uint64) * np.uint64(K)
    x = w ^ pos
    acc = int(((x ^ (x >> np.uint64(29))) * np.uint64(C)).sum(dtype=np.uint64))
    z = acc ^ ((n * P) & M)
    z = (z ^ (z >> 30)) * C & M
    z = (z ^ (z >> 27)) * P & M
    return f"g64:{z ^ (z >> 31):016x}"


def top(score, count, largest) -> np.ndarray:
    """``count`` entries by score (largest or smallest first), ties to the lower
    row-major index."""
    s = score.reshape(-1)
    idx = np.arange(s.size)
    order = np.lexsort((idx, -s if largest else s))
    m = np.zeros(s.size, dtype=bool)
    m[order[:count]] = True
    return m


def angles_deg(A, B) -> np.ndarray:
    """Principal angles between the column spaces of orthonormal A, B (ascending,
    degrees): from the cosines sigma(A^T B), below 45 degrees from the sines
    sigma(B - A A^T B)."""
    cos = np.sort(np.linalg.svd(A.T @ B, compute_uv=False))[::-1]
    sin = np.sort(np.linalg.svd(B - A @ (A.T @ B), compute_uv=False))
    t = np.arccos(np.clip(cos, -1, 1))
    ts = np.arcsin(np.clip(sin, -1, 1))
    return np.degrees(np.where(t < np.pi / 4, ts, t))


def spectral(W0, W1, changed_mask, alpha=ALPHA) -> dict:
    m, n = W0.shape
    k = min(64, max(1, min(m, n) // 4))
    U0, s0, V0h = np.linalg.svd(W0, full_matrices=False)
    U1, s1, V1h = np.linalg.svd(W1, full_matrices=False)
    U0k, V0k, U1k, V1k = U0[:, :k], V0h[:k].T, U1[:, :k], V1h[:k].T
    left, right = angles_deg(U0k, U1k), angles_deg(V0k, V1k)
    D = W1 - W0
    normF = np.linalg.norm(D)
    energy = np.linalg.norm(U0k.T @ D @ V0k) ** 2 / normF ** 2
    N = W0.size
    cnt = max(1, int(math.floor(alpha * N + 0.5)))
    P = top(np.abs(U0k @ np.diag(s0[:k]) @ V0k.T), cnt, True)
    L = top(np.abs(W0), cnt, False)
    U = changed_mask.reshape(-1)
    dens = U.sum() / N

    def ov(name, M, cond=None):
        v = (U & M).sum() / M.sum()
        out = {name: v, f"{name}_baseline": dens, f"{name}_ratio": v / dens}
        if cond is not None:
            out[f"{name}_cond_baseline"] = cond
        return out

    row = dict(spectral="ok", k=k, alpha=alpha,
               nss=np.linalg.norm(s1 - s0) / np.linalg.norm(s0),
               angle_left_max_deg=left.max(), angle_right_max_deg=right.max(),
               angles_left_deg=left, angles_right_deg=right, energy_topk=energy,
               energy_topk_baseline=(k / m) * (k / n), update_normF=normF, svd="gram/gram")
    row.update(ov("overlap_principal", P))
    row.update(ov("overlap_low", L))
    row.update(ov("overlap_principal_not_low", P & ~L, (U & ~L).sum() / (~L).sum()))
    return row


# ------------------------------------------------------------------------------------------
# the pair
# ------------------------------------------------------------------------------------------
def _bf16_tensor(bits, shape):
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)
                            .reshape(shape).copy()).view(torch.bfloat16)


def _f32_tensor(bits, shape):
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)
                            .reshape(shape).copy())


def build(root):
    """Writes base.safetensors / tuned.safetensors; returns (paths, spec) where spec maps
    each name to what the row must say (bits of both sides for the paired ones)."""
    rng = np.random.default_rng(2024)
    base, tuned, spec = {}, {}, {}

    def mags(n, lo, hi):
        return rng.uniform(lo, hi, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)

    # 1. bf16 q_proj 24 x 20: 1-, 3-ULP moves, moves toward zero, +0 -> -0, +0 -> smallest
    #    subnormal (below atol), sign flips, large moves
    n = 24 * 20
    b0 = bf16_bits(mags(n, 0.01, 1.0))
    p = rng.permutation(n)
    b0[p[:14]] = 0x0000
    b1 = b0.copy()
    b1[p[:10]] = 0x8000                       # -0: unchanged
    b1[p[10:14]] = 0x0001                     # one ULP from zero, far below atol
    b1[p[14:54]] += 1
    b1[p[54:74]] += 3
    b1[p[74:89]] -= 2
    b1[p[89:94]] ^= 0x8000
    b1[p[94:99]] = bf16_bits(bf16_value(b0[p[94:99]]) * 1.5)
    spec["model.layers.0.self_attn.q_proj.weight"] = ("bfloat16", b0, b1, (24, 20))

    # 2. fp32 down_proj 16 x 24 (wide): fp32-ULP moves hidden by bf16, bf16- and fp16-
    #    visible moves, relative-equal and atol-equal moves, zeros, bf16 rounding ties
    n = 16 * 24
    x0 = mags(n, 0.05, 2.0).astype(np.float32)
    p = rng.permutation(n)
    x0[p[:6]] = 0.0
    t = bf16_bits(x0[p[100:110]]).astype(np.uint32)          # exact bf16 ties in base
    x0[p[100:110]] = ((t << 16) | 0x8000).view(np.float32)
    x1 = x0.copy()
    x1[p[:3]] = -0.0
    x1[p[3:6]] = 1e-30
    u1 = x1.view(np.uint32)
    u1[p[6:36]] += 1                                          # one fp32 ULP
    x1[p[36:56]] = x0[p[36:56]] * np.float32(1 + 2 ** -6)
    x1[p[56:76]] = x0[p[56:76]] * np.float32(1 + 2 ** -10)
    x1[p[76:80]] = x0[p[76:80]] * np.float32(1 + 5e-4)        # relative-equal only
    x1[p[80:84]] = x0[p[80:84]] + np.float32(3e-6)            # relative- and atol-equal
    u1[p[100:110]] += 1                                       # off the tie: RNE matters
    spec["model.layers.0.mlp.down_proj.weight"] = (
        "float32", x0.view(np.uint32).copy(), u1.copy(), (16, 24))

    # 3. bf16 Mixtral expert w2 (8 x 12) with NaN and inf: spectral block skipped
    n = 96
    b0 = bf16_bits(mags(n, 0.1, 1.0))
    b1 = b0.copy()
    b0[0] = b1[0] = 0x7FC0                    # the same NaN bits: changed
    b1[1] = 0x7FC0                            # NaN in tuned only
    b0[2] = 0xFFC1                            # NaN in base only (negative, other payload)
    b0[3] = b1[3] = 0x7F80                    # +inf both: unchanged
    b1[4] = 0xFF80                            # finite -> -inf
    b0[5], b1[5] = 0x7F80, 0xFF80             # +inf -> -inf
    b0[6], b1[6] = 0x0000, 0x8000             # +0 -> -0
    b1[7:12] += 1
    b0[12], b1[12] = 0x7FC0, 0x7FC1           # two NaNs
    spec["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = ("bfloat16", b0, b1, (8, 12))

    # 4. fp32 1-D norm: relative vs atol vs bitwise, tiny values, zeros, a NaN
    n = 40
    x0 = (1.0 + mags(n, 0.0, 0.2)).astype(np.float32)
    x0[20:23] = np.float32(1e-7)
    x0[25:27] = 0.0
    x1 = x0.copy()
    x1[0:5] += np.float32(1e-6)
    x1[5:10] += np.float32(2e-5)
    x1[10:15] *= np.float32(1.01)
    x1[20:23] = np.float32(3e-7)
    x1[25:27] = -0.0
    x0[30] = x1[30] = np.float32("nan")
    spec["model.layers.1.input_layernorm.weight"] = ("float32", x0.view(np.uint32).copy(),
                                                     x1.view(np.uint32).copy(), (40,))

    # 5. bf16 o_proj 20 x 16: the low-magnitude mask's last places fall in a group of
    #    equal magnitudes (both signs), whose later entries are the updated ones (so the
    #    tie rule, lower index first, shows in overlap_low); a third matrix for the medians
    n = 20 * 16
    b0 = bf16_bits(mags(n, 0.01, 1.0))
    p = np.sort(rng.permutation(n)[:22])
    b0[p[:12]] = bf16_bits(mags(12, 0.004, 0.005))             # the 12 smallest
    b0[p[12:]] = bf16_bits(np.where(np.arange(10) % 2, -1, 1) * 0.0078125)  # 10 tied
    b1 = b0.copy()
    b1[p[17:]] += 1                                            # the last 5 tied entries
    b1[rng.permutation(n)[:60]] += 2
    spec["model.layers.1.self_attn.o_proj.weight"] = ("bfloat16", b0, b1, (20, 16))

    for name, (dt, c0, c1, shape) in spec.items():
        mk = _bf16_tensor if dt == "bfloat16" else _f32_tensor
        base[name], tuned[name] = mk(c0, shape), mk(c1, shape)
    # unpaired and mismatched
    base["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    tuned["value_head.weight"] = torch.rand(1, 12)
    base["model.embed_tokens.weight"] = torch.zeros(10, 12, dtype=torch.bfloat16)
    tuned["model.embed_tokens.weight"] = torch.zeros(11, 12, dtype=torch.bfloat16)
    base["model.norm.weight"] = torch.ones(12, dtype=torch.bfloat16)
    tuned["model.norm.weight"] = torch.ones(12)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors", spec, base, tuned


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def expected_rows(spec, base, tuned) -> dict:
    """name -> {column: value} for every column of every row."""
    names = {  # layer, module, param, expert: by hand from the documented name patterns
        "model.layers.0.self_attn.q_proj.weight": (0, "q", "weight", None),
        "model.layers.0.mlp.down_proj.weight": (0, "down", "weight", None),
        "model.layers.1.block_sparse_moe.experts.3.w2.weight": (1, "down", "weight", 3),
        "model.layers.1.input_layernorm.weight": (1, "norm", "weight", None),
        "model.layers.1.self_attn.o_proj.weight": (1, "o", "weight", None),
        "model.layers.1.self_attn.rotary_emb.inv_freq": (1, "other", "inv_freq", None),
        "value_head.weight": (None, "other", "weight", None),
        "model.embed_tokens.weight": (None, "embed", "weight", None),
        "model.norm.weight": (None, "norm", "weight", None),
    }
    status = {"model.layers.1.self_attn.rotary_emb.inv_freq": "only_base",
              "value_head.weight": "only_tuned",
              "model.embed_tokens.weight": "shape_mismatch",
              "model.norm.weight": "dtype_mismatch"}
    out = {}
    for name, (layer, module, param, expert) in names.items():
        b, t = base.get(name), tuned.get(name)
        ref = b if b is not None else t
        row = dict.fromkeys(COLUMNS)
        row.update(name=name, base_name=name if b is not None else None,
                   tuned_name=name if t is not None else None,
                   status=status.get(name, "paired"), layer=layer, module=module,
                   param=param, expert=expert, shape=json.dumps(list(ref.shape)),
                   dtype=str(ref.dtype).replace("torch.", ""),
                   tuned_dtype=str(t.dtype).replace("torch.", "") if t is not None else None,
                   numel=ref.numel(),
                   bytes=sum(x.numel() * x.element_size() for x in (b, t) if x is not None))
        if name in spec:
            dt, c0, c1, shape = spec[name]
            cnt = pair_counts(c0, c1, dt)
            mask = cnt.pop("_mask")
            row.update(cnt, compared_dtype=dt, base_checksum=checksum(_raw(b)),
                       tuned_checksum=checksum(_raw(t)))
            if dt == "float32":          # the precision question: both saved in bf16/fp16
                f0 = np.asarray(c0, np.uint32).view(np.float32)
                f1 = np.asarray(c1, np.uint32).view(np.float32)
                r = pair_counts(bf16_bits(f0), bf16_bits(f1), "bfloat16")
                h0 = f0.astype(np.float16).view(np.uint16)
                h1 = f1.astype(np.float16).view(np.uint16)
                q = pair_counts_f16(h0, h1)
                row.update(if_bf16_changed=r["changed"], if_bf16_sparsity=r["sparsity_bitwise"],
                           if_bf16_ulp_1=r["ulp_1"], if_fp16_changed=q[0],
                           if_fp16_sparsity=q[1], if_fp16_ulp_1=q[2])
            if len(shape) == 1:
                row["spectral"] = "skipped: 1-D"
            elif cnt["nan_base"] + cnt["inf_base"] + cnt["nan_tuned"] + cnt["inf_tuned"]:
                row["spectral"] = "skipped: non-finite values"
            else:
                W0 = values(c0, dt).reshape(shape)
                W1 = values(c1, dt).reshape(shape)
                row.update(spectral(W0, W1, mask.reshape(shape)))
        elif status[name] == "shape_mismatch":
            row["note"] = ("contains", "[11, 12]")
        elif status[name] == "dtype_mismatch":
            row["note"] = ("contains", "float32")
        out[name] = row
    return out


def pair_counts_f16(h0, h1):
    """(changed, sparsity, one-ULP moves) of fp16 bit patterns (bitwise rule)."""
    b0, b1 = h0.astype(np.int64), h1.astype(np.int64)
    m0, m1 = b0 & 0x7FFF, b1 & 0x7FFF
    nan = (m0 > 0x7C00) | (m1 > 0x7C00)
    eq = ((b0 == b1) | ((m0 == 0) & (m1 == 0))) & ~nan
    k0, k1 = np.where(b0 & 0x8000, -m0, m0), np.where(b1 & 0x8000, -m1, m1)
    n = b0.size
    return int(n - eq.sum()), eq.sum() / n, int(((np.abs(k1 - k0) == 1) & ~nan).sum())


SUMMARY_KEYS = ("tensors", "numel", "changed", "sparsity_bitwise", "sparsity_relative",
                "sparsity_atol", "if_bf16_sparsity", "if_fp16_sparsity", "nan_base",
                "inf_base", "nan_tuned", "inf_tuned", "ulp_1", "ulp_1_frac", "matrices",
                "nss_median", "nss_max", "angle_max_deg", "angle_median_deg",
                "overlap_principal_ratio_mean", "overlap_low_ratio_mean",
                "overlap_principal_not_low_ratio_mean", "energy_ratio_mean")


def summary_of(rows: list) -> dict:
    """docs/diff.md: sparsities pooled over entries (a fraction only where every row has
    it), counts summed, median/max NSS, largest and median angle (left or right), mean
    overlap ratios and energy ratios over the matrices with spectral metrics."""
    numel = sum(r["numel"] for r in rows)
    changed = sum(r["changed"] for r in rows)
    s = dict(tensors=len(rows), numel=numel, changed=changed,
             sparsity_bitwise=1 - changed / numel)
    for col, name in (("changed_relative", "sparsity_relative"),
                      ("changed_atol", "sparsity_atol"),
                      ("if_bf16_changed", "if_bf16_sparsity"),
                      ("if_fp16_changed", "if_fp16_sparsity")):
        have = [r[col] for r in rows if r[col] is not None]
        s[name] = 1 - sum(have) / numel if len(have) == len(rows) else math.nan
    for col in ("nan_base", "inf_base", "nan_tuned", "inf_tuned", "ulp_1"):
        s[col] = sum(r[col] for r in rows)
    s["ulp_1_frac"] = s["ulp_1"] / changed
    sp = [r for r in rows if r["spectral"] == "ok"]
    s["matrices"] = len(sp)
    for c in SUMMARY_KEYS[15:]:
        s[c] = math.nan
    if sp:
        nss = [r["nss"] for r in sp]
        ang = [max(r["angle_left_max_deg"], r["angle_right_max_deg"]) for r in sp]
        s.update(nss_median=float(np.median(nss)), nss_max=max(nss), angle_max_deg=max(ang),
                 angle_median_deg=float(np.median(ang)))
        for c in ("overlap_principal", "overlap_low", "overlap_principal_not_low"):
            s[c + "_ratio_mean"] = float(np.mean([r[c + "_ratio"] for r in sp]))
        s["energy_ratio_mean"] = float(np.mean([r["energy_topk"] / r["energy_topk_baseline"]
                                                for r in sp]))
    return s


def expected_summaries(exp: dict) -> dict:
    paired = [r for r in exp.values() if r["status"] == "paired"]
    mods = [m for m in ("q", "o", "down", "norm") if any(r["module"] == m for r in paired)]
    module = {m: summary_of([r for r in paired if r["module"] == m]) for m in mods}
    layer = {i: summary_of([r for r in paired if r["layer"] == i]) for i in (0, 1)}
    model = summary_of(paired)
    for st in ("paired", "only_base", "only_tuned", "shape_mismatch", "dtype_mismatch"):
        model[f"n_{st}"] = sum(r["status"] == st for r in exp.values())
    return {"module": module, "layer": layer, "model": model}


# ------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------
SPECTRAL_TOL = {"nss": 1e-7, "energy_topk": 1e-7, "update_normF": 1e-9}
ANGLE_COLS = ("angle_left_max_deg", "angle_right_max_deg", "angle_max_deg",
              "angle_median_deg")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or (
        isinstance(v, str) and v == "")


def check(col, got, want, where):
    msg = f"{where}.{col}: got {got!r}, want {want!r}"
    if isinstance(want, tuple) and want[0] == "contains":
        assert isinstance(got, str) and want[1] in got, msg
        return
    if _missing(want):
        assert _missing(got), msg
        return
    assert not _missing(got), msg
    if col == "ulp_hist":
        assert json.loads(got) == want, msg              # keys in order, counts exact
        assert list(json.loads(got)) == list(want), msg
    elif col in ("angles_left_deg", "angles_right_deg"):
        g = json.loads(got)
        assert len(g) == len(want) and np.allclose(g, want, rtol=0, atol=1e-6), msg
    elif isinstance(want, str):
        assert str(got) == want, msg
    elif col in ANGLE_COLS or col.startswith("angle"):
        assert float(got) == pytest.approx(float(want), abs=1e-6), msg
    elif col in SPECTRAL_TOL or col.startswith(("nss", "energy_ratio")):
        assert float(got) == pytest.approx(float(want), rel=SPECTRAL_TOL.get(col, 1e-7)), msg
    elif isinstance(want, (int, np.integer)) and not isinstance(want, bool):
        assert float(got) == int(want), msg              # counts: exact
    else:
        assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-300), msg


def check_rows(frame: pd.DataFrame, exp: dict, where: str):
    assert list(frame.columns) == list(COLUMNS), where
    assert sorted(frame["name"]) == sorted(exp), where
    for _, r in frame.iterrows():
        want = exp[r["name"]]
        for col in COLUMNS:
            check(col, r[col], want[col], f"{where}:{r['name']}")


def check_summary(frame: pd.DataFrame, exp: dict, key: str, where: str):
    if key == "model":
        rows = {None: exp}
        assert len(frame) == 1
    else:
        rows = exp
        assert [int(x) if key == "layer" else x for x in frame[key]] == list(exp), where
    want_cols = ([key] if key != "model" else []) + list(SUMMARY_KEYS) + (
        [f"n_{s}" for s in ("paired", "only_base", "only_tuned", "shape_mismatch",
                            "dtype_mismatch")] if key == "model" else [])
    assert sorted(frame.columns) == sorted(want_cols), where
    for (label, want), (_, r) in zip(rows.items(), frame.iterrows()):
        for col in want_cols:
            if col == key:
                continue
            check(col, r[col], want[col], f"{where}:{key}={label}")


# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    b, t, spec, base, tuned = build(root)
    exp = expected_rows(spec, base, tuned)
    res = gd.diff(b, t, root / "out", progress=False, figures=False)
    return b, t, exp, expected_summaries(exp), res


def test_the_expectations_cover_every_column(case):
    *_, exp, _, _ = case
    for row in exp.values():
        assert set(row) == set(COLUMNS)
    # the planted cases are all there (a construction slip would weaken the checks)
    q = exp["model.layers.0.self_attn.q_proj.weight"]
    assert q["changed_atol"] < q["changed"] == q["changed_relative"]
    d = exp["model.layers.0.mlp.down_proj.weight"]
    assert d["changed_relative"] < d["changed_atol"] < d["changed"]
    assert 0 < d["if_bf16_changed"] < d["if_fp16_changed"] < d["changed"]
    e = exp["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert e["nan_pairs"] == 4 and e["inf_pairs"] == 3
    n = exp["model.layers.1.input_layernorm.weight"]
    assert n["changed_relative"] < n["changed_atol"] < n["changed"]


def test_rows_every_column(case):
    *_, exp, _, res = case
    check_rows(res.rows, exp, "rows")


def test_rows_csv_parquet_jsonl_every_column(case):
    *_, exp, _, res = case
    check_rows(pd.read_csv(res.out / "rows.csv", keep_default_na=False, na_values=[""]),
               exp, "rows.csv")
    check_rows(pd.read_parquet(res.out / "rows.parquet"), exp, "rows.parquet")
    check_rows(pq.read_table(res.out / "rows.parquet").to_pandas(), exp, "pyarrow")
    recs = [json.loads(x) for x in (res.out / "rows.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == list(res.rows["name"])
    check_rows(pd.DataFrame([r["result"] for r in recs], columns=list(COLUMNS)), exp,
               "rows.jsonl")


def test_summaries_every_column(case):
    *_, sums, res = case
    for key in ("module", "layer", "model"):
        want = sums[key]
        check_summary(res.summary[key], want, key, "summary")
        check_summary(pd.read_csv(res.out / f"summary_{key}.csv"), want, key, "csv")
        check_summary(pd.read_parquet(res.out / f"summary_{key}.parquet"), want, key,
                      "parquet")


def test_printed_summary(case):
    """Without --out the command prints the model and module tables."""
    b, t, _, sums, _ = case
    code, out, err = run_cli(["diff", b, t, "--no-progress"])
    assert code == 0, err
    tables, cur = [], None
    for line in out.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = [cells]
            elif not set(line) <= set("|-"):
                cur.append(cells)
        elif cur is not None:
            tables.append(cur)
            cur = None
    model, module = tables[0], tables[1]
    assert len(model) == 2 and len(module) == 1 + len(sums["module"])

    def same(cell, want):
        if _missing(want):
            return cell == ""
        return math.isclose(float(cell), float(want), rel_tol=5e-3, abs_tol=5e-5)

    for head, vals, want in [(model[0], model[1], sums["model"])] + [
            (module[0], r, sums["module"][r[0]]) for r in module[1:]]:
        for h, v in zip(head, vals):
            if h != "module":
                assert same(v, want[h]), (h, v, want[h])
    assert (f"paired {sums['model']['n_paired']}, only in base 1, only in tuned 1, "
            "shape mismatches 1, dtype mismatches 1") in out


# ------------------------------------------------------------------------------------------
# +0 / -0 in the bitwise-only pass, without NaN or inf
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zeros_pair(tmp_path_factory):
    """bf16 and fp32 tensors, odd lengths (partial 64-bit words) and whole words, whose
    only non-finite-free differences include +0 vs -0 (both ways), and tensors whose only
    difference is +0/-0."""
    root = tmp_path_factory.mktemp("zeros")
    spec = {}
    b0 = np.array([0x0000, 0x8000, 0x3F80, 0x3F00, 0x0000, 0xBF80, 0x0000], np.uint16)
    b1 = np.array([0x8000, 0x0000, 0x3F80, 0x3F01, 0x0000, 0xBF80, 0x8000], np.uint16)
    spec["a.weight"] = ("bfloat16", b0, b1, (7,))
    spec["b.weight"] = ("bfloat16", np.zeros(16, np.uint16),                    # flips only
                        np.where(np.arange(16) % 3 == 0, 0x8000, 0).astype(np.uint16), (4, 4))
    x0 = np.array([0.0, -0.0, 1.5, 0.0, 2.0], np.float32).view(np.uint32)
    x1 = np.array([-0.0, 0.0, 1.5, 0.0, 2.5], np.float32).view(np.uint32)
    spec["c.weight"] = ("float32", x0, x1, (5,))
    spec["d.weight"] = ("float32", np.zeros(6, np.uint32),                      # flips only
                        np.full(6, 0x80000000, np.uint32), (2, 3))
    base, tuned = {}, {}
    for name, (dt, c0, c1, shape) in spec.items():
        mk = _bf16_tensor if dt == "bfloat16" else _f32_tensor
        base[name], tuned[name] = mk(c0, shape), mk(c1, shape)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors", spec, base, tuned


@pytest.mark.parametrize("mode", [dict(bitwise_only=True),               # fused checksums
                                  dict(bitwise_only=True, cast="fp32"),  # plain quick pass
                                  dict(sparsity_only=True)])             # gathering pass
def test_plus_and_minus_zero_are_equal_without_nan_or_inf(zeros_pair, mode):
    b, t, spec, base, tuned = zeros_pair
    rows = gd.diff(b, t, progress=False, **mode).rows.set_index("name")
    for name, (dt, c0, c1, _) in spec.items():
        want = pair_counts(c0, c1, dt)
        assert want["nan_pairs"] == want["inf_pairs"] == 0
        r = rows.loc[name]
        for col in ("changed", "sparsity_bitwise", "update_density", "nan_base", "inf_base",
                    "nan_tuned", "inf_tuned", "nan_pairs", "inf_pairs"):
            check(col, r[col], want[col], f"{mode}:{name}")
        assert r["base_checksum"] == checksum(_raw(base[name]))
        assert r["tuned_checksum"] == checksum(_raw(tuned[name]))
    assert rows.loc["b.weight", "changed"] == rows.loc["d.weight", "changed"] == 0
    assert rows.loc["a.weight", "changed"] == 1 and rows.loc["c.weight", "changed"] == 1
