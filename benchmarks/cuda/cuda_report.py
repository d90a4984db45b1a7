"""One-shot GPU check: build the CUDA extension, run the CUDA tests, print a timing table.

Meant for a lent H100/H200 (finishes in a few minutes):

    python benchmarks/cuda/cuda_report.py [--no-build] [--no-tests] [--size N] [--out DIR]

Timings use CUDA events (median of --repeat runs after warm-up) and are reported against a
device-to-device copy measured in the same run, as bandwidth fractions:
  * nearest_even fp32 -> bf16 (to_dtype into a preallocated bf16 tensor, 6 B/element);
  * the replay step "fp32 master + fp32 delta -> bf16 param, with stats"
    (apply_update; 12 B/element for master read+write and delta read, 16 with the bf16
    param read and write), against torch.compile of the equivalent eager code;
  * stochastic rounding fp32 -> bf16 against torch.compile of the randint-add-mask trick;
  * EmulatedAdamW.step() with stats against torch.optim.AdamW(fused=True).step().
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build() -> None:
    env = dict(os.environ, GATESIM_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    t0 = time.time()
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    print(f"built the CUDA extension in {time.time() - t0:.0f} s", flush=True)


def run_tests() -> bool:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--maxfail=10", "--tb=short",
                          "-p", "no:cacheprovider", "tests/test_cuda.py"],
                         cwd=ROOT)
    print(f"CUDA tests {'passed' if res.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f} s",
          flush=True)
    return res.returncode == 0


def timed(fn, repeat: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def timings(n: int, repeat: int, quick: bool = False) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT))
    import gatesim
    from gatesim.optim import EmulatedAdamW, PrecisionPolicy

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, device=dev, generator=g) * 0.02
    y32 = torch.empty_like(x)
    y16 = torch.empty(n, device=dev, dtype=torch.bfloat16)
    rows = []

    def row(name, ms, bytes_per_elem=None, ref=None, target=None, note=""):
        r = dict(name=name, ms=ms)
        if bytes_per_elem:
            r["GB/s"] = n * bytes_per_elem / ms / 1e6
        r["ref"], r["target"], r["note"] = ref, target, note
        rows.append(r)
        return r

    copy_ms = timed(lambda: y32.copy_(x), repeat)
    copy = row("copy fp32 -> fp32 (device to device)", copy_ms, 8)
    row("torch eager bf16_out.copy_(x)", timed(lambda: y16.copy_(x), repeat), 6)
    ne = row("gatesim to_dtype nearest_even -> bf16", timed(
        lambda: gatesim.to_dtype(x, torch.bfloat16, out=y16), repeat), 6)
    ne["ratio"] = ne["GB/s"] / copy["GB/s"]
    ne["target"] = ">= 0.90 of copy bandwidth"
    row("gatesim quantize nearest_even bf16 (fp32 out)", timed(
        lambda: gatesim.quantize(x, gatesim.BF16, out=y32), repeat), 8)
    sr = row("gatesim to_dtype stochastic -> bf16", timed(
        lambda: gatesim.to_dtype(x, torch.bfloat16, "stochastic", seed=1, out=y16), repeat), 6)

    def trick(xx):
        r = torch.randint(0, 1 << 16, xx.shape, device=xx.device, dtype=torch.int32)
        return ((xx.view(torch.int32) + r) & -65536).view(torch.float32).to(torch.bfloat16)

    try:
        if quick:
            raise RuntimeError("skipped (--quick)")
        ctrick = torch.compile(trick)
        trick_ms = timed(lambda: ctrick(x), repeat)
        row("torch.compile randint-add-mask trick", trick_ms, 6)
        sr["ratio"] = trick_ms / sr["ms"]
        sr["target"] = ">= 2x faster than compiled trick"
    except Exception as exc:  # pragma: no cover
        row("torch.compile randint trick", float("nan"), note=f"unavailable: {exc!r:.80}")

    # the replay step
    m = x.clone()
    p = gatesim.to_dtype(m, torch.bfloat16)
    d = torch.randn(n, device=dev, generator=g) * 1e-5
    rep = row("gatesim replay step (master+delta -> bf16, stats)", timed(
        lambda: gatesim.apply_update(p, d, master=m), repeat), 12)
    rep["ratio"] = rep["GB/s"] / copy["GB/s"]
    rep["target"] = ">= 0.85 of copy bandwidth (12 B/elem)"
    moved = rep["GB/s"] * 16 / 12
    rep["note"] = (f"; counting the 16 B it moves (bf16 param read for the statistics and "
                   f"written): {moved:.0f} GB/s = {moved / copy['GB/s']:.2f} of copy")
    row("gatesim replay step, no stats", timed(
        lambda: gatesim.apply_update(p, d, master=m, stats=False), repeat), 12)

    def eager(m_, d_, p_):
        m_.add_(d_)
        new = m_.to(torch.bfloat16)
        changed = new.view(torch.int16) != p_.view(torch.int16)
        absorbed = (d_ != 0) & ~changed
        p_.copy_(new)
        return changed.sum(), absorbed.sum()

    row("torch eager replay (changed/absorbed counts only)", timed(lambda: eager(m, d, p), repeat), 12)
    try:
        if quick:
            raise RuntimeError("skipped (--quick)")
        ceager = torch.compile(eager)
        ce_ms = timed(lambda: ceager(m, d, p), repeat)
        row("torch.compile replay (counts only)", ce_ms, 12)
        rep["vs_compile"] = ce_ms / rep["ms"]
    except Exception as exc:  # pragma: no cover
        row("torch.compile replay", float("nan"), note=f"unavailable: {exc!r:.80}")

    # optimizers on a 4096 x 4096 parameter
    from gatesim.optim import adam_variant

    side = 4096
    w0 = torch.randn(side, side, device=dev, generator=g) * 0.02
    grad = torch.randn(side, side, device=dev, generator=g) * 1e-3
    pb = torch.nn.Parameter(w0.clone())
    pb.grad = grad.clone()
    theirs = torch.optim.AdamW([pb], lr=1e-4, fused=True)
    tb = timed(theirs.step, max(5, repeat // 2))
    variant = adam_variant(torch.device(dev))
    for label, pol in (("fp32 policy", PrecisionPolicy()),
                       ("bf16 + fp32 master", PrecisionPolicy(param_format="bf16", master=True))):
        for fused in (True, False):
            pa = torch.nn.Parameter(w0.clone())
            pa.grad = grad.clone()
            ours = EmulatedAdamW([pa], lr=1e-4, policy=pol)
            ours.fused = fused
            ta = timed(ours.step, max(5, repeat // 2))
            how = f"fused, variant {variant}" if fused and variant is not None else "torch ops"
            r = row(f"EmulatedAdamW.step() with stats ({label}, {how})", ta)
            r["ratio"] = ta / tb
            if fused:
                r["target"] = "<= 1.3x torch fused AdamW"
    row("torch AdamW(fused=True).step() (16.7M)", tb)
    return rows


def adam_probe_report(out_dir) -> None:
    """Which part of the fused Adam step differs from torch's ops, per variant (and the
    probe's values, saved for analysis when no variant matches)."""
    import numpy as np
    import torch

    from gatesim.optim import adam_probe

    for large in (False, True):
        (grad, m0, v0), (m_ref, v_ref, d_ref), fused = adam_probe(torch.device("cuda"), large)
        print(f"adam probe (lerp weight {'>=' if large else '<'} 0.5): mismatches of "
              f"exp_avg / exp_avg_sq / direction per variant")
        line = []
        for variant, (m, v, p) in fused.items():
            line.append(f"{variant}:{int((m.view(torch.int32) != m_ref.view(torch.int32)).sum())}/"
                        f"{int((v.view(torch.int32) != v_ref.view(torch.int32)).sum())}/"
                        f"{int((p != d_ref).sum())}")
        print("  " + "  ".join(line))
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            k = 4096
            arrays = dict(grad=grad, m0=m0, v0=v0, m_ref=m_ref, v_ref=v_ref, d_ref=d_ref)
            for variant, (m, v, p) in fused.items():
                arrays.update({f"m{variant}": m, f"v{variant}": v, f"d{variant}": p})
            np.savez_compressed(Path(out_dir) / f"adam_probe_{int(large)}.npz",
                                **{name: t[:k].cpu().numpy() for name, t in arrays.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the torch.compile references")
    ap.add_argument("--size", type=int, default=8192 * 8192)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not args.no_build:
        build()
    ok = True if args.no_tests else run_tests()
    import torch

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  n={args.size}")
    try:
        rows = timings(args.size, args.repeat, args.quick)
    except Exception as exc:  # report what we have rather than nothing
        import traceback
        traceback.print_exc()
        rows = [dict(name=f"timings failed: {exc!r:.100}", ms=float("nan"), note="")]
    print(f"| {'operation':62s} | {'ms':>8s} | {'GB/s':>7s} | ratio | target")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 9}|-------|-------")
    for r in rows:
        gbs = f"{r['GB/s']:7.0f}" if "GB/s" in r else " " * 7
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        extra = f" (vs torch.compile: {r['vs_compile']:.2f}x faster)" if "vs_compile" in r else ""
        print(f"| {r['name']:62s} | {r['ms']:8.3f} | {gbs} | {ratio:5s} | "
              f"{r.get('target') or ''}{extra}{r['note']}")
    try:
        adam_probe_report(args.out)
    except Exception as exc:  # report the rest regardless
        print(f"adam probe failed: {exc!r}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tests_ok=ok,
                 rows=rows), indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
