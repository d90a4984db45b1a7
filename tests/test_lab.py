"""gatesim.lab pieces: the exact reward, the tasks, the transformers loader, checkpoints, and
single cells (lr 0, the KL penalty, the torch optimizer with gatesim.track, a causal LM).

Everything runs on tiny randomly initialised models written by
:func:`gatesim.lab.model.make_tiny_model` (with the bundled MiniLM's tokenizer), except the
loader test, which reads the real bundled MiniLM."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import gatesim.diff
from gatesim.lab.model import ModelError, load_model, make_tiny_model, save_checkpoint
from gatesim.lab.task import FAMILIES, TaskError, build_task, family_items, reward
from gatesim.lab.train import CellConfig, run_cell


@pytest.fixture(scope="module")
def tiny_masked(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_masked"), "masked", layers=1)


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_causal"), "causal", layers=1)


def _cell(model, tmp_path, **kw):
    base = dict(model=str(model), steps=3, batch=4, group=4, max_train=8, max_heldout=8,
                eval_every=2)
    base.update(kw)
    cfg = CellConfig(**base)
    return cfg, run_cell({"cell": cfg.to_dict(), "out": str(tmp_path)})


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# -- reward ---------------------------------------------------------------------------
def test_reward_right_wrong_malformed():
    correct = torch.tensor([2, 0, 1, 3, 1, 0])
    answers = torch.tensor([2, 1, 1, 0, -1, 7])  # right, wrong, right, wrong, neg, out of range
    assert reward(answers, correct, n_candidates=4).tolist() == [1, 0, 1, 0, 0, 0]
    # without the candidate count an index past the end is simply not the right one
    assert reward(torch.tensor([5]), torch.tensor([5])).tolist() == [1.0]
    assert reward(torch.tensor([5]), torch.tensor([5]), n_candidates=4).tolist() == [0.0]
    # non-integer, NaN and inf answers are malformed: 0, never an error
    fl = torch.tensor([2.0, 2.5, float("nan"), float("inf"), 0.0])
    assert reward(fl, torch.tensor([2, 2, 2, 2, 0]), 4).tolist() == [1, 0, 0, 0, 1]
    assert reward(torch.tensor([True, False]), torch.tensor([1, 0])).tolist() == [0, 0]
    # groups: (B, G) answers against (B, 1) correct
    g = reward(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[1], [1]]), 2)
    assert g.dtype == torch.float32 and g.tolist() == [[0, 1], [1, 1]]
    with pytest.raises(TypeError, match="integer"):
        reward(torch.tensor([1]), torch.tensor([1.0]))


# -- tasks ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_task_single_tokens_and_split(family, tiny_masked):
    tok = load_model(tiny_masked).tokenizer
    task = build_task(family, tok)
    items, words = family_items(family)
    assert len(task.train_prompts) + len(task.heldout_prompts) == len(items)
    assert not set(task.train_prompts) & set(task.heldout_prompts)
    assert all(p.count(tok.mask_token) == 1 for p in task.train_prompts)
    for ids in (task.candidate_ids.tolist(),):
        assert [tok.convert_ids_to_tokens(i) for i in ids] == words
    assert int(task.train_answers.max()) < len(words)
    # the same split every time
    again = build_task(family, tok)
    assert again.heldout_prompts == task.heldout_prompts
    causal = build_task(family, tok, causal=True)
    assert not any(tok.mask_token in p for p in causal.train_prompts)


def test_task_errors(tiny_masked):
    tok = load_model(tiny_masked).tokenizer
    with pytest.raises(TaskError, match="unknown task family"):
        build_task("poetry", tok)
    with pytest.raises(TaskError, match="heldout_fraction"):
        build_task("arithmetic", tok, heldout_fraction=1.5)

    class NoMask:  # a tokenizer without a mask token cannot ask a masked-LM question
        mask_token = None

        def __init__(self):
            self.ids = {}   # one distinct id per text (str hashes vary between processes)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.ids.setdefault(text, len(self.ids))]}
    with pytest.raises(TaskError, match="mask token"):
        build_task("arithmetic", NoMask())


# -- loader and checkpoints ------------------------------------------------------------
def test_bundled_minilm_loads_and_saves_bit_exact(tmp_path):
    """The real bundled MiniLM through transformers: every weight of the saved fp32
    checkpoint has the bundled file's bits."""
    from gatesim.weights import bundled_model_path
    policy = load_model()
    assert policy.kind == "masked" and policy.tokenizer.mask_token == "[MASK]"
    out = save_checkpoint(policy, tmp_path / "ck", "fp32")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    saved = _tensors(out)
    with safe_open(str(bundled_model_path()), "pt") as f:
        # the pooler is unused by the lab; position_ids is an integer buffer, not a weight
        names = [k for k in f.keys()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids"]
        assert sorted(saved) == sorted(names)
        for k in names:
            assert torch.equal(saved[k].view(torch.int32), f.get_tensor(k).view(torch.int32)), k
    with pytest.raises(ValueError, match="bf16 grid"):
        save_checkpoint(policy, tmp_path / "bad", "bf16")


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path)


