"""The simulation's claims (:mod:`gatesim.claims`) on results documents built by hand.

What is independent here: every document is a literal dict of the shape
:mod:`gatesim.sim.sweep` writes (``cells`` with ``variant``/``config``/``trajectory``/
``policies``/``null``, ``cross_frame``, ``jaccard``, ``run_pairs``), with numbers chosen in
this file. The expected per-seed statistic of each claim is computed here from those
literals by the claim's definition (docs/simulation.md, "Claims"; the module docstring of
gatesim.claims), and the expected interval by the textbook two-sided 95% Student-t interval
written here with ``scipy.stats.t`` (not :mod:`gatesim.stats`). Each claim is checked on
both sides of its threshold, with per-seed values close enough to the fixed threshold that
a threshold moved by a factor of 100, a flipped comparison, or a claim that reads another
variant, policy, metric, geometry or reference flips at least one verdict or changes the
per-seed values. Decoys (other policies, variants and geometries holding the opposite
numbers) make a wrong read visible.
"""
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from gatesim import claims as C

SEEDS = (0, 1, 2)
STORED = "bf16+master"


# ----------------------------------------------------------------- independent expectations

def t_interval(values):
    """(mean, lo, hi) of the two-sided 95% Student-t interval, written from the textbook."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    m = float(x.mean())
    if n == 1:
        return m, -math.inf, math.inf
    half = float(student_t.ppf(0.975, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


def check(claim, per_seed, threshold, side, verdict, baseline="skip"):
    """The claim reports ``per_seed`` (computed by the test), their t-interval, the given
    threshold and side, and ``verdict`` (a literal of the test)."""
    assert claim.per_seed == pytest.approx(per_seed, rel=1e-12, abs=1e-15), claim.name
    assert claim.threshold == threshold and claim.side == side, claim.name
    m, lo, hi = t_interval(per_seed)
    assert claim.n == len(per_seed)
    assert claim.statistic == pytest.approx(m, rel=1e-12, abs=1e-15)
    assert claim.lo == pytest.approx(lo, rel=1e-9, abs=1e-12)
    assert claim.hi == pytest.approx(hi, rel=1e-9, abs=1e-12)
    # the interval itself puts the verdict where the test says (the numbers are chosen so)
    if verdict == "holds":
        assert (lo > threshold) if side == "above" else (hi < threshold)
    elif verdict == "fails":
        assert (hi < threshold) if side == "above" else (lo > threshold)
    else:
        assert lo <= threshold <= hi
    assert claim.verdict == verdict, (claim.name, claim.lo, claim.hi, claim.threshold)
    if baseline != "skip":
        if baseline is None:
            assert claim.baseline is None
        else:
            assert claim.baseline == pytest.approx(baseline, rel=1e-12)


# ------------------------------------------------------------------------- document builders

def cell(variant, seed, *, geometry="real", algo="grpo", reward=(0.1, 0.2, 0.4),
         kl=(0.0, 0.05, 0.1), policies=None, null=None):
    return {"key": f"variant={variant},seed={seed}", "variant": variant,
            "config": {"seed": seed, "geometry": geometry, "algo": algo, "k": 4,
                       "alpha": 0.05},
            "trajectory": {"step": [0, 5, 10], "reward": list(reward), "kl": list(kl),
                           "angle_left_max_deg": [0.0, 0.1, 0.2]},
            "policies": policies or {}, "null": null or {}}


def by_name(claims):
    out = {c.name: c for c in claims}
    assert len(out) == len(claims)
    return out


# ---------------------------------------------------------------------------- the regime

def _regime_doc(starts, ends):
    """rl_kl with the given start/end rewards; the middle point and the KL trajectory hold
    decoys (a claim reading them would see other ratios); rl_kl@rotated learns the opposite."""
    cells = []
    for s, (a, b) in enumerate(zip(starts, ends)):
        cells.append(cell("rl_kl", s, reward=(a, 100.0 * b, b), kl=(1.0, 0.5, 0.01)))
        cells.append(cell("rl_kl@rotated", s, geometry="rotated", reward=(b, b, a)))
    return {"cells": cells, "stored_policy": STORED}


@pytest.mark.parametrize("starts, ends, verdict", [
    # ratios 3.3, 3.5, 3.4: mean 3.4, t-interval [3.15, 3.65] above 3 (and below 300)
    ((0.10, 0.12, 0.08), (0.33, 0.42, 0.272), "holds"),
    # ratios 2.6, 2.7, 2.8: interval [2.45, 2.95] below 3 (and above 0.03)
    ((0.10, 0.12, 0.08), (0.26, 0.324, 0.224), "fails"),
    # ratios 2.5, 3.0, 3.5 straddle 3
    ((0.10, 0.12, 0.08), (0.25, 0.36, 0.28), "inconclusive"),
])
def test_regime_learns_on_both_sides_of_learn_factor(starts, ends, verdict):
    got = C.regime_learning(_regime_doc(starts, ends))
    assert [c.name for c in got] == ["regime_rl_kl_learns"]
    check(got[0], [b / a for a, b in zip(starts, ends)], 3.0, "above", verdict,
          baseline=sum(starts) / 3)


def test_regime_lists_every_arm_present_and_drops_a_zero_start():
    cells = [cell(v, s, algo="sft" if v == "sft" else "grpo", reward=(0.1, 0.2, r))
             for v, r in (("sft", 0.5), ("rl_nokl", 0.2)) for s in SEEDS]
    cells.append(cell("rl_nokl", 3, reward=(0.0, 0.1, 0.2)))   # ratio undefined: dropped
    got = by_name(C.regime_learning({"cells": cells}))
    assert list(got) == ["regime_rl_nokl_learns", "regime_sft_learns"]   # fixed arm order
    check(got["regime_sft_learns"], [5.0] * 3, 3.0, "above", "holds")
    assert "accuracy" in got["regime_sft_learns"].statement
    nokl = got["regime_rl_nokl_learns"]
    assert nokl.per_seed == pytest.approx([2.0] * 3) and nokl.n == 3
    assert nokl.baseline == pytest.approx(0.075)     # the mean start includes seed 3's 0.0
    # no arm at all: one "not tested" claim for rl_kl
    (none,) = C.regime_learning({"cells": []})
    assert (none.name, none.verdict, none.n) == ("regime_rl_kl_learns", "not tested", 0)


# ----------------------------------------------------------------------------- Gate I

def _kl_doc(kl, nokl):
    """Final KLs of rl_kl and rl_nokl per seed; earlier trajectory points, the reward and a
    rotated twin hold decoys."""
    cells = []
    for s, (a, b) in enumerate(zip(kl, nokl)):
        cells.append(cell("rl_kl", s, kl=(0.0, 10 * b, a)))
        cells.append(cell("rl_nokl", s, kl=(0.0, a, b)))
        cells.append(cell("rl_kl@rotated", s, geometry="rotated", kl=(0.0, a, 10 * b)))
    return {"cells": cells, "stored_policy": STORED}


@pytest.mark.parametrize("kl, nokl, verdict", [
    ((0.040, 0.084, 0.022), (0.1, 0.2, 0.05), "holds"),        # ratios 0.40, 0.42, 0.44
    ((0.056, 0.116, 0.030), (0.1, 0.2, 0.05), "fails"),        # ratios 0.56, 0.58, 0.60
    ((0.030, 0.100, 0.035), (0.1, 0.2, 0.05), "inconclusive"),  # ratios 0.3, 0.5, 0.7
])
def test_kl_anchor_binds_on_both_sides_of_kl_bind_ratio(kl, nokl, verdict):
    c = C.kl_anchor_binds(_kl_doc(kl, nokl))
    assert c.name == "gate1_kl_anchor_binds"
    check(c, [a / b for a, b in zip(kl, nokl)], 0.5, "below", verdict,
          baseline=sum(nokl) / 3)


def test_kl_anchor_binds_drops_a_zero_reference_and_needs_both_arms():
    c = C.kl_anchor_binds(_kl_doc((0.04, 0.084, 0.0, 0.022), (0.1, 0.2, 0.0, 0.05)))
    assert c.per_seed == pytest.approx([0.4, 0.42, 0.44]) and c.n == 3
    only_kl = {"cells": [cell("rl_kl", s) for s in SEEDS]}
    assert C.kl_anchor_binds(only_kl).verdict == "not tested"


def _pol(**by_policy):
    """policies dict: {policy: {field: value}}."""
    return {p: dict(v) for p, v in by_policy.items()}


def _sparsity_doc(kl_sp, nokl_sp, stored=STORED):
    """bitwise sparsity of rl_kl / rl_nokl under the stored policy; bf16 and fp32 hold the
    opposite difference (a claim reading them flips)."""
    cells = []
    for s, (a, b) in enumerate(zip(kl_sp, nokl_sp)):
        for v, x, y in (("rl_kl", a, b), ("rl_nokl", b, a)):
            cells.append(cell(v, s, policies=_pol(
                **{"fp32": {"bitwise_sparsity": y}, "bf16": {"bitwise_sparsity": y},
                   stored: {"bitwise_sparsity": x}})))
    return {"cells": cells}


@pytest.mark.parametrize("kl_sp, nokl_sp, verdict", [
    ((0.62, 0.70, 0.565), (0.60, 0.67, 0.54), "holds"),    # diffs 0.02, 0.03, 0.025
    ((0.58, 0.645, 0.51), (0.60, 0.67, 0.54), "fails"),    # diffs -0.02, -0.025, -0.03
    ((0.62, 0.64, 0.55), (0.60, 0.67, 0.54), "inconclusive"),
])
def test_kl_anchor_raises_sparsity_reads_the_stored_policy(kl_sp, nokl_sp, verdict):
    # no "stored_policy" key: the claim picks bf16+master because the cells have it
    c = C.kl_anchor_raises_sparsity(_sparsity_doc(kl_sp, nokl_sp))
    assert c.name == "gate1_kl_anchor_raises_sparsity" and STORED in c.statement
    check(c, [a - b for a, b in zip(kl_sp, nokl_sp)], 0.0, "above", verdict, baseline=None)


def test_stored_policy_falls_back_to_bf16():
    # bf16 is now the stored one (no bf16+master); fp32 keeps the opposite sign
    doc = _sparsity_doc((0.62, 0.70, 0.565), (0.60, 0.67, 0.54), stored="bf16")
    assert set(doc["cells"][0]["policies"]) == {"fp32", "bf16"}
    c = C.kl_anchor_raises_sparsity(doc)
    check(c, [0.62 - 0.60, 0.70 - 0.67, 0.565 - 0.54], 0.0, "above", "holds")
    # a sweep without bf16 storage: not tested
    only32 = {"cells": [cell(v, s, policies=_pol(fp32={"bitwise_sparsity": 0.1}))
                        for v in ("rl_kl", "rl_nokl") for s in SEEDS]}
    assert C.kl_anchor_raises_sparsity(only32).verdict == "not tested"


# ----------------------------------------------------------------------------- Gate III

def _gate3_doc(bf16, fp32):
    """rl_kl's bitwise sparsity under bf16 and fp32; bf16+master, rl_nokl and the rotated
    twin hold decoys with the gap reversed."""
    cells = []
    for s, (b, f) in enumerate(zip(bf16, fp32)):
        cells.append(cell("rl_kl", s, policies=_pol(
            fp32={"bitwise_sparsity": f}, bf16={"bitwise_sparsity": b},
            **{"bf16+master": {"bitwise_sparsity": f - 0.5}})))
        for v, g in (("rl_nokl", "real"), ("rl_kl@rotated", "rotated")):
            cells.append(cell(v, s, geometry=g, policies=_pol(
                fp32={"bitwise_sparsity": b}, bf16={"bitwise_sparsity": f},
                **{"bf16+master": {"bitwise_sparsity": b}})))
    return {"cells": cells, "stored_policy": STORED}


@pytest.mark.parametrize("bf16, fp32, verdict", [
    ((0.53, 0.44, 0.65), (0.40, 0.30, 0.50), "holds"),           # gaps 0.13, 0.14, 0.15
    ((0.45, 0.36, 0.57), (0.40, 0.30, 0.50), "fails"),           # gaps 0.05, 0.06, 0.07
    ((0.45, 0.40, 0.65), (0.40, 0.30, 0.50), "inconclusive"),    # gaps 0.05, 0.10, 0.15
])
def test_bf16_sparsity_far_above_fp32_on_both_sides_of_far_above(bf16, fp32, verdict):
    c = C.bf16_sparsity_above_fp32(_gate3_doc(bf16, fp32))
    assert c.name == "gate3_bf16_sparsity_far_above_fp32"
    check(c, [b - f for b, f in zip(bf16, fp32)], 0.10, "above", verdict,
          baseline=sum(fp32) / 3)


def test_gate3_needs_both_policies():
    doc = {"cells": [cell("rl_kl", s, policies=_pol(bf16={"bitwise_sparsity": 0.5}))
                     for s in SEEDS]}
    assert C.bf16_sparsity_above_fp32(doc).verdict == "not tested"


# ------------------------------------------------------------------- Gate II: landing

#: per metric, per seed: rl_kl's value when the claims hold and when they fail, and the
#: three references (the random baseline field, the precision-only null, SFT). "below"
#: metrics: RL under every reference when holding, over every one when failing; "above"
#: (low_overlap) the other way.
LANDING = {
    "principal_overlap": dict(hold=(0.10, 0.11, 0.12), fail=(0.60, 0.62, 0.61),
                              base=(0.30, 0.32, 0.31), null=(0.20, 0.22, 0.25),
                              sft=(0.40, 0.38, 0.45)),
    "low_overlap": dict(hold=(0.60, 0.62, 0.65), fail=(0.10, 0.12, 0.11),
                        base=(0.30, 0.32, 0.31), null=(0.50, 0.52, 0.49),
                        sft=(0.20, 0.25, 0.22)),
    "angle_left_max_deg": dict(hold=(1.0, 1.5, 1.2), fail=(20.0, 22.0, 21.0),
                               null=(3.0, 3.5, 2.8), sft=(10.0, 12.0, 11.0)),
    "energy_topk": dict(hold=(0.001, 0.002, 0.0015), fail=(0.20, 0.21, 0.22),
                        base=(0.01, 0.011, 0.012), null=(0.004, 0.005, 0.006),
                        sft=(0.05, 0.06, 0.07)),
}
BASE_FIELD = {"principal_overlap": "overlap_baseline", "low_overlap": "overlap_baseline",
              "energy_topk": "energy_baseline"}
SIDE = {"principal_overlap": "below", "low_overlap": "above", "angle_left_max_deg": "below",
        "energy_topk": "below"}


def _landing_doc(which):
    """rl_kl and sft cells on the real weights, three seeds. The stored policy
    (bf16+master) holds the numbers of LANDING; bf16 and the rotated twin hold the other
    case's RL numbers (decoys); rl_nokl holds SFT's numbers swapped with RL's."""
    other = "fail" if which == "hold" else "hold"
    cells = []
    for s in SEEDS:
        def pol(key):
            d = {m: v[key][s] for m, v in LANDING.items()}
            d["overlap_baseline"] = LANDING["principal_overlap"]["base"][s]
            d["energy_baseline"] = LANDING["energy_topk"]["base"][s]
            d["bitwise_sparsity"] = 0.5
            return d
        null = {STORED: {m: v["null"][s] for m, v in LANDING.items()},
                "bf16": {m: v[other][s] for m, v in LANDING.items()}}
        cells.append(cell("rl_kl", s, policies={STORED: pol(which),
                                                "bf16": pol(other)}, null=null))
        cells.append(cell("sft", s, algo="sft", policies={STORED: pol("sft"),
                                                          "bf16": pol(which)}))
        cells.append(cell("rl_nokl", s, policies={STORED: pol("sft"),
                                                  "bf16": pol("sft")}))
        cells.append(cell("rl_kl@rotated", s, geometry="rotated",
                          policies={STORED: pol(other), "bf16": pol(other)},
                          null={STORED: {m: v[which][s] for m, v in LANDING.items()}}))
    # base field must be per-metric: overlap_baseline is shared by both overlaps
    assert LANDING["principal_overlap"]["base"] == LANDING["low_overlap"]["base"]
    return {"cells": cells, "stored_policy": STORED}


