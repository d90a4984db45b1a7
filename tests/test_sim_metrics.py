"""Every number of a simulation cell's results, recomputed with plain numpy from the
definitions (docs/metrics.md, docs/simulation.md), and the sweep's cross-run Jaccard on
hand-built masks.

What is independent here:

* The weights. One tiny cell records its update stream; this file replays the stream's
  deltas through its own numpy emulation of each storage policy (fp32 storage,
  ``bf16`` = round-to-nearest-even of ``fl32(p + u)``, ``bf16+master`` = ``bf16(m)`` with
  ``m = fl32(m + u)``), written from the policy definitions in gatesim.update's docstring,
  and checks the result against the run's own digests (``final_weights_sha``,
  ``train_weights_sha``): so the weights the metrics are recomputed from are the run's, not
  gatesim's replay of them. The precision-only null uses the permutation and signs that
  run.py documents (a torch generator seeded ``seed * 1_000_003 + 29``: the only thing
  copied from the code), applied here.
* The metrics. Sparsities, masks, Top/Bottom-alpha selections, overlaps, singular values,
  principal angles, update energy, ULP ratios, absorbed counts, histograms, reward and KL
  are written below in numpy from their definitions; the code's values must match them.
* The Jaccard pairs. Masks written by hand with densities p != q, so a baseline computed
  from one density (p**2 / (2p - p**2)) differs from pq / (p + q - pq).
"""
import hashlib
import json
import math
import types

import numpy as np
import pytest
import torch

from gatesim.sim import CellConfig, run_cell
from gatesim.sim.analysis import cross_frame, run_pairs
from gatesim.sim.run import DELTA_KEY, NULL_PREFIX
from gatesim.sim.stream import Stream
from gatesim.sim.sweep import cell_id, jaccard_pairs
from gatesim.sim.task import Task

POLICIES = ("fp32", "bf16", "bf16+master")
CFG = dict(rows=16, n_contexts=8, n_targets=2, batch=4, group=4, steps=6, eval_every=3,
           k=2, alpha=0.1, lr=3e-4, policies=POLICIES, null_policies=("bf16",),
           mask="random", mask_density=0.7)   # some updates are exactly zero


# --------------------------------------------------------------- numpy from the definitions

def sha(a):
    """The results' digest: sha256 of the fp32 bits, 16 hex digits."""
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).view(np.int32)
                          .tobytes()).hexdigest()[:16]


