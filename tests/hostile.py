"""Shared pieces of the hostile-input suite (``tests/test_hostile_*.py``, one file per class
of issue 22): small inputs, a CLI runner that captures stderr, and the "refused cleanly"
assertion every command must pass: exit status 2, one line on stderr naming the problem,
no traceback, and nothing written."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from gatesim.diff.synthetic import save_sharded


def planted_pair(root: Path, n: int = 6, size: int = 48, seed: int = 0,
                 scale: float = 1.03, shard_bytes: tuple = (20_000, 15_000)
                 ) -> tuple[Path, Path]:
    """A small bf16 base/tuned pair (sharded, with an index) with planted updates: a third
    of each matrix's entries scaled by ``scale``, every LayerNorm weight by 1.01. Shared by
    the diff tests (hostile inputs, resume, Ray)."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i in range(n):
        w = (0.02 * torch.randn(size, size, generator=g)).to(torch.bfloat16)
        t = w.clone()
        idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 3]
        t.view(-1)[idx] = (t.view(-1)[idx].float() * scale).to(torch.bfloat16)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = t
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(size)
        tuned[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(size) * 1.01
    save_sharded(base, root / "base", shard_bytes=shard_bytes[0])
    save_sharded(tuned, root / "tuned", shard_bytes=shard_bytes[1])
    return root / "base", root / "tuned"


def run_cli(argv: list) -> tuple[int, str, str]:
    """``gatesim ARGV`` in this process: (exit status, stdout, stderr)."""
    from gatesim.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:          # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (to prove nothing was written)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(argv: list, watch: Path, *names: str) -> str:
    """The command exits 2 with one stderr line that names each of ``names``, and
    ``watch`` (an output folder) is exactly as it was."""
    before = snapshot(watch)
    existed = watch.exists()
    code, _out, err = run_cli(argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], f"{n!r} not named in: {lines[0]}"
    assert watch.exists() == existed and snapshot(watch) == before, \
        f"{watch} changed although the command was refused"
    return lines[0]


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(")") + 2:].split()[0] != "Z"