@pytest.mark.parametrize("which, verdict", [("hold", "holds"), ("fail", "fails")])
def test_landing_claims_against_each_reference(which, verdict):
    got = by_name(C.landing_claims(_landing_doc(which)))
    expected_names = set()
    for metric, v in LANDING.items():
        side = SIDE[metric]
        for ref in ("baseline", "null", "sft"):
            if ref == "baseline" and metric not in BASE_FIELD:
                continue
            name = f"gate2_{metric}_rl_{side}_{ref}"
            expected_names.add(name)
            refv = v["base" if ref == "baseline" else ref]
            diffs = [x - y for x, y in zip(v[which], refv)]
            check(got[name], diffs, 0.0, side, verdict, baseline=sum(refv) / 3)
    assert set(got) == expected_names and len(got) == 11


def test_landing_claims_inconclusive_and_missing_references():
    doc = _landing_doc("hold")
    # seed 2's RL principal overlap jumps over the null: the diffs straddle 0
    rl2 = next(c for c in doc["cells"] if c["variant"] == "rl_kl" and c["config"]["seed"] == 2)
    rl2["policies"][STORED]["principal_overlap"] = 0.45
    for c in doc["cells"]:                      # no null at all
        c["null"] = {}
    got = by_name(C.landing_claims(doc))
    check(got["gate2_principal_overlap_rl_below_baseline"], [0.10 - 0.30, 0.11 - 0.32,
                                                             0.45 - 0.31], 0.0, "below",
          "inconclusive")
    assert got["gate2_principal_overlap_rl_below_null"].verdict == "not tested"
    assert got["gate2_principal_overlap_rl_below_null"].n == 0
    # no sft cells: the sft references are not tested, the others still are
    doc["cells"] = [c for c in doc["cells"] if c["variant"] != "sft"]
    got = by_name(C.landing_claims(doc))
    assert got["gate2_energy_topk_rl_below_sft"].verdict == "not tested"
    assert got["gate2_energy_topk_rl_below_baseline"].verdict == "holds"


