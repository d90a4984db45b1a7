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
from gatesim.policy import canonical_name
from gatesim.sim.policies import DEFAULT_POLICIES, sim_policy
from gatesim.sim.validate import spell_none

__all__ = ["CellConfig", "SweepConfig", "ALGOS", "GEOMETRIES", "DATASETS", "load_sweep",
           "demo_sweep", "paper_sweep", "mini_sweep", "DEMO_VARIANTS", "bundled_sweeps"]

ALGOS = ("grpo", "reinforce", "sft")
GEOMETRIES = ("real", "rotated", "random")
#: Task distributions ("datasets", see :mod:`gatesim.sim.task`): context distribution and
#: target function differ between them.
DATASETS = ("gauss_random", "aniso_teacher", "embed_teacher")


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """One simulation run.

    Task (see :mod:`gatesim.sim.task`): the policy's logits are ``W h`` for context vectors
    ``h`` (``n_contexts`` of them, fixed by ``task_seed`` and ``dataset``); each context has
    ``n_targets`` target outputs (a fixed function of the context, drawn with
    ``task_seed``); reward 1 if the sampled output is a target.

    Attributes:
        matrix / path / rows / row_offset: the weight matrix: tensor ``matrix`` of the
            safetensors file ``path`` (None: the bundled MiniLM), rows
            ``row_offset .. row_offset + rows - 1`` (default: 256 rows from 1996, BERT's
            most frequent whole words; rows below 999 are [unused] placeholders).
        dataset: one of :data:`DATASETS`, the context distribution and target function.
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
        null_policies: policies the precision-only null stream is replayed through (the
            run's own per-step updates with their entries moved by one fixed random
            permutation and sign pattern; see :mod:`gatesim.sim.run`); empty: no null.
        k, alpha: rank of the principal subspaces/angles and mask fraction of the metrics.
        eval_every: steps between trajectory points (reward, KL, principal angle).
        mask, mask_density: restrict the run's updates to a mask of ``W0``
            (:func:`gatesim.restrict.build_mask`: ``principal``, ``low``, ``safe`` or
            ``random``; None: every entry trains) of density ``mask_density`` (None: ``alpha``),
            principal part at rank ``k``; applied by the optimizer's ``set_mask`` (masked-out
            entries are never updated; the replayed stream is zero there).
    """

    matrix: str = "embeddings.word_embeddings.weight"
    path: Optional[str] = None
    rows: int = 256
    row_offset: int = 1996
    geometry: str = "real"
    dataset: str = "gauss_random"
    n_contexts: int = 64
    n_targets: int = 8
    task_seed: int = 0
    algo: str = "grpo"
    beta: float = 0.05
    clip: Optional[float] = 0.2
    inner_steps: int = 1
    group: int = 8
    batch: int = 32
    steps: int = 400
    norm_matched: bool = False
    step_norm: float = 1e-2
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    train_policy: str = "fp32"
    policies: tuple = DEFAULT_POLICIES
    null_policies: tuple = ("bf16", "bf16+master")
    seed: int = 0
    k: int = 16
    alpha: float = 0.05
    eval_every: int = 50
    mask: Optional[str] = None
    mask_density: Optional[float] = None

    def __post_init__(self) -> None:
        check_fields(self)     # seed = true, clip = "0.2", steps = 1.5 ...: refused
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        # policy names in their canonical spelling (gatesim.policy): results key by them
        object.__setattr__(self, "policies", tuple(map(canonical_name, self.policies)))
        object.__setattr__(self, "null_policies",
                           tuple(map(canonical_name, self.null_policies)))
        object.__setattr__(self, "train_policy", canonical_name(self.train_policy))
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
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
        sim_policy(self.train_policy)
        if not self.policies:
            raise ValueError("policies must name at least one precision policy")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies has duplicates: {self.policies}")
        for p in self.policies:
            sim_policy(p)
        if len(set(self.null_policies)) != len(self.null_policies):
            raise ValueError(f"null_policies has duplicates: {self.null_policies}")
        for p in self.null_policies:
            sim_policy(p)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        from gatesim.restrict import MASK_KINDS
        if self.mask is not None and self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS} or None, got {self.mask!r}")
        if self.mask_density is not None:
            if self.mask is None:
                raise ValueError("mask_density needs a mask")
            if isinstance(self.mask_density, bool) or not isinstance(
                    self.mask_density, (int, float)) or not 0 < self.mask_density <= 1:
                raise ValueError(f"mask_density must be in (0, 1], got {self.mask_density!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["policies"] = list(self.policies)
        d["null_policies"] = list(self.null_policies)
        # an unrestricted cell is written as before the restriction fields existed, so the
        # configs, streams and results of earlier sweeps keep their bytes
        for key in ("mask", "mask_density"):
            if d[key] is None:
                del d[key]
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


def bundled_sweeps() -> dict:
    """Name -> path of the sweep files shipped in ``gatesim/sim/sweeps/``."""
    d = Path(__file__).parent / "sweeps"
    return {p.stem: p for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


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


#: The arms of the default sweep (the anchors of :mod:`gatesim.sim.analysis` are rl_kl,
#: rl_nokl and sft): RL with the explicit KL penalty only (beta 1: the smallest beta of the
#: sweep 0, 0.01, 0.05, 0.2, 1 at which the anchor binds, see README), RL with neither
#: penalty nor clipping (only the implicit leash of on-policy sampling), RL with PPO-style
#: clipping and batch reuse (the implicit leash of clipping), SFT.
DEMO_VARIANTS = {
    "rl_kl": {"algo": "grpo", "beta": 1.0, "clip": None},
    "rl_nokl": {"algo": "grpo", "beta": 0.0, "clip": None},
    "rl_clip": {"algo": "grpo", "beta": 0.0, "clip": 0.2, "inner_steps": 2},
    "sft": {"algo": "sft", "beta": 0.0, "clip": None},
}


def _variants(main: dict, geometries: dict, extra: dict) -> dict:
    """Variants: the main arms, ``<arm>@<geometry>`` for the listed geometries, and
    ``extra`` (name -> (arm, overrides))."""
    out = {name: dict(v) for name, v in main.items()}
    for name, geos in geometries.items():
        for g in geos:
            out[f"{name}@{g}"] = dict(main[name], geometry=g)
    for name, (arm, over) in extra.items():
        out[name] = dict(main[arm], **over)
    return out


#: policies of the demo (the paper sweep adds fp16 and the stochastic-rounding master)
DEMO_POLICIES = ["fp32", "bf16", "bf16_sr", "bf16+master"]


def demo_sweep(seeds: tuple = (0, 1, 2)) -> SweepConfig:
    """The bundled default (``gatesim demo``), 3 seeds, under 5 minutes on 2 cores:
    the four arms on the real weights, rl_kl also on the rotated geometry, two more
    datasets (data consistency; rl_clip against rl_nokl: a recipe pair), and lr 1e-6 for
    RL and SFT (with the default 1e-4: the Gate III response over two
    decades; rl_kl and rl_nokl give the beta sweep's ends, 1 and 0). ``gatesim ablate
    paper`` runs the full design with 5 seeds."""
    extra = {"rl_aniso_teacher": ("rl_nokl", {"dataset": "aniso_teacher"}),
             "rl_embed_teacher": ("rl_nokl", {"dataset": "embed_teacher"}),
             "rl_lr1e-6": ("rl_nokl", {"lr": 1e-6}),
             "sft_lr1e-6": ("sft", {"lr": 1e-6})}
    return SweepConfig(name="demo", base={"policies": DEMO_POLICIES,
                                          "null_policies": ["bf16+master"]},
                       variants=_variants(DEMO_VARIANTS, {"rl_kl": ("rotated",)}, extra),
                       grid={"seed": list(seeds)})


def paper_sweep(seeds: tuple = (0, 1, 2, 3, 4)) -> SweepConfig:
    """``gatesim ablate paper``: every item of the design with 5 seeds (the bundled
    ``gatesim/sim/sweeps/paper.json`` is this config)."""
    extra = {"rl_kl_matched": ("rl_kl", {"norm_matched": True}),  # step_norm 1e-2: between
             # rl_kl's (0.009) and sft's (0.011) own mean per-step norms
             "sft_matched": ("sft", {"norm_matched": True}),
             "reinforce": ("rl_nokl", {"algo": "reinforce"}),
             "rl_aniso_teacher": ("rl_nokl", {"dataset": "aniso_teacher"}),
             "rl_embed_teacher": ("rl_nokl", {"dataset": "embed_teacher"})}
    for b in (0.01, 0.05, 0.2):
        extra[f"rl_beta{b:g}"] = ("rl_kl", {"beta": b})
    for lr in (1e-6, 1e-5, 1e-3):
        extra[f"rl_lr{lr:g}"] = ("rl_nokl", {"lr": lr})
        extra[f"sft_lr{lr:g}"] = ("sft", {"lr": lr})
    return SweepConfig(name="paper",
                       base={"policies": ["fp32", "bf16", "bf16_sr", "fp16", "bf16+master"],
                             "null_policies": ["bf16", "bf16+master"]},
                       variants=_variants(DEMO_VARIANTS, {"rl_kl": ("rotated", "random")},
                                          extra),
                       grid={"seed": list(seeds)})


def mini_sweep(name: str = "mini") -> SweepConfig:
    """A seconds-long sweep for tests and CI: the anchors rl_kl, rl_nokl, sft, a rotated
    rl_kl and REINFORCE, 2 seeds, on a 96 x 384 slice."""
    small = {"rows": 96, "n_contexts": 16, "n_targets": 4, "batch": 8, "group": 4,
             "steps": 12, "eval_every": 6, "k": 4,
             "policies": ["fp32", "bf16", "bf16_sr", "bf16+master"],
             "null_policies": ["bf16+master"]}
    main = {k: DEMO_VARIANTS[k] for k in ("rl_kl", "rl_nokl", "sft")}
    return SweepConfig(name=name, base=small,
                       variants=_variants(main, {"rl_kl": ("rotated",)},
                                          {"reinforce": ("rl_nokl", {"algo": "reinforce"})}),
                       grid={"seed": [0, 1]})
