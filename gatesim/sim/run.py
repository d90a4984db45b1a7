"""One gate-simulation cell: train with a KL-anchored policy gradient (or SFT), replay the
update stream through every Gate III policy in lockstep, measure.

:func:`run_cell` is a pure function of its :class:`CellConfig` (same config, same bits:
every random draw comes from generators seeded by the config, and the sweep runs each cell
with a fixed torch thread count).

Per step (``inner_steps`` optimizer steps per batch):

* ``grpo``/``reinforce``: ``batch`` contexts, ``group`` outputs sampled from the current
  policy per context, reward r = 1 on a target; advantage ``(r - mean) / (std + 1e-6)``
  (grpo; std over the group, population) or ``r - mean`` (reinforce), 0 for a group whose
  rewards are all equal; loss ``-mean(min(rho A, clip(rho, 1-eps, 1+eps) A))`` with
  ``rho = pi / pi_old`` (no clip: ``-mean(rho A)``), plus ``beta * KL(pi || pi_ref)``
  (exact, over all outputs, mean over the batch's contexts; with ``beta = 0`` the term is
  not built at all).
* ``sft``: cross-entropy on one target output per context (drawn per step).
* The emulated AdamW (:mod:`gatesim.optim`) under ``train_policy`` applies the step; its
  update hook rescales the update to norm ``step_norm`` (``norm_matched``), records it
  (update streams) and applies it to every policy's shadow weights.

The precision-only null (``null_policies``): the same per-step updates with their entries
moved by one fixed random permutation ``pi`` and sign pattern ``s`` (drawn from the seed),
``delta_null = s * delta[pi]``, replayed through the same storage policies. Every step keeps
its exact multiset of |update| values and every entry keeps its temporal consistency (the
accumulated null update is ``s * acc[pi]``), so the null differs from the run only in
*where* the updates land relative to the weights: what it shows about principal or
low-magnitude overlap is what rounding alone (ULP grows with |w|) produces.

Gate III regime numbers (``step_ratio``, ``acc_ratio``): the per-step update ``|u|`` and
the accumulated fp32 update ``|acc|`` relative to the bf16 spacing ``ulp_bf16(w0)`` of the
initial weight they hit, as quantiles over the non-zero (entry, step) pairs of every
``STEP_RATIO_EVERY``-th optimizer step (a sample: the histogram costs as much as two policy
replays), from a histogram of log2 ratios with 1/16-octave bins.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from gatesim import metrics as gm
from gatesim.formats import BF16
from gatesim.optim import EmulatedAdamW
from gatesim.precision import ulp
from gatesim.sim.config import CellConfig
from gatesim.policy import PrecisionPolicy
from gatesim.shadow import ShadowWeights
from gatesim.sim.policies import sim_shadow
from gatesim.sim.stream import StreamWriter
from gatesim.sim.task import Task

#: keys of the cell's ``.npz`` file besides policy masks: the accumulated fp32 update and
#: the null's masks (prefix + policy)
DELTA_KEY = "accumulated_update"
NULL_PREFIX = "null:"

__all__ = ["run_cell", "policy_metrics", "ratio_quantiles", "RATIO_LOG2_RANGE",
           "hist_quantiles"]

#: log2 range and bins of the |u| / ulp_bf16(w0) histograms (1/16 octave)
RATIO_LOG2_RANGE = (-40.0, 12.0)
_RATIO_BINS = int((RATIO_LOG2_RANGE[1] - RATIO_LOG2_RANGE[0]) * 16)
QUANTILES = (0.1, 0.5, 0.9)
#: the per-step ratio histogram samples every this-many-th optimizer step
STEP_RATIO_EVERY = 4


def _log2_hist(r: torch.Tensor) -> torch.Tensor:
    """Histogram (float64 counts) of log2 of the non-zero finite entries of ``r``, clamped
    into :data:`RATIO_LOG2_RANGE`."""
    r = r[(r > 0) & torch.isfinite(r)]
    lo, hi = RATIO_LOG2_RANGE
    x = torch.log2(r.float()).clamp(lo, hi - 1e-3)
    return torch.histc(x, bins=_RATIO_BINS, min=lo, max=hi).double()  # exact below 2**24


def hist_quantiles(counts, edges_log2, qs=QUANTILES) -> dict:
    """Quantiles (as ratios, not log2) of a log2 histogram with bin ``i`` covering
    ``[edges_log2[i], edges_log2[i+1])``, linear within a bin in log2; None if empty."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum()
    out = {}
    cum = np.concatenate([[0.0], np.cumsum(c)])
    for q in qs:
        key = f"p{int(round(q * 100))}"
        if tot <= 0:
            out[key] = None
            continue
        target = q * tot
        i = int(np.searchsorted(cum, target, side="left")) - 1
        i = min(max(i, 0), len(c) - 1)
        frac = (target - cum[i]) / c[i] if c[i] > 0 else 0.0
        out[key] = float(2.0 ** (edges_log2[i] + frac * (edges_log2[i + 1] - edges_log2[i])))
    return out