def _matched_doc(rl, sft):
    """fp32 largest angles of rl_kl_matched and sft_matched; bf16 and the unmatched arms
    hold the reverse."""
    cells = []
    for s, (a, b) in enumerate(zip(rl, sft)):
        cells.append(cell("rl_kl_matched", s, policies=_pol(
            fp32={"angle_left_max_deg": a}, bf16={"angle_left_max_deg": b})))
        cells.append(cell("sft_matched", s, algo="sft", policies=_pol(
            fp32={"angle_left_max_deg": b}, bf16={"angle_left_max_deg": a})))
        cells.append(cell("rl_kl", s, policies=_pol(fp32={"angle_left_max_deg": b})))
        cells.append(cell("sft", s, algo="sft", policies=_pol(fp32={"angle_left_max_deg": a})))
    return {"cells": cells, "stored_policy": STORED}


@pytest.mark.parametrize("rl, sft, verdict", [
    ((5.0, 4.0, 6.5), (10.0, 10.0, 11.0), "holds"),     # diffs -5, -6, -4.5
    ((12.0, 13.0, 13.5), (10.0, 10.0, 11.0), "fails"),  # diffs 2, 3, 2.5
    ((8.0, 13.0, 10.0), (10.0, 10.0, 11.0), "inconclusive"),
])
def test_rotation_below_sft_at_matched_norm(rl, sft, verdict):
    c = C.rl_rotation_below_sft(_matched_doc(rl, sft))
    assert c.name == "gate2_rl_rotation_below_sft_at_matched_norm"
    check(c, [a - b for a, b in zip(rl, sft)], 0.0, "below", verdict, baseline=sum(sft) / 3)