def test_checkpoint_roundtrip_and_diff_agree_with_run(tiny_masked, tmp_path):
    """A tuned bf16 checkpoint loads with the same loader and saves back bit for bit (diff:
    zero changes); gatesim diff of base vs tuned counts what the run counted in memory."""
    cfg, res = _cell(tiny_masked, tmp_path, lr=1e-3)
    tuned = tmp_path / "cells" / cfg.id / "checkpoint"
    again = load_model(tuned)
    save_checkpoint(again, tmp_path / "again", "bf16",
                    tensors={n: p.detach() for n, p in again.model.named_parameters()})
    same = gatesim.diff(tuned, tmp_path / "again", progress=False, sparsity_only=True)
    assert int(same.rows["changed"].sum()) == 0 and (same.rows["status"] == "paired").all()
    base = load_model(tiny_masked)
    save_checkpoint(base, tmp_path / "base", "bf16",
                    tensors={n: p.detach().to(torch.bfloat16).float()
                             for n, p in base.model.named_parameters()})
    d = gatesim.diff(tmp_path / "base", tuned, progress=False, sparsity_only=True)
    by_name = dict(zip(d.rows["name"], d.rows["changed"]))
    assert by_name == res["changed"]
    assert sum(res["changed"].values()) > 0


def test_lr_zero_fp32_changes_nothing(tiny_masked, tmp_path):
    cfg, res = _cell(tiny_masked, tmp_path, lr=0.0, precision="fp32")
    assert sum(res["changed"].values()) == 0
    cell = tmp_path / "cells" / cfg.id
    with safe_open(str(cell / "update_fp32.safetensors"), "pt") as f:
        assert all(bool((f.get_tensor(k) == 0).all()) for k in f.keys())
    base = _tensors(tiny_masked)
    tuned = _tensors(cell / "checkpoint")
    for k, t in tuned.items():
        assert torch.equal(t.view(torch.int32), base[k].view(torch.int32)), k
    assert res["final"]["kl"] == 0.0


def test_large_beta_keeps_kl_small(tiny_masked, tmp_path):
    """Gate I: with a large KL coefficient the policy stays near the reference. Stated
    bound (6 GRPO steps, lr 3e-3, beta = 1000): KL <= 5e-3 nats at every step and the final
    KL below a tenth of the same run's with beta = 0, which drifts past 1e-2. Why not
    tighter: Adam's step is scale-free and the KL's gradient is zero at the reference, so the
    first step moves every weight by about lr whatever beta is; beta pulls the policy back
    from the second step on."""
    kw = dict(steps=6, lr=3e-3, precision="fp32", group=8, method="grpo", seed=1)
    _, free = _cell(tiny_masked, tmp_path / "free", beta=0.0, **kw)
    _, tied = _cell(tiny_masked, tmp_path / "tied", beta=1000.0, **kw)
    assert free["curve"]["kl"][-1] > 1e-2
    assert max(tied["curve"]["kl"]) <= 5e-3
    assert tied["curve"]["kl"][-1] < 0.1 * free["curve"]["kl"][-1]


def test_torch_optimizer_with_track_logs_absorbed(tiny_masked, tmp_path):
    cfg, res = _cell(tiny_masked, tmp_path, optimizer="torch", precision="bf16", lr=1e-4)
    cell = tmp_path / "cells" / cfg.id
    recs = [json.loads(line) for line in open(cell / "track.jsonl")]
    assert recs and {r["policy"] for r in recs} == {"own"} and recs[0]["dtype"] == "bfloat16"
    steps = [json.loads(line) for line in open(cell / "steps.jsonl")]
    assert len(steps) == 3 and all(0 <= v <= 1 for s in steps for v in s["absorbed"].values())
    assert res["absorbed"] and any(v > 0 for v in res["absorbed"].values())
    tensors = _tensors(cell / "checkpoint")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    with pytest.raises(ValueError, match="master"):
        CellConfig(optimizer="torch", precision="bf16_master")


def test_emulated_log_has_absorbed_per_kind(tiny_masked, tmp_path):
    cfg, res = _cell(tiny_masked, tmp_path, precision="bf16", method="reinforce", lr=1e-4)
    steps = [json.loads(line) for line in open(tmp_path / "cells" / cfg.id / "steps.jsonl")]
    assert {"q", "k", "v", "o", "up", "down", "embed"} <= set(steps[0]["absorbed"])
    # pure bf16 at lr 1e-4 on weights of ~0.02: most intended updates are absorbed
    assert np.mean(list(res["absorbed"].values())) > 0.1


def test_causal_lm_cell(tiny_causal, tmp_path):
    policy = load_model(tiny_causal)
    assert policy.kind == "causal"
    cfg, res = _cell(tiny_causal, tmp_path, method="grpo", family="relations", lr=1e-3)
    back = load_model(tmp_path / "cells" / cfg.id / "checkpoint")
    assert back.kind == "causal" and sum(res["changed"].values()) > 0


def test_cell_config_rejects_bad_values():
    for bad in (dict(method="ppo2"), dict(precision="fp8"), dict(steps=-1), dict(lr=float("nan")),
                dict(group=1), dict(layers=0), dict(beta=-1.0)):
        with pytest.raises(ValueError):
            CellConfig(**bad)
    with pytest.raises(ValueError, match="unknown settings"):
        CellConfig.from_dict({"method": "grpo", "bogus": 1})
