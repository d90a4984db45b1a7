"""Peak resident memory of a diff stays within a small multiple of the largest tensor.

Measured in a fresh subprocess: after importing everything and running a tiny diff (so
imports, numba compilation and lazy modules are in the baseline), the kernel's peak-RSS
counter is reset (``echo 5 > /proc/self/clear_refs``) and the increase of ``VmHWM`` over
the then current ``VmRSS`` is the peak of the run. Where the reset is not allowed, the
test falls back to ``ru_maxrss`` minus the baseline's, which can only under-report the
peak relative to an import-time high-water mark (then printed as such). Documented bounds
(README, "Checkpoint diff"), for a largest tensor of L bytes stored in bf16:

* sparsity-only pass: peak increase <= 4 L + 64 MiB, over a checkpoint of 12 L per side
  (reading everything at once would need 24 L);
* full diff (spectral metrics): peak increase <= 24 L + 64 MiB (the float64 metric buffers
  hold 4 bytes per stored bf16 byte).
"""
import json
import subprocess
import sys

import pytest

from gatesim.diff.synthetic import save_sharded, write_planted_pair

MiB = 2 ** 20

SCRIPT = r"""
import json, re, resource, shutil, sys, tempfile
import torch
import gatesim.diff as gd
from gatesim.diff.synthetic import save_sharded
d = tempfile.mkdtemp()
save_sharded({"a.weight": torch.randn(64, 32).to(torch.bfloat16), "b": torch.randn(8)}, d + "/x")
gd.diff(d + "/x", d + "/x", d + "/o", progress=False)      # imports, JIT, lazy modules
shutil.rmtree(d)

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

def reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS"), True
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False

def peak(exact):
    return status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

base, exact = reset()
gd.diff(sys.argv[1], sys.argv[2], sparsity_only=True, progress=False)
sparse = peak(exact) - base
base, exact = reset()
gd.diff(sys.argv[3], sys.argv[4], progress=False, figures=False)
full = peak(exact) - base
print(json.dumps({"base": base, "sparse": sparse, "full": full, "exact": exact}))
"""


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    L = 8192 * 1024 * 2                                    # 16 MiB of bf16
    # 12 tensors of L per side; one planted pair stored under 12 names (cheap to make)
    write_planted_pair(root / "one_a", root / "one_b",
                       [("w", (8192, 1024))], shard_bytes=None)
    from safetensors.torch import load_file
    a, b = load_file(root / "one_a" / "model.safetensors")["w"], \
        load_file(root / "one_b" / "model.safetensors")["w"]
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)]
    save_sharded({n: a.clone() for n in names}, root / "sa", shard_bytes=64 * MiB)
    save_sharded({n: b.clone() for n in names}, root / "sb", shard_bytes=64 * MiB)
    few = [("model.layers.0.mlp.up_proj.weight", (8192, 1024)),
           ("model.layers.0.mlp.down_proj.weight", (1024, 8192)),
           ("model.layers.0.input_layernorm.weight", (1024,))]
    write_planted_pair(root / "fa", root / "fb", few, shard_bytes=64 * MiB)
    return root, L


def test_peak_rss_bounded_by_largest_tensor(pairs):
    root, L = pairs
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(root / "sa"), str(root / "sb"),
                        str(root / "fa"), str(root / "fb")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"({'VmHWM reset' if m['exact'] else 'ru_maxrss fallback'}) "
          f"L = {L / MiB:.0f} MiB; sparsity-only +{m['sparse'] / MiB:.0f} MiB "
          f"({m['sparse'] / L:.1f} L), full +{m['full'] / MiB:.0f} MiB ({m['full'] / L:.1f} L)")
    assert m["sparse"] <= 4 * L + 64 * MiB, m
    assert m["full"] <= 24 * L + 64 * MiB, m
