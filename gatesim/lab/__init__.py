"""The network lab: RLVR against SFT on a whole pretrained transformer (``gatesim lab``).

::

    from gatesim.lab import run_lab, default_lab
    doc = run_lab(default_lab(), out="results")     # results/default/{table.md,results.json}

Modules: :mod:`~gatesim.lab.task` (tasks with an exact reward), :mod:`~gatesim.lab.model`
(transformers loader, candidate policy, HF checkpoints), :mod:`~gatesim.lab.train` (one cell:
RLVR or SFT under a precision policy), :mod:`~gatesim.lab.analysis` (``gatesim diff`` of each
cell, fp32-ranked overlaps, consistency), :mod:`~gatesim.lab.report` (results.json schema,
table.md, figures), :mod:`~gatesim.lab.claims` (verdicts), :mod:`~gatesim.lab.arms` (restricted arms:
masks, LoRA, PiSSA; ``run_lab(arms_lab())``), :mod:`~gatesim.lab.run` (the
sweep, its defaults and why), :mod:`~gatesim.lab.cli` (``gatesim lab``).
"""
from gatesim.lab.arms import arms_lab, tiny_arms_lab
from gatesim.lab.run import LabConfig, LabError, default_lab, run_lab, tiny_lab
from gatesim.lab.train import CellConfig, run_cell

__all__ = ["LabConfig", "LabError", "default_lab", "tiny_lab", "run_lab", "CellConfig",
           "run_cell", "arms_lab", "tiny_arms_lab"]
