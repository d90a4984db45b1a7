"""Checks of the papers' claims (docs/simulation.md, "Claims") on gate-simulation results.

Each check reads a ``results.json`` document (:mod:`gatesim.sim.sweep`) and returns a
:class:`Claim`: one statistic per seed (or per seed pair), their mean with a 95% Student-t
interval across seeds (:func:`gatesim.stats.mean_interval`), a threshold fixed in this
module, and the verdict of :func:`gatesim.stats.verdict`: ``holds`` or ``fails`` only when
the whole interval lies on one side of the threshold, ``inconclusive`` when it straddles
it, ``not tested`` when the sweep lacks the cells. Thresholds were fixed before any run
and are not tuned to the simulation: report what it shows, whichever way it goes.

Comparisons of two arms use the paired per-seed difference against threshold 0. The arms
are the anchor cells of :mod:`gatesim.sim.analysis` (``rl_kl``, ``rl_nokl``, ``sft`` on
the real geometry, same seed); the stored-checkpoint policy is ``bf16+master`` when the
sweep has it (mixed-precision training saves ``bf16(master)``), else ``bf16``.

Claims about *where* updates land (principal and low-magnitude overlaps, angles, energy)
compare RL against three references, each its own claim: the random baseline of the
metric, the precision-only null (the same update stream, entries moved by a random
permutation: what rounding alone does, because a weight's ULP grows with its magnitude)
and SFT on the same task.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from gatesim.stats import Interval, mean_interval, verdict

__all__ = ["Claim", "check_claims", "CLAIMS", "FAR_ABOVE", "RANDOM_MARGIN", "LEARN_FACTOR",
           "KL_BIND_RATIO", "CONSISTENT_RATIO", "make_claim"]

#: "far above": bf16 storage sparsity at least this many points (fraction) above fp32's.
FAR_ABOVE = 0.10
#: "no better than random": a Jaccard at most this factor above its baseline.
RANDOM_MARGIN = 1.05
#: "the model learns": final expected reward at least this factor of the initial one.
LEARN_FACTOR = 3.0
#: "the KL anchor binds": final KL of rl_kl at most this fraction of rl_nokl's.
KL_BIND_RATIO = 0.5
#: "largely invariant": the Jaccard of two runs' masks at least this factor above its
#: baseline (the paper's one-layer example: 0.58 vs 0.43, a factor 1.35).
CONSISTENT_RATIO = 1.25


@dataclasses.dataclass
class Claim:
    """A claim's verdict. ``statistic`` is the across-seed mean of ``per_seed``, with the
    95% interval ``[lo, hi]``; ``baseline`` is what chance (or the comparison arm) gives,
    for reading; the verdict compares the interval with ``threshold`` on ``side``."""

    name: str
    statement: str
    statistic: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int
    threshold: float
    side: str
    baseline: Optional[float]
    verdict: str
    detail: str
    per_seed: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_claim(name: str, statement: str, per_seed: list, threshold: float, side: str,
               baseline: Optional[float] = None, detail: str = "",
               missing: str = "") -> Claim:
    """A :class:`Claim` from per-seed statistics (None/NaN entries dropped)."""
    vals = [float(v) for v in per_seed
            if v is not None and not (isinstance(v, float) and math.isnan(v))]
    iv: Optional[Interval] = mean_interval(vals) if vals else None
    v = verdict(iv, threshold, side)
    if iv is None:
        return Claim(name, statement, None, None, None, 0, threshold, side, baseline, v,
                     missing or "the sweep has no cells for it", vals)
    return Claim(name, statement, iv.mean, iv.lo, iv.hi, iv.n, threshold, side, baseline, v,
                 detail, vals)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def _anchors(doc: dict, variant: str) -> dict:
    from gatesim.sim.analysis import anchor_cells
    return anchor_cells(doc["cells"], variant)


def _stored(doc: dict) -> Optional[str]:
    from gatesim.sim.sweep import stored_policy
    return doc.get("stored_policy") or stored_policy(doc["cells"])


# ---------------------------------------------------------------- the regime

def _learns(doc: dict, variant: str) -> Claim:
    arms = _anchors(doc, variant)
    algo = next(iter(arms.values()))["config"]["algo"] if arms else "?"
    what = "accuracy (expected reward)" if algo == "sft" else "expected reward"
    stmt = (f"Regime: {variant} learns: its final {what} is at least {LEARN_FACTOR:g}x its "
            "initial one (real weights).")
    ratios, starts, ends = [], [], []
    for seed, c in sorted(arms.items()):
        r = c["trajectory"]["reward"]
        starts.append(r[0])
        ends.append(r[-1])
        ratios.append(r[-1] / r[0] if r[0] > 0 else None)
    s, e = mean_interval(starts), mean_interval(ends)
    detail = (f"reward {s} -> {e}" if s else "")
    return make_claim(f"regime_{variant}_learns", stmt, ratios, LEARN_FACTOR, "above",
                      _mean(starts), detail, f"needs {variant} cells on real weights")


def regime_learning(doc: dict) -> list[Claim]:
    names = [v for v in ("rl_kl", "rl_nokl", "rl_clip", "sft") if _anchors(doc, v)]
    return [_learns(doc, v) for v in names] or [_learns(doc, "rl_kl")]


def kl_anchor_binds(doc: dict) -> Claim:
    stmt = (f"Gate I binds: the final KL(pi || pi_ref) of rl_kl is at most {KL_BIND_RATIO:g} "
            "of rl_nokl's (per-seed ratio, real weights).")
    kl, nokl = _anchors(doc, "rl_kl"), _anchors(doc, "rl_nokl")
    ratios, a, b = [], [], []
    for seed in sorted(set(kl) & set(nokl)):
        x, y = kl[seed]["trajectory"]["kl"][-1], nokl[seed]["trajectory"]["kl"][-1]
        a.append(x)
        b.append(y)
        ratios.append(x / y if y > 0 else None)
    detail = f"KL rl_kl {mean_interval(a)} vs rl_nokl {mean_interval(b)}" if a else ""
    return make_claim("gate1_kl_anchor_binds", stmt, ratios, KL_BIND_RATIO, "below",
                      _mean(b), detail, "needs rl_kl and rl_nokl cells on real weights")


def kl_anchor_raises_sparsity(doc: dict) -> Claim:
    pol = _stored(doc)
    stmt = (f"Gate I raises stored sparsity: rl_kl's bitwise sparsity ({pol}) is above "
            "rl_nokl's (paired per-seed difference > 0).")
    kl, nokl = _anchors(doc, "rl_kl"), _anchors(doc, "rl_nokl")
    diffs = [kl[s]["policies"][pol]["bitwise_sparsity"] - nokl[s]["policies"][pol]
             ["bitwise_sparsity"] for s in sorted(set(kl) & set(nokl))] if pol else []
    detail = ""
    if diffs:
        detail = (f"rl_kl {_fmt(_mean(kl[s]['policies'][pol]['bitwise_sparsity'] for s in kl))}"
                  f" vs rl_nokl "
                  f"{_fmt(_mean(nokl[s]['policies'][pol]['bitwise_sparsity'] for s in nokl))}")
    return make_claim("gate1_kl_anchor_raises_sparsity", stmt, diffs, 0.0, "above", None,
                      detail, "needs rl_kl and rl_nokl cells with a bf16 policy")


def bf16_sparsity_above_fp32(doc: dict) -> Claim:
    stmt = (f"Gate III: for the same RL update stream (rl_kl, real weights), bf16 storage "
            f"(nearest) shows a bitwise sparsity at least {FAR_ABOVE:.0%} points above fp32 "
            "storage (per-seed difference).")
    arms = _anchors(doc, "rl_kl")
    gaps, b, f = [], [], []
    for seed, c in sorted(arms.items()):
        if {"bf16", "fp32"} <= set(c["policies"]):
            b.append(c["policies"]["bf16"]["bitwise_sparsity"])
            f.append(c["policies"]["fp32"]["bitwise_sparsity"])
            gaps.append(b[-1] - f[-1])
    detail = f"bf16 {_fmt(_mean(b))} vs fp32 {_fmt(_mean(f))}" if gaps else ""
    return make_claim("gate3_bf16_sparsity_far_above_fp32", stmt, gaps, FAR_ABOVE, "above",
                      _mean(f), detail, "needs rl_kl cells with policies bf16 and fp32")


# ------------------------------------------------------- where updates land (Gate II)

#: metric -> (the direction RL is claimed to go, baseline field or None, description)
LANDING = {
    "principal_overlap": ("below", "overlap_baseline",
                          "overlap of the update mask with the principal weights"),
    "low_overlap": ("above", "overlap_baseline",
                    "overlap of the update mask with the low-magnitude weights"),
    "angle_left_max_deg": ("below", None, "largest principal angle of the top-k left "
                                          "subspace"),
    "energy_topk": ("below", "energy_baseline", "energy of the update in the top-k subspace"),
}


def landing_claims(doc: dict) -> list[Claim]:
    pol = _stored(doc)
    rl, sft = _anchors(doc, "rl_kl"), _anchors(doc, "sft")
    k = doc["cells"][0]["config"]["k"] if doc["cells"] else None
    alpha = doc["cells"][0]["config"]["alpha"] if doc["cells"] else None
    out = []
    for metric, (side, base_field, what) in LANDING.items():
        word = "less" if side == "below" else "more"
        refs = []
        if base_field:
            refs.append(("baseline", "its random baseline",
                         lambda s, c: c["policies"][pol][base_field]))
        refs.append(("null", "the precision-only null (the same updates at random positions, "
                             "same storage policy)",
                     lambda s, c: c.get("null", {}).get(pol, {}).get(metric)))
        refs.append(("sft", "SFT on the same task and seed",
                     lambda s, c: sft[s]["policies"][pol][metric] if s in sft else None))
        for ref, ref_text, get in refs:
            stmt = (f"Gate II: RL's stored update ({pol}; rl_kl, real weights; k={k}, "
                    f"alpha={alpha}) has {word} {what} than {ref_text}.")
            diffs, vals, refv = [], [], []
            for seed, c in sorted(rl.items()) if pol else []:
                x, y = c["policies"][pol][metric], get(seed, c)
                if x is None or y is None:
                    continue
                vals.append(x)
                refv.append(y)
                diffs.append(x - y)
            detail = f"RL {_fmt(_mean(vals))} vs {ref} {_fmt(_mean(refv))} (per-seed difference)"
            out.append(make_claim(f"gate2_{metric}_rl_{'below' if side == 'below' else 'above'}"
                                  f"_{ref}", stmt, diffs, 0.0, side, _mean(refv), detail,
                                  f"needs rl_kl cells and the {ref} reference"))
    return out


def rl_rotation_below_sft(doc: dict) -> Claim:
    stmt = ("At matched per-step update norms, RL rotates the top-k left singular subspace "
            "less than SFT (largest principal angle, fp32 storage, real weights; paired "
            "per-seed difference).")
    rl, sft = _anchors(doc, "rl_kl_matched"), _anchors(doc, "sft_matched")
    diffs, a, b = [], [], []
    for s in sorted(set(rl) & set(sft)):
        if "fp32" in rl[s]["policies"]:
            a.append(rl[s]["policies"]["fp32"]["angle_left_max_deg"])
            b.append(sft[s]["policies"]["fp32"]["angle_left_max_deg"])
            diffs.append(a[-1] - b[-1])
    detail = f"RL {_fmt(_mean(a))} deg vs SFT {_fmt(_mean(b))} deg" if diffs else ""
    return make_claim("gate2_rl_rotation_below_sft_at_matched_norm", stmt, diffs, 0.0,
                      "below", _mean(b), detail,
                      "needs rl_kl_matched and sft_matched cells with policy fp32")


# ------------------------------------------------------------ the rotation control

def _arm(variant: str) -> str:
    """``rl_kl@rotated`` -> ``rl_kl`` (the sweep's naming of an arm on another geometry)."""
    return variant.split("@", 1)[0]


def rotation_claims(doc: dict) -> list[Claim]:
    """(a) the rotated run's mask against the real run's, same seed, stored coordinates:
    the paper's claim; (b) cross-seed consistency within the rotated basis: a separate
    quantity (bf16 alone can keep it high: the rounding mask follows the rotated weights'
    magnitudes)."""
    pol = _stored(doc)
    cf = [j for j in doc.get("cross_frame", []) if j["policy"] == pol and
          _arm(j["variant"]) == "rl_kl"]
    out = []
    for geo in ("rotated", "random"):
        rows = sorted((j for j in cf if j["geometry"] == geo), key=lambda j: j["seed"])
        name = ("gate2_rotation_frame_overlap_at_chance" if geo == "rotated"
                else "gate2_random_geometry_frame_overlap_at_chance")
        stmt = (f"The {geo} geometry's RL update mask ({pol}, rl_kl) overlaps the real run's "
                f"mask (same seed and task, stored coordinates) no more than independent "
                f"masks would: Jaccard / baseline pq/(p+q-pq) below {RANDOM_MARGIN}.")
        detail = (f"J {_fmt(_mean(j['value'] for j in rows))} vs baseline "
                  f"{_fmt(_mean(j['baseline'] for j in rows))}") if rows else ""
        out.append(make_claim(name, stmt, [j["ratio"] for j in rows], RANDOM_MARGIN, "below",
                              1.0, detail, f"needs rl_kl cells on the real and {geo} "
                                           "geometries"))
    pairs = [j for j in doc.get("jaccard", []) if j["policy"] == pol
             and _arm(j["variant"]) == "rl_kl" and j["geometry"] == "rotated"]
    ratios = [j["value"] / j["baseline"] if j["baseline"] else None for j in pairs]
    detail = (f"J {_fmt(_mean(j['value'] for j in pairs))} vs baseline "
              f"{_fmt(_mean(j['baseline'] for j in pairs))}; {len(pairs)} seed pairs "
              "(pairs share seeds: the interval is optimistic)") if pairs else ""
    out.append(make_claim(
        "rotated_basis_cross_seed_consistency",
        f"Not the paper's claim, a separate quantity: within the rotated basis, RL masks "
        f"({pol}, rl_kl) of two seeds overlap more than chance (Jaccard / baseline above "
        f"{RANDOM_MARGIN}).", ratios, RANDOM_MARGIN, "above", 1.0, detail,
        "needs two seeds of rl_kl on the rotated geometry"))
    return out


# ---------------------------------------------------------- recipes and datasets

def consistency_claims(doc: dict) -> list[Claim]:
    pol = _stored(doc)
    out = []
    for kind, what in (("recipe", "recipes (GRPO, REINFORCE, PPO-style clipping)"),
                       ("dataset", "task distributions (datasets)")):
        rows = [r for r in doc.get("run_pairs", []) if r["kind"] == kind]
        seeds = sorted({r["seed"] for r in rows})
        per_seed = [_mean(r["jaccard"]["ratio"] for r in rows if r["seed"] == s) for s in seeds]
        detail = ""
        if rows:
            detail = (f"{len(rows)} pairs; J {_fmt(_mean(r['jaccard']['value'] for r in rows))}"
                      f" vs baseline {_fmt(_mean(r['jaccard']['baseline'] for r in rows))}; "
                      f"cosine of accumulated fp32 updates "
                      f"{_fmt(_mean(r['cosine'] for r in rows))} (random: 0 +- "
                      f"{_fmt(rows[0]['cosine_baseline_sd'])})")
        out.append(make_claim(
            f"update_pattern_invariant_to_{kind}",
            f"The update pattern is largely invariant across {what}: for every pair of runs "
            f"on the same matrix and seed, the Jaccard of their update masks ({pol}) is at "
            f"least {CONSISTENT_RATIO}x its baseline (per-seed mean over pairs).",
            per_seed, CONSISTENT_RATIO, "above", 1.0, detail,
            f"needs rl_nokl and runs differing from it in {kind}"))
    return out


CLAIMS: tuple[Callable[[dict], object], ...] = (
    regime_learning, kl_anchor_binds, kl_anchor_raises_sparsity, bf16_sparsity_above_fp32,
    landing_claims, rl_rotation_below_sft, rotation_claims, consistency_claims)


def check_claims(doc: dict) -> list[Claim]:
    """Every claim of :data:`CLAIMS` on a results document, in order."""
    out: list[Claim] = []
    for check in CLAIMS:
        r = check(doc)
        out.extend(r if isinstance(r, list) else [r])
    return out
