"""The full metric set of one matrix pair (``gatesim.metrics.compare``) against the time
``gatesim diff`` takes for the same pair (issue 20, item 4: at most 1.5x).

One fp32 pair as in ``metrics_report.py`` (W0 ~ N(0, 0.02), W1 = W0 + D, D ~ N(0, 1e-4) on
10% of the entries, fixed seed), default 4096 x 11008, k = 64, alpha = 0.05, saved as two
one-tensor safetensors checkpoints. Each round runs, in turn and in this process, at one
torch thread: ``gatesim.diff.diff(base, tuned, workers=1, threads=1)`` (its wall time, from
opening the files to the summary; no output folder, no figures) and ``compare(W0, W1, k=64)``
on the tensors in memory. The rounds interleave the two so that the machine's load hits
both; the report gives each round, the medians and the ratio of the medians, the load
average and the share of the machine's CPU time other processes used. On an oversubscribed
machine the CPU seconds of this process (both sides single-threaded but for the diff's
checksum thread) are the steadier measure; both are printed. The NSS, angles and
update ranks of the two agree (printed).

Usage::

    python benchmarks/metrics/metrics_vs_diff.py                    # 4096x11008, 3 rounds
    python benchmarks/metrics/metrics_vs_diff.py --shape 1024x2752 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the in-place build


def _cpu() -> tuple:
    with open("/proc/stat") as f:
        j = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(j) - j[3] - j[4]) / hz, sum(j) / hz, t.user + t.system


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=64)
    args = p.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    import gatesim.diff as gd
    import gatesim.metrics as gm

    torch.set_num_threads(1)
    m, n = (int(x) for x in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(m, n, generator=g) * 0.02
    D = torch.randn(m, n, generator=g) * 1e-4 * (torch.rand(m, n, generator=g) < 0.1)
    W1 = W0 + D
    del D
    tmp = Path(tempfile.mkdtemp(prefix="gatesim_mvd_"))
    save_file({"w": W0.contiguous()}, str(tmp / "base.safetensors"))
    save_file({"w": W1.contiguous()}, str(tmp / "tuned.safetensors"))
    small = tmp / "s"
    small.mkdir()
    save_file({"w": W0[:64, :64].contiguous()}, str(small / "b.safetensors"))
    save_file({"w": W1[:64, :64].contiguous()}, str(small / "t.safetensors"))
    gd.diff(small / "b.safetensors", small / "t.safetensors", k=8, progress=False,
            figures=False)                                        # warm code paths
    gm.compare(W0[:64, :64].contiguous(), W1[:64, :64].contiguous(), k=8)
    td, tc, cd, cc, loads, others = [], [], [], [], [], []
    row = res = None
    for r in range(args.rounds):
        c0, l0 = _cpu(), os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        res = gd.diff(tmp / "base.safetensors", tmp / "tuned.safetensors", k=args.k,
                      workers=1, threads=1, progress=False, figures=False)
        td.append(time.perf_counter() - t)
        cd.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        row = gm.compare(W0, W1, k=args.k, angles=False)
        tc.append(time.perf_counter() - t)
        cc.append(time.process_time() - c)
        busy, total, own = (b - a for a, b in zip(c0, _cpu()))
        others.append(max(busy - own, 0.0) / max(total, 1e-9))
        loads.append((l0 + os.getloadavg()[0]) / 2)
        print(f"round {r}: diff {td[-1]:.1f} s, compare {tc[-1]:.1f} s "
              f"(t_svd {row['t_svd']:.1f}, t_spectral {row['t_spectral']:.1f}, "
              f"t_masks {row['t_masks']:.1f}), ratio {tc[-1] / td[-1]:.2f}; CPU s diff "
              f"{cd[-1]:.1f} compare {cc[-1]:.1f}, ratio {cc[-1] / cd[-1]:.2f}; load "
              f"{loads[-1]:.1f}, others' CPU share {others[-1]:.0%}", flush=True)
    d = res.rows.iloc[0]
    md, mc = statistics.median(td), statistics.median(tc)
    print(f"\n{m}x{n}, k={args.k}, 1 torch thread, {args.rounds} interleaved rounds: diff "
          f"median {md:.1f} s, compare median {mc:.1f} s, ratio {mc / md:.2f} (target <= 1.5); "
          f"CPU seconds of this process: diff median {statistics.median(cd):.1f}, compare "
          f"median {statistics.median(cc):.1f}, ratio "
          f"{statistics.median(cc) / statistics.median(cd):.2f}; "
          f"load {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores, others' CPU "
          f"share {min(others):.0%}..{max(others):.0%}")
    print(f"NSS diff {d['nss']:.9e} compare {row['nss']:.9e} (bound {row.get('nss_bound')}, "
          f"values {row.get('spectral_values')}); max angle L diff {d['angle_left_max_deg']:.6g} "
          f"compare {row['angle_left_max_deg']:.6g}; update erank {row['update_erank']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
