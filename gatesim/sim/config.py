"""Configuration of one gate-simulation cell (:class:`CellConfig`) and of a sweep
(:class:`SweepConfig`): plain dataclasses, JSON-serializable, validated on construction.

Every field has a documented default; a sweep is a base cell config, named variants
(overrides, e.g. ``{"algo": "grpo", "beta": 0.05, "clip": 0.2}``) and a grid of axes whose
Cartesian product gives the cells. A cell is a pure function of its config.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Optional, Union

from gatesim.checks import check_fields
from gatesim.sim.policies import DEFAULT_POLICIES, parse_policy
from gatesim.sim.validate import spell_none

__all__ = ["CellConfig", "SweepConfig", "ALGOS", "GEOMETRIES", "load_sweep", "demo_sweep",
           "mini_sweep"]

ALGOS = ("grpo", "reinforce", "sft")
GEOMETRIES = ("real", "rotated", "random")


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """One simulation run.

    Task (see :mod:`gatesim.sim.task`): the policy's logits are ``W h`` for context vectors
    ``h`` (``n_contexts`` of them, N(0, I), fixed by ``task_seed``); each context has
    ``n_targets`` target outputs (a fixed function of the context, drawn with
    ``task_seed``); reward 1 if the sampled output is a target.

    Attributes:
        matrix / path / rows / row_offset: the weight matrix: tensor ``matrix`` of the
            safetensors file ``path`` (None: the bundled MiniLM), rows
            ``row_offset .. row_offset + rows - 1`` (default: 512 rows from 1996, BERT's
            most frequent whole words; rows below 999 are [unused] placeholders).
        geometry: ``real`` (the matrix), ``rotated`` (``W R`` with a random orthogonal R,
            contexts ``R^T h``: the same policy in another coordinate basis) or ``random``
            (Gaussian, same shape and Frobenius norm).
        algo: ``grpo`` (group-normalized advantages), ``reinforce`` (group-mean baseline)
            or ``sft`` (cross-entropy on a correct output).
        beta: KL penalty to the reference (initial) policy, exact KL over all outputs.
        clip: PPO ratio clipping epsilon (None: no clipping); with ``inner_steps`` > 1
            each batch is reused and the clipping bites.
        norm_matched: rescale every step's update to Frobenius norm ``step_norm`` (equal
            per-step norms for RL and SFT: step size separated from direction).
        lr, betas, eps, weight_decay: the emulated AdamW.
        train_policy: precision policy the run itself trains under (name, see
            :mod:`gatesim.sim.policies`).
        policies: Gate III policies the run's update stream is replayed through, in
            lockstep (each keeps its own weights).
        k, alpha: rank of the principal subspaces/angles and mask fraction of the metrics.
        eval_every: steps between trajectory points (reward, KL, principal angle).
    """

    matrix: str = "embeddings.word_embeddings.weight"
    path: Optional[str] = None
    rows: int = 512
    row_offset: int = 1996
    geometry: str = "real"
    n_contexts: int = 256
    n_targets: int = 16
    task_seed: int = 0
    algo: str = "grpo"
    beta: float = 0.05
    clip: Optional[float] = 0.2
    inner_steps: int = 1
    group: int = 8
    batch: int = 32
    steps: int = 200
    norm_matched: bool = False
    step_norm: float = 1e-3
    lr: float = 1e-5
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    train_policy: str = "fp32"
    policies: tuple = DEFAULT_POLICIES
    seed: int = 0
    k: int = 16
    alpha: float = 0.05
    eval_every: int = 20

    def __post_init__(self) -> None:
        check_fields(self)     # seed = true, clip = "0.2", steps = 1.5 ...: refused
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "policies", tuple(self.policies))
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for name in ("rows", "n_contexts", "n_targets", "group", "batch", "steps",
                     "inner_steps", "k", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.row_offset < 0:
            raise ValueError(f"row_offset must be >= 0, got {self.row_offset}")
        if self.n_targets >= self.rows:
            raise ValueError(f"n_targets ({self.n_targets}) must be below rows ({self.rows})")
        if self.algo != "sft" and self.group < 2:
            raise ValueError("group must be >= 2 for group baselines")
        for name in ("beta", "lr", "eps", "weight_decay", "step_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.clip is not None and not 0 < self.clip < 1:
            raise ValueError(f"clip must be in (0, 1) or None, got {self.clip!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        parse_policy(self.train_policy)
        if not self.policies:
            raise ValueError("policies must name at least one precision policy")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies has duplicates: {self.policies}")
        for p in self.policies:
            parse_policy(p)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["policies"] = list(self.policies)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown cell config field(s): {', '.join(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A factorial sweep: ``base`` fields, named ``variants`` (each a dict of overrides;
    empty: one variant "base"), and ``grid`` axes (field -> list of values). Cells are
    variants x grid, in a fixed order; a cell's key names its variant and grid values.
    ``seeds`` are the grid's ``seed`` axis by convention (cross-seed Jaccard pairs them)."""

    name: str = "sweep"
    base: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)
    grid: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name \
                or self.name.startswith("."):
            raise ValueError(f"sweep name must be a plain non-empty file name, got {self.name!r}")
        for axis, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"grid axis {axis!r} must be a non-empty list")
        self.cells()  # validates every cell config

    def cells(self) -> list[tuple[str, CellConfig]]:
        variants = self.variants or {"base": {}}
        axes = sorted(self.grid)
        out = []
        for vname, overrides in variants.items():
            if not isinstance(overrides, dict):
                raise ValueError(f"variant {vname!r} must be a dict of overrides")
            for values in itertools.product(*(self.grid[a] for a in axes)):
                d = dict(self.base)
                d.update(overrides)
                d.update(zip(axes, values))
                key = ",".join([f"variant={vname}"] + [f"{a}={v}" for a, v in zip(axes, values)])
                try:
                    cfg = CellConfig.from_dict(d)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"cell {key}: {exc}") from exc
                out.append((key, cfg))
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "variants": self.variants,
                "grid": self.grid}