# ------------------------------------------------------------------ the rotation control

def _frame_rows(geo, ratios, policy=STORED, variant="rl_kl@"):
    """cross_frame rows; value and baseline chosen so value / baseline = ratio (the claim
    reads the stored ratio; value and baseline feed its detail)."""
    return [{"variant": f"{variant}{geo}", "geometry": geo, "policy": policy, "seed": s,
             "value": 0.2 * r, "baseline": 0.2, "p": 0.3, "q": 0.4, "ratio": r}
            for s, r in enumerate(ratios)]


def _pair_rows(values, baselines, policy=STORED, variant="rl_kl@rotated",
               geometry="rotated"):
    return [{"variant": variant, "geometry": geometry, "policy": policy, "seeds": [a, b],
             "value": v, "baseline": bb, "p": 0.3, "q": 0.3}
            for (a, b), v, bb in zip(((0, 1), (0, 2), (1, 2)), values, baselines)]


def _rotation_doc(rot, rnd, jv, jb):
    chance, far = (0.97, 0.99, 1.01), (1.10, 1.12, 1.14)
    decoy_r = far if rot == chance else chance
    rows = (_frame_rows("rotated", rot) + _frame_rows("random", rnd) +
            _frame_rows("rotated", decoy_r, policy="bf16") +               # other policy
            _frame_rows("rotated", decoy_r, variant="rl_nokl@"))            # other arm
    pairs = (_pair_rows(jv, jb) +
             _pair_rows([b for b in jb], [v for v in jv], policy="bf16") +
             _pair_rows([b for b in jb], [v for v in jv], variant="rl_nokl@rotated") +
             _pair_rows([b for b in jb], [v for v in jv], variant="rl_kl", geometry="real"))
    return {"cells": [cell("rl_kl", s) for s in SEEDS], "stored_policy": STORED,
            "cross_frame": rows, "jaccard": pairs}


