"""gatesim.track under hostile use: parameters replaced or added mid-run, missing and NaN
gradients, errors inside the tracker, close() twice, a crash mid-run. Documented behaviour,
no crash, nothing lost from the log, training unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatesim.tracking import read_log, track
from test_track import Net, OPTIMIZERS, assert_same_run, reference_stats, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

PARAMS = 7  # Net's parameters


def _records(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def test_param_replaced_in_model_and_optimizer(tmp_path):
    """module.weight = nn.Parameter(...) plus the optimizer's param_groups pointed at it (and
    its state dropped): the new tensor is tracked under the same name from its first step,
    its what-ifs restart from its values (anchored), and the run is bit-identical."""
    def replace(s, model, opt):
        if s == 3:
            old = model.proj.weight
            new = nn.Parameter(old.detach() * 0.5)
            new.grad = old.grad
            model.proj.weight = new
            group = opt.param_groups[0]
            i = next(i for i, q in enumerate(group["params"]) if q is old)
            group["params"][i] = new
            opt.state.pop(old, None)

    plain = train(torch.bfloat16, "adamw", steps=6, before_step=replace)
    log = tmp_path / "r.jsonl"
    tracked = train(torch.bfloat16, "adamw", steps=6, before_step=replace,
                    track_kw=dict(what_if=["master"], log=log))
    assert_same_run(plain[:2], tracked[:2])
    recs = [r for r in _records(log) if r["param"] == "proj.weight"]
    assert [r["step"] for r in recs if r["policy"] == "own"] == list(range(6))
    assert sorted({r["step"] for r in recs if r["anchored"]}) == [0, 3]
    # the master what-if restarted from the halved weights at step 3: it stays next to the
    # real weights (without the restart it would be about twice as large)
    wm = tracked[2].what_if_weights("proj.weight", "master")["master"]
    real = plain[0].proj.weight.detach().float()
    assert (wm - real).abs().max() < 0.05 * real.abs().max()


def test_param_replaced_in_model_only(tmp_path):
    """Only the model's attribute replaced: the optimizer still steps the old tensor, which
    is what is tracked (under its old name); the new one gets gradients but no step."""
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["adamw"](model.parameters())
    old = model.proj.weight
    t = track(opt, model=model, log=tmp_path / "m.jsonl", on_error="raise")

    def replace(s, m, o):
        if s == 2:
            m.proj.weight = nn.Parameter(old.detach().clone())

    train(torch.bfloat16, steps=5, model=model, optimizer=opt, before_step=replace)
    t.close()
    recs = [r for r in _records(tmp_path / "m.jsonl") if r["param"] == "proj.weight"]
    # step 2: the old tensor still holds the gradient of that step's backward; from step 3
    # on only the new tensor gets gradients, and the optimizer does not hold it
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert not any(r["anchored"] for r in recs[1:])
    assert not any(r["param"].startswith("group") for r in _records(tmp_path / "m.jsonl"))


def test_param_group_added_and_removed(tmp_path):
    model = Net(torch.bfloat16)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head")],
                          lr=0.05)
    t = track(opt, model=model, log=tmp_path / "g.jsonl", what_if=["master"],
              on_error="raise")

    def edit(s, m, o):
        if s == 2:
            o.add_param_group({"params": list(m.head.parameters()), "lr": 0.1})
        if s == 4:
            o.param_groups[0]["params"] = [p for p in o.param_groups[0]["params"]
                                           if p is not m.norm.weight]

    train(torch.bfloat16, steps=6, model=model, optimizer=opt, before_step=edit)
    t.close()
    recs = _records(tmp_path / "g.jsonl")
    head = [r for r in recs if r["param"] == "head.weight" and r["policy"] == "own"]
    assert [r["step"] for r in head] == [2, 3, 4, 5] and head[0]["anchored"]
    assert head[0]["group"] == 1
    norm = [r["step"] for r in recs if r["param"] == "norm.weight" and r["policy"] == "own"]
    assert norm == [0, 1, 2, 3]
    with pytest.raises(KeyError):  # it left the optimizer: its buffers were freed
        t.what_if_weights("norm.weight", "master")
    assert t.what_if_weights("norm.bias", "master")["master"] is not None


def test_param_resized_in_place(tmp_path):
    """p.data replaced by a tensor of another shape (plain SGD keeps no state): buffers and
    what-ifs restart, no crash."""
    model = Net(torch.float32)
    opt = OPTIMIZERS["sgd_plain"](model.parameters())
    t = track(opt, model=model, what_if=["bf16"], log=tmp_path / "s.jsonl", on_error="raise")

    def grow(s, m, o):
        if s == 2:
            m.emb.weight.data = torch.cat([m.emb.weight.data, m.emb.weight.data[:8]])
            m.emb.weight.grad = torch.cat([m.emb.weight.grad, m.emb.weight.grad[:8]])

    train(torch.float32, "sgd_plain", steps=4, model=model, optimizer=opt, before_step=grow)
    t.close()
    emb = [r for r in _records(tmp_path / "s.jsonl") if r["param"] == "emb.weight"]
    assert [r["shape"][0] for r in emb if r["policy"] == "own"] == [64, 64, 72, 72]
    assert [r["anchored"] for r in emb if r["policy"] == "bf16"] == [True, False, True, False]
    assert t.what_if_weights("emb.weight", "bf16")["param"].shape == (72, 48)


def test_params_without_gradient_are_not_recorded(tmp_path):
    """.grad is None: torch's optimizers skip the parameter and so does the log; a zero
    gradient is recorded (AdamW still decays)."""
    model = Net(torch.bfloat16)
    model.head.bias.requires_grad_(False)
    opt = OPTIMIZERS["adamw"](model.parameters())
    t = track(opt, model=model, log=tmp_path / "n.jsonl", what_if=["master"], on_error="raise")

    def no_grad(s, m, o):
        if s == 1:
            m.norm.weight.grad = None
        if s == 2:
            m.norm.weight.grad = torch.zeros_like(m.norm.weight)

    train(torch.bfloat16, steps=3, model=model, optimizer=opt, before_step=no_grad)
    t.close()
    recs = _records(tmp_path / "n.jsonl")
    assert not any(r["param"] == "head.bias" for r in recs)
    assert [r["step"] for r in recs if r["param"] == "norm.weight" and r["policy"] == "own"] \
        == [0, 2]
    zero_grad = next(r for r in recs if r["param"] == "norm.weight" and r["step"] == 2
                     and r["policy"] == "own")
    assert zero_grad["zero"] < zero_grad["n"] and not zero_grad["anchored"]
    assert len(recs) == 3 * 6 * 2 - 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_gradient_is_counted_not_raised(dtype, tmp_path):
    saved = {}

    def poison(s, m, o):
        if s == 2:
            m.proj.weight.grad[0, :5] = float("nan")
            m.proj.weight.grad[1, 0] = float("inf")
        saved[s] = m.proj.weight.detach().clone()

    plain = train(dtype, "adamw", steps=4, before_step=poison)
    log = tmp_path / "nan.jsonl"
    model, opt, t = train(dtype, "adamw", steps=4, before_step=poison,
                          track_kw=dict(what_if=["master", "bf16_sr"], log=log))
    assert_same_run(plain[:2], (model, opt))
    recs = {(r["step"], r["policy"]): r for r in read_log(log).to_dict("records")
            if r["param"] == "proj.weight"}
    own = recs[(2, "own")]
    assert own["nonfinite_delta"] == 6 and own["nonfinite_result"] == 6
    assert own["nonfinite_param"] == 0 and recs[(3, "own")]["nonfinite_param"] == 6
    for pol in ("master", "bf16_sr"):
        assert recs[(2, pol)]["nonfinite_delta"] == 6 and recs[(2, pol)]["nonfinite_result"] == 6
    assert len(read_log(log)) == 4 * PARAMS * 3 and t.errors == 0
    # the step after: NaN params stay NaN; the offline reference agrees
    after = model.proj.weight.detach()
    st = t.last_stats[("proj.weight", "own")]
    ref = reference_stats(saved[3], after, t.last_update("proj.weight"))
    assert st.nonfinite_param == ref["nonfinite_param"] == 6
    assert st.changed == ref["changed"] and st.absorbed == ref["absorbed"]


def test_close_twice_and_steps_after_close(tmp_path):
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["sgd"](model.parameters())
    log = tmp_path / "c.jsonl"
    with track(opt, model=model, log=log, on_error="raise") as t:
        train(torch.bfloat16, steps=2, model=model, optimizer=opt)
    t.close()
    t.close()
    assert t.closed and len(opt._optimizer_step_pre_hooks) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    train(torch.bfloat16, steps=2, model=model, optimizer=opt)
    assert len(_records(log)) == 2 * PARAMS and t.steps_seen == 2
    assert t.summary()["steps"].max() == 2  # summaries survive close()
    with pytest.raises(RuntimeError, match="closed"):
        t.last_update("proj.weight")


def test_error_inside_tracker_warns_and_training_goes_on(tmp_path, monkeypatch):
    """on_error="warn" (default): an exception inside the tracker skips that step's tracking
    with a RuntimeWarning; the run is bit-identical and later steps are tracked again."""
    import gatesim.tracking.observed as T

    real = T.step_stats
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third parameter of step 0
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(T, "step_stats", flaky)
    plain = train(torch.bfloat16, "adamw", steps=4)
    log = tmp_path / "e.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracked = train(torch.bfloat16, "adamw", steps=4,
                        track_kw=dict(log=log, on_error="warn"))
    assert any("injected failure" in str(w.message) for w in caught)
    assert_same_run(plain[:2], tracked[:2])
    t = tracked[2]
    assert t.errors == 1 and t.steps_seen == 4 and t.steps_tracked == 3
    recs = _records(log)
    assert sorted({r["step"] for r in recs}) == [1, 2, 3]  # nothing half-written of step 0
    assert sorted({r["step"] for r in recs if r["anchored"]}) == [1]
    # on_error="raise" surfaces the error
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="injected"):
        train(torch.bfloat16, "adamw", steps=4, track_kw=dict(on_error="raise"))


def test_optimizer_step_that_raises(tmp_path):
    """A step that raises between the hooks (here: the closure) leaves nothing pending; the
    next step is tracked normally."""
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["sgd_plain"](model.parameters())
    t = track(opt, model=model, log=tmp_path / "x.jsonl", on_error="raise")

    def bad():
        raise ValueError("closure failed")

    with pytest.raises(ValueError):
        opt.step(bad)
    train(torch.bfloat16, steps=2, model=model, optimizer=opt)
    t.close()
    recs = _records(tmp_path / "x.jsonl")
    assert sorted({r["step"] for r in recs}) == [0, 1] and len(recs) == 2 * PARAMS


def test_log_survives_a_crash(tmp_path):
    """The log is flushed after every step: a process killed without close() (os._exit, no
    atexit, no buffers flushed) keeps every finished step, each line complete JSON."""
    log = tmp_path / "crash.jsonl"
    here = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {here!r})
        import torch
        from test_track import train
        def die(s, m, o):
            if s == 3:
                os._exit(7)
        train(torch.bfloat16, "adamw", steps=6, before_step=die,
              track_kw=dict(log={str(log)!r}, what_if=["master"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 7, proc.stderr
    recs = _records(log)
    assert len(recs) == 3 * PARAMS * 2
    assert sorted({r["step"] for r in recs}) == [0, 1, 2]


def test_two_tensors_under_one_name(tmp_path):
    """The model's attribute replaced and the new tensor added to the optimizer while the old
    one stays in it: both are stepped, so both are tracked, the second as 'proj.weight#2'."""
    model = Net(torch.bfloat16)
    opt = OPTIMIZERS["sgd_plain"](model.parameters())
    old = model.proj.weight
    t = track(opt, model=model, log=tmp_path / "d.jsonl", on_error="raise")

    def swap(s, m, o):
        if s == 1:
            m.proj.weight = nn.Parameter(old.detach().clone())
            o.add_param_group({"params": [m.proj.weight]})
        if s >= 2:
            old.grad = torch.zeros_like(old)  # keep the old tensor stepping

    train(torch.bfloat16, "sgd_plain", steps=4, model=model, optimizer=opt, before_step=swap)
    t.close()
    names = {(r["step"], r["param"]) for r in _records(tmp_path / "d.jsonl")}
    assert {(s, "proj.weight") for s in range(4)} <= names
    assert {(2, "proj.weight#2"), (3, "proj.weight#2")} <= names


def test_optimizer_that_cannot_be_replayed_falls_back_to_stored(tmp_path):
    """gatesim's EmulatedAdamW looks its parameters up by identity, so its step fails on the
    replay's copy: one RuntimeWarning, then the stored update (intended="stored") for that
    optimizer; nothing skipped, training unchanged."""
    from gatesim.optim import EmulatedAdamW

    def run(tracked):
        model = Net(torch.bfloat16)
        opt = EmulatedAdamW(model.named_parameters(), lr=1e-4)
        t = track(opt, model=model, log=tmp_path / "e.jsonl", what_if=["master"],
                  on_error="raise") if tracked else None
        train(torch.bfloat16, steps=3, model=model, optimizer=opt)
        return model, opt, t

    plain = run(False)
    with pytest.warns(RuntimeWarning, match="cannot be replayed"):
        model, opt, t = run(True)
    for (n, p), (_, q) in zip(plain[0].named_parameters(), model.named_parameters()):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16)), n
    recs = _records(tmp_path / "e.jsonl")
    assert len(recs) == 3 * PARAMS * 2 and {r["intended"] for r in recs} == {"stored"}
    assert t.errors == 0 and t.steps_tracked == 3