def to_bf16(x):
    """Round-to-nearest-even of float32 values to bf16 (kept as float32 on the grid)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def ulp(x, mant_bits):
    """ULP of non-zero finite x: for |x| in [2^e, 2^(e+1)), 2^(e - mant_bits)."""
    _, e = np.frexp(np.abs(np.asarray(x, np.float64)))   # |x| = m 2^e, m in [0.5, 1)
    assert np.all(np.asarray(x) != 0)
    return np.ldexp(1.0, e - 1 - mant_bits)


def emulate(W0, updates, policy):
    """(stored start, stored end, stats) of ``policy`` fed ``updates`` = [(delta, alpha)]:
    stats count non-zero updates, absorbed ones (u != 0, stored value unchanged), their |u|
    mass and the 34-bin histogram of log2(|u| / ulp(stored before)) (bin 0 below 2^-24,
    bin j in [2^(j-25), 2^(j-24)), bin 33 at or above 2^8)."""
    bf = policy != "fp32"
    q = to_bf16 if bf else (lambda x: np.asarray(x, np.float32))
    mant = 7 if bf else 23
    p = q(W0)
    m = W0.astype(np.float32).copy()
    start = p.copy()
    st = dict(nonzero=0, absorbed=0, mass=0.0, hist=np.zeros(34, np.int64), seq=[])
    for delta, alpha in updates:
        u = alpha * delta.astype(np.float64)
        if policy == "bf16+master":
            m = (m.astype(np.float64) + u).astype(np.float32)
            new = to_bf16(m)
        else:
            new = q((p.astype(np.float64) + u).astype(np.float32))
        nz = u != 0
        absorbed = nz & (new == p)
        st["nonzero"] += int(nz.sum())
        st["absorbed"] += int(absorbed.sum())
        st["mass"] += float(np.abs(u[absorbed]).sum())
        _, e = np.frexp(np.abs(u[nz]) / ulp(p[nz], mant))     # ratio = f 2^e: floor log2 e-1
        st["hist"] += np.bincount(np.clip(e - 1 + 25, 0, 33), minlength=34)
        p = new
        st["seq"].append(p.copy())
    return start, p, st


def top_count(alpha, n):
    return max(1, int(math.floor(alpha * n + 0.5)))


def select(score, alpha, largest):
    """Flat bool mask of the top (bottom) alpha fraction, ties to the lower index."""
    s = score.ravel()
    order = np.argsort(-s if largest else s, kind="stable")
    out = np.zeros(s.size, bool)
    out[order[:top_count(alpha, s.size)]] = True
    return out


def svd(a):
    return np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)


def angles_max_deg(A, B, k):
    """Largest principal angle between the top-k left (right) singular subspaces."""
    U0, _, V0 = svd(A)
    U1, _, V1 = svd(B)
    out = []
    for X, Y in ((U0[:, :k], U1[:, :k]), (V0[:k].T, V1[:k].T)):
        c = np.linalg.svd(X.T @ Y, compute_uv=False)
        out.append(float(np.degrees(np.arccos(np.clip(c.min(), -1, 1)))))
    return out


def quantiles_close(got, values, rel):
    """The code's p10/p50/p90 (from a histogram) within ``rel`` of numpy's exact ones."""
    for key, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        assert got[key] == pytest.approx(float(np.quantile(values, q)), rel=rel), key


# -------------------------------------------------------------------------------- the cell

@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim_metrics")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = CellConfig(**CFG)
        res = run_cell(cfg, record=d / "stream", mask_path=d / "m.npz")
        s = Stream(d / "stream")
        W0 = s.initial().numpy().astype(np.float32)
        ups = [(step, delta.numpy().astype(np.float32), alpha, decay)
               for step, delta, alpha, decay in s.updates()]
        task = Task(cfg)
        H, tmask = task.H.numpy().astype(np.float64), task.target_mask.numpy()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 29)
        perm = torch.randperm(W0.size, generator=gen).numpy()
        sign = (torch.randint(0, 2, (W0.size,), generator=gen) * 2 - 1).numpy()
    finally:
        torch.set_num_threads(threads)
    assert all(decay == 1.0 for *_, decay in ups) and len(ups) == cfg.steps
    with np.load(d / "m.npz") as z:
        arrays = {k: z[k] for k in z.files}
    null_ups = [((dl.ravel()[perm] * sign).reshape(dl.shape).astype(np.float32), a)
                for _, dl, a, _ in ups]
    emu = {p: emulate(W0, [(dl, a) for _, dl, a, _ in ups], p) for p in POLICIES}
    emu_null = {"bf16": emulate(W0, null_ups, "bf16")}
    return types.SimpleNamespace(cfg=cfg, res=res, W0=W0, ups=ups, H=H, tmask=tmask,
                                 arrays=arrays, emu=emu, emu_null=emu_null)


def test_the_emulated_weights_are_the_runs(cell):
    """The numpy emulation reproduces every policy's final stored weights and the training
    weights bit for bit (the run's digests): the metrics below are recomputed from them."""
    r = cell.res
    for p in POLICIES:
        assert sha(cell.emu[p][1]) == r["final_weights_sha"][p], p
    assert sha(cell.emu["fp32"][1]) == r["train_weights_sha"]    # train_policy fp32
    # and the run moved things: bf16 absorbed some entries and changed others
    bf = cell.res["policies"]["bf16"]["bitwise_sparsity"]
    assert 0.05 < bf < 0.95
    # the mask leaves some updates exactly zero: non-zero counts differ from element counts
    assert 0 < cell.emu["bf16"][2]["nonzero"] < cell.W0.size * cell.cfg.steps


def expected_policy(cell, start, end, stats):
    """Every per-policy field, by its definition."""
    cfg, W0 = cell.cfg, cell.W0.astype(np.float64)
    a, b = start.astype(np.float64), end.astype(np.float64)
    n = a.size
    upd = (a != b).ravel()                       # bits differ (+0 == -0; no NaN here)
    s0 = np.linalg.svd(a, compute_uv=False)
    s1 = np.linalg.svd(b, compute_uv=False)
    U0, _, V0 = svd(a)
    D = b - a
    k = cfg.k
    energy = (float(np.sum((U0[:, :k].T @ D @ V0[:k].T) ** 2) / np.sum(D ** 2))
              if upd.any() else 0.0)
    left, right = angles_max_deg(a, b, k) if upd.any() else (0.0, 0.0)
    Uw, Sw, Vw = svd(W0)
    principal = select(np.abs((Uw[:, :k] * Sw[:k]) @ Vw[:k]), cfg.alpha, True)
    low = select(np.abs(W0), cfg.alpha, False)
    p_and_not_l = principal & ~low
    diff = np.abs(b - a)
    hist = stats["hist"]
    return {
        "bitwise_sparsity": 1 - upd.mean(),
        "relative_sparsity": float(np.mean((a == b) | (diff <= 1e-3 * np.maximum(
            np.abs(a), np.abs(b))))),
        "atol_sparsity": {"1e-05": float(np.mean((a == b) | (diff <= 1e-5)))},
        "update_density": upd.mean(),
        "absorbed_fraction": stats["absorbed"] / stats["nonzero"],
        "absorbed_updates": stats["absorbed"],
        "nonzero_updates": stats["nonzero"],
        "absorbed_mass": stats["mass"],
        "hist": hist.tolist(),
        "nss": float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0)),
        "angle_left_max_deg": left,
        "angle_right_max_deg": right,
        "energy_topk": energy,
        "energy_baseline": (k / W0.shape[0]) * (k / W0.shape[1]),
        "sv_drift": (s1 - s0).tolist(),
        "principal_overlap": (upd & principal).sum() / principal.sum(),
        "low_overlap": (upd & low).sum() / low.sum(),
        "principal_overlap_excl_low": (upd & p_and_not_l).sum() / p_and_not_l.sum(),
        "overlap_baseline": upd.sum() / n,
        "overlap_excl_low_baseline": upd.sum() / n,
        "_mask": upd, "_principal": principal, "_low": low,
    }