@pytest.mark.parametrize("rot, rnd, vr, verdicts", [
    # rotated at chance (mean 0.99, [0.94, 1.04] below 1.05), random far above (fails)
    ((0.97, 0.99, 1.01), (1.10, 1.12, 1.14), "hold", ("holds", "fails")),
    ((1.10, 1.12, 1.14), (0.97, 0.99, 1.01), "fail", ("fails", "holds")),
    ((0.95, 1.05, 1.15), (0.95, 1.05, 1.15), "hold", ("inconclusive", "inconclusive")),
])
def test_rotation_claims_on_both_sides_of_random_margin(rot, rnd, vr, verdicts):
    # within the rotated basis: J / baseline 1.10, 1.12, 1.14 (hold: above 1.05) or
    # 0.97, 0.99, 1.01 (fail)
    jb = (0.25, 0.30, 0.20)
    ratios = (1.10, 1.12, 1.14) if vr == "hold" else (0.97, 0.99, 1.01)
    jv = tuple(r * b for r, b in zip(ratios, jb))
    got = by_name(C.rotation_claims(_rotation_doc(rot, rnd, jv, jb)))
    assert list(got) == ["gate2_rotation_frame_overlap_at_chance",
                         "gate2_random_geometry_frame_overlap_at_chance",
                         "rotated_basis_cross_seed_consistency"]
    check(got["gate2_rotation_frame_overlap_at_chance"], list(rot), 1.05, "below",
          verdicts[0], baseline=1.0)
    check(got["gate2_random_geometry_frame_overlap_at_chance"], list(rnd), 1.05, "below",
          verdicts[1], baseline=1.0)
    check(got["rotated_basis_cross_seed_consistency"], [v / b for v, b in zip(jv, jb)], 1.05,
          "above", "holds" if vr == "hold" else "fails", baseline=1.0)


