"""Checks of the papers' claims (../shared/SCIENCE.md) on gate-simulation results.

Each check reads a ``results.json`` document (:mod:`gatesim.sim.sweep`) and returns a
:class:`Claim`: the statistic, the value chance (or the comparison arm) gives, and a
verdict, ``"holds"``, ``"fails"`` or ``"not tested"`` (the sweep lacks the cells). The
thresholds are fixed here, documented, and were not tuned to the simulation: report what
the simulation shows, whichever way it goes.

Cells used: "RL" cells are those with ``algo`` grpo or reinforce; the stored-checkpoint
policy is ``bf16+master`` when the sweep has it (mixed-precision training saves
``bf16(master)``), else ``bf16``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

__all__ = ["Claim", "check_claims", "CLAIMS", "FAR_ABOVE", "RANDOM_MARGIN"]

#: "far above": bf16 storage sparsity at least this many points (fraction) above fp32's.
FAR_ABOVE = 0.10
#: "no better than random": the Jaccard at most this factor above its baseline.
RANDOM_MARGIN = 1.05


@dataclasses.dataclass
class Claim:
    name: str
    statement: str
    statistic: Optional[float]
    baseline: Optional[float]
    verdict: str
    detail: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _is_rl(c: dict) -> bool:
    return c["config"]["algo"] in ("grpo", "reinforce")


def _stored_policy(doc: dict) -> Optional[str]:
    pols = doc["cells"][0]["policies"] if doc["cells"] else {}
    for p in ("bf16+master", "bf16"):
        if p in pols:
            return p
    return None


def bf16_sparsity_above_fp32(doc: dict) -> Claim:
    name = "bf16_storage_sparsity_far_above_fp32"
    stmt = (f"For the same RL update stream, bf16 storage (nearest) shows a bitwise sparsity at "
            f"least {FAR_ABOVE:.0%} points above fp32 storage, in every RL cell on the real "
            "weights.")
    cells = [c for c in doc["cells"] if _is_rl(c) and c["config"]["geometry"] == "real"
             and {"bf16", "fp32"} <= set(c["policies"])]
    if not cells:
        return Claim(name, stmt, None, None, "not tested", "needs RL cells on real weights "
                     "with policies bf16 and fp32")
    b = [c["policies"]["bf16"]["bitwise_sparsity"] for c in cells]
    f = [c["policies"]["fp32"]["bitwise_sparsity"] for c in cells]
    gaps = [x - y for x, y in zip(b, f)]
    ok = min(gaps) >= FAR_ABOVE
    return Claim(name, stmt, _mean(b), _mean(f), "holds" if ok else "fails",
                 f"{len(cells)} cells; mean bf16 {_mean(b):.4f} vs fp32 {_mean(f):.4f}; "
                 f"smallest gap {min(gaps):+.4f}")


def rl_principal_overlap_below_baseline(doc: dict) -> Claim:
    pol = _stored_policy(doc)
    name = "rl_principal_overlap_below_baseline"
    stmt = (f"RL's stored-weight update mask ({pol}) overlaps the principal weights "
            "Top_alpha(|W0^(k)|) less than a random mask of the same density would, in every "
            "RL cell on the real weights.")
    cells = [c for c in doc["cells"] if _is_rl(c) and c["config"]["geometry"] == "real"]
    if pol is None or not cells:
        return Claim(name, stmt, None, None, "not tested", "needs RL cells on real weights "
                     "with a bf16 policy")
    ov = [c["policies"][pol]["principal_overlap"] for c in cells]
    base = [c["policies"][pol]["overlap_baseline"] for c in cells]
    below = sum(1 for o, b in zip(ov, base) if o < b)
    k = cells[0]["config"]["k"]
    alpha = cells[0]["config"]["alpha"]
    return Claim(name, stmt, _mean(ov), _mean(base), "holds" if below == len(cells) else "fails",
                 f"k={k}, alpha={alpha}; below baseline in {below} of {len(cells)} cells")


def rl_rotation_below_sft(doc: dict) -> Claim:
    name = "rl_rotation_below_sft_at_matched_norm"
    stmt = ("At matched per-step update norms, RL rotates the top-k left singular subspace "
            "less than SFT (largest principal angle, fp32 storage, real weights).")
    sel = [c for c in doc["cells"] if c["config"]["norm_matched"]
           and c["config"]["geometry"] == "real" and "fp32" in c["policies"]]
    rl = [c["policies"]["fp32"]["angle_left_max_deg"] for c in sel if _is_rl(c)]
    sft = [c["policies"]["fp32"]["angle_left_max_deg"] for c in sel
           if c["config"]["algo"] == "sft"]
    if not rl or not sft:
        return Claim(name, stmt, None, None, "not tested", "needs norm-matched RL and SFT "
                     "cells on real weights with policy fp32")
    k = sel[0]["config"]["k"]
    r, s = _mean(rl), _mean(sft)
    return Claim(name, stmt, r, s, "holds" if r < s else "fails",
                 f"k={k}; mean largest angle RL {r:.4f} deg ({len(rl)} cells) vs SFT "
                 f"{s:.4f} deg ({len(sft)} cells)")


def rotation_overlap_random(doc: dict) -> Claim:
    pol = _stored_policy(doc)
    name = "rotation_makes_cross_seed_overlap_random"
    stmt = (f"Under a function-preserving rotation of the weights, RL update masks of two "
            f"seeds ({pol}) overlap no more than independent masks would (Jaccard at most "
            f"{RANDOM_MARGIN}x its baseline pq/(p+q-pq)).")
    pairs = [j for j in doc.get("jaccard", []) if j["policy"] == pol]
    rl_variants = {c["variant"] for c in doc["cells"] if _is_rl(c)}
    rot = [j for j in pairs if j["geometry"] == "rotated" and j["variant"] in rl_variants]
    real = [j for j in pairs if j["geometry"] == "real" and j["variant"] in rl_variants]
    if pol is None or not rot:
        return Claim(name, stmt, None, None, "not tested", "needs two seeds of RL cells with "
                     "the rotated geometry")
    jv, jb = _mean([j["value"] for j in rot]), _mean([j["baseline"] for j in rot])
    ok = jv <= RANDOM_MARGIN * jb
    detail = f"rotated: J={jv:.4f} vs baseline {jb:.4f} ({len(rot)} pairs)"
    if real:
        detail += (f"; real: J={_mean([j['value'] for j in real]):.4f} vs baseline "
                   f"{_mean([j['baseline'] for j in real]):.4f}")
    return Claim(name, stmt, jv, jb, "holds" if ok else "fails", detail)


CLAIMS: tuple[Callable[[dict], Claim], ...] = (
    bf16_sparsity_above_fp32, rl_principal_overlap_below_baseline, rl_rotation_below_sft,
    rotation_overlap_random)


def check_claims(doc: dict) -> list[Claim]:
    """Every claim of :data:`CLAIMS` on a results document."""
    return [c(doc) for c in CLAIMS]
