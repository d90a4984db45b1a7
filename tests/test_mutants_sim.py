"""gatesim.sim internals: cell labels, the claims' text lines, a manifest field that is
missing; written against hand-made inputs to kill mutants the mutation run
(docs/mutation.md) found surviving."""
import pytest

from gatesim.sim.analysis import run_label
from gatesim.sim.report import claims_text
from gatesim.sim.stream import StreamError
from test_hostile_streams import _manifest, _write_manifest, recorded, stream  # noqa: F401


ANCHOR = {"algo": "grpo", "lr": 1e-3, "seed": 0, "clip": None, "inner_steps": 1}


def _cell(variant, **changes):
    return {"variant": variant, "config": dict(ANCHOR, **changes)}


def test_run_label_names_what_differs_from_the_anchor_but_the_seed():
    assert run_label(_cell("anchor"), ANCHOR) == "anchor"
    assert run_label(_cell("anchor", seed=3), ANCHOR) == "anchor"        # seed ignored
    assert run_label(_cell("v", lr=0.01, seed=2), ANCHOR) == "lr=0.01"
    assert run_label(_cell("v", algo="sft", lr=0.01), ANCHOR) == "algo=sft,lr=0.01"


def test_run_label_calls_clipped_multi_step_grpo_ppo():
    c = _cell("v", clip=0.2, inner_steps=4, lr=0.01)
    assert run_label(c, ANCHOR) == "lr=0.01,ppo"
    # one inner step: the clip never binds, no "ppo"
    assert run_label(_cell("v", clip=0.2), ANCHOR) == "clip=0.2"
    # another algorithm: not PPO either
    assert run_label(_cell("v", algo="reinforce", clip=0.2, inner_steps=4), ANCHOR) == \
        "algo=reinforce,clip=0.2,inner_steps=4"


def test_claims_text_lines():
    doc = {"claims": [
        {"name": "a", "verdict": "supported", "statistic": 0.123456, "lo": 0.1, "hi": 0.15,
         "n": 3, "threshold": 0.05, "side": "above", "detail": "d1"},
        {"name": "b", "verdict": "untestable", "statistic": None, "lo": None, "hi": None,
         "n": 0, "threshold": 2, "side": "below", "detail": "d2"}]}
    lines = claims_text(doc).split("\n")
    assert lines == [
        "  SUPPORTED    a: 0.1235 [0.1, 0.15] (n=3) vs threshold 0.05 (above)  d1",
        "  UNTESTABLE   b: - vs threshold 2 (below)  d2"]
    assert claims_text({}) == ""


def test_missing_manifest_field_is_named(stream):  # noqa: F811
    from gatesim.sim.stream import replay
    m = _manifest(stream)
    del m["init_checksum"]
    _write_manifest(stream, m, reseal=True)
    with pytest.raises(StreamError) as info:
        replay(stream, "bf16")
    assert info.value.field == "init_checksum"
    assert str(info.value).endswith("init_checksum: missing")


def _arm(variant, seed, r0, r1, p50):
    return {"variant": variant,
            "config": {"seed": seed, "geometry": "real", "lr": 1e-4, "steps": 10, "rows": 64,
                       "matrix": "M", "n_contexts": 8},
            "trajectory": {"reward": [r0, 0.0, r1]}, "step_ratio": {"p50": p50}}


def test_regime_line_reports_every_default_arm_with_its_seed_means():
    from gatesim.sim.report import regime_line
    doc = {"cells": [_arm("rl_clip", 0, 0.1, 0.3, 2.0), _arm("rl_clip", 1, 0.3, 0.5, 4.0),
                     _arm("sft", 0, 0.2, 0.8, 10.0), _arm("other", 0, 1.0, 1.0, 1.0)],
           "rlvr_reference": {"lrs": {"1e-06": {"p50": 0.01, "p10": 0.001, "p90": 0.1}}}}
    line = regime_line(doc)
    # rl_clip: rewards 0.2 -> 0.4 (means over the two seeds), x2.0, p50 3; sft: 0.2 -> 0.8
    assert line == ("Regime: AdamW lr 0.0001, 10 steps, 64 rows of M, 8 contexts; "
                    "rl_clip reward 0.200->0.400 (x2.0), step |u|/ulp p50 3; "
                    "sft reward 0.200->0.800 (x4.0), step |u|/ulp p50 10. Typical RLVR (upper "
                    "estimate lr/ulp_bf16(w) over MiniLM's weights): lr 1e-06: p50 0.01 "
                    "(p10 0.001, p90 0.1).")
    assert regime_line({"cells": [_arm("other", 0, 1, 1, 1)]}).startswith(
        "Regime: no rl_kl/rl_nokl/rl_clip/sft cells")


@pytest.fixture(scope="module")
def mini_doc(tmp_path_factory):
    import json
    from gatesim.cli import main as cli_main
    from gatesim.sim import mini_sweep
    d = tmp_path_factory.mktemp("mini")
    (d / "sweep.json").write_text(json.dumps(mini_sweep("md").to_dict()))
    assert cli_main(["ablate", str(d / "sweep.json"), "--out", str(d / "out"), "--workers",
                     "1", "--quiet"]) == 0
    return d / "out" / "md"


def test_report_tables_are_well_formed_markdown(mini_doc):
    """Every table of table.md: a header, a |---| rule with one cell per column, then rows
    that start with "| ", end with " |" and have the header's number of cells (cells are
    " | " apart: a "|u|" inside a cell is not a separator)."""
    lines = (mini_doc / "table.md").read_text().splitlines()
    tables, cur = [], []
    for ln in lines + [""]:
        if ln.startswith("|") or (cur and ln.strip().startswith("|")):
            cur.append(ln)
        elif cur:
            tables.append(cur)
            cur = []
    assert len(tables) >= 4
    for t in tables:
        assert len(t) >= 3, t
        ncol = t[0].count(" | ") + 1
        assert set(t[1].replace("|", "").replace(":", "")) <= {"-"} and t[1].count("|") == ncol + 1
        for row in t[:1] + t[2:]:
            assert row.startswith("| ") and row.endswith(" |"), row
            assert len(row[2:-2].split(" | ")) == ncol, (row, ncol)   # cells: " | " apart