def test_rotation_claims_not_tested_without_rows():
    got = by_name(C.rotation_claims({"cells": [cell("rl_kl", 0)], "stored_policy": STORED}))
    assert {c.verdict for c in got.values()} == {"not tested"}


# --------------------------------------------------------------- recipes and datasets

def _run_pairs(kind, per_seed_pairs, cos=0.3):
    rows = []
    for s, ratios in enumerate(per_seed_pairs):
        for i, r in enumerate(ratios):
            rows.append({"seed": s, "kind": kind, "policy": STORED, "a": "rl_nokl",
                         "b": f"run{i}", "jaccard": {"value": 0.1 * r, "baseline": 0.1,
                                                     "p": 0.2, "q": 0.3, "ratio": r},
                         "cosine": cos, "cosine_baseline": 0.0,
                         "cosine_baseline_sd": 0.01})
    return rows


HIGH = ((1.30, 1.40), (1.35, 1.45), (1.40, 1.50))   # per-seed means 1.35, 1.40, 1.45
LOW = ((1.00, 1.10), (1.05, 1.15), (1.10, 1.20))    # per-seed means 1.05, 1.10, 1.15
MIXED = ((1.00, 1.20), (1.25, 1.35), (1.40, 1.60))  # per-seed means 1.10, 1.30, 1.50


