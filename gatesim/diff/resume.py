"""The output folder of a diff: what identifies a run (``config.json``), whether a folder
may receive it, and the proof that stored rows came from the same bytes.

:func:`check_out` only reads; :func:`verify_stored` reads the inputs again (the content
checksums of every stored paired row, through the executor); :func:`init_out` is the
first write of a run. :func:`gatesim.diff.core.diff` calls them in that order, after every
other check, so a refused run leaves the folder as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from gatesim.diff.errors import ResumeError
from gatesim.executor import Executor

__all__ = ["make_config", "check_out", "init_out", "verify_stored", "CONFIG_VERSION"]

_OUR_FILES = ("config.json", "rows.jsonl", "rows.csv", "timings.jsonl", "timings.csv",
              "summary_module.csv", "summary_layer.csv", "summary_model.csv", "report.md",
              "fig_sparsity.png", "fig_ulp.png", "fig_angles.png")
#: Version of ``config.json``; 2: rows carry content checksums, paths are part of the key.
CONFIG_VERSION = 2


def make_config(base, tuned, rules, o) -> dict:
    """What identifies a diff's inputs and settings (``config.json``): both checkpoints'
    absolute paths, every file's name, size and header hash, the map and the options.
    The bytes of each tensor are tied to its row by the row's checksums."""
    return {"tool": "gatesim.diff", "version": CONFIG_VERSION,
            "base": {"path": base.path, "kind": base.kind, "files": base.fingerprint},
            "tuned": {"path": tuned.path, "kind": tuned.kind, "files": tuned.fingerprint},
            "map": [list(r) for r in rules], "options": dataclasses.asdict(o)}


def _config_differences(old: dict, new: dict) -> list:
    """The top-level parts (``base``, ``tuned``, ``map``, ``options``, ...) that differ."""
    a, b = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_out(out: Path, config: dict, overwrite: bool) -> bool:
    """Read-only: may ``out`` receive this diff? Returns True when it holds rows of the
    same inputs and settings to resume from (their bytes are verified later)."""
    cfg = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ResumeError(f"{out}: exists and is not a folder")
    if overwrite:
        return False
    if cfg.exists():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ResumeError(f"{cfg}: unreadable; use another output folder or "
                              "overwrite=True (--overwrite)") from None
        if not isinstance(old, dict) or old.get("version") != CONFIG_VERSION:
            raise ResumeError(f"{cfg}: written by another gatesim version (rows without "
                              "content checksums cannot be verified); use another output "
                              "folder or overwrite=True (--overwrite)")
        diffs = _config_differences(old, config)
        if diffs:
            raise ResumeError(f"{out}: holds a diff of other inputs or settings (config.json "
                              f"differs in: {', '.join(diffs)}); use another output folder "
                              "or overwrite=True (--overwrite)")
        return True
    if (out / "rows.jsonl").exists():
        raise ResumeError(f"{out}: has rows.jsonl but no config.json; use another output "
                          "folder or overwrite=True (--overwrite)")
    return False


def init_out(out: Path, config: dict, overwrite: bool) -> None:
    """The first write of a diff: clears our files (``overwrite``) and writes config.json."""
    if overwrite and out.is_dir():
        for name in _OUR_FILES:
            p = out / name
            if p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.json"
    tmp = cfg.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=1), encoding="utf-8")
    os.replace(tmp, cfg)


_IDENTITY = ("name", "base_name", "tuned_name", "status", "shape", "dtype", "tuned_dtype")


def verify_stored(out: Path, stored: dict, by_key: dict, ex: Executor,
                   progress: bool) -> None:
    """Every stored row must describe the same pair as now (names, status, shape, dtype)
    and, for a paired row, have been computed from the same bytes: the current tensors'
    checksums (read again now) must equal the row's. Raises ResumeError otherwise."""
    for key, row in stored.items():
        task = by_key.get(key)
        if task is None:
            raise ResumeError(f"{out}: rows.jsonl holds tensor {key!r}, which this diff does "
                              "not have; use another output folder or --overwrite")
        fresh = {"name": key, "base_name": task.base.name if task.base else None,
                "tuned_name": task.tuned.name if task.tuned else None,
                "status": task.status,
                "shape": json.dumps(list((task.base or task.tuned).shape)),
                "dtype": (task.base or task.tuned).dtype,
                "tuned_dtype": task.tuned.dtype if task.tuned else None}
        for c in _IDENTITY:
            if row.get(c) != fresh[c]:
                raise ResumeError(f"{out}: the stored row of {key!r} has {c}={row.get(c)!r}, "
                                  f"the inputs now give {fresh[c]!r}; use another output "
                                  "folder or --overwrite")
        if task.status == "paired" and not (row.get("base_checksum")
                                             and row.get("tuned_checksum")):
            raise ResumeError(f"{out}: the stored row of {key!r} has no content checksum; "
                              "use another output folder or --overwrite")
    from gatesim.diff.core import tensor_checksums
    todo = [(k, by_key[k]) for k in stored if by_key[k].status == "paired"]
    if not todo:
        return
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="verify ", unit="tensor", file=sys.stderr,
                   dynamic_ncols=True)
    stream = ex.map(tensor_checksums, todo)
    try:
        for key, (cb, ct) in stream:
            row, task = stored[key], by_key[key]
            for side, now, ref in (("base", cb, task.base), ("tuned", ct, task.tuned)):
                was = row[f"{side}_checksum"]
                if now != was:
                    raise ResumeError(
                        f"{out}: the stored row of {key!r} was computed from other bytes: "
                        f"{ref.path} tensor {ref.name!r} now has checksum {now}, the row "
                        f"{was} (the checkpoint changed since); use another output folder "
                        "or --overwrite")
            if bar is not None:
                bar.update(1)
    finally:
        if hasattr(stream, "close"):      # a refusal stops the executor's workers now
            stream.close()
        if bar is not None:
            bar.close()
