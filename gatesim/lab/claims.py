"""The lab's claims: the papers' whole-network statements, checked across seeds.

Each claim takes one value per run (or per matched pair of runs: RL and SFT on the same
family and seed, or two runs compared for consistency), computes the mean with its 95%
Student-t interval and gives the verdict of :func:`gatesim.claims.make_claim` (the one
claim type, shared with the gate simulation) against a threshold fixed here, before any run: ``holds``
when the whole interval is on the claimed side, ``fails`` when it is wholly on the other,
``inconclusive`` when it straddles. Thresholds were not tuned to the lab's results.

Runs used: the default precision (``LabConfig.precision``, bf16 with fp32 master weights
unless changed), the first RL method (``grpo``) against ``sft``; the second recipe only in the
recipe-consistency claims. Consistency pairs that share a run are not independent, so their
intervals are optimistic; each claim's ``n`` says how many values went in.
"""
from __future__ import annotations

import math

from gatesim.claims import Claim, make_claim
from gatesim.lab.train import storage_dtype

__all__ = ["check_lab_claims", "check_arm_claims", "LEARN_GAIN", "COSINE_SDS", "SAFE_MARGIN"]

#: "RLVR learns": held-out accuracy gain (after - before), in accuracy points.
LEARN_GAIN = 0.10
#: a cosine counts as aligned when it exceeds this many random-baseline sds (1/sqrt(N)).
COSINE_SDS = 3.0
#: "the safe mask tracks full fine-tuning": its final held-out accuracy is at most this many
#: accuracy points below the full arm's (per seed), fixed before any arm sweep ran.
SAFE_MARGIN = 0.05


def _claim(name, statement, values, threshold, side) -> Claim:
    """The one claim type of gatesim (:func:`gatesim.claims.make_claim`: mean, 95%
    interval across seeds, verdict from :mod:`gatesim.stats`)."""
    return make_claim(name, statement, values, threshold, side,
                      missing="the lab has no runs for it")


def _runs(doc: dict, method: str, precision: str) -> list:
    return [c for c in doc["cells"] if c["config"]["method"] == method
            and c["config"]["precision"] == precision]


def _pairs(doc: dict, rl: str, precision: str):
    """(rl cell, sft cell) matched on family and seed."""
    sft = {(c["config"]["family"], c["config"]["seed"]): c for c in _runs(doc, "sft", precision)}
    for c in _runs(doc, rl, precision):
        key = (c["config"]["family"], c["config"]["seed"])
        if key in sft:
            yield c, sft[key]


def _net(doc: dict, cell: dict, key: str):
    return doc["analysis"][cell["id"]]["network"].get(key)


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def check_lab_claims(doc: dict, rl: str = "grpo") -> list:
    """The claims (module docstring) on a lab's ``results.json`` document."""
    prec = doc["lab"]["precision"]
    out = []
    fams = sorted({c["config"]["family"] for c in doc["cells"]})
    for fam in fams:
        gains = [c["final"]["heldout_acc"] - c["final"]["heldout_acc0"]
                 for c in _runs(doc, rl, prec) if c["config"]["family"] == fam]
        out.append(_claim(
            f"rlvr_learns[{fam}]",
            f"{rl} raises held-out accuracy on '{fam}' by more than {LEARN_GAIN:.0%} points "
            "(after - before, per seed)", gains, LEARN_GAIN, "above"))
    pairs = list(_pairs(doc, rl, prec))
    out.append(_claim(
        "rlvr_sparser_than_sft",
        "the stored checkpoint's bitwise sparsity (whole network) is higher after RLVR than "
        "after SFT on the same prompts (RL - SFT per family and seed)",
        [_net(doc, r, "sparsity") - _net(doc, s, "sparsity") for r, s in pairs], 0.0, "above"))
    out.append(_claim(
        "rlvr_smaller_spectral_drift",
        "RLVR moves the singular values less than SFT: log10(median NSS RL / median NSS SFT) "
        "< 0 per family and seed",
        [math.log10(x) if x else None for x in
         (_ratio(_net(doc, r, "nss_median"), _net(doc, s, "nss_median")) for r, s in pairs)],
        0.0, "below"))
    out.append(_claim(
        "rlvr_smaller_sv_drift",
        "RLVR moves the top-k singular values less than SFT, relative to their size: "
        "log10(median sv drift RL / median sv drift SFT) < 0 per family and seed",
        [math.log10(x) if x else None for x in
         (_ratio(_net(doc, r, "sv_drift_median"), _net(doc, s, "sv_drift_median"))
          for r, s in pairs)],
        0.0, "below"))
    out.append(_claim(
        "rlvr_smaller_rotation",
        "RLVR rotates the top-k singular subspaces less than SFT: median over matrices of "
        "the largest principal angle, RL - SFT (degrees) < 0",
        [_net(doc, r, "angle_median") - _net(doc, s, "angle_median") for r, s in pairs
         if _net(doc, r, "angle_median") is not None], 0.0, "below"))
    out.append(_claim(
        "rlvr_avoids_principal_weights",
        "Gate II with precision taken out: the fp32 update's largest-|dW| entries (at the "
        "stored mask's density) overlap principal weights less than chance (ratio < 1)",
        [_net(doc, c, "ranked_principal_ratio") for c in _runs(doc, rl, prec)], 1.0, "below"))
    out.append(_claim(
        "sft_avoids_principal_weights_less",
        "the fp32-ranked principal overlap ratio is lower for RLVR than for SFT "
        "(RL - SFT per family and seed < 0)",
        [_net(doc, r, "ranked_principal_ratio") - _net(doc, s, "ranked_principal_ratio")
         for r, s in pairs], 0.0, "below"))
    stored = [c for c in doc["cells"] if storage_dtype(c["config"]["precision"]) == "bf16"]
    out.append(_claim(
        "bf16_storage_favors_low_magnitude",
        "Gate III: in every bf16-stored run (RL and SFT), the stored mask's low-magnitude "
        "overlap ratio exceeds the fp32-ranked one at the same density (stored - ranked > 0)",
        [_net(doc, c, "stored_low_ratio") - _net(doc, c, "ranked_low_ratio") for c in stored
         if _net(doc, c, "ranked_low_ratio") is not None], 0.0, "above"))
    for axis, plural in (("seed", "seeds"), ("family", "families"), ("recipe", "recipes")):
        rows = [p for p in doc["consistency"] if p["axis"] == axis and p["method"] == rl
                and p["precision"] == prec]
        net = [p["kinds"].get("all", {}) for p in rows]
        out.append(_claim(
            f"rlvr_masks_consistent_across_{plural}",
            f"RLVR's stored update masks agree across {plural} more than independent masks of "
            "the same densities: Jaccard - baseline > 0 (whole network, per pair)",
            [(x["jaccard"] - x["jaccard_baseline"]) if x.get("jaccard") is not None
             and x.get("jaccard_baseline") is not None else None for x in net], 0.0, "above"))
        out.append(_claim(
            f"rlvr_updates_aligned_across_{plural}",
            f"RLVR's fp32 updates point the same way across {plural}: cosine over its random sd "
            f"1/sqrt(N) exceeds {COSINE_SDS:g} (whole network, per pair)",
            [x["cosine"] / x["cosine_baseline_sd"] if x.get("cosine") is not None else None
             for x in net], COSINE_SDS, "above"))
    return out