def ratio_quantiles(counts) -> dict:
    """p10/p50/p90 of a :func:`_log2_hist` histogram."""
    lo, hi = RATIO_LOG2_RANGE
    edges = np.linspace(lo, hi, _RATIO_BINS + 1)
    return hist_quantiles(counts, edges)


def _policy_hist_quantiles(hist) -> dict:
    """p10/p50/p90 of |u|/ulp from a policy's 34-bin UpdateStats histogram (factor-2 bins;
    the open end bins are given one octave)."""
    from gatesim.update import HIST_EDGES_LOG2
    edges = [HIST_EDGES_LOG2[0] - 1] + list(HIST_EDGES_LOG2) + [HIST_EDGES_LOG2[-1] + 1]
    return hist_quantiles(hist, np.asarray(edges, dtype=np.float64))


def _advantages(r: torch.Tensor, algo: str) -> torch.Tensor:
    centered = r - r.mean(dim=1, keepdim=True)
    if algo == "reinforce":
        return centered
    return centered / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)


def _kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the exact KL(pi || pi_ref)."""
    return (logp.exp() * (logp - ref_logp)).sum(dim=1).mean()


def _loss(task: Task, cfg: CellConfig, W: torch.Tensor, idx: torch.Tensor, batch: dict,
          ref_logp: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(task.logits(W, idx), dim=1)
    if cfg.algo == "sft":
        loss = -logp.gather(1, batch["y"].unsqueeze(1)).mean()
    else:
        lp = logp.gather(1, batch["y"])
        ratio = torch.exp(lp - batch["logp_old"])
        adv = batch["adv"]
        obj = ratio * adv
        if cfg.clip is not None:
            obj = torch.minimum(obj, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        loss = -obj.mean()
    if cfg.beta > 0:
        loss = loss + cfg.beta * _kl(logp, ref_logp[idx])
    return loss


def _angle(W0: torch.Tensor, W: torch.Tensor, k: int) -> float:
    return gm.principal_angles(W0, W.detach().clone(), k).left_max


def policy_metrics(shadow: ShadowWeights, W0: torch.Tensor, cfg: CellConfig,
                   principal: torch.Tensor, low: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The measurements of one policy's stored weights after the run (see the schema in
    :mod:`gatesim.sim.sweep`), and its update mask."""
    w0s, w1s = shadow.stored_initial(), shadow.stored()
    sp = gm.sparsity(w0s, w1s)
    mask = gm.update_mask(w0s, w1s)
    a32, b32 = w0s.to(torch.float32), w1s.to(torch.float32)
    t = shadow.total
    nonzero = t.n - t.zero
    out = {
        "bitwise_sparsity": sp.bitwise,
        "relative_sparsity": sp.relative,
        "atol_sparsity": {str(k): v for k, v in sp.atol.items()},
        "update_density": float(mask.double().mean()),
        "absorbed_fraction": t.absorbed / nonzero if nonzero else 0.0,
        "absorbed_updates": t.absorbed,
        "nonzero_updates": nonzero,
        "absorbed_mass": t.absorbed_mass,
        "hist": list(t.hist),
        "step_ratio_own_ulp": _policy_hist_quantiles(t.hist),
    }
    changed = bool(mask.any())
    if changed:
        pa = gm.principal_angles(a32, b32, cfg.k)
        out["nss"] = gm.nss(a32, b32)
        out["angle_left_max_deg"] = pa.left_max
        out["angle_right_max_deg"] = pa.right_max
        out["energy_topk"] = gm.update_energy(a32, b32, cfg.k).value
    else:  # nothing stored changed: no rotation, no shift, no update energy
        out.update(nss=0.0, angle_left_max_deg=0.0, angle_right_max_deg=0.0, energy_topk=0.0)
    out["energy_baseline"] = gm.energy_baseline(cfg.k, *W0.shape)
    s0 = gm.singular_values(a32)
    s1 = gm.singular_values(b32)
    out["sv_drift"] = (s1 - s0).tolist()
    op = gm.overlap(mask, principal)
    ol = gm.overlap(mask, low)
    ox = gm.overlap_excluding(mask, principal, low)
    out["principal_overlap"] = op.value
    out["low_overlap"] = ol.value
    out["principal_overlap_excl_low"] = ox.value
    out["overlap_baseline"] = op.baseline
    out["overlap_excl_low_baseline"] = ox.baseline
    return out, mask


