"""Restricted arms of the lab: full fine-tuning against masks and adapters, under RLVR and SFT.

The paper's practical claim (arXiv 2511.08567): restricting RLVR to the principal weights
gives the worst trajectory, a mask of low-magnitude non-principal weights ("safe") tracks
full fine-tuning, and PiSSA (LoRA initialised on the principal singular directions) is no
better than plain LoRA. :func:`arms_lab` is the lab that tests it
(``gatesim lab --arms full,principal,low,safe,random,lora,pissa``); the restrictions
themselves are :mod:`gatesim.restrict`'s.

**Arms** (:data:`ARMS`, a cell's ``arm``), on the attention (q, k, v, o) and MLP (up,
down) matrices of every layer (:func:`target_names`); every other parameter (embeddings,
norms, biases) is frozen in a restricted arm:

* ``full``: every parameter trains (the lab's ordinary cell);
* ``principal`` / ``low`` / ``safe`` / ``random``: a mask per matrix
  (:func:`gatesim.restrict.build_mask`) of the stored starting matrix, at the density
  :func:`gatesim.restrict.matched_density` that trains as many entries as a rank-``rank``
  adapter on it, with the diff's ``k`` (:func:`gatesim.diff.default_k`) for the principal
  part; ``safe`` keeps the low-magnitude entries that are not principal, so it trains at
  most as many; applied by :meth:`gatesim.optim.EmulatedAdam.set_mask`;
* ``mask``: the user's masks (``mask_file``, :func:`gatesim.restrict.load_masks`), on any
  parameters they name; the others are frozen;
* ``lora`` / ``pissa``: rank-``rank`` adapters (:class:`gatesim.restrict.AdapterLinear`);
  the starting weights are rounded to the storage format first (as the optimizer would),
  the adapter factors too, so a PiSSA residual is exact against what the model computes;
  at the end the adapters are merged: the checkpoint holds ``round(W' + B A)`` from the
  stored factors, ``update_fp32`` the merge from the fp32 master factors minus the stored
  start.

Trainable counts at the default size (bundled MiniLM, 6 layers, rank 8): full 22,565,376
(every parameter); ``lora``, ``pissa``, ``principal``, ``low``, ``random`` 331,776 each
(``8 (m + n)`` per matrix); ``safe`` 331,305 (the 471 low-magnitude entries that are
also principal are dropped); each cell's result records its count (``trainable``).

All arms share the lab's settings (lr, steps, beta): one learning rate for every arm is a
confound for the restricted ones (an adapter or a 3% mask may need a larger rate to move at
all), reported as such, not tuned away.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ARMS", "DEFAULT_ARMS", "MASK_ARMS", "ADAPTER_ARMS", "TARGET_KINDS", "ArmRun",
           "target_names", "check_arms", "arms_lab", "tiny_arms_lab", "arms_summary",
           "write_arms_table", "write_arms_figure", "parse_arms"]

MASK_ARMS = ("principal", "low", "safe", "random")
ADAPTER_ARMS = ("lora", "pissa")
ARMS = ("full",) + MASK_ARMS + ADAPTER_ARMS + ("mask",)
DEFAULT_ARMS = ("full",) + MASK_ARMS + ADAPTER_ARMS
#: module kinds (:func:`gatesim.diff.names.module_kind`) that restricted arms train.
TARGET_KINDS = ("q", "k", "v", "o", "up", "down")


def check_arms(arms: tuple) -> None:
    """Every arm known, none repeated (ValueError naming the problem)."""
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"arms: unknown arm {a!r}; choose from {ARMS} or 'all'")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms repeat: {arms}")


def parse_arms(text: str) -> tuple:
    """``"full,principal,..."`` (or ``"all"``) -> a tuple of arms, checked."""
    arms = DEFAULT_ARMS if text.strip() == "all" else tuple(
        a.strip() for a in text.split(",") if a.strip())
    if not arms:
        raise ValueError("--arms: name at least one arm")
    check_arms(arms)
    return arms


def target_names(model: torch.nn.Module) -> list:
    """The weights of the attention and MLP ``nn.Linear`` modules, in model order."""
    from gatesim.diff.names import module_kind
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and module_kind(f"{mname}.weight") in TARGET_KINDS:
            out.append(f"{mname}.weight")
    return out


def _storage_format(precision: str):
    from gatesim.formats import FP32
    from gatesim.policy import PrecisionPolicy
    fmt = PrecisionPolicy.parse(precision).param_format
    return None if fmt is None or fmt == FP32 else fmt


def _rounded(t: torch.Tensor, fmt) -> torch.Tensor:
    """``t`` rounded to the storage format to nearest-even (a copy), as the emulated
    optimizer rounds a float32 parameter when it takes it (``_init_storage``)."""
    from gatesim.precision import quantize
    out = t.detach().float().clone().contiguous()
    return out if fmt is None else quantize(out, fmt, out=out)


class ArmRun:
    """One cell's restriction: set up before the optimizer is built, :meth:`attach` ed to it,
    :meth:`finish` ed after training (see the module docstring)."""

    def __init__(self, cfg, policy):
        from gatesim.diff import default_k
        from gatesim.restrict import build_mask, install_adapters, load_masks, matched_density
        self.cfg, self.policy, self.arm = cfg, policy, cfg.arm
        model = policy.model
        self.fmt = _storage_format(cfg.precision)
        self.masks: dict = {}
        self.adapters: dict = {}
        self.stored0: dict = {}
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)
        if self.arm in ADAPTER_ARMS:
            with torch.no_grad():
                for p in params.values():
                    p.copy_(_rounded(p, self.fmt))
            self.stored0 = {n: p.detach().clone() for n, p in params.items()}
            self.adapters = install_adapters(model, target_names(model), cfg.rank, self.arm,
                                             seed=cfg.seed, fmt=self.fmt)
            self.trainable = sum(a.lora_A.numel() + a.lora_B.numel()
                                 for a in self.adapters.values())
            return
        if self.arm == "mask":
            self.masks = load_masks(cfg.mask_file, {n: tuple(p.shape) for n, p in
                                                    params.items()})
        else:
            for name in target_names(model):
                W0 = _rounded(params[name], self.fmt)
                m, n = W0.shape
                self.masks[name] = build_mask(self.arm, W0, matched_density(m, n, cfg.rank),
                                              k=default_k(m, n), seed=cfg.seed, name=name)
        for name in self.masks:
            params[name].requires_grad_(True)
        self.trainable = int(sum(int(m.sum()) for m in self.masks.values()))

    def named_params(self) -> list:
        """The (name, parameter) pairs the optimizer takes: every parameter for a mask arm
        (so storage starts as in the full arm; frozen ones get no gradient), the adapter
        factors for an adapter arm."""
        named = list(self.policy.model.named_parameters())
        if self.adapters:
            return [(n, p) for n, p in named if p.requires_grad]
        return named

    def attach(self, opt) -> None:
        """Sets the masks on the optimizer."""
        params = dict(self.policy.model.named_parameters())
        for name, mask in self.masks.items():
            opt.set_mask(params[name], mask.to(params[name].device))

    def finish(self, opt) -> dict:
        """Merges adapters into plain weights (stored factors, rounded to the storage
        format); returns ``{weight name: fp32 merge from the master factors}`` ({} for a
        mask arm)."""
        from gatesim.restrict import merge_adapters
        if not self.adapters:
            return {}
        stored, master = {}, {}
        for name, ad in self.adapters.items():
            st_a, st_b = opt.state.get(ad.lora_A, {}), opt.state.get(ad.lora_B, {})
            master[name] = ad.merged_weight(st_a.get("master"), st_b.get("master"))
            stored[name] = _rounded(ad.merged_weight(), self.fmt)
        merge_adapters(self.policy.model, self.adapters, stored)
        for p in self.policy.model.parameters():
            p.requires_grad_(False)
        return master


# ---------------------------------------------------------------------------------------
# labs
# ---------------------------------------------------------------------------------------
def arms_lab(**overrides):
    """The arm sweep at the lab's default size: every default arm, GRPO and SFT, 3 seeds,
    the ``arithmetic`` family, the lab's default precision, lr, steps and beta (42 cells);
    no second recipe or extra precisions."""
    from gatesim.lab.run import LabConfig
    kw = dict(name="arms", arms=DEFAULT_ARMS, families=("arithmetic",), second_recipe=None,
              extra_precisions=())
    kw.update(overrides)
    return LabConfig(**kw)


def tiny_arms_lab(**overrides):
    """An arm sweep of seconds (tests): one layer, 3 steps, 3 seeds, rank 2."""
    from gatesim.lab.run import tiny_lab
    kw = dict(name="tiny_arms", arms=DEFAULT_ARMS, families=("arithmetic",), seeds=(0, 1, 2),
              second_recipe=None, extra_precisions=(), rank=2)
    kw.update(overrides)
    return tiny_lab(**kw)


# ---------------------------------------------------------------------------------------
# report: results.json "arms", table.md section, figure
# ---------------------------------------------------------------------------------------
def _arm_of(cell: dict) -> str:
    return cell["config"].get("arm", "full")


def _mean_curve(curves: list) -> list:
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def arms_summary(doc: dict) -> list:
    """One entry per (method, family, arm): ``n``, ``trainable``, intervals across seeds
    (:func:`gatesim.stats.mean_interval`) of the final held-out accuracy, its gain, the
    final KL and the last-10-step reward, the seed-mean trajectories (``curve``: step,
    reward, kl; ``evals``: step, heldout_acc) and the network aggregate of each seed's
    merged checkpoint (``network``: the lab's AGG, seed means of sparsity, nss_median,
    angle_median, stored_principal_ratio, stored_low_ratio)."""
    from gatesim.lab.report import _iv

    def iv(vals):
        return _iv([v for v in vals if v is not None])

    groups: dict = {}
    for c in doc["cells"]:
        cf = c["config"]
        groups.setdefault((cf["method"], cf["family"], _arm_of(c)), []).append(c)
    order = {a: i for i, a in enumerate(ARMS)}
    out = []
    for (m, f, a), cells in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                   order[kv[0][2]])):
        fins = [c["final"] for c in cells]
        net = [doc["analysis"].get(c["id"], {}).get("network", {}) for c in cells]
        keys = ("sparsity", "nss_median", "angle_median", "stored_principal_ratio",
                "stored_low_ratio")
        out.append({
            "method": m, "family": f, "arm": a, "n": len(cells),
            "seeds": [c["config"]["seed"] for c in cells],
            "trainable": cells[0].get("trainable"),
            "heldout_acc": iv([x["heldout_acc"] for x in fins]),
            "gain": iv([x["heldout_acc"] - x["heldout_acc0"] for x in fins]),
            "kl": iv([x["kl"] for x in fins]),
            "reward_last": iv([x["reward_last"] for x in fins]),
            "curve": {"step": cells[0]["curve"]["step"],
                      "reward": _mean_curve([c["curve"]["reward"] for c in cells]),
                      "kl": _mean_curve([c["curve"]["kl"] for c in cells])},
            "evals": {"step": cells[0]["evals"]["step"],
                      "heldout_acc": _mean_curve([c["evals"]["heldout_acc"] for c in cells])},
            "network": {k: _avg([x.get(k) for x in net]) for k in keys}})
    return out


def _avg(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def write_arms_table(doc: dict, figure: Optional[str]) -> list:
    """The table.md lines of the arms section."""
    from gatesim.lab.report import _f, _ivs
    L = ["## Restricted arms", "",
         "Final held-out accuracy (%), mean and 95% interval across seeds; the gain over "
         "the start; final KL to the start; trainable parameters; and the merged "
         "checkpoint's parameter-level aggregate (bitwise sparsity, median NSS, median "
         "largest principal angle in degrees, stored-mask overlap with principal / "
         "low-magnitude weights over chance; seed means).", "",
         "| method | family | arm | n | trainable | held-out acc | gain | KL end | sparsity "
         "| NSS med | angle med | principal x | low x |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc.get("arms", []):
        net = e["network"]
        kl = e["kl"]["mean"] if e.get("kl") else None
        L.append(f"| {e['method']} | {e['family']} | {e['arm']} | {e['n']} | "
                 f"{e['trainable']:,} | {_ivs(e['heldout_acc'], pct=True)} | "
                 f"{_ivs(e['gain'], pct=True)} | "
                 f"{_f(kl)} | {_f(net.get('sparsity'), '{:.4f}')} | "
                 f"{_f(net.get('nss_median'))} | {_f(net.get('angle_median'))} | "
                 f"{_f(net.get('stored_principal_ratio'))} | "
                 f"{_f(net.get('stored_low_ratio'))} |")
    claims = [c for c in doc.get("claims", []) if c["name"].startswith("arms_")]
    if claims:
        L += ["", "### Claims on the arms", "",
              "| claim | mean | 95% interval | n | threshold | verdict |",
              "|---|---|---|---|---|---|"]
        for c in claims:
            iv = "-" if c["lo"] is None else f"[{c['lo']:.3f}, {c['hi']:.3f}]"
            L.append(f"| {c['name']}: {c['statement']} | {_f(c['statistic'], '{:.3f}')} | {iv} "
                     f"| {c['n']} | {c['side']} {c['threshold']:g} | **{c['verdict']}** |")
    if figure:
        L += ["", f"![arm trajectories]({figure})"]
    return L + [""]


def write_arms_figure(doc: dict, folder: Path) -> Optional[str]:
    """``arms_trajectories.png``: reward, KL (per step) and held-out accuracy (per
    evaluation), seed means, one line per arm, one row per method; returns the file name
    relative to the lab folder (None without matplotlib or arms)."""
    entries = doc.get("arms", [])
    if not entries:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted({(e["method"], e["family"]) for e in entries})
    fig, axes = plt.subplots(len(rows), 3, figsize=(14, 3.6 * len(rows)), squeeze=False)
    for i, (m, f) in enumerate(rows):
        for e in (x for x in entries if x["method"] == m and x["family"] == f):
            axes[i][0].plot(e["curve"]["step"][:len(e["curve"]["reward"])],
                            e["curve"]["reward"], label=e["arm"])
            axes[i][1].plot(e["curve"]["step"][:len(e["curve"]["kl"])], e["curve"]["kl"],
                            label=e["arm"])
            axes[i][2].plot(e["evals"]["step"][:len(e["evals"]["heldout_acc"])],
                            e["evals"]["heldout_acc"], marker="o", label=e["arm"])
        for j, what in enumerate(("sampled reward", "KL to start", "held-out accuracy")):
            axes[i][j].set_title(f"{m} / {f}: {what}")
            axes[i][j].set_xlabel("step")
        axes[i][2].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "arms_trajectories.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"{folder.name}/{path.name}"
