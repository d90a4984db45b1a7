"""``gatesim lab``: the sweep of cells, their diffs, the table, the claims.

:func:`run_lab` runs a :class:`LabConfig` into ``<out>/<name>/``:

1. ``base_bf16/`` and ``base_fp32/``: the starting model saved as Hugging Face folders in the
   two storage formats (the bf16 one is what every bf16 cell starts from, rounded to nearest;
   the fp32 one is where the fp32 master weights of ``bf16+master`` start, and what the
   precision-only null of such a cell adds its update to) and, for each storage format of
   the cells, ``base_masks_<fmt>.npz``: the principal (``Top_alpha(|W0^(k)|)``) and
   low-magnitude (``Bottom_alpha(|W0|)``) masks of every matrix at the diff's ``k``
   (docs/metrics.md, "Principal and low-magnitude weights") and its singular values;
2. the cells (:func:`gatesim.lab.train.run_cell`) through an executor
   (:mod:`gatesim.executor`), each result appended to ``cells.jsonl`` as it finishes
   (:class:`gatesim.executor.ResultStore`): a rerun skips the finished cells;
3. for each cell, ``gatesim diff`` of its base and tuned checkpoints into
   ``cells/<id>/diff/``, the fp32-ranked overlaps, the singular-value drift and the
   precision-only null, every metric's random baseline
   (:func:`gatesim.lab.analysis.analyze_cell`), through the same executor, stored in
   ``analysis.jsonl`` (an entry of an earlier analysis version is computed again);
4. consistency of update masks and updates across seeds, task families and RL recipes,
   the table, the claims and the figures (:mod:`gatesim.lab.report`).

**Default lab** (:func:`default_lab`; 911 CPU-seconds with the precision-only null, 751
before it; 6 min 41 s wall on the idle 2-core machine with 2 workers before the null, 15 min
37 s with it while another job held one of the two cores: BENCHMARKS.md, "Network lab"):
the bundled MiniLM (all 22.6M parameters of the encoder), families ``arithmetic`` (which of
two number words is larger/smaller; 588 training and 252 held-out prompts, 21 candidates)
and ``relations`` (antonyms both ways; 83 / 35 prompts, 59 candidates); GRPO and SFT on
both, 3 seeds, the default precision ``bf16+master``; REINFORCE (the second RL recipe) on
``arithmetic`` with the same seeds; pure ``bf16`` and ``fp32`` storage for GRPO and SFT on
``arithmetic``, seed 0. Each cell: 80 AdamW steps of 8 prompts (x 8 sampled answers for
RL), lr 5e-5, beta 0.5; 19 cells.

Why these numbers: the lab must finish on a laptop, and RLVR has to learn within it. Pilot
runs of GRPO (plain torch AdamW, fp32, seed 0, before any claim was computed), held-out
greedy accuracy:

* a first arithmetic family (number after / before / plus two / minus two): lr 1e-5, 60
  steps, 4% -> 4%; lr 1e-4, 100 steps, training prompts 5% -> 65% but held-out 4% -> 0%
  (memorized, no generalization), so it was replaced by the comparison family;
* ``arithmetic`` (comparison): lr 1e-4: 6% -> 82% in 100 steps; lr 3e-5: 6% -> 50% in 60
  steps, 64% in 100;
* ``relations``: lr 1e-4: 3% -> 20% in 60 steps, 37% in 100; lr 3e-5: 3% -> 9% in 60, 17%
  in 100; lr 5e-5: 3% -> 17% in 60, 26% in 80.

5e-5 with 80 steps is the smallest rate of those that moved both families clearly within
the budget. The per-step relative update of a weight is larger than in the papers' runs
(Adam moves each weight by up to about lr per step: lr / |w| ~ 1e-3 for the typical
|w| ~ 0.05 here, about half of bf16's half-ULP; RLVR on billion-parameter models at lr 1e-6
moves weights by ~1e-4 of themselves), which weakens Gate III compared with those runs:
read the sparsities with that in mind.

beta (the KL anchor, Gate I) is 0.5 so that the anchor binds. A pilot (GRPO,
``bf16+master``, seed 0, the settings above, both families;
``examples/lab_kl_pilot.py``) fixed its rule before it ran: the smallest beta of (0,
0.05, 0.1, 0.2, 0.5, 1) whose KL to the start (mean of the last 10 steps) is at most half
that of beta 0 on both families while the held-out gain stays at least half of beta 0's.
KL_end arithmetic / relations, held-out gain in points:

======  ===========  ===========  =========  =========
beta    KL arith.    KL rel.      gain ar.   gain rel.
======  ===========  ===========  =========  =========
0       2.10         2.93         +46.8      +17.1
0.05    2.26         2.94         +71.8      +20.0
0.1     2.07         2.42         +55.2      +28.6
0.2     1.26         1.95         +69.8      +28.6
0.5     0.21         0.31         +44.0      +14.3
1       0.049        0.049        +25.0      +17.1
======  ===========  ===========  =========  =========

At 0.05 (the value before) the penalty did not bind: KL ended where it ends without it.
0.5 is the first that cuts KL to 0.10x on both families, and RLVR still learns.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from gatesim.lab.train import CellConfig, storage_dtype
from gatesim.policy import PrecisionPolicy, canonical_name

__all__ = ["LabConfig", "default_lab", "tiny_lab", "run_lab", "LabError"]


class LabError(ValueError):
    """A lab cannot run as asked (a different lab in the output folder, bad settings)."""


@dataclasses.dataclass(frozen=True)
class LabConfig:
    """What a lab runs. ``cells()`` expands it into :class:`CellConfig` s."""

    name: str = "default"
    model: Optional[str] = None
    families: tuple = ("arithmetic", "relations")
    seeds: tuple = (0, 1, 2)
    methods: tuple = ("grpo", "sft")
    second_recipe: Optional[str] = "reinforce"
    extra_precisions: tuple = ("bf16", "fp32")
    extra_seeds: tuple = (0,)
    precision: str = "bf16+master"
    optimizer: str = "emulated"
    steps: int = 80
    lr: float = 5e-5
    batch: int = 8
    group: int = 8
    beta: float = 0.5
    clip: float = 0.2
    ppo_epochs: int = 1
    eval_every: int = 20
    layers: Optional[int] = None
    max_train: Optional[int] = None
    max_heldout: Optional[int] = None
    k: Optional[int] = None
    alpha: float = 0.05
    diff_figures: bool = True
    #: restricted arms (:mod:`gatesim.lab.arms`): each method x family x seed runs once per
    #: arm; () = the ordinary lab (every cell the full arm).
    arms: tuple = ()
    rank: int = 8
    mask_file: Optional[str] = None

    def __post_init__(self):
        from gatesim.lab.task import FAMILIES
        # policy names in the canonical spelling, as the cells write them (the report
        # matches the lab's precision against the cells')
        object.__setattr__(self, "precision", canonical_name(self.precision))
        object.__setattr__(self, "extra_precisions",
                           tuple(map(canonical_name, self.extra_precisions)))
        if not self.families or not self.seeds or not self.methods:
            raise LabError("a lab needs at least one family, seed and method")
        if len(set(self.seeds)) != len(self.seeds):
            raise LabError(f"seeds repeat: {self.seeds}")
        for s in (*self.seeds, *self.extra_seeds):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63:
                raise LabError(f"seeds must be ints in [0, 2**63), got {s!r}")
        for fam in self.families:
            if fam not in FAMILIES:
                raise LabError(f"families: unknown task family {fam!r}; choose from "
                               f"{FAMILIES}")
        from gatesim.lab.arms import check_arms
        try:
            check_arms(self.arms)
        except ValueError as exc:
            raise LabError(str(exc)) from None
        if ("mask" in self.arms) != (self.mask_file is not None):
            raise LabError("the 'mask' arm needs mask_file, and mask_file needs the 'mask' "
                           "arm")
        if self.mask_file is not None and not Path(self.mask_file).is_file():
            raise LabError(f"mask_file {self.mask_file!r} is not a file")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LabError(f"rank must be an int >= 1, got {self.rank!r}")

    def cell(self, **kw) -> CellConfig:
        base = dict(precision=self.precision, optimizer=self.optimizer, steps=self.steps,
                    lr=self.lr, batch=self.batch, group=self.group, beta=self.beta,
                    clip=self.clip, ppo_epochs=self.ppo_epochs, eval_every=self.eval_every,
                    model=self.model, layers=self.layers, max_train=self.max_train,
                    max_heldout=self.max_heldout)
        base.update(kw)
        if base.get("method") != "grpo":  # PPO-style passes and clipping are grpo's
            base["ppo_epochs"] = 1
        return CellConfig(**base)

    def cells(self) -> list:
        out = []
        for fam in self.families:
            for m in self.methods:
                for arm in (self.arms or ("full",)):
                    extra = {} if arm == "full" else dict(
                        arm=arm, rank=self.rank,
                        mask_file=self.mask_file if arm == "mask" else None)
                    for s in self.seeds:
                        out.append(self.cell(method=m, family=fam, seed=s, **extra))
        if self.second_recipe:
            for s in self.seeds:
                out.append(self.cell(method=self.second_recipe, family=self.families[0],
                                     seed=s))
        for prec in self.extra_precisions:
            for m in self.methods:
                for s in self.extra_seeds:
                    out.append(self.cell(method=m, family=self.families[0], seed=s,
                                         precision=prec))
        seen, uniq = set(), []
        for c in out:
            if c.id not in seen:
                seen.add(c.id)
                uniq.append(c)
        return uniq

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LabConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LabError(f"unknown lab settings {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def default_lab(**overrides) -> LabConfig:
    """The default lab (module docstring)."""
    return LabConfig(**overrides)


def tiny_lab(**overrides) -> LabConfig:
    """A lab of seconds for tests: one layer, a few steps, 2 seeds, both families, every
    precision."""
    kw = dict(name="tiny", seeds=(0, 1), steps=3, eval_every=2, layers=1, max_train=16,
              max_heldout=16, batch=4, group=4, extra_seeds=(0,), diff_figures=False)
    kw.update(overrides)
    return LabConfig(**kw)


def _bar(progress: bool, total: int, desc: str, done: int = 0):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, desc=desc, unit="cell")


def _input_checksums(config: LabConfig) -> dict:
    """Checksums of the files a lab reads (the model folder's weight files, the user's
    mask file): a lab is resumed only on the same bytes, not merely the same paths."""
    from gatesim.integrity import checksum_file
    from gatesim.lab.model import resolve_model_path
    folder = resolve_model_path(config.model)
    out = {f"model/{p.name}": checksum_file(p) for p in sorted(folder.iterdir())
           if p.is_file() and p.suffix in (".safetensors", ".bin")}
    if config.mask_file is not None:
        out["mask_file"] = checksum_file(config.mask_file)
    return out


def _prepare(out: Path, config: LabConfig, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "lab.json"
    doc = {"tool": "gatesim.lab", "version": 1, "config": config.to_dict(),
           "inputs": _input_checksums(config)}
    if cfg_path.exists() and not overwrite:
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LabError(f"{cfg_path} is not JSON ({exc}); delete the folder or pass "
                           "overwrite=True") from None
        if isinstance(old, dict) and isinstance(old.get("config"), dict):
            try:   # a lab.json written before a setting existed: its default fills in
                old["config"] = LabConfig.from_dict(old["config"]).to_dict()
            except (LabError, TypeError, ValueError):
                pass
            # a lab.json written before inputs were recorded: the folder names them
            old.setdefault("inputs", doc["inputs"])
        if old != doc:
            what = ("the model's weights or the mask file changed since it ran"
                    if isinstance(old, dict) and old.get("config") == doc["config"]
                    else f"{cfg_path} differs")
            raise LabError(f"{out} holds another lab ({what}); choose another "
                           "--out or pass --overwrite to start over")
        return
    if overwrite:
        for name in ("cells.jsonl", "analysis.jsonl", "results.json", "table.md"):
            (out / name).unlink(missing_ok=True)
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, cfg_path)


def start_format(precision: str) -> str:
    """The format of the weights a cell's fp32 update starts from: fp32 (the master
    weights of ``bf16+master``, the weights of ``fp32``) or bf16 (pure ``bf16``)."""
    policy = PrecisionPolicy.parse(precision)
    return "fp32" if policy.master or storage_dtype(precision) == "fp32" else "bf16"


def save_bases(config: LabConfig, out: Path, formats: Sequence[str],
               masks_for: Optional[Sequence[str]] = None) -> dict:
    """Writes ``base_<fmt>/`` (HF folders) for ``formats`` and ``base_masks_<fmt>.npz`` for
    ``masks_for`` (default: every format); returns ``{fmt: folder}``. Skips what exists (a
    resumed lab)."""
    import torch
    from gatesim.lab.analysis import save_base_masks
    from gatesim.lab.model import save_checkpoint
    from gatesim.lab.train import build_policy
    masks_for = set(formats if masks_for is None else masks_for)
    folders, policy = {}, None
    for fmt in formats:
        folder = out / f"base_{fmt}"
        folders[fmt] = folder
        masks = out / f"base_masks_{fmt}.npz"
        if (folder / "model.safetensors").is_file() and (fmt not in masks_for
                                                         or _masks_current(masks)):
            continue
        if not (folder / "model.safetensors").is_file():
            if policy is None:
                policy = build_policy(config.cell())
            dt = torch.bfloat16 if fmt == "bf16" else torch.float32
            tensors = {n: p.detach().to(dt).float()
                       for n, p in policy.model.named_parameters()}
            save_checkpoint(policy, folder, fmt, tensors=tensors)
        if fmt in masks_for:
            save_base_masks(folder, masks, k=config.k, alpha=config.alpha)
    return folders


def _masks_current(path: Path) -> bool:
    """A base mask file of this version (with the singular values ``sv::``)."""
    if not path.is_file():
        return False
    import numpy as np
    with np.load(path) as z:
        return any(f.startswith("sv::") for f in z.files)


def run_lab(config: Optional[LabConfig] = None, out="lab", *, executor=None,
            workers: int = 2, progress: bool = True, overwrite: bool = False,
            limit: Optional[int] = None) -> dict:
    """Runs (or resumes) a lab (module docstring) and returns the ``results.json`` document.

    Args:
        config: the lab (default :func:`default_lab`).
        out: output root; the lab writes ``<out>/<config.name>/``.
        executor: anything with :mod:`gatesim.executor`'s ``map`` (a Ray wrapper, say);
            default ``make_executor(workers, threads=1)``.
        workers: local worker processes when no executor is given (1: in this process).
        progress: tqdm bars.
        overwrite: discard an earlier lab in the folder instead of resuming it.
        limit: run at most this many new cells, then stop before the analysis (tests of
            resumability; rerunning completes the lab).
    """
    from gatesim.executor import ResultStore, make_executor
    from gatesim.lab.analysis import ANALYSIS_VERSION, analyze_cell
    from gatesim.lab.report import build_results
    from gatesim.lab.model import resolve_model_path
    config = config or default_lab()
    root = Path(out) / config.name
    # every input is checked before the first byte is written (cells, model folder, workers)
    cells = config.cells()
    resolve_model_path(config.model)
    ex = executor if executor is not None else make_executor(workers, threads=1)
    _prepare(root, config, overwrite)
    t0 = time.perf_counter()
    stores = sorted({storage_dtype(c.precision) for c in cells})
    starts = {start_format(c.precision) for c in cells}
    bases = save_bases(config, root, sorted(set(stores) | starts), masks_for=stores)
    store = ResultStore(root / "cells.jsonl")
    for c in cells:  # a stored result whose checkpoint is gone is run again
        if c.id in store and not (root / "cells" / c.id / "checkpoint" /
                                  "model.safetensors").is_file():
            store.discard(c.id)
    todo = [(c.id, {"cell": c.to_dict(), "out": str(root), "progress": False})
            for c in cells if c.id not in store]
    if limit is not None:
        todo = todo[:limit]
    bar = _bar(progress, len(cells), "lab cells", len(cells) - len(
        [c for c in cells if c.id not in store]))
    store.run(ex, _run_cell_task, todo, progress=(lambda k: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    if any(c.id not in store for c in cells):
        return {"complete": False, "cells_done": sum(c.id in store for c in cells),
                "cells": len(cells), "out": str(root)}
    astore = ResultStore(root / "analysis.jsonl")
    for c in cells:  # an analysis of an earlier version is computed again
        if c.id in astore and astore.get(c.id).get("version") != ANALYSIS_VERSION:
            astore.discard(c.id)
    ids = {c.id for c in cells}
    atodo = [(c.id, {"cell": c.to_dict(), "lab": str(root),
                     "base": str(bases[storage_dtype(c.precision)]),
                     "start": str(bases[start_format(c.precision)]),
                     "masks": str(root / f"base_masks_{storage_dtype(c.precision)}.npz"),
                     "k": config.k, "alpha": config.alpha, "figures": config.diff_figures,
                     "ranked_update": _ranked_update(root, c, ids)})
             for c in cells if c.id not in astore]
    bar = _bar(progress, len(cells), "diffs", len(cells) - len(atodo))
    astore.run(ex, analyze_cell, atodo, progress=(lambda k: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    results = {c.id: store.get(c.id) for c in cells}
    analysis = {c.id: astore.get(c.id) for c in cells}
    doc = build_results(config, root, cells, results, analysis, progress=progress)
    doc["seconds"] = time.perf_counter() - t0
    return doc


def _ranked_update(root: Path, cell: CellConfig, ids: set) -> Optional[str]:
    """The fp32 update whose |dW| ranking is compared with ``cell``'s stored mask: the
    cell's own, except for pure bf16 (no fp32 record): the fp32 cell of the same method,
    family and seed, if the lab has it."""
    if cell.precision != "bf16":
        return None
    twin = dataclasses.replace(cell, precision="fp32").id
    return str(root / "cells" / twin / "update_fp32.safetensors") if twin in ids else None


def _run_cell_task(payload: dict) -> dict:
    from gatesim.lab.train import run_cell
    return run_cell(payload)
