"""The pilot that chose the network lab's default KL weight (rule fixed before the run):
GRPO, bf16+master, seed 0, the lab's defaults (80 steps, lr 5e-5) on both families, for
beta in (0, 0.05, 0.1, 0.2, 0.5, 1.0). KL_end = mean KL of the last 10 steps.
Rule: the default beta is the smallest beta of the grid with
  (a) KL_end(beta) <= 0.5 * KL_end(0) on both families (the anchor at least halves the drift), and
  (b) the held-out accuracy gain (final - start) >= 0.5 * the gain at beta 0 on both families.
If none qualifies, the finding is reported and the default is left as it is.
Result (2026-12-05): beta = 0.5 (table in gatesim/lab/run.py). About 20 CPU-minutes.

    .venv/bin/python examples/lab_kl_pilot.py [OUT]    (OUT default: results/kl_pilot)"""
import json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from gatesim.lab.train import CellConfig, run_cell

OUT = sys.argv[1] if len(sys.argv) > 1 else "results/kl_pilot"
BETAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
FAMS = ("arithmetic", "relations")

def one(args):
    fam, beta = args
    cfg = CellConfig(method="grpo", family=fam, beta=beta)
    r = run_cell({"cell": cfg.to_dict(), "out": f"{OUT}/out_{fam}_{beta}",
                  "progress": False})
    kl = r["curve"]["kl"]
    return dict(family=fam, beta=beta, kl_end=sum(kl[-10:]) / len(kl[-10:]),
                kl_max=max(kl), acc0=r["final"]["heldout_acc0"], acc=r["final"]["heldout_acc"],
                reward_last=r["final"]["reward_last"], seconds=r["seconds"])

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    jobs = [(f, b) for b in BETAS for f in FAMS]
    t0 = time.time()
    with ProcessPoolExecutor(2) as ex, open(f"{OUT}/results.jsonl", "w") as fh:
        for res in ex.map(one, jobs):
            print(json.dumps(res), flush=True)
            fh.write(json.dumps(res) + "\n"); fh.flush()
    print("wall", time.time() - t0)
