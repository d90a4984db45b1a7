"""Weight decay that bf16 silently drops, shown by gatesim.track on a real training loop.

A known user complaint: with bf16 parameters, AdamW's decoupled weight decay
``w <- w * (1 - lr * wd)`` does nothing, because a relative change of lr*wd (here 5e-5) is far
below half a bf16 ULP (2**-9 = 0.2% of |w| at least). This script fine-tunes a small BERT built
from the bundled, real MiniLM weights (all-MiniLM-L6-v2: its embeddings and first encoder
layer) in bf16 with ``torch.optim.AdamW`` for a few hundred steps, tracked by
``gatesim.track`` with one what-if policy (bf16 storage with fp32 master weights), and then
reads the JSON-lines log.

Parameters whose only update is the decay make the point cleanly: position embeddings past the
sequence length (rows 16..511) and word embeddings of tokens that never occur never get a
gradient (their Adam moments stay zero), so AdamW's intended update for them is exactly the
decay. The log shows every one of those updates absorbed, step after step, the stored values
never move, while the fp32-master what-if keeps the decay (its stored bf16 values move).

Run from the repository root (well under a minute on one CPU core)::

    python examples/track_bf16_decay.py [--steps 300] [--out results/track_bf16_decay]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the in-place build

import gatesim  # noqa: E402
from gatesim.tracking import read_log, summarize, track  # noqa: E402
from minilm import build_minilm  # noqa: E402

SEQ, VOCAB, USED = 16, 1500, (1000, 1500)  # sequences of 16 tokens from ids 1000..1499


def batches(n: int, batch: int, seed: int = 0):
    """A learnable synthetic task: label 1 if the sequence has more tokens from the upper
    half of the used id range than from the lower half."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = USED
    for _ in range(n):
        ids = torch.randint(lo, hi, (batch, SEQ), generator=g)
        yield ids, ((ids >= (lo + hi) // 2).sum(1) > SEQ // 2).long()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--out", default="results/track_bf16_decay")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the tensors are small, and one thread "
                         "avoids fork/join waits on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "track.jsonl"
    if log.exists():
        log.unlink()  # the tracker appends

    torch.manual_seed(0)
    model = build_minilm(layers=1, vocab=VOCAB, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    pos0 = model.embeddings.position_embeddings.weight.detach().clone()
    word0 = model.embeddings.word_embeddings.weight.detach().clone()
    t0 = time.perf_counter()
    with track(opt, model=model, what_if={"bf16+master": "master"}, log=log) as tracker:
        for step, (ids, y) in enumerate(batches(args.steps, args.batch)):
            loss = F.cross_entropy(model(ids).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}")
        master = {n: tracker.what_if_weights(n, "bf16+master") for n in
                  ("embeddings.position_embeddings.weight", "embeddings.word_embeddings.weight")}
    seconds = time.perf_counter() - t0

    df = read_log(log)
    print(f"\n{args.steps} steps of bf16 AdamW (lr {args.lr}, weight decay {args.wd}) on MiniLM "
          f"weights in {seconds:.1f} s, tracked; {len(df)} log records in {log}")
    table = summarize(df, by="kind")
    table = table[["kind", "policy", "changed_fraction", "absorbed_fraction", "absorbed_mass"]]
    print("\nPer module kind, over all steps (changed: stored values that moved per step; "
          "absorbed: intended updates the storage swallowed):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    # -- the decay-only entries -----------------------------------------------------------
    decay = args.lr * args.wd
    lo, hi = USED
    cases = {
        "embeddings.position_embeddings.weight": (pos0, slice(SEQ, None),
                                                  f"position rows {SEQ}..511"),
        "embeddings.word_embeddings.weight": (word0, slice(0, lo), f"token rows 0..{lo - 1}"),
    }
    print(f"\nDecay-only entries (no gradient ever; AdamW's intended update is -lr*wd*w, "
          f"relative {decay:.0e} per step):")
    result = {"seconds": seconds, "records": len(df)}
    for name, (w0, rows, label) in cases.items():
        p = dict(model.named_parameters())[name].detach()
        part0, part = w0[rows].float(), p[rows].float()
        moved_bf16 = int((part != part0).sum())
        m = master[name]
        moved_master = int((m["param"][rows].float() != part0).sum())
        shrink_master = 1 - float(m["master"][rows].abs().sum() / part0.abs().sum())
        own = df[(df.param == name) & (df.policy == "own")]
        # every decay-only entry is absorbed at every step: absorbed >= their count
        min_absorbed = int(own.absorbed.min())
        print(f"  {name} ({label}: {part0.numel()} values)")
        print(f"    stored bf16 after {args.steps} steps: {moved_bf16} of {part0.numel()} "
              f"values changed (intended shrink {1 - (1 - decay) ** args.steps:.2%})")
        print(f"    log, own storage: at every step at least {min_absorbed} of the "
              f"{p.numel()} intended updates of this matrix absorbed (>= the "
              f"{part0.numel()} decay-only values)")
        print(f"    what-if bf16 + fp32 master: {moved_master} of {part0.numel()} stored values "
              f"changed, master shrank by {shrink_master:.2%}")
        result[name] = dict(values=part0.numel(), moved_bf16=moved_bf16,
                            moved_master=moved_master, shrink_master=shrink_master,
                            min_absorbed=min_absorbed)
    png = tracker.plot(out / "absorbed.png",
                       title=f"bf16 AdamW on MiniLM: absorbed fraction per step (lr {args.lr}, "
                             f"wd {args.wd})")
    print(f"\nPlot of the absorbed fraction per module kind: {png}")
    return result


if __name__ == "__main__":
    main()
