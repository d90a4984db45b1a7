"""Every option of the gate simulation's training step bites (issue 23, item 2).

Each recorded update stream (``run_cell(record=...)``) is checked against an independent
re-computation of the optimizer step in float64 numpy, written from the definitions in
:mod:`gatesim.sim.run` (advantages, clipped surrogate, exact KL, cross-entropy, Adam,
norm matching) rather than from the code. Only the random draws (which contexts, which
sampled outputs) are taken the way the run takes them, with the same torch generator.
For each option the test also checks that the reference *without* the option does not
match the stream: a run that ignored the option would fail the test.

To keep Adam's update linear in the gradient (so that a float32 gradient and a float64
one give the same update, sign included, also where the gradient is tiny) most runs use
``eps = 1``: then the first Adam step is ``-lr g / (|g| + 1)``.
"""
import math

import numpy as np
import pytest
import torch

from gatesim.sim import CellConfig, Stream, run_cell
from gatesim.sim.task import Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TINY = dict(rows=32, n_contexts=8, n_targets=3, batch=4, group=4, steps=2, eval_every=2,
            k=2, policies=("fp32",), null_policies=(), lr=1e-2, eps=1.0)


def _cfg(**kw) -> CellConfig:
    return CellConfig(**dict(TINY, **kw))


def _stream(cfg: CellConfig, tmp_path, tag: str):
    res = run_cell(cfg, record=tmp_path / tag)
    s = Stream(tmp_path / tag)
    return res, s, [(d.double().numpy(), a, dec) for _, d, a, dec in s.updates()]


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def reference(cfg: CellConfig, *, algo=None, clip="cfg", beta=None, inner_steps=None,
              norm_matched=None, eps=None, betas=None, weight_decay=None, steps=None):
    """The per-optimizer-step updates ``(delta, decay, clipped_fraction)`` of ``cfg``,
    recomputed in float64 from the definitions. The keyword arguments override one
    setting of the reference (not of the run): the "option ignored" alternatives."""
    algo = cfg.algo if algo is None else algo
    clip = cfg.clip if clip == "cfg" else clip
    beta = cfg.beta if beta is None else beta
    inner = cfg.inner_steps if inner_steps is None else inner_steps
    nm = cfg.norm_matched if norm_matched is None else norm_matched
    eps = cfg.eps if eps is None else eps
    b1, b2 = cfg.betas if betas is None else betas
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    steps = cfg.steps if steps is None else steps
    task = Task(cfg)
    H = task.H.double().numpy()
    targets = task.targets.numpy()
    tmask = task.target_mask.numpy()
    W32 = task.W0.clone()                 # the fp32 training weights
    ref = _log_softmax(H @ task.W0.double().numpy().T)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    m = np.zeros(W32.shape)
    v = np.zeros(W32.shape)
    t = 0
    out = []
    for _ in range(steps):
        idx = torch.randint(cfg.n_contexts, (cfg.batch,), generator=gen)
        if algo == "sft":
            pick = torch.randint(cfg.n_targets, (cfg.batch,), generator=gen)
            y = targets[idx.numpy(), pick.numpy()][:, None]
        else:  # the run samples from its own float32 policy: the same draw here
            lp32 = torch.log_softmax(task.H[idx] @ W32.T, dim=1)
            y = torch.multinomial(lp32.exp(), cfg.group, replacement=True,
                                  generator=gen).numpy()
            r = tmask[idx.numpy()[:, None], y].astype(np.float64)
            c = r - r.mean(axis=1, keepdims=True)
            adv = c if algo == "reinforce" else c / (r.std(axis=1, keepdims=True) + 1e-6)
        i = idx.numpy()
        h = H[i]
        B, G = y.shape
        logp_old = _log_softmax(h @ W32.double().numpy().T)[np.arange(B)[:, None], y]
        for _ in range(inner):
            W = W32.double().numpy()
            logp = _log_softmax(h @ W.T)
            p = np.exp(logp)
            onehot = np.zeros((B, G, W.shape[0]))
            onehot[np.arange(B)[:, None], np.arange(G)[None, :], y] = 1.0
            dlogp = onehot - p[:, None, :]            # d logp[y] / d logits
            clipped = 0.0
            if algo == "sft":
                coef = -np.ones((B, G)) / B
            else:
                rho = np.exp(logp[np.arange(B)[:, None], y] - logp_old)
                active = np.ones_like(rho, dtype=bool)
                if clip is not None:  # min(rho A, clip(rho) A) takes the constant side
                    active = ~(((adv > 0) & (rho > 1 + clip)) | ((adv < 0) & (rho < 1 - clip)))
                    clipped = float((~active).mean())
                coef = -(rho * adv * active) / (B * G)
            glog = np.einsum("bg,bgv->bv", coef, dlogp)
            if beta > 0:
                kl = (p * (logp - ref[i])).sum(axis=1, keepdims=True)
                glog = glog + beta * p * (logp - ref[i] - kl) / B
            g = glog.T @ h
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            delta = -(cfg.lr / (1 - b1 ** t)) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
            if nm:
                delta = delta * (cfg.step_norm / np.linalg.norm(delta))
            decay = 1 - cfg.lr * wd
            out.append((delta, decay, clipped))
            W32 = (W32.double() * decay + torch.from_numpy(delta)).float()
    return out