EXACT = ("absorbed_updates", "nonzero_updates", "hist", "atol_sparsity")


def compare_policy(got, want, where):
    assert set(got) == set(want) - {"_mask", "_principal", "_low"} | {"step_ratio_own_ulp"}
    for key, w in want.items():
        if key.startswith("_"):
            continue
        if key in EXACT:
            assert got[key] == w, (where, key)
        elif key.startswith("angle"):
            assert got[key] == pytest.approx(w, rel=1e-4, abs=1e-4), (where, key)
        else:
            assert got[key] == pytest.approx(w, rel=1e-6, abs=1e-12), (where, key)
    # the quantiles of |u|/ulp from the factor-2 histogram: each within its bin
    hist = np.asarray(want["hist"])
    cum = np.cumsum(hist) / hist.sum()
    for key, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        j = int(np.searchsorted(cum, q))                  # the bin holding the quantile
        lo, hi = 2.0 ** (j - 25), 2.0 ** (j - 24)
        assert lo <= got["step_ratio_own_ulp"][key] <= hi, (where, key)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_metrics_from_the_definitions(cell, policy):
    """Sparsities, absorbed counts, histogram, spectral shift, angles, energy, masks and
    overlaps of each stored policy, against numpy on the emulated weights; the mask file
    holds the same update mask."""
    start, end, stats = cell.emu[policy]
    want = expected_policy(cell, start, end, stats)
    compare_policy(cell.res["policies"][policy], want, policy)
    n = cell.W0.size
    stored = np.unpackbits(cell.arrays[policy])[:n].astype(bool)
    assert np.array_equal(stored, want["_mask"])
    # the case discriminates: the principal and low-magnitude masks are different sets
    # with different overlaps (a metric reading the wrong mask would not match)
    if 0 < want["update_density"] < 1:
        assert (want["principal_overlap"] != pytest.approx(want["low_overlap"], abs=0.02))


def test_null_metrics_from_the_definitions(cell):
    """The precision-only null: the run's deltas permuted and sign-flipped, through bf16."""
    start, end, stats = cell.emu_null["bf16"]
    want = expected_policy(cell, start, end, stats)
    compare_policy(cell.res["null"]["bf16"], want, "null bf16")
    stored = np.unpackbits(cell.arrays[NULL_PREFIX + "bf16"])[:cell.W0.size].astype(bool)
    assert np.array_equal(stored, want["_mask"])
    # same multiset of |u| per step as the run: same non-zero count, same histogram total
    assert stats["nonzero"] == cell.emu["bf16"][2]["nonzero"]