def load_sweep(path: Union[str, os.PathLike]) -> SweepConfig:
    """A sweep from a JSON or TOML file (keys ``name``, ``base``, ``variants``, ``grid``).
    An optional field (``clip``, ``path``) set to the string ``"none"`` is None (TOML has
    no null; :func:`gatesim.sim.validate.spell_none`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no sweep config at {p}")
    text = p.read_text(encoding="utf-8")
    try:
        d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a sweep config is a mapping")
    unknown = sorted(set(d) - {"name", "base", "variants", "grid"})
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {', '.join(unknown)}")
    return SweepConfig(**spell_none(d))     # TOML has no null: clip = "none"


#: Gate I variants of the default sweep: RL with the KL anchor and clipping, RL without
#: either, SFT; and RL / SFT with per-step update norms matched.
DEMO_VARIANTS = {
    "rl_kl": {"algo": "grpo", "beta": 0.05, "clip": 0.2},
    "rl_nokl": {"algo": "grpo", "beta": 0.0, "clip": None},
    "sft": {"algo": "sft", "beta": 0.0, "clip": None},
    "rl_kl_matched": {"algo": "grpo", "beta": 0.05, "clip": 0.2, "norm_matched": True},
    "sft_matched": {"algo": "sft", "beta": 0.0, "clip": None, "norm_matched": True},
}


def demo_sweep() -> SweepConfig:
    """The bundled default (``gatesim demo``): 5 Gate I variants x 3 Gate II geometries x
    2 seeds = 30 cells of 150 steps on 512 MiniLM word-embedding rows, each replayed
    through the 7 Gate III policies."""
    return SweepConfig(name="demo", base={"steps": 150, "eval_every": 25},
                       variants=DEMO_VARIANTS,
                       grid={"geometry": list(GEOMETRIES), "seed": [0, 1]})


def mini_sweep(name: str = "mini") -> SweepConfig:
    """A seconds-long sweep for tests and CI: 2 variants x 2 geometries x 2 seeds."""
    return SweepConfig(name=name,
                       base={"rows": 96, "n_contexts": 32, "n_targets": 4, "batch": 8,
                             "group": 4, "steps": 12, "eval_every": 6, "k": 4,
                             "policies": ["fp32", "bf16", "bf16_sr", "bf16+master"]},
                       variants={"rl_kl": DEMO_VARIANTS["rl_kl"], "sft": DEMO_VARIANTS["sft"]},
                       grid={"geometry": ["real", "rotated"], "seed": [0, 1]})
