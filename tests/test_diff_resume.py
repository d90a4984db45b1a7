"""An interrupted diff resumes from the rows already written and gives the same rows."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import gatesim.diff as gd
from hostile import planted_pair



def _pair(root):
    return planted_pair(root, n=16, size=96, shard_bytes=(100_000, 70_000))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    b, t = _pair(root)
    res = gd.diff(b, t, root / "fresh", progress=False, figures=False)
    return root, b, t, res


def _same(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def _jsonl_keys(path):
    return [json.loads(x)["key"] for x in path.read_text().splitlines() if x.strip()]


def test_partial_then_resume(fresh, tmp_path):
    root, b, t, full = fresh
    out = tmp_path / "d"
    part = gd.diff(b, t, out, progress=False, figures=False, limit=7)
    assert len(part.rows) == 7 and part.summary == {}
    assert not (out / "report.md").exists()
    assert len(pd.read_csv(out / "rows.csv")) == 7
    res = gd.diff(b, t, out, progress=False, figures=False)
    assert res.resumed == 7
    _same(res.rows, full.rows)
    keys = _jsonl_keys(out / "rows.jsonl")
    assert len(keys) == len(set(keys)) == len(full.rows)
    _same(pd.read_csv(out / "rows.csv"), pd.read_csv(root / "fresh" / "rows.csv"))
    assert (out / "report.md").exists()


def test_torn_last_line(fresh, tmp_path):
    root, b, t, full = fresh
    out = tmp_path / "d"
    gd.diff(b, t, out, progress=False, figures=False, limit=5)
    with open(out / "rows.jsonl", "a") as f:
        f.write('{"key": "model.layers.9.mlp.up_proj.weight", "result": {"name": "mod')
    res = gd.diff(b, t, out, progress=False, figures=False)
    assert res.resumed == 5
    _same(res.rows, full.rows)


def test_killed_run_resumes(fresh, tmp_path):
    """SIGKILL a CLI run once some rows are stored; rerunning completes it identically.
    The run is slowed (0.2 s per tensor) so that the kill lands before it ends, and the
    test asserts it did: a kill that misses must not pass as a resume."""
    root, b, t, full = fresh
    out = tmp_path / "killed"
    code = ("import sys, time; import gatesim.diff.core as c; f = c.diff_tensor; "
            "c.diff_tensor = lambda task: (time.sleep(0.2), f(task))[1]; "
            "from gatesim.diff.cli import main; sys.exit(main())")
    args = [sys.executable, "-c", code, str(b), str(t), "--out", str(out), "--no-progress",
            "--no-figures", "--svd", "full"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 120
    try:
        while time.time() < deadline and p.poll() is None:
            f = out / "rows.jsonl"
            if f.exists() and len(f.read_text().splitlines()) >= 3:
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if not killed:
            p.kill()
        p.wait(timeout=60)
    assert killed and p.returncode == -signal.SIGKILL, "the kill did not happen"
    done_before = len(_jsonl_keys(out / "rows.jsonl"))
    assert 3 <= done_before < len(full.rows)
    assert not (out / "report.md").exists()              # it was cut off mid-run
    res = gd.diff(b, t, out, progress=False, figures=False, svd="full")
    assert res.resumed == done_before
    ref = gd.diff(b, t, svd="full", progress=False)          # one uninterrupted run
    _same(res.rows, ref.rows)


def test_other_settings_or_inputs_refused(fresh, tmp_path):
    root, b, t, _ = fresh
    out = tmp_path / "d"
    gd.diff(b, t, out, progress=False, figures=False, limit=3)
    before = (out / "rows.jsonl").read_text()
    with pytest.raises(gd.ResumeError, match="other inputs or settings"):
        gd.diff(b, t, out, k=4, progress=False)
    with pytest.raises(gd.ResumeError):
        gd.diff(b, b, out, progress=False)
    assert (out / "rows.jsonl").read_text() == before
    res = gd.diff(b, t, out, k=4, overwrite=True, progress=False, figures=False)
    assert res.resumed == 0 and (res.rows[res.rows["spectral"] == "ok"]["k"] == 4).all()