@pytest.mark.parametrize("recipe, dataset, verdicts", [
    (HIGH, LOW, ("holds", "fails")),
    (LOW, HIGH, ("fails", "holds")),
    (MIXED, MIXED, ("inconclusive", "inconclusive")),
])
def test_consistency_claims_on_both_sides_of_consistent_ratio(recipe, dataset, verdicts):
    doc = {"cells": [cell("rl_nokl", s) for s in SEEDS], "stored_policy": STORED,
           "run_pairs": _run_pairs("recipe", recipe) + _run_pairs("dataset", dataset)}
    got = by_name(C.consistency_claims(doc))
    assert list(got) == ["update_pattern_invariant_to_recipe",
                         "update_pattern_invariant_to_dataset"]
    for (name, rows), v in zip((("update_pattern_invariant_to_recipe", recipe),
                                ("update_pattern_invariant_to_dataset", dataset)), verdicts):
        check(got[name], [sum(r) / len(r) for r in rows], 1.25, "above", v, baseline=1.0)


# ---------------------------------------------------------------------- the whole list

def test_check_claims_runs_every_claim_in_order():
    doc = _landing_doc("hold")
    doc["cross_frame"] = _frame_rows("rotated", (0.97, 0.99, 1.01))
    got = C.check_claims(doc)
    names = [c.name for c in got]
    assert names[:2] == ["regime_rl_kl_learns", "regime_rl_nokl_learns"]
    assert names[2:6] == ["regime_sft_learns", "gate1_kl_anchor_binds",
                          "gate1_kl_anchor_raises_sparsity",
                          "gate3_bf16_sparsity_far_above_fp32"]
    assert len(names) == 3 + 3 + 11 + 1 + 3 + 2 == len(set(names))
    v = {c.name: c.verdict for c in got}
    assert v["gate2_rotation_frame_overlap_at_chance"] == "holds"
    assert v["gate2_rl_rotation_below_sft_at_matched_norm"] == "not tested"
    assert v["update_pattern_invariant_to_recipe"] == "not tested"
    # every claim serializes to the fields results.json stores
    assert set(got[0].to_dict()) == {"name", "statement", "statistic", "lo", "hi", "n",
                                     "threshold", "side", "baseline", "verdict", "detail",
                                     "per_seed"}


def test_make_claim_drops_missing_values_and_says_why():
    c = C.make_claim("x", "s", [None, float("nan"), 2.0, 2.2, 1.9], 1.0, "above",
                     baseline=0.5)
    check(c, [2.0, 2.2, 1.9], 1.0, "above", "holds", baseline=0.5)
    c = C.make_claim("x", "s", [], 1.0, "below", missing="needs cells")
    assert (c.verdict, c.statistic, c.n, c.detail) == ("not tested", None, 0, "needs cells")
    one = C.make_claim("x", "s", [0.1], 1.0, "below")      # one seed cannot decide
    assert one.verdict == "inconclusive" and one.lo == -math.inf and one.hi == math.inf