def run_cell(cfg: CellConfig, *, record: Optional[Union[str, Path]] = None,
             mask_path: Optional[Union[str, Path]] = None) -> dict:
    """Runs one cell; returns its JSON-serializable result. ``record``: directory for the
    update stream; ``mask_path``: ``.npz`` file for each policy's update mask (packed
    bits; the sweep's cross-seed Jaccard reads them)."""
    task = Task(cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    W = torch.nn.Parameter(task.W0.clone())
    opt = EmulatedAdamW([("W", W)], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        policy=PrecisionPolicy.parse(cfg.train_policy, seed=cfg.seed))
    if cfg.mask is not None:  # a restriction of the updates (gatesim.restrict)
        from gatesim.restrict import build_mask
        density = cfg.alpha if cfg.mask_density is None else cfg.mask_density
        opt.set_mask(W, build_mask(cfg.mask, task.W0, density, k=cfg.k, seed=cfg.seed,
                                   name=cfg.matrix))
    shadows = [sim_shadow(n, task.W0, cfg.seed) for n in cfg.policies]
    writer = (StreamWriter(record, task.W0, config=cfg.to_dict(), policy=cfg.train_policy,
                           seed=cfg.seed) if record is not None else None)
    nulls = [sim_shadow(n, task.W0, cfg.seed) for n in cfg.null_policies]
    null_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 29)
    null_perm = torch.randperm(task.W0.numel(), generator=null_gen)
    null_sign = (torch.randint(0, 2, (task.W0.numel(),), generator=null_gen) * 2 - 1).float()
    acc = torch.zeros(task.W0.shape, dtype=torch.float64)  # the exact accumulated stream
    inv_ulp0 = 1.0 / ulp(task.W0, BF16)
    step_hist = torch.zeros(_RATIO_BINS, dtype=torch.float64)
    step_norms = []

    def hook(name, delta, alpha, decay, step):
        if cfg.norm_matched:
            nrm = float(delta.norm())
            if nrm > 0 and math.isfinite(nrm):
                delta.mul_(cfg.step_norm / nrm)
        step_norms.append(float(delta.norm()) * abs(alpha))
        acc.add_(delta.double(), alpha=alpha)
        if step % STEP_RATIO_EVERY == 0:
            step_hist.add_(_log2_hist(delta.abs() * (abs(alpha) * inv_ulp0)))
        if writer is not None:
            writer.add(delta, alpha, decay, step)
        for s in shadows:
            s.apply(delta, alpha, decay, step)
        if nulls:
            dn = (delta.reshape(-1)[null_perm] * null_sign).reshape(delta.shape)
            for s in nulls:
                s.apply(dn, alpha, decay, step)

    opt.update_hook = hook
    all_idx = torch.arange(cfg.n_contexts)
    with torch.no_grad():
        ref_logp = torch.log_softmax(task.logits(task.W0, all_idx), dim=1)
    traj = {"step": [], "reward": [], "kl": [], "angle_left_max_deg": []}

    def evaluate(t: int) -> None:
        with torch.no_grad():
            logp = torch.log_softmax(task.logits(W, all_idx), dim=1)
            traj["step"].append(t)
            traj["reward"].append(float(task.expected_reward(logp, all_idx).mean()))
            traj["kl"].append(float(_kl(logp, ref_logp)))
            traj["angle_left_max_deg"].append(
                _angle(task.W0, W, cfg.k) if t > 0 else 0.0)

    evaluate(0)
    for t in range(cfg.steps):
        idx = torch.randint(cfg.n_contexts, (cfg.batch,), generator=gen)
        batch: dict = {}
        with torch.no_grad():
            if cfg.algo == "sft":
                pick = torch.randint(cfg.n_targets, (cfg.batch,), generator=gen)
                batch["y"] = task.targets[idx, pick]
            else:
                logp_old = torch.log_softmax(task.logits(W, idx), dim=1)
                y = torch.multinomial(logp_old.exp(), cfg.group, replacement=True,
                                      generator=gen)
                r = task.target_mask[idx].gather(1, y).to(torch.float32)
                batch.update(y=y, adv=_advantages(r, cfg.algo), logp_old=logp_old.gather(1, y))
        for _ in range(cfg.inner_steps):
            opt.zero_grad(set_to_none=True)
            _loss(task, cfg, W, idx, batch, ref_logp).backward()
            opt.step()
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            evaluate(t + 1)
    if writer is not None:
        writer.close()
    opt.close()

    principal = gm.principal_mask(task.W0, cfg.k, cfg.alpha)
    low = gm.low_magnitude_mask(task.W0, cfg.alpha)
    acc_ratio = acc.abs() * inv_ulp0.double()
    result = {"config": cfg.to_dict(), "trajectory": traj,
              "true_update_density": float((acc != 0).double().mean()),
              "mean_step_norm": float(np.mean(step_norms)) if step_norms else 0.0,
              "update_norm": float(acc.norm()),
              "step_ratio": ratio_quantiles(step_hist.numpy()),
              "nominal_step_ratio": ratio_quantiles(
                  _log2_hist(inv_ulp0 * cfg.lr).numpy()),
              "acc_ratio": {**ratio_quantiles(_log2_hist(acc_ratio).numpy()),
                            "below_half": float((acc_ratio < 0.5).double().mean())},
              "policies": {}, "null": {}}
    masks = {}
    for s in shadows:
        res, mask = policy_metrics(s, task.W0, cfg, principal, low)
        result["policies"][s.policy.name] = res
        masks[s.policy.name] = np.packbits(mask.cpu().numpy().ravel())
    for s in nulls:
        res, mask = policy_metrics(s, task.W0, cfg, principal, low)
        result["null"][s.policy.name] = res
        masks[NULL_PREFIX + s.policy.name] = np.packbits(mask.cpu().numpy().ravel())
    if mask_path is not None:
        mp = Path(mask_path)
        mp.parent.mkdir(parents=True, exist_ok=True)
        tmp = mp.with_name(mp.name + ".tmp.npz")
        np.savez_compressed(tmp, shape=np.array(task.W0.shape),
                            **{DELTA_KEY: acc.float().numpy()}, **masks)
        tmp.replace(mp)
    result["final_weights_sha"] = {s.policy.name: _digest(s.weights) for s in shadows}
    result["train_weights_sha"] = _digest(W.detach())
    return result


def _digest(t: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(t.contiguous().view(torch.int32).numpy().tobytes()).hexdigest()[:16]