def _close(got, want) -> bool:
    return len(got) == len(want) and all(
        np.allclose(g[0], w[0], rtol=1e-4, atol=1e-6 * np.abs(w[0]).max())
        for g, w in zip(got, want))


def _check(cfg, tmp_path, tag, **ignored):
    """The stream of ``cfg`` matches the reference, and the reference with the option
    ignored (``ignored``: the override) does not."""
    res, s, got = _stream(cfg, tmp_path, tag)
    want = reference(cfg)
    assert _close(got, want), tag
    for k, v in ignored.items():
        assert not _close(got, reference(cfg, **{k: v})), (tag, k)
    return res, s, got, want


def test_grpo_reinforce_sft_follow_their_definitions(tmp_path):
    # each algorithm's stream is its own definition's and not the others'
    _check(_cfg(algo="grpo", beta=0.0, clip=None), tmp_path, "grpo", algo="reinforce")
    _check(_cfg(algo="reinforce", beta=0.0, clip=None), tmp_path, "reinforce", algo="grpo")
    _check(_cfg(algo="sft", beta=0.0, clip=None), tmp_path, "sft", algo="grpo")


def test_beta_adds_the_exact_kl_gradient(tmp_path):
    # on the first step the policy is the reference (the KL gradient is 0): the second
    # step shows the penalty
    _check(_cfg(beta=5.0, clip=None, steps=3), tmp_path, "kl", beta=0.0)


def test_inner_steps_with_a_small_clip_range_clip(tmp_path):
    """inner_steps = 2 reuses each batch: on the second pass rho != 1 and, with clip range
    0.01 and lr 0.05, some samples are clipped (no gradient from them). The stream is the
    clipped reference's, not the unclipped one's nor the one-pass run's."""
    cfg = _cfg(clip=0.01, inner_steps=2, beta=0.0, lr=0.05)
    res, s, got, want = _check(cfg, tmp_path, "clip", clip=None)
    assert s.steps == cfg.steps * 2 == len(got)
    frac = [w[2] for w in want]
    assert frac[0] == frac[2] == 0.0          # first pass over a batch: rho = 1
    assert frac[1] > 0 and frac[3] > 0        # second pass: clipping takes effect
    # and one pass per batch gives other updates from the second batch on
    one = run_cell(_cfg(clip=0.01, inner_steps=1, beta=0.0, lr=0.05))
    assert one["train_weights_sha"] != res["train_weights_sha"]
    # without clipping the same two passes also differ from the clipped run
    free = run_cell(_cfg(clip=None, inner_steps=2, beta=0.0, lr=0.05))
    assert free["train_weights_sha"] != res["train_weights_sha"]


def test_norm_matched_rescales_every_step(tmp_path):
    cfg = _cfg(norm_matched=True, step_norm=3e-3, beta=0.0, clip=None, steps=3)
    res, s, got, _ = _check(cfg, tmp_path, "nm", norm_matched=False)
    for d, alpha, _ in got:
        assert np.linalg.norm(d) * abs(alpha) == pytest.approx(3e-3, rel=1e-5)
    assert res["mean_step_norm"] == pytest.approx(3e-3, rel=1e-5)
    plain = run_cell(_cfg(beta=0.0, clip=None, steps=3))
    assert plain["mean_step_norm"] > 3 * 3e-3   # the unmatched run's steps are larger


