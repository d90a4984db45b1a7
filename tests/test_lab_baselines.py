"""The lab's random baselines and singular-value drift (gatesim.lab.analysis): the
precision-only null keeps every |update| value and the storage and moves only the
positions; sv drift on spectra with known answers; a lab whose updates are all zero says
so in every metric and in every baseline."""
import json

import pytest
import torch
from safetensors.torch import save_file

from gatesim.lab.analysis import null_tensors, null_update, sv_drift
from gatesim.lab.model import make_tiny_model
from gatesim.lab.run import run_lab, tiny_lab
from gatesim.metrics import singular_values


def _sparse_update(shape, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g) * 1e-3
    return d * (torch.rand(shape, generator=g) < density)


def test_null_update_keeps_values_moves_positions():
    d = _sparse_update((48, 32))
    n = null_update(d, 3, "layer.0.q.weight")
    assert n.shape == d.shape and n.dtype == d.dtype
    # the same multiset of |values| (a permutation with signs), so the same norm and density
    assert torch.equal(n.abs().reshape(-1).sort().values, d.abs().reshape(-1).sort().values)
    assert int((n != 0).sum()) == int((d != 0).sum())
    # ... at other positions: the masks agree about as often as independent ones would
    a, b = d != 0, n != 0
    p = float(a.float().mean())
    assert abs(float((a & b).float().mean()) - p * p) < 0.05
    assert not torch.equal(a, b)
    # random signs: both appear among the moved entries
    assert 0 < int((n > 0).sum()) < int((n != 0).sum())
    # deterministic, and a function of (seed, name)
    assert torch.equal(n, null_update(d, 3, "layer.0.q.weight"))
    assert not torch.equal(n, null_update(d, 4, "layer.0.q.weight"))
    assert not torch.equal(n, null_update(d, 3, "layer.0.k.weight"))
    assert bool((null_update(torch.zeros(5, 7), 0, "z") == 0).all())


def test_null_tensors_store_like_the_cell(tmp_path):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(40, 24, generator=g) * 0.05
    d = _sparse_update((40, 24), seed=2)
    save_file({"m": w0, "v": torch.ones(24)}, str(tmp_path / "start.safetensors"))
    save_file({"m": d}, str(tmp_path / "upd.safetensors"))
    s, u = tmp_path / "start.safetensors", tmp_path / "upd.safetensors"
    b = null_tensors(s, u, "bf16", seed=5)
    f = null_tensors(s, u, "fp32", seed=5)
    assert set(b) == set(f) == {"m"}       # only the matrices with a recorded update
    want = w0 + null_update(d, 5, "m")
    assert f["m"].dtype == torch.float32 and torch.equal(f["m"], want)
    assert b["m"].dtype == torch.bfloat16 and torch.equal(b["m"], want.to(torch.bfloat16))
    # a zero update stores the start itself
    save_file({"m": torch.zeros(40, 24)}, str(tmp_path / "zero.safetensors"))
    z = null_tensors(s, tmp_path / "zero.safetensors", "bf16", seed=5)
    assert torch.equal(z["m"], w0.to(torch.bfloat16))
    with pytest.raises(ValueError, match="storage"):
        null_tensors(s, u, "fp8", seed=5)
    save_file({"other": d}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not"):
        null_tensors(s, tmp_path / "bad.safetensors", "fp32", seed=5)
    save_file({"m": d[:10]}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        null_tensors(s, tmp_path / "shape.safetensors", "fp32", seed=5)


def test_sv_drift_known_spectra():
    s0 = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    s1 = torch.tensor([4.4, 2.0, 0.5], dtype=torch.float64)
    assert sv_drift(s0, s1, 1) == pytest.approx(0.1)
    assert sv_drift(s0, s1, 2) == pytest.approx(0.1)
    assert sv_drift(s0, s1, 3) == pytest.approx(0.5)
    assert sv_drift(s0, s1, 10) == pytest.approx(0.5)     # k past the spectrum: all of it
    assert sv_drift(torch.zeros(3, dtype=torch.float64), s1, 2) is None
    # on matrices: scaling a matrix by 1.25 moves every singular value by 25%
    W0 = torch.randn(30, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = sv_drift(singular_values(W0), singular_values(1.25 * W0), 5)
    assert d == pytest.approx(0.25, rel=1e-9)
    assert sv_drift(singular_values(W0), singular_values(W0.clone()), 5) == 0.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("baseline_model"), "masked", layers=1)


def test_zero_update_lab_every_metric_and_baseline_say_unchanged(tiny_model, tmp_path):
    """lr 0: nothing moves, so the run and its null agree that nothing changed (sparsity 1,
    NSS 0, sv drift 0, angles 0), and the null file is not left behind."""
    cfg = tiny_lab(model=str(tiny_model), layers=None, seeds=(0,), families=("arithmetic",),
                   methods=("grpo",), second_recipe=None, extra_precisions=("fp32",),
                   steps=2, lr=0.0)
    doc = run_lab(cfg, tmp_path, workers=1, progress=False)
    assert len(doc["cells"]) == 2
    for cid, a in doc["analysis"].items():
        net = a["network"]
        assert net["sparsity"] == 1.0 and net["null_sparsity"] == 1.0, cid
        for key in ("nss_median", "null_nss_median", "sv_drift_median",
                    "null_sv_drift_median"):
            assert net[key] == 0.0, (cid, key)
        assert net["angle_max"] < 1e-3 and net["null_angle_max"] < 1e-3, cid
        mats = [r for r in a["rows"] if r.get("spectral") == "ok"]
        assert mats and all(r["null_changed"] == 0 for r in a["rows"])
        assert not list((tmp_path / "tiny" / "cells" / cid).glob("null*"))
    # an analysis of an earlier version (no "version") is computed again on resume, to
    # the same bytes, without retraining
    root = tmp_path / "tiny"
    before = (root / "results.json").read_bytes()
    lines = [json.loads(x) for x in open(root / "analysis.jsonl")]
    for rec in lines:
        rec["result"].pop("version")
    (root / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cells_before = (root / "cells.jsonl").read_bytes()
    run_lab(cfg, tmp_path, workers=1, progress=False)
    assert (root / "results.json").read_bytes() == before
    assert (root / "cells.jsonl").read_bytes() == cells_before
    again = [json.loads(x) for x in open(root / "analysis.jsonl")]
    assert len(again) == 4 and all(r["result"].get("version") == 2 for r in again[2:])
