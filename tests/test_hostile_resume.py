"""Hostile inputs, classes 1 and 2 of issue 22: nothing stale is reused, and results are
the same bytes every time.

1. A resumed diff reuses a stored row only if the row's tensors still have the bytes it
   was computed from (content checksums) and the inputs are the same paths and headers;
   anything else is refused with ResumeError (exit 2 on the command line), never reused.
2. rows.csv, rows.jsonl, report.md (and every other result file; timings live in
   timings.csv) are byte-identical across runs, worker counts and resumes.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import gatesim.diff as gd
from gatesim.diff.synthetic import save_sharded
from hostile import assert_refused, planted_pair, snapshot

RESULT_FILES = ("config.json", "rows.jsonl", "rows.csv", "summary_module.csv",
                "summary_layer.csv", "summary_model.csv", "report.md")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return planted_pair(tmp_path_factory.mktemp("pair"))


def _later_checkpoint(folder, name):
    """Rewrites tensor ``name`` of ``folder`` in place with other weights: same names,
    shapes, dtypes and shard layout, so byte-identical headers (what a later checkpoint
    of the same run looks like). Returns the shard's path."""
    from gatesim.diff.io import open_checkpoint, read_tensor
    ref = open_checkpoint(folder).tensors[name]
    w = read_tensor(ref).clone()
    new = (w.float() * 1.5).to(w.dtype)
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset)
        f.write(new.view(torch.uint8).numpy().tobytes())
    return Path(ref.path)


def _stored_paired(out):
    recs = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    return [r["key"] for r in recs if r["result"]["status"] == "paired"]


def test_stale_bytes_same_header_are_refused(pair, tmp_path):
    base, tuned = pair
    later = tmp_path / "tuned"
    shutil.copytree(tuned, later)
    out = tmp_path / "d"
    gd.diff(base, later, out, progress=False, figures=False, limit=8)
    name = [k for k in _stored_paired(out) if "up_proj" in k][-1]
    headers = {p.name: p.read_bytes()[:64] for p in later.iterdir()}
    shard = _later_checkpoint(later, name)        # the same path now holds later weights
    assert {p.name: p.read_bytes()[:64] for p in later.iterdir()} == headers
    before = snapshot(out)
    with pytest.raises(gd.ResumeError, match="other bytes") as info:
        gd.diff(base, later, out, progress=False, figures=False)
    msg = str(info.value)
    assert name in msg and shard.name in msg
    assert snapshot(out) == before, "a refused resume must not write"
    # the command line says it in one line, exit 2, and writes nothing either
    assert_refused(["diff", base, later, "--out", out, "--no-progress"], out,
                   "other bytes", name)
    # --overwrite starts over and computes from the new bytes
    res = gd.diff(base, later, out, progress=False, figures=False, overwrite=True)
    fresh = gd.diff(base, later, progress=False)
    assert res.resumed == 0
    assert res.rows.equals(fresh.rows)
    old = gd.diff(base, tuned, progress=False).rows.set_index("name")
    now = res.rows.set_index("name")
    assert now.loc[name, "tuned_checksum"] != old.loc[name, "tuned_checksum"]
    assert now.loc[name, "sparsity_relative"] != old.loc[name, "sparsity_relative"]