def test_adam_settings_eps_betas_weight_decay(tmp_path):
    # eps: the default 1e-8 makes the first step -lr sign(g): the reference with eps = 1
    # (linear in g) does not match it
    cfg = _cfg(eps=1e-8, beta=0.0, clip=None, steps=1)
    _, _, got = _stream(cfg, tmp_path, "eps")
    d = got[0][0]
    nz = d != 0
    assert np.allclose(np.abs(d[nz]), cfg.lr, rtol=1e-3)
    assert not _close(got, reference(cfg, eps=1.0))
    # betas: the second step's moments
    _check(_cfg(betas=(0.5, 0.6), beta=0.0, clip=None), tmp_path, "betas",
           betas=(0.9, 0.999))
    # weight decay: the recorded decay factor is 1 - lr * wd, every step
    cfg = _cfg(weight_decay=0.5, beta=0.0, clip=None)
    _, _, got, _ = _check(cfg, tmp_path, "wd")
    assert [dec for _, _, dec in got] == pytest.approx([1 - cfg.lr * 0.5] * cfg.steps,
                                                       rel=1e-12)
    _, _, none = _stream(_cfg(beta=0.0, clip=None), tmp_path, "nowd")
    assert [dec for _, _, dec in none] == [1.0] * cfg.steps


def test_task_and_sampling_settings_reach_the_run(tmp_path):
    """group, batch, n_targets, n_contexts, task_seed, seed and steps change the stream
    (and the reference follows each)."""
    base = dict(beta=0.0, clip=None)
    _, _, b0 = _stream(_cfg(**base), tmp_path, "base")
    for k, v in dict(group=6, batch=3, n_targets=12, n_contexts=12, task_seed=4, seed=9,
                     steps=3).items():
        cfg = _cfg(**dict(base, **{k: v}))
        _, s, got = _stream(cfg, tmp_path, k)
        assert _close(got, reference(cfg)), k
        assert not _close(got, b0), k
    # rows / row_offset / matrix choose the slice trained
    assert Stream(tmp_path / "base").initial().shape == (32, 384)
    t = Task(_cfg(rows=16, row_offset=3000))
    from gatesim.weights import load_matrix
    full = load_matrix("embeddings.word_embeddings.weight")
    assert torch.equal(t.W0, full[3000:3016])
    q = Task(_cfg(rows=16, row_offset=0, n_targets=3,
                  matrix="encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(q.W0, load_matrix("encoder.layer.0.attention.self.query.weight")[:16])


def test_metric_settings_k_alpha_eval_every_and_policies(tmp_path):
    """k, alpha and eval_every change what is measured; policies, null_policies and
    train_policy name what is run (checked against numbers computed here)."""
    kw = dict(beta=0.0, clip=None, lr=3e-4, steps=2, eps=1e-8, policies=("bf16", "fp32"),
              null_policies=("bf16",), train_policy="bf16+master")
    runs = {}
    for alpha, k, every in ((0.05, 2, 2), (0.3, 3, 1)):
        cfg = _cfg(alpha=alpha, k=k, eval_every=every, **kw)
        res = run_cell(cfg, mask_path=tmp_path / f"{alpha}.npz")
        runs[alpha] = res
        assert res["trajectory"]["step"] == list(range(0, 3, every))
        assert set(res["policies"]) == {"bf16", "fp32"} and set(res["null"]) == {"bf16"}
        assert res["config"]["train_policy"] == "bf16+master"
        W0 = Task(cfg).W0.numpy()
        with np.load(tmp_path / f"{alpha}.npz") as z:
            upd = np.unpackbits(z["bf16"])[: W0.size].astype(bool)
        n_low = max(1, int(math.floor(alpha * W0.size + 0.5)))
        low = np.zeros(W0.size, bool)
        low[np.argsort(np.abs(W0).ravel(), kind="stable")[:n_low]] = True
        p = res["policies"]["bf16"]
        assert 0 < upd.mean() < 1
        assert p["low_overlap"] == pytest.approx((upd & low).sum() / low.sum(), abs=1e-12)
        assert p["overlap_baseline"] == pytest.approx(upd.mean(), abs=1e-12)
        assert p["energy_baseline"] == pytest.approx((k / 32) * (k / 384), rel=1e-12)
    assert runs[0.05]["policies"]["bf16"]["low_overlap"] != \
        runs[0.3]["policies"]["bf16"]["low_overlap"]
    # the training policy: the run's own weights are stored under it (bf16+master keeps an
    # fp32 master, so its weights differ from the fp32-trained run's)
    fp32 = run_cell(_cfg(**dict(kw, train_policy="fp32")))
    assert fp32["train_weights_sha"] != runs[0.05]["train_weights_sha"]


def test_path_loads_the_matrix_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    save_file({"m": w}, str(tmp_path / "w.safetensors"))
    t = Task(_cfg(path=str(tmp_path / "w.safetensors"), matrix="m", rows=16, row_offset=10))
    assert torch.equal(t.W0, w[10:26])