def test_cell_level_metrics_from_the_definitions(cell):
    """The accumulated update and its ratios to ulp_bf16(w0), the step norms, the
    trajectory's reward, KL and principal angle, against numpy."""
    r, cfg = cell.res, cell.cfg
    W0 = cell.W0.astype(np.float64)
    acc = np.zeros_like(W0)
    norms, sampled = [], []
    u0 = ulp(to_bf16(cell.W0), 7)
    for step, dl, alpha, _ in cell.ups:
        u = alpha * dl.astype(np.float64)
        acc += u
        norms.append(float(np.linalg.norm(dl.astype(np.float64))) * abs(alpha))
        if step % 4 == 0:                          # STEP_RATIO_EVERY: steps 0 and 4
            x = np.abs(u) / u0
            sampled.append(x[x > 0])
    assert np.array_equal(cell.arrays[DELTA_KEY], acc.astype(np.float32))
    assert r["true_update_density"] == pytest.approx(float(np.mean(acc != 0)), rel=1e-12)
    assert r["update_norm"] == pytest.approx(float(np.linalg.norm(acc)), rel=1e-9)
    assert r["mean_step_norm"] == pytest.approx(float(np.mean(norms)), rel=1e-6)
    ratio = np.abs(acc) / u0
    assert r["acc_ratio"]["below_half"] == pytest.approx(float(np.mean(ratio < 0.5)),
                                                         rel=1e-12)
    # the histogram quantiles (1/16-octave bins, linear in log2 within a bin): within one
    # bin (2**(1/16) = 1.044) of numpy's exact quantile
    quantiles_close(r["acc_ratio"], ratio[ratio > 0], rel=0.045)
    quantiles_close(r["step_ratio"], np.concatenate(sampled), rel=0.045)
    quantiles_close(r["nominal_step_ratio"], (cfg.lr / u0).ravel(), rel=0.045)
    # trajectory: the training weights (fp32 policy = train policy) after steps 3 and 6
    seq = cell.emu["fp32"][2]["seq"]
    assert r["trajectory"]["step"] == [0, 3, 6]

    def logp(W):
        z = cell.H @ W.T
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ref = logp(W0)
    for i, t in enumerate((0, 3, 6)):
        W = W0 if t == 0 else seq[t - 1].astype(np.float64)
        lp = logp(W)
        reward = float(np.mean((np.exp(lp) * cell.tmask).sum(1)))
        kl = float(np.mean((np.exp(lp) * (lp - ref)).sum(1)))
        assert r["trajectory"]["reward"][i] == pytest.approx(reward, rel=1e-5)
        assert r["trajectory"]["kl"][i] == pytest.approx(kl, rel=2e-2, abs=1e-9)
        want_angle = angles_max_deg(W0, W, cfg.k)[0] if t else 0.0
        assert r["trajectory"]["angle_left_max_deg"][i] == pytest.approx(want_angle,
                                                                          rel=1e-3, abs=1e-4)
    assert r["trajectory"]["kl"][-1] > 1e-6          # the KL checked is not just zero


# ------------------------------------------------------------------- cross-run Jaccard

N = 1000
#: hand-built masks: A = entries 0..99 (p = 0.1), B = entries 50..649 (q = 0.6):
#: |A & B| = 50, |A | B| = 650
MASK_A = np.arange(N) < 100
MASK_B = (np.arange(N) >= 50) & (np.arange(N) < 650)
J_AB = 50 / 650
BASE_AB = 0.1 * 0.6 / (0.1 + 0.6 - 0.1 * 0.6)       # pq / (p + q - pq) = 0.09375


def _write(mask_dir, key, masks, delta):
    np.savez(mask_dir / f"{cell_id(key)}.npz", shape=np.array([N]),
             **{p: np.packbits(m) for p, m in masks.items()}, **{DELTA_KEY: delta})


def _cells(mask_dir, geometry_b="real", seed_b=1, variant_b="rl_kl"):
    base = CellConfig(**CFG).to_dict()
    d1, d2 = np.zeros(N, np.float32), np.zeros(N, np.float32)
    d1[:3], d2[:3] = (1, 2, 0), (2, 1, 2)            # cosine 4 / (sqrt 5 * 3)
    cells = []
    for seed, geo, variant, masks, d in (
            (0, "real", "rl_kl", {"bf16": MASK_A, "fp32": MASK_A}, d1),
            (seed_b, geometry_b, variant_b, {"bf16": MASK_B, "fp32": MASK_A}, d2)):
        key = f"variant={variant},seed={seed}"
        cells.append({"key": key, "variant": variant,
                      "config": dict(base, seed=seed, geometry=geo),
                      "policies": {p: {} for p in masks}})
        _write(mask_dir, key, masks, d)
    return cells


