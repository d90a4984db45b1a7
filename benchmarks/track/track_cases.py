"""Cases of the live-tracking benchmark (``track_bench.py``, ``track_report.py``).

The model is the whole bundled MiniLM (all-MiniLM-L6-v2: 6 BERT layers and the full 30522 x
384 word embeddings, real pretrained weights, 22.57M parameters) with a 2-way classification
head on mean-pooled tokens (``examples/minilm.py``), trained with ``torch.optim.AdamW``
(lr 1e-4, weight decay 0.01) on random token ids. One training step is forward + backward +
``optimizer.step()`` + ``zero_grad()``. The tracked step is the same with
``gatesim.track(optimizer, model=model, what_if=[one policy])`` attached: every parameter,
every step, intended update replayed in fp32 for bf16 parameters (``intended="fp32"``), the
own-storage statistics and one what-if (bf16 parameters: ``"master"``, bf16 storage with fp32
master weights; fp32 parameters: ``"bf16"``, bf16 storage), no log file.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the in-place build
sys.path.insert(0, str(ROOT / "examples"))

import gatesim  # noqa: E402
from gatesim.tracking import track  # noqa: E402
from minilm import build_minilm  # noqa: E402

WHAT_IF = {torch.bfloat16: "master", torch.float32: "bf16"}


@dataclass
class Case:
    """One model + optimizer (+ tracker) on fixed data; ``step()`` trains one step."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ids: torch.Tensor
    labels: torch.Tensor
    tracker: Optional[object] = None

    def forward_backward(self) -> None:
        F.cross_entropy(self.model(self.ids).float(), self.labels).backward()

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad()

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_case(dtype: torch.dtype = torch.bfloat16, batch: int = 8, seq: int = 128,
              tracked: bool = False, what_if: Optional[str] = None, seed: int = 0) -> Case:
    model = build_minilm(layers=6, dtype=dtype, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    case = Case(model, opt, ids, labels)
    if tracked:
        case.tracker = track(opt, model=model, what_if=[what_if or WHAT_IF[dtype]],
                             on_error="raise")
    return case


def check_identical(a: Case, b: Case) -> None:
    """The benchmark's own sanity check: after the same steps, tracked and untracked weights
    are bit-identical."""
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        itype = {4: torch.int32, 2: torch.int16}[p.element_size()]
        if not torch.equal(p.detach().view(itype), q.detach().view(itype)):
            raise AssertionError(f"tracked run differs from the untracked one at {n}")


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