def test_other_paths_are_refused(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "d"
    gd.diff(base, tuned, out, progress=False, figures=False, limit=2)
    copy = tmp_path / "tuned_copy"
    shutil.copytree(tuned, copy)                    # identical bytes, another path
    with pytest.raises(gd.ResumeError, match="tuned"):
        gd.diff(base, copy, out, progress=False)
    with pytest.raises(gd.ResumeError, match="base, tuned"):
        gd.diff(tuned, base, out, progress=False)   # swapped


def test_rows_without_checksums_are_not_reused(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "d"
    gd.diff(base, tuned, out, progress=False, figures=False, limit=3)
    lines = (out / "rows.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["result"]["tuned_checksum"] = None
    (out / "rows.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(gd.ResumeError, match="no content checksum"):
        gd.diff(base, tuned, out, progress=False)
    # a row that says it describes another pair is not reused either
    rec = json.loads(lines[0])
    rec["result"]["shape"] = "[1, 2]"
    (out / "rows.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(gd.ResumeError, match="shape"):
        gd.diff(base, tuned, out, progress=False)


def test_resume_checks_every_stored_row_with_a_pool(pair, tmp_path):
    """The checksum verification of a resume runs through the executor too."""
    base, tuned = pair
    later = tmp_path / "tuned"
    shutil.copytree(tuned, later)
    out = tmp_path / "d"
    gd.diff(base, later, out, progress=False, figures=False, limit=6)
    _later_checkpoint(later, _stored_paired(out)[0])
    with pytest.raises(gd.ResumeError, match="other bytes"):
        gd.diff(base, later, out, progress=False, workers=2)


def _results(out):
    return {n: (out / n).read_bytes() for n in RESULT_FILES}


def test_outputs_are_byte_identical_across_runs_workers_and_resumes(pair, tmp_path):
    base, tuned = pair
    kw = dict(progress=False, figures=True)
    gd.diff(base, tuned, tmp_path / "a", **kw)
    gd.diff(base, tuned, tmp_path / "b", workers=2, **kw)
    gd.diff(base, tuned, tmp_path / "c", limit=5, **kw)
    res = gd.diff(base, tuned, tmp_path / "c", **kw)       # resumed
    assert res.resumed == 5
    ref = _results(tmp_path / "a")
    for other in ("b", "c"):
        got = _results(tmp_path / other)
        for name in RESULT_FILES:
            assert got[name] == ref[name], f"{other}/{name} differs from a/{name}"
    for fig in ("fig_sparsity.png", "fig_ulp.png", "fig_angles.png"):
        assert (tmp_path / "b" / fig).read_bytes() == (tmp_path / "a" / fig).read_bytes()
    # timings are kept, separately
    t = (tmp_path / "a" / "timings.csv").read_text().splitlines()
    assert t[0] == "name,seconds,svd_seconds" and len(t) == 1 + len(res.rows)
    assert "seconds" not in (tmp_path / "a" / "rows.csv").read_text().splitlines()[0]
    assert res.timings["seconds"].notna().all()


def test_rows_carry_the_checksums_of_the_stored_bytes(pair):
    from gatesim.diff.io import open_checkpoint, read_tensor
    from gatesim.integrity import checksum_tensor
    base, tuned = pair
    res = gd.diff(base, tuned, progress=False, bitwise_only=True)
    ck = open_checkpoint(tuned)
    for _, r in res.rows.iterrows():
        ref = ck.tensors[r["tuned_name"]]
        assert r["tuned_checksum"] == checksum_tensor(read_tensor(ref))


def test_cast_checksums_the_stored_bytes_not_the_cast(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 16, generator=g)
    save_sharded({"a.weight": w}, tmp_path / "b32")
    save_sharded({"a.weight": w.to(torch.bfloat16)}, tmp_path / "b16")
    from gatesim.integrity import checksum_tensor
    r = gd.diff(tmp_path / "b32", tmp_path / "b16", cast="bf16", progress=False).rows
    assert r["base_checksum"][0] == checksum_tensor(w)
    assert r["tuned_checksum"][0] == checksum_tensor(w.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_checksums_fused_into_the_bitwise_pass_are_exact(dtype):
    """The bitwise-only pass computes the checksums inside its own loop (SWAR over 64-bit
    words); counts and checksums must equal the separate reference computations, for
    every length (partial last words), unaligned starts, +0/-0 and NaN/inf."""
    from gatesim.diff.scan import scan
    from gatesim.integrity import checksum_tensor
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 7, 8, 9, 63, 1000, 4099, 70001):
        a = torch.randn(n, generator=g).to(dtype)
        b = a.clone()
        idx = torch.randperm(n, generator=g)[: n // 3]
        b[idx] = (b[idx].float() * 1.1).to(dtype)
        if n > 10:
            b[5] = (-a[5].float()).to(dtype)
            a[7], b[7] = 0.0, -0.0
        if n > 100:
            a[50], b[60] = float("inf"), float("nan")
        for off in (0, 1, 3):
            if off >= n:
                continue
            x, y = a[off:], b[off:]                  # unaligned for 64-bit words
            got = scan(x, y, gather=False, checksums=True)
            ref = scan(x, y, gather=True)
            assert got.bitwise_equal == ref.bitwise_equal and got.nan_a == ref.nan_a
            assert got.checksums == (checksum_tensor(x), checksum_tensor(y))


def test_sweep_resumed_on_changed_weights_is_refused(tmp_path, monkeypatch):
    """ablate's stored cells are tied to the checksum of every matrix they read."""
    from safetensors.torch import save_file
    import gatesim.sim.sweep as sweep_mod
    from gatesim.sim.config import SweepConfig
    from gatesim.sim.sweep import ablate
    calls = []
    run = sweep_mod._run
    monkeypatch.setattr(sweep_mod, "_run", lambda payload: calls.append(1) or run(payload))
    g = torch.Generator().manual_seed(0)
    m = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(24, 12, generator=g)}, str(m))
    sweep = SweepConfig(name="s", base={
        "path": str(m), "matrix": "w", "rows": 16, "row_offset": 0, "n_contexts": 8,
        "n_targets": 2, "batch": 4, "group": 4, "steps": 2, "eval_every": 1, "k": 2,
        "policies": ["fp32"]})
    doc = ablate(sweep, tmp_path / "out", workers=1, progress=False, figures=False)
    assert json.loads((tmp_path / "out" / "s" / "sweep.json").read_text())["inputs"]
    assert len(calls) == 1
    ablate(sweep, tmp_path / "out", workers=1, progress=False, figures=False)  # resumes
    assert len(calls) == 1                                   # ... computing nothing
    save_file({"w": torch.randn(24, 12, generator=g)}, str(m))     # later weights
    before = snapshot(tmp_path / "out")
    with pytest.raises(ValueError, match="other weights"):
        ablate(sweep, tmp_path / "out", workers=1, progress=False, figures=False)
    assert snapshot(tmp_path / "out") == before
    assert len(calls) == 1 and len(doc["cells"]) == 1
