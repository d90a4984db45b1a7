"""The lab's claims (:func:`gatesim.lab.claims.check_lab_claims`, ``check_arm_claims``) on
results documents built by hand.

What is independent here: the documents are literal dicts of the shape gatesim.lab.report
writes (``lab.precision``, ``cells`` with ``id``/``config``/``final``, ``analysis[id]
["network"]``, ``consistency`` rows), with numbers chosen in this file. Each claim's per-run
or per-pair statistic is computed here from those literals by the claim's statement (the
module docstring of gatesim.lab.claims), the 95% interval by the textbook Student-t formula
written with ``scipy.stats.t``. One document makes every claim hold, its twin makes every
claim fail, with values close enough to the fixed thresholds (LEARN_GAIN, COSINE_SDS,
SAFE_MARGIN, the ratio 1) that a threshold moved by a factor of 100 or a flipped side flips
a verdict. Decoy runs (another precision, method, family or consistency axis) hold the
other document's numbers, so a claim that reads the wrong runs changes its values.
"""
import math

import pytest

from gatesim.lab.claims import check_arm_claims, check_lab_claims
from test_claims import check

SEEDS = (0, 1, 2)
PREC = "bf16+master"

#: per case, per seed: (grpo value, sft value) of each quantity
CASES = {
    "hold": dict(gain=(0.13, 0.14, 0.15), sft_gain=(0.3, 0.3, 0.3),
                 sparsity=((0.60, 0.40), (0.62, 0.41), (0.64, 0.43)),
                 nss=((1e-5, 1e-3), (2e-5, 1e-3), (1e-5, 2e-3)),
                 sv=((1e-4, 1e-3), (3e-4, 2e-3), (1e-4, 2e-3)),
                 angle=((1.0, 10.0), (2.0, 11.0), (1.5, 12.0)),
                 principal=((0.80, 1.10), (0.85, 1.20), (0.90, 1.15)),
                 low=(((2.0, 1.0), (1.5, 1.2)), ((2.2, 1.1), (1.6, 1.1)),
                      ((2.1, 1.0), (1.7, 1.3))),
                 jac=((0.50, 0.40), (0.52, 0.41), (0.55, 0.43)),
                 cos=(0.040, 0.045, 0.050)),
    "fail": dict(gain=(0.05, 0.06, 0.07), sft_gain=(0.3, 0.3, 0.3),
                 sparsity=((0.40, 0.60), (0.41, 0.62), (0.43, 0.64)),
                 nss=((1e-3, 1e-5), (1e-3, 2e-5), (2e-3, 1e-5)),
                 sv=((1e-3, 1e-4), (2e-3, 3e-4), (2e-3, 1e-4)),
                 angle=((10.0, 1.0), (11.0, 2.0), (12.0, 1.5)),
                 principal=((1.20, 0.80), (1.30, 0.85), (1.25, 0.90)),
                 low=(((1.0, 2.0), (1.2, 1.5)), ((1.1, 2.2), (1.1, 1.6)),
                      ((1.0, 2.1), (1.3, 1.7))),
                 jac=((0.40, 0.50), (0.41, 0.52), (0.43, 0.55)),
                 cos=(0.020, 0.022, 0.024)),
}
COS_SD = 0.01   # a cosine of 0.040 is 4 sds (holds above 3); 0.022 is 2.2 sds (fails)


def _lab_doc(which):
    other = "fail" if which == "hold" else "hold"
    cells, analysis, consistency = [], {}, []

    def add(case, method, prec, family, seed, j):
        v = CASES[case]
        cid = f"{method}-{family}-{prec}-s{seed}"
        gain = v["gain"][seed] if method == "grpo" else v["sft_gain"][seed]
        cells.append({"id": cid, "config": {"method": method, "family": family,
                                            "precision": prec, "seed": seed},
                      "final": {"heldout_acc0": 0.2, "heldout_acc": 0.2 + gain}})
        stored, ranked = v["low"][seed][j]
        analysis[cid] = {"network": {
            "sparsity": v["sparsity"][seed][j], "nss_median": v["nss"][seed][j],
            "sv_drift_median": v["sv"][seed][j], "angle_median": v["angle"][seed][j],
            "ranked_principal_ratio": v["principal"][seed][j],
            "stored_low_ratio": stored, "ranked_low_ratio": ranked}}

    for s in SEEDS:
        for j, m in enumerate(("grpo", "sft")):
            add(which, m, PREC, "f", s, j)
            add(other, m, "fp32", "f", s, j)          # decoy: another (fp32-stored) precision
        add(other, "reinforce", PREC, "f", s, 0)      # decoy: the second recipe
    for axis in ("seed", "family", "recipe"):
        for case, method, prec in ((which, "grpo", PREC), (other, "sft", PREC),
                                   (other, "grpo", "fp32")):
            for s in SEEDS:
                jv, jb = CASES[case]["jac"][s]
                consistency.append({"axis": axis, "method": method, "precision": prec,
                                    "a": "x", "b": "y",
                                    "kinds": {"all": {"jaccard": jv, "jaccard_baseline": jb,
                                                      "cosine": CASES[case]["cos"][s],
                                                      "cosine_baseline_sd": COS_SD},
                                              "attn": {"jaccard": jb, "jaccard_baseline": jv}}})
    return {"lab": {"precision": PREC}, "cells": cells, "analysis": analysis,
            "consistency": consistency}


