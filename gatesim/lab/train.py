"""One lab cell: fine-tune the whole model with RLVR or SFT under one precision policy.

:func:`run_cell` is a pure function of its payload (a :class:`CellConfig` as a dict and the
output folder), so any :mod:`gatesim.executor` can run it. It writes ``<out>/cells/<id>/``:

* ``checkpoint/``: the tuned model as a Hugging Face folder (``model.safetensors`` in the
  stored format, bf16 for the bf16 policies, + ``config.json`` + tokenizer);
* ``update_fp32.safetensors``: the fp32 accumulated update ``Delta W`` of every 2-D
  parameter: master minus the fp32 starting weights for ``bf16+master``, stored minus
  starting weights otherwise (the update before bf16 storage rounds it away);
* ``steps.jsonl``: one line per optimizer step: ``step``, ``reward`` (mean sampled reward of
  the batch; SFT samples too, only to log it), ``kl`` (exact KL of the candidate policy to
  the reference, batch mean), ``loss``, ``absorbed`` ({module kind: fraction of non-zero
  intended updates that storage absorbed at this step}), ``changed`` ({kind: entries whose
  stored bits changed at this step});

and returns the cell's result (:data:`RESULT_KEYS`).

**Methods.** The policy is the categorical distribution over the task's candidate tokens at
the answer position (:mod:`gatesim.lab.model`). Per step, ``batch`` training prompts:

* ``"grpo"``: ``group`` answers sampled per prompt; reward 1 for the exact answer
  (:func:`gatesim.lab.task.reward`); advantages normalized within each group,
  ``A = (r - mean) / (std + 1e-6)`` (population std; a group of equal rewards gets 0);
  PPO-style clipped surrogate ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` with
  ``rho = pi / pi_old`` over ``ppo_epochs`` passes of the same samples (with one pass
  ``rho = 1`` and clipping is inactive, as in on-policy GRPO); plus ``beta * KL(pi || pi_ref)``,
  the exact KL over the candidates (the reference is the starting model, frozen).
* ``"reinforce"``: the same with ``A = r - mean`` (group-mean baseline, no std
  normalization) and no clipping: the second RL recipe.
* ``"sft"``: cross-entropy of the correct candidate on the same prompts.

**Precision** (``precision``, a policy name of :mod:`gatesim.policy`; the older spelling
``bf16_master`` is read as ``bf16+master``): ``"bf16+master"`` (default; bf16 parameters
from fp32 master weights, as mixed-precision trainers store ``bf16(master)``), ``"bf16"``
(pure bf16 storage,
round to nearest) or ``"fp32"``. With ``optimizer="emulated"`` (default) the step is
:class:`gatesim.optim.EmulatedAdamW` under the matching :class:`~gatesim.policy.PrecisionPolicy`:
parameters stay float32 tensors holding values on the storage grid, so the forward and
backward passes run in fp32 on exactly the stored weights (compute precision is not what
is studied here; storage is). With ``optimizer="torch"``, ``torch.optim.AdamW`` steps real
bf16 (or fp32) parameters and :func:`gatesim.track` records the absorbed updates (its log in
``track.jsonl``); ``bf16+master`` has no torch counterpart and is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from gatesim.formats import FP32
from gatesim.policy import PrecisionPolicy, canonical_name

__all__ = ["CellConfig", "run_cell", "METHODS", "RL_METHODS", "PRECISIONS", "RESULT_KEYS",
           "storage_dtype"]

METHODS = ("grpo", "reinforce", "sft")
RL_METHODS = ("grpo", "reinforce")
PRECISIONS = ("bf16+master", "bf16", "fp32")
OPTIMIZERS = ("emulated", "torch")
#: training accuracy is measured on the first this many training prompts (held-out: all).
TRAIN_EVAL = 128
RESULT_KEYS = ("id", "config", "task", "curve", "evals", "absorbed", "changed", "numel",
               "final", "trainable")


def storage_dtype(precision: str) -> str:
    """The dtype of the stored checkpoint of a precision policy (``"bf16"`` / ``"fp32"``)."""
    return "fp32" if PrecisionPolicy.parse(precision).param_format == FP32 else "bf16"


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """One cell of the lab: method x family x precision x seed (and the shared settings).

    Defaults are the lab's (:mod:`gatesim.lab.run` documents why): 80 AdamW steps, lr 5e-5,
    betas (0.9, 0.999), no weight decay; 8 prompts x 8 samples per step; beta 0.5."""

    method: str = "grpo"
    family: str = "arithmetic"
    precision: str = "bf16+master"
    seed: int = 0
    steps: int = 80
    batch: int = 8
    group: int = 8
    lr: float = 5e-5
    beta: float = 0.5
    clip: float = 0.2
    ppo_epochs: int = 1
    weight_decay: float = 0.0
    optimizer: str = "emulated"
    eval_every: int = 20
    model: Optional[str] = None
    layers: Optional[int] = None
    max_train: Optional[int] = None
    max_heldout: Optional[int] = None
    heldout_fraction: float = 0.3
    split_seed: int = 0
    #: update restriction (:mod:`gatesim.lab.arms`): ``full`` (every parameter), a mask
    #: (``principal``, ``low``, ``safe``, ``random``, ``mask`` = ``mask_file``) or an
    #: adapter (``lora``, ``pissa``) of rank ``rank`` (masks: the matched density).
    arm: str = "full"
    rank: int = 8
    mask_file: Optional[str] = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"lab cell: {msg}")
        # the canonical spelling (older results say bf16_master)
        object.__setattr__(self, "precision", canonical_name(self.precision))
        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "torch" and PrecisionPolicy.parse(self.precision).master:
            bad("torch's AdamW has no fp32 master weights: use optimizer='emulated' for "
                "bf16+master, or precision 'bf16' / 'fp32' with optimizer='torch'")
        for name in ("steps", "batch", "group", "ppo_epochs", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps"
                                                                      else 1):
                bad(f"{name} must be a positive int, got {v!r}")
        if self.method != "sft" and self.group < 2:
            bad("group must be >= 2 for RL (advantages are relative to the group)")
        for name in ("lr", "beta", "clip", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            bad(f"layers must be None or an int >= 1, got {self.layers!r}")
        from gatesim.lab.arms import ARMS
        if self.arm not in ARMS:
            bad(f"arm must be one of {ARMS}, got {self.arm!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            bad(f"rank must be an int >= 1, got {self.rank!r}")
        if (self.arm == "mask") != (self.mask_file is not None):
            bad("arm 'mask' needs mask_file, and mask_file needs arm 'mask'")
        if self.arm != "full" and self.optimizer != "emulated":
            bad("restricted arms need optimizer='emulated' (its set_mask)")

    @property
    def id(self) -> str:
        """Cell identifier: ``method-family-precision-s<seed>`` (plus non-default knobs that
        define an RL recipe)."""
        tag = f"{self.method}-{self.family}-{self.precision}-s{self.seed}"
        if self.optimizer != "emulated":
            tag += f"-{self.optimizer}"
        if self.ppo_epochs != 1:
            tag += f"-ppo{self.ppo_epochs}"
        if self.arm == "mask":
            from pathlib import PurePath
            tag += f"-mask-{PurePath(self.mask_file).stem}"
        elif self.arm != "full":
            tag += f"-{self.arm}-r{self.rank}"
        return tag

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CellConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"lab cell: unknown settings {sorted(unknown)}")
        return cls(**d)


def _truncate(policy, layers: Optional[int]) -> None:
    """Keeps the first ``layers`` transformer layers (tests and quick looks)."""
    if layers is None:
        return
    m = policy.model
    for holder in (getattr(m, "encoder", None), getattr(m, "model", None),
                   getattr(m, "transformer", None), m):
        for attr in ("layer", "layers", "h"):
            stack = getattr(holder, attr, None) if holder is not None else None
            if isinstance(stack, torch.nn.ModuleList):
                if layers > len(stack):
                    raise ValueError(f"layers={layers} but the model has {len(stack)}")
                setattr(holder, attr, stack[:layers])
                for key in ("num_hidden_layers", "n_layer", "num_layers"):
                    if hasattr(m.config, key):
                        setattr(m.config, key, layers)
                return
    raise ValueError("cannot find the layer stack of this model to truncate it")


def build_policy(cfg: CellConfig, dtype=torch.float32):
    """The starting model of a cell (loaded, truncated to ``cfg.layers``)."""
    from gatesim.lab.model import load_model
    policy = load_model(cfg.model, dtype=dtype)
    _truncate(policy, cfg.layers)
    for p in policy.model.parameters():
        p.requires_grad_(True)
    return policy


def _kind(name: str) -> str:
    from gatesim.diff.names import module_kind
    return module_kind(name)


def _optimizer(cfg: CellConfig, policy, log_dir: Path, named=None):
    """(optimizer, tracker or None, stats getter); ``named``: the (name, parameter) pairs
    to optimize (default: every parameter of the model)."""
    named = list(policy.model.named_parameters()) if named is None else named
    kw = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "emulated":
        from gatesim.optim import EmulatedAdamW
        opt = EmulatedAdamW(named, policy=PrecisionPolicy.parse(cfg.precision), **kw)
        return opt, None, lambda: dict(opt.last_stats)
    from gatesim.tracking import track
    if cfg.precision == "bf16":
        policy.model.to(torch.bfloat16)
        named = list(policy.model.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], foreach=False, **kw)
    tracker = track(opt, model=policy.model, log=log_dir / "track.jsonl")
    return opt, tracker, lambda: {n: s for (n, pol), s in tracker.last_stats.items()
                                  if pol == "own"}


def _evaluate(policy, enc, answers, cand) -> dict:
    with torch.no_grad():
        logits = policy.logits(enc, cand)
    probs = logits.softmax(-1)
    return dict(acc=float((logits.argmax(-1) == answers).float().mean()),
                expected=float(probs[torch.arange(len(answers)), answers].mean()))


def _advantages(method: str, r: torch.Tensor) -> torch.Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "reinforce":
        return centred
    return centred / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
            answers: torch.Tensor, adv: torch.Tensor, beta: float,
            clip: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RLVR objective of one batch: clipped surrogate (``clip`` None: plain policy
    gradient) averaged over samples, plus ``beta`` times the exact KL to the reference.
    Returns ``(loss, kl)``; ``logp``/``ref_logp`` are ``(B, C)`` log-probabilities,
    ``answers``/``adv`` ``(B, G)``."""
    lp = logp.gather(1, answers)
    ratio = torch.exp(lp - old_logp)
    surr = ratio * adv
    if clip is not None:
        surr = torch.minimum(surr, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
    return -surr.mean() + beta * kl, kl


def run_cell(payload: dict) -> dict:
    """Trains one cell (module docstring); ``payload = {"cell": CellConfig dict, "out":
    lab folder, "progress": bool}``."""
    from gatesim.lab.model import save_checkpoint
    from gatesim.lab.task import build_task, reward, sample_batch
    from safetensors.torch import save_file
    cfg = CellConfig.from_dict(payload["cell"])
    cell_dir = Path(payload["out"]) / "cells" / cfg.id
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg)
    task = build_task(cfg.family, policy.tokenizer, causal=policy.kind == "causal",
                      heldout_fraction=cfg.heldout_fraction, split_seed=cfg.split_seed,
                      max_train=cfg.max_train, max_heldout=cfg.max_heldout)
    enc_train, enc_held = policy.encode(task.train_prompts), policy.encode(task.heldout_prompts)
    enc_train_eval = policy.encode(task.train_prompts[:TRAIN_EVAL])
    cand, C = task.candidate_ids, len(task.candidates)
    start32 = {n: p.detach().float().clone() for n, p in policy.model.named_parameters()}
    arm = None
    if cfg.arm != "full":
        from gatesim.lab.arms import ArmRun
        arm = ArmRun(cfg, policy)   # freezes, masks or installs adapters
    opt, tracker, stats_of = _optimizer(cfg, policy, cell_dir,
                                        arm.named_params() if arm else None)
    if arm is not None:
        arm.attach(opt)
    # the stored start (an adapter arm's was taken before its adapters replaced the weights)
    stored0 = (arm.stored0 if arm is not None and arm.adapters else
               {n: p.detach().clone() for n, p in policy.model.named_parameters()})
    with torch.no_grad():
        ref_logp = policy.logits(enc_train, cand).log_softmax(-1)
    gen = torch.Generator().manual_seed(10_007 * cfg.seed + 17)
    curve = {"step": [], "reward": [], "kl": [], "loss": []}
    evals = {"step": [], "heldout_acc": [], "heldout_expected": [], "train_acc": [],
             "train_expected": []}
    absorbed_tot: dict = {}

    def do_eval(step):
        h = _evaluate(policy, enc_held, task.heldout_answers, cand)
        t = _evaluate(policy, enc_train_eval, task.train_answers[:TRAIN_EVAL], cand)
        evals["step"].append(step)
        evals["heldout_acc"].append(h["acc"])
        evals["heldout_expected"].append(h["expected"])
        evals["train_acc"].append(t["acc"])
        evals["train_expected"].append(t["expected"])

    bar = None
    if payload.get("progress"):
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc=cfg.id, unit="step", leave=False)
    do_eval(0)
    n_train = len(task.train_prompts)
    with open(cell_dir / "steps.jsonl", "w", encoding="utf-8") as log:
        for step in range(cfg.steps):
            rows = torch.tensor(sample_batch(n_train, cfg.batch, step, cfg.seed))
            correct = task.train_answers[rows]
            logp = policy.logits(enc_train, cand, rows).log_softmax(-1)
            with torch.no_grad():
                samples = torch.multinomial(logp.detach().exp(), cfg.group, replacement=True,
                                            generator=gen)
                r = reward(samples, correct[:, None], C)
            step_stats: dict = {}
            if cfg.method == "sft":
                loss = torch.nn.functional.nll_loss(logp, correct)
                with torch.no_grad():
                    kl = (logp.exp() * (logp - ref_logp[rows])).sum(-1).mean()
                passes = [loss]
            else:
                adv = _advantages(cfg.method, r)
                old = logp.detach().gather(1, samples)
                clip = cfg.clip if cfg.method == "grpo" else None
                passes = []
            for ep in range(cfg.ppo_epochs if cfg.method != "sft" else 1):
                if cfg.method != "sft":
                    if ep > 0:
                        logp = policy.logits(enc_train, cand, rows).log_softmax(-1)
                    loss, kl = rl_loss(logp, old, ref_logp[rows], samples, adv, cfg.beta, clip)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for name, s in stats_of().items():
                    k = _kind(name)
                    acc = step_stats.setdefault(k, [0, 0, 0])
                    acc[0] += s.absorbed
                    acc[1] += s.n - s.zero
                    acc[2] += s.changed
            for k, (a, nz, ch) in step_stats.items():
                tot = absorbed_tot.setdefault(k, [0, 0])
                tot[0] += a
                tot[1] += nz
            rec = {"step": step + 1, "reward": float(r.mean()), "kl": float(kl.detach()),
                   "loss": float(loss.detach()),
                   "absorbed": {k: (a / nz if nz else 0.0) for k, (a, nz, _) in
                                sorted(step_stats.items())},
                   "changed": {k: ch for k, (_, _, ch) in sorted(step_stats.items())}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            for key in ("reward", "kl", "loss"):
                curve[key].append(rec[key])
            curve["step"].append(step + 1)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                do_eval(step + 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl']:.1e}")
    if bar is not None:
        bar.close()
    if tracker is not None:
        tracker.close()
    # adapters merged into plain weights (stored and fp32-master values)
    merged_master = arm.finish(opt) if arm is not None else {}
    # what was stored, what the fp32 update was, and in-memory change counts
    params = dict(policy.model.named_parameters())
    stored = {n: p.detach() for n, p in params.items()}
    changed, numel, upd = {}, {}, {}
    from gatesim.metrics import update_mask
    for n, w in stored.items():
        changed[n] = int(update_mask(stored0[n], w).sum())
        numel[n] = w.numel()
        if w.dim() == 2:
            st = opt.state.get(params[n], {}) if cfg.optimizer == "emulated" else {}
            if n in merged_master:  # an adapter's merge, from its fp32 master factors
                upd[n] = (merged_master[n] - stored0[n].float()).contiguous()
            elif "master" in st:  # fp32 master: the update before bf16 storage rounds it
                upd[n] = (st["master"] - start32[n]).contiguous()
            else:
                upd[n] = (w.float() - stored0[n].float()).contiguous()
    save_file(upd, str(cell_dir / "update_fp32.safetensors"))
    save_checkpoint(policy, cell_dir / "checkpoint", storage_dtype(cfg.precision),
                    tensors={n: w.float() for n, w in stored.items()})
    if hasattr(opt, "close"):
        opt.close()
    final = dict(heldout_acc=evals["heldout_acc"][-1], heldout_acc0=evals["heldout_acc"][0],
                 heldout_expected=evals["heldout_expected"][-1],
                 heldout_expected0=evals["heldout_expected"][0],
                 train_acc=evals["train_acc"][-1], train_acc0=evals["train_acc"][0],
                 kl=curve["kl"][-1] if curve["kl"] else 0.0,
                 reward_first=_mean(curve["reward"][:10]),
                 reward_last=_mean(curve["reward"][-10:]),
                 changed_fraction=sum(changed.values()) / max(1, sum(numel.values())))
    return dict(id=cfg.id, config=cfg.to_dict(), task=task.describe(), curve=curve,
                evals=evals,
                absorbed={k: (a / nz if nz else 0.0)
                          for k, (a, nz) in sorted(absorbed_tot.items())},
                changed=changed, numel=numel, final=final,
                trainable=arm.trainable if arm is not None else sum(numel.values()),
                seconds=time.perf_counter() - t0)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")
