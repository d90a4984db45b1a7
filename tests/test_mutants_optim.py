"""gatesim.optim: argument checks, the step log of SGD, restriction masks set after training
has started, parameter names; each written against the documented behaviour to kill a
mutant the mutation run (docs/mutation.md) found surviving."""
import json

import pytest
import torch

from gatesim.optim import EmulatedAdam, EmulatedAdamW, EmulatedSGD


def _p(n=6):
    return torch.nn.Parameter(torch.linspace(-1.0, 1.0, n))


@pytest.mark.parametrize("kw", [dict(lr=-0.1), dict(momentum=-0.5), dict(weight_decay=-1e-3)])
def test_sgd_refuses_each_negative_hyperparameter(kw):
    args = dict(lr=0.1, momentum=0.0, weight_decay=0.0)
    args.update(kw)
    with pytest.raises(ValueError, match="must be non-negative"):
        EmulatedSGD([_p()], **args)


@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1)])
def test_sgd_nesterov_needs_momentum_and_no_dampening(kw):
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        EmulatedSGD([_p()], lr=0.1, nesterov=True, **kw)
    EmulatedSGD([_p()], lr=0.1, nesterov=True, momentum=0.9)       # the valid case


@pytest.mark.parametrize("kw", [dict(lr=-1e-3), dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_adam_refuses_each_negative_hyperparameter(kw):
    with pytest.raises(ValueError, match="must be non-negative"):
        EmulatedAdam([_p()], **kw)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (-0.1, 0.999), (0.9, 1.0), (0.9, -0.01)])
def test_adam_refuses_betas_outside_0_1(betas):
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\)"):
        EmulatedAdamW([_p()], betas=betas)
    EmulatedAdamW([_p()], betas=(0.0, 0.0))                         # 0 is allowed


def test_sgd_writes_its_step_log(tmp_path):
    log = tmp_path / "sgd.jsonl"
    w = _p(5)
    opt = EmulatedSGD([("w", w)], lr=0.5, momentum=0.9, log=log)
    for _ in range(3):
        w.grad = torch.ones(5)
        opt.step()
    opt.close()
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [(r["step"], r["param"], r["numel"], r["shape"]) for r in recs] == [
        (0, "w", 5, [5]), (1, "w", 5, [5]), (2, "w", 5, [5])]
    # fp32 storage, a non-zero update of every entry: nothing absorbed, all changed
    assert all(r["n"] == 5 and r["absorbed"] == 0 for r in recs)


def test_no_log_file_without_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = _p()
    opt = EmulatedAdamW([w])
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt._log is None and list(tmp_path.iterdir()) == []


def test_last_stats_are_the_steps_stats():
    w = _p(4)
    opt = EmulatedSGD([w], lr=1.0)
    w.grad = torch.tensor([1.0, 0.0, -2.0, 0.0])
    opt.step()
    st = opt.last_stats["group0.param0"]
    assert st.n == 4 and st.zero == 2                      # two zero updates, counted


def test_parameter_names_by_group_and_position():
    a, b, c = _p(), _p(), _p()
    opt = EmulatedSGD([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=0.1)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert list(opt.last_stats) == ["group0.param0", "group0.param1", "group1.param0"]
    # the stochastic-rounding offsets: each parameter starts where the previous ends
    assert [opt._offsets[id(p)] for p in (a, b, c)] == [0, 6, 12]


def test_sparse_gradients_are_refused():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = EmulatedSGD([w], lr=0.1)
    w.grad = torch.zeros(4).to_sparse()
    with pytest.raises(TypeError, match="^sparse gradients are not supported$"):
        opt.step()


def _train(opt, w, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("make, keys", [
    (lambda w: EmulatedAdamW([w], lr=1e-2), ("exp_avg", "exp_avg_sq")),
    (lambda w: EmulatedSGD([w], lr=1e-2, momentum=0.9), ("momentum_buffer",)),
])
def test_mask_set_mid_training_zeroes_the_existing_state_there(make, keys):
    """set_mask: "the state is zeroed there now": moments built up before the mask are
    cleared at the masked-out entries at once, and kept elsewhere."""
    w = torch.nn.Parameter(torch.randn(8, 5, generator=torch.Generator().manual_seed(3)))
    opt = make(w)
    _train(opt, w, 3)
    before = {k: opt.state[w][k].clone() for k in keys}
    assert all(bool((v != 0).all()) for v in before.values())
    mask = torch.zeros(8, 5, dtype=torch.bool)
    mask[::2] = True
    opt.set_mask(w, mask)
    for k in keys:
        now = opt.state[w][k]
        assert bool((now[~mask] == 0).all()), k
        assert torch.equal(now[mask], before[k][mask]), k
    frozen = w.detach()[~mask].clone()
    _train(opt, w, 2, seed=1)
    assert torch.equal(w.detach()[~mask], frozen)