@pytest.mark.parametrize("which, verdict", [("hold", "holds"), ("fail", "fails")])
def test_lab_claims_on_both_sides(which, verdict):
    v = CASES[which]
    got = {c.name: c for c in check_lab_claims(_lab_doc(which))}
    assert len(got) == 14
    check(got["rlvr_learns[f]"], list(v["gain"]), 0.10, "above", verdict)
    check(got["rlvr_sparser_than_sft"], [a - b for a, b in v["sparsity"]], 0.0, "above",
          verdict)
    check(got["rlvr_smaller_spectral_drift"], [math.log10(a / b) for a, b in v["nss"]], 0.0,
          "below", verdict)
    check(got["rlvr_smaller_sv_drift"], [math.log10(a / b) for a, b in v["sv"]], 0.0,
          "below", verdict)
    check(got["rlvr_smaller_rotation"], [a - b for a, b in v["angle"]], 0.0, "below",
          verdict)
    check(got["rlvr_avoids_principal_weights"], [a for a, _ in v["principal"]], 1.0,
          "below", verdict)
    check(got["sft_avoids_principal_weights_less"], [a - b for a, b in v["principal"]], 0.0,
          "below", verdict)
    # every bf16-stored run of the lab precision, in document order: grpo then sft per
    # seed, and the bf16-stored reinforce decoy (the other case's grpo numbers)
    other = CASES["fail" if which == "hold" else "hold"]
    low = []
    for s in SEEDS:
        low += [v["low"][s][0][0] - v["low"][s][0][1], v["low"][s][1][0] - v["low"][s][1][1],
                other["low"][s][0][0] - other["low"][s][0][1]]
    lowc = got["bf16_storage_favors_low_magnitude"]
    assert lowc.per_seed == pytest.approx(low) and lowc.n == 9
    for plural in ("seeds", "families", "recipes"):
        check(got[f"rlvr_masks_consistent_across_{plural}"], [a - b for a, b in v["jac"]],
              0.0, "above", verdict)
        check(got[f"rlvr_updates_aligned_across_{plural}"], [c / COS_SD for c in v["cos"]],
              3.0, "above", verdict)


def test_bf16_storage_claim_on_both_sides_without_decoys():
    for which, verdict in (("hold", "holds"), ("fail", "fails")):
        doc = _lab_doc(which)
        doc["cells"] = [c for c in doc["cells"] if c["config"]["method"] != "reinforce"]
        v = CASES[which]
        want = [v["low"][s][j][0] - v["low"][s][j][1] for s in SEEDS for j in (0, 1)]
        got = {c.name: c for c in check_lab_claims(doc)}
        check(got["bf16_storage_favors_low_magnitude"], want, 0.0, "above", verdict)


def test_lab_claims_inconclusive_and_not_tested():
    doc = _lab_doc("hold")
    # seed 2 learns nothing: gains 0.13, 0.14, 0.0 straddle 0.10
    for c in doc["cells"]:
        if c["id"] == f"grpo-f-{PREC}-s2":
            c["final"]["heldout_acc"] = c["final"]["heldout_acc0"]
    doc["consistency"] = []
    got = {c.name: c for c in check_lab_claims(doc)}
    check(got["rlvr_learns[f]"], [0.13, 0.14, 0.0], 0.10, "above", "inconclusive")
    assert got["rlvr_masks_consistent_across_seeds"].verdict == "not tested"
    assert got["rlvr_updates_aligned_across_recipes"].n == 0


# ------------------------------------------------------------------------ the arms' claims

def _arm_doc(accs, method="grpo"):
    return {"cells": [{"config": {"method": method, "family": "f", "arm": arm, "seed": s},
                       "final": {"heldout_acc": a}}
                      for arm, vals in accs.items() for s, a in enumerate(vals)]}


HOLD_ARMS = {"full": (0.80, 0.82, 0.81), "safe": (0.77, 0.785, 0.77),      # -0.03..-0.04
             "principal": (0.40, 0.45, 0.43), "lora": (0.60, 0.62, 0.61),
             "pissa": (0.55, 0.58, 0.555)}                                   # -0.05..-0.04
FAIL_ARMS = {"full": (0.80, 0.82, 0.81), "safe": (0.73, 0.755, 0.75),      # -0.07..-0.06
             "principal": (0.90, 0.92, 0.91), "lora": (0.60, 0.62, 0.61),
             "pissa": (0.64, 0.665, 0.655)}                                  # 0.04..0.045


@pytest.mark.parametrize("accs, verdict", [(HOLD_ARMS, "holds"), (FAIL_ARMS, "fails")])
def test_arm_claims_on_both_sides(accs, verdict):
    doc = _arm_doc(accs)
    doc["cells"] += _arm_doc(FAIL_ARMS if accs is HOLD_ARMS else HOLD_ARMS, "sft")["cells"]
    got = {c.name: c for c in check_arm_claims(doc)}
    assert len(got) == 6
    lowest = [accs["principal"][s] - min(accs[a][s] for a in accs if a != "principal")
              for s in SEEDS]
    check(got["arms_principal_lowest[grpo/f]"], lowest, 0.0, "below", verdict)
    check(got["arms_safe_near_full[grpo/f]"],
          [a - b for a, b in zip(accs["safe"], accs["full"])], -0.05, "above", verdict)
    check(got["arms_pissa_not_better[grpo/f]"],
          [a - b for a, b in zip(accs["pissa"], accs["lora"])], 0.0, "below", verdict)


def test_arm_claims_need_their_arms():
    got = {c.name for c in check_arm_claims(_arm_doc({"full": (0.8, 0.8),
                                                      "lora": (0.5, 0.6)}))}
    assert got == set()
    got = {c.name: c for c in check_arm_claims(_arm_doc({"principal": (0.1, 0.2, 0.3),
                                                         "lora": (0.5, 0.6)}))}
    # seed 2 has no lora run: its principal value drops out
    assert list(got) == ["arms_principal_lowest[grpo/f]"]
    assert got["arms_principal_lowest[grpo/f]"].per_seed == pytest.approx([-0.4, -0.4])