def _arm_acc(doc: dict, method: str, family: str) -> dict:
    """{arm: {seed: final held-out accuracy}} of the arm cells of one method and family."""
    out: dict = {}
    for c in doc["cells"]:
        cf = c["config"]
        if cf["method"] == method and cf["family"] == family:
            out.setdefault(cf.get("arm", "full"), {})[cf["seed"]] = c["final"]["heldout_acc"]
    return out


def check_arm_claims(doc: dict) -> list:
    """The restricted arms' claims (:mod:`gatesim.lab.arms`), per method and family, on the
    final held-out accuracy matched by seed (a seed missing from an arm drops out):

    * ``arms_principal_lowest``: the principal-mask arm ends lowest: principal minus the
      lowest of the other arms < 0 (the paper: true under RLVR; under SFT it
      expects the opposite, principal weights are where SFT learns);
    * ``arms_safe_near_full``: the safe-mask arm ends within :data:`SAFE_MARGIN` of full
      fine-tuning: safe - full > -SAFE_MARGIN;
    * ``arms_pissa_not_better``: PiSSA is no better than LoRA at equal rank: pissa - lora
      < 0 (an interval around 0 is inconclusive).

    Only claims whose arms the lab ran are made."""
    out = []
    keys = sorted({(c["config"]["method"], c["config"]["family"]) for c in doc["cells"]})
    for m, f in keys:
        acc = _arm_acc(doc, m, f)
        tag = f"[{m}/{f}]"
        expect = ("the paper expects this under RLVR" if m in ("grpo", "reinforce") else
                  "under SFT the paper expects the opposite (principal weights learn)")
        if "principal" in acc and len(acc) > 1:
            vals = []
            for s, v in sorted(acc["principal"].items()):
                others = [a[s] for arm, a in acc.items() if arm != "principal" and s in a]
                vals.append(v - min(others) if others else None)
            out.append(_claim(
                f"arms_principal_lowest{tag}",
                f"{m}: the principal-mask arm ends with the lowest held-out accuracy of all "
                f"arms (principal - lowest other arm < 0 per seed; {expect})", vals, 0.0,
                "below"))
        for a, b, name, thr, side, text in (
                ("safe", "full", "arms_safe_near_full", -SAFE_MARGIN, "above",
                 f"the safe-mask arm ends within {SAFE_MARGIN * 100:g} accuracy points of full "
                 "fine-tuning (safe - full > -margin per seed)"),
                ("pissa", "lora", "arms_pissa_not_better", 0.0, "below",
                 "PiSSA ends no better than LoRA at equal rank (pissa - lora < 0 per seed)")):
            if a in acc and b in acc:
                vals = [acc[a][s] - acc[b][s] for s in sorted(acc[a]) if s in acc[b]]
                out.append(_claim(f"{name}{tag}", f"{m}: {text}", vals, thr, side))
    return out
