"""Tasks with a verifiable reward, built from the model's own tokenizer.

Every task family is a list of templated questions whose answer is **one token** of a small
candidate set (number words, adjectives, ...). The question carries an answer slot: for a
masked LM (BERT/MiniLM) the slot is the tokenizer's mask token inside the prompt; for a
causal LM the prompt ends where the answer begins. The policy is the distribution over the
candidate tokens at that position (:mod:`gatesim.lab.model`), so an answer is a candidate
index and the reward is exact: 1 when the sampled token is the correct one, else 0
(:func:`reward`).

Families (``FAMILIES``; the paper's "datasets", two of them, for the cross-data consistency):

* ``"arithmetic"``: counting relations between number words ``zero``..``twenty``:
  ``"the number after seven is [MASK] ."`` (successor, predecessor, plus two, minus two);
  21 candidates.
* ``"relations"``: word relations between adjectives: ``"the opposite of hot is [MASK] ."``
  in both directions and a second template; the candidates are the adjectives of the
  family.

The items of a family are split once, by a seeded permutation (``split_seed``), into
training and held-out prompts (``heldout_fraction``); held-out prompts only measure
accuracy. Every word must be a single token of the tokenizer, checked when the task is built
(:class:`TaskError` names the words that are not).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

__all__ = ["FAMILIES", "Task", "TaskError", "build_task", "reward", "family_items"]

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()

_ARITH = (  # (template, larger?): the answer is one of the two numbers asked about
    ("which is larger , {x} or {y} ? {slot} .", True),
    ("which is smaller , {x} or {y} ? {slot} .", False),
)

ANTONYMS = (("hot", "cold"), ("big", "small"), ("good", "bad"), ("fast", "slow"),
            ("happy", "sad"), ("high", "low"), ("long", "short"), ("rich", "poor"),
            ("hard", "soft"), ("early", "late"), ("strong", "weak"), ("full", "empty"),
            ("wet", "dry"), ("young", "old"), ("black", "white"), ("thick", "thin"),
            ("heavy", "light"), ("clean", "dirty"), ("cheap", "expensive"),
            ("loud", "quiet"), ("deep", "shallow"), ("wide", "narrow"), ("sweet", "sour"),
            ("tall", "short"), ("warm", "cool"), ("safe", "dangerous"), ("true", "false"),
            ("dark", "bright"), ("open", "closed"), ("alive", "dead"))

_REL = ("the opposite of {x} is {slot} .", "{x} is the opposite of {slot} .")

FAMILIES = ("arithmetic", "relations")


class TaskError(ValueError):
    """A task cannot be built with this tokenizer (a word is not one token, no mask token
    for a masked LM, an unknown family, ...)."""


def family_items(family: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(template with {slot}, answer word)], candidate words)`` of a family."""
    if family == "arithmetic":
        items = []
        n = len(NUMBER_WORDS)
        for tmpl, larger in _ARITH:
            for x in range(n):
                for y in range(n):
                    if x != y:
                        q = tmpl.replace("{x}", NUMBER_WORDS[x]).replace("{y}", NUMBER_WORDS[y])
                        items.append((q, NUMBER_WORDS[max(x, y) if larger else min(x, y)]))
        return items, list(NUMBER_WORDS)
    if family == "relations":
        items = []
        for a, b in ANTONYMS:
            for tmpl in _REL:
                items.append((tmpl.replace("{x}", a), b))
                items.append((tmpl.replace("{x}", b), a))
        words = sorted({w for pair in ANTONYMS for w in pair})
        # "short" answers two questions (tall, long): keep each (prompt, answer) once
        seen, uniq = set(), []
        for it in items:
            if it[0] not in seen:
                seen.add(it[0])
                uniq.append(it)
        return uniq, words
    raise TaskError(f"unknown task family {family!r}; choose from {FAMILIES}")