def test_cross_seed_jaccard_and_its_two_density_baseline(tmp_path):
    """jaccard_pairs: J = |A & B| / |A | B| and baseline pq/(p+q-pq) with p != q."""
    rows = jaccard_pairs(_cells(tmp_path), tmp_path)
    by = {r["policy"]: r for r in rows}
    assert len(rows) == 2 and by["bf16"]["seeds"] == [0, 1]
    assert by["bf16"]["p"] == pytest.approx(0.1) and by["bf16"]["q"] == pytest.approx(0.6)
    assert by["bf16"]["value"] == pytest.approx(J_AB, rel=1e-12)
    assert by["bf16"]["baseline"] == pytest.approx(BASE_AB, rel=1e-12)
    # identical masks (fp32 policy here): J = 1, baseline p^2 / (2p - p^2)
    assert by["fp32"]["value"] == 1.0
    assert by["fp32"]["baseline"] == pytest.approx(0.01 / 0.19, rel=1e-12)


def test_cross_frame_jaccard_and_baseline(tmp_path):
    """cross_frame (the rotation control's frame a) on the same hand-built masks."""
    cells = _cells(tmp_path, geometry_b="rotated", seed_b=0, variant_b="rl_kl@rotated")
    (row_bf, row_32) = sorted(cross_frame(cells, tmp_path), key=lambda r: r["policy"])
    assert (row_bf["policy"], row_bf["geometry"], row_bf["seed"]) == ("bf16", "rotated", 0)
    assert row_bf["value"] == pytest.approx(J_AB, rel=1e-12)
    assert row_bf["baseline"] == pytest.approx(BASE_AB, rel=1e-12)
    assert row_bf["ratio"] == pytest.approx(J_AB / BASE_AB, rel=1e-12)
    assert (row_bf["p"], row_bf["q"]) == (pytest.approx(0.6), pytest.approx(0.1))


def test_run_pairs_jaccard_and_cosine(tmp_path):
    """run_pairs: rl_nokl against a recipe variant (algo reinforce), same seed: Jaccard with
    its baseline and the cosine of the accumulated updates with sd 1/sqrt(N)."""
    base = CellConfig(**CFG).to_dict()
    cells = []
    d1, d2 = np.zeros(N, np.float32), np.zeros(N, np.float32)
    d1[:3], d2[:3] = (1, 2, 0), (2, 1, 2)
    for variant, algo, mask, d in (("rl_nokl", "grpo", MASK_A, d1),
                                   ("reinforce", "reinforce", MASK_B, d2)):
        key = f"variant={variant},seed=0"
        cells.append({"key": key, "variant": variant,
                      "config": dict(base, algo=algo, beta=0.0, clip=None),
                      "policies": {"bf16": {}}})
        _write(tmp_path, key, {"bf16": mask}, d)
    (row,) = run_pairs(cells, tmp_path, "bf16")
    assert row["kind"] == "recipe" and row["seed"] == 0
    assert row["jaccard"]["value"] == pytest.approx(J_AB, rel=1e-12)
    assert row["jaccard"]["baseline"] == pytest.approx(BASE_AB, rel=1e-12)
    assert row["cosine"] == pytest.approx(4 / (math.sqrt(5) * 3), rel=1e-12)
    assert row["cosine_baseline"] == 0.0
    assert row["cosine_baseline_sd"] == pytest.approx(1 / math.sqrt(N), rel=1e-12)


def test_metrics_jaccard_baseline_uses_both_densities():
    import gatesim.metrics as gm
    j = gm.jaccard(torch.from_numpy(MASK_A), torch.from_numpy(MASK_B))
    assert (j.value, j.intersection, j.union) == (pytest.approx(J_AB), 50, 650)
    assert j.baseline == pytest.approx(BASE_AB, rel=1e-12)
    assert gm.jaccard_baseline(0.1, 0.6) == pytest.approx(BASE_AB, rel=1e-12)
    assert gm.jaccard_baseline(0.6, 0.1) == pytest.approx(BASE_AB, rel=1e-12)