@dataclasses.dataclass
class Task:
    """Tokenized prompts of one family.

    Attributes:
        family: the family name.
        candidates: candidate words; ``candidate_ids`` their token ids (a 1-D long tensor).
        train_prompts / heldout_prompts: prompt strings (answer slot filled by the mask
            token, or cut off for a causal LM).
        train_answers / heldout_answers: index of the correct candidate (1-D long tensors).
    """

    family: str
    candidates: list
    candidate_ids: torch.Tensor
    train_prompts: list
    train_answers: torch.Tensor
    heldout_prompts: list
    heldout_answers: torch.Tensor

    def describe(self) -> dict:
        return dict(family=self.family, candidates=len(self.candidates),
                    train=len(self.train_prompts), heldout=len(self.heldout_prompts))


def _single_token_id(tokenizer, word: str) -> Optional[int]:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def build_task(family: str, tokenizer, *, causal: bool = False, heldout_fraction: float = 0.3,
               split_seed: int = 0, max_train: Optional[int] = None,
               max_heldout: Optional[int] = None) -> Task:
    """The prompts of ``family`` for ``tokenizer``; ``causal`` cuts each prompt at the answer
    slot instead of placing the mask token there. ``max_train`` / ``max_heldout`` keep the
    first training / held-out prompts only (tests)."""
    if not 0 < heldout_fraction < 1:
        raise TaskError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    items, words = family_items(family)
    ids, bad = [], []
    for w in words:
        t = _single_token_id(tokenizer, w)
        (bad.append(w) if t is None else ids.append(t))
    if bad:
        raise TaskError(f"family {family!r}: these candidate words are not one token of the "
                        f"tokenizer: {bad[:10]}")
    if len(set(ids)) != len(ids):
        raise TaskError(f"family {family!r}: two candidate words share a token id")
    if causal:
        prompts = [t.split("{slot}")[0].rstrip() for t, _ in items]
    else:
        mask = getattr(tokenizer, "mask_token", None)
        if not mask:
            raise TaskError("the tokenizer has no mask token: a masked-LM task needs one "
                            "(use causal=True for a causal LM)")
        prompts = [t.replace("{slot}", mask) for t, _ in items]
    answers = [words.index(a) for _, a in items]
    gen = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(len(items), generator=gen).tolist()
    n_held = max(1, int(round(heldout_fraction * len(items))))
    held, train = sorted(perm[:n_held]), sorted(perm[n_held:])
    if max_train is not None:
        train = train[:max_train]
    if max_heldout is not None:
        held = held[:max_heldout]
    pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
    return Task(family, list(words), torch.tensor(ids, dtype=torch.long),
                pick(train, prompts), torch.tensor(pick(train, answers), dtype=torch.long),
                pick(held, prompts), torch.tensor(pick(held, answers), dtype=torch.long))


def reward(answers, correct, n_candidates: Optional[int] = None) -> torch.Tensor:
    """Exact-match reward: 1.0 where the answer equals the correct candidate index, 0.0
    otherwise, as float32.

    ``answers`` may hold anything a policy could emit: an index outside
    ``0..n_candidates-1`` (when ``n_candidates`` is given), a negative index or a
    non-integer value is a malformed answer and gets 0, never an error. ``correct`` must be
    integer indices broadcastable to ``answers``.
    """
    a = torch.as_tensor(answers)
    c = torch.as_tensor(correct)
    if c.is_floating_point() or c.dtype == torch.bool:
        raise TypeError(f"correct answers must be integer indices, got {c.dtype}")
    if a.is_floating_point():
        whole = torch.isfinite(a) & (a == torch.round(a))
        a = torch.where(whole, a, torch.full_like(a, -1)).to(torch.long)
    elif a.dtype == torch.bool or a.is_complex():
        return torch.zeros(torch.broadcast_shapes(a.shape, c.shape), dtype=torch.float32)
    ok = a >= 0
    if n_candidates is not None:
        ok &= a < n_candidates
    return (ok & (a == c)).to(torch.float32)


def sample_batch(n_train: int, batch: int, step: int, seed: int) -> Sequence[int]:
    """Prompt indices of one step: a seeded permutation per epoch, so each epoch visits every
    training prompt once and the same (seed, step) always gives the same batch."""
    per_epoch = max(1, n_train // batch)
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_train, generator=gen)
    return perm[pos * batch:(pos + 1) * batch].tolist() if n_train >= batch else \
        perm.tolist()
