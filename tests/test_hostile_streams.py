"""Hostile inputs, class 3 of issue 22: update streams carry checksums, and replay verifies
every file and every count before the first step. Each error is a StreamError (a
ValueError) naming the file and the field; the CLI says it in one line, exit 2."""
import json
import os
import shutil

import pytest

from gatesim.sim.config import CellConfig
from gatesim.sim.run import run_cell
from gatesim.sim.stream import STREAM_FORMAT, Stream, StreamError, _canonical, replay
from gatesim.integrity import checksum_bytes
from hostile import assert_refused

SMALL = dict(rows=64, n_contexts=16, n_targets=4, batch=4, group=4, steps=6, eval_every=3,
             k=4, policies=("fp32",))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recorded run (run_cell) re-sharded 2 steps per shard: 3 shards of equal size."""
    import torch
    from gatesim.sim.stream import StreamWriter
    root = tmp_path_factory.mktemp("stream")
    run_cell(CellConfig(**SMALL), record=root / "run")
    src = Stream(root / "run")
    w = StreamWriter(root / "s", src.initial(), config=src.manifest["config"],
                     policy=src.manifest["policy"], seed=src.manifest["seed"], shard_steps=2)
    for step, delta, alpha, decay in src.updates():
        w.add(delta, alpha, decay, step)
    w.close()
    assert len(Stream(root / "s").manifest["shards"]) == 3
    # re-sharding changes nothing of the replay
    assert torch.equal(replay(root / "s", "bf16").weights, replay(src, "bf16").weights)
    return root / "s"


@pytest.fixture
def stream(recorded, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(recorded, d)
    return d


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d, m, reseal=False):
    if reseal:         # a consistent manifest checksum: only the field checks can catch it
        m["manifest_checksum"] = checksum_bytes(_canonical(m))
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def _refused(d, *names):
    with pytest.raises(StreamError) as info:
        replay(d, "bf16")
    for n in names:
        assert n in str(info.value), (n, str(info.value))
    assert_refused(["replay", d, "--policy", "bf16"], d, *names)
    return info.value


def test_good_stream_replays(stream):
    s = Stream(stream)
    assert s.manifest["format"] == STREAM_FORMAT and s.complete
    assert all(sh["checksum"].startswith("g64:") for sh in s.manifest["shards"])
    replay(s, "bf16")


def test_bit_flip_in_a_shard(stream):
    shard = stream / _manifest(stream)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40                      # an exponent bit of the last delta entry
    shard.write_bytes(bytes(data))
    e = _refused(stream, shard.name, "checksum")
    assert e.path == str(shard)


def test_bit_flip_in_init(stream):
    init = stream / "init.safetensors"
    data = bytearray(init.read_bytes())
    data[-1] ^= 1
    init.write_bytes(bytes(data))
    _refused(stream, "init.safetensors", "init.checksum")


def test_edited_manifest_value(stream):
    m = _manifest(stream)
    m["alpha"][1] = m["alpha"][1] * 1e30          # replays into garbage if trusted
    _write_manifest(stream, m)
    _refused(stream, "manifest.json", "manifest_checksum")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["shards"][0].__setitem__("count", -m["shards"][0]["count"]), "count"),
    (lambda m: m["shards"][-1].__setitem__("count", m["shards"][-1]["count"] + 1), "steps"),
    (lambda m: m.__setitem__("steps", m["steps"] - 1), "alpha"),
    (lambda m: m["alpha"].pop(), "alpha"),
    (lambda m: m["decay"].__setitem__(0, 1e39), "decay[0]"),
    (lambda m: m["decay"].__setitem__(0, True), "decay[0]"),
    (lambda m: m.__setitem__("seed", True), "seed"),
    (lambda m: m.__setitem__("seed", -1), "seed"),
    (lambda m: m.__setitem__("shape", [64, 0]), "shape"),
    (lambda m: m.__setitem__("policy", "bf17"), "policy"),
    (lambda m: m["shards"][0].__setitem__("first", 1), "shards[0].first"),
    (lambda m: m["shards"][0].__setitem__("file", "../x.safetensors"), "plain name"),
    (lambda m: m["shards"][0].pop("checksum"), "shards[0].checksum"),
    (lambda m: m.__setitem__("complete", "yes"), "complete"),
])
def test_bad_manifest_fields_even_with_a_valid_checksum(stream, edit, field):
    m = _manifest(stream)
    edit(m)
    _write_manifest(stream, m, reseal=True)
    _refused(stream, "manifest.json", field)


@pytest.mark.parametrize("damage", ["truncate", "empty", "missing"])
def test_truncated_empty_missing_shard(stream, damage):
    shard = stream / _manifest(stream)["shards"][-1]["file"]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        shard.unlink()
    _refused(stream, shard.name, "missing" if damage == "missing" else "bytes")


def test_replaced_shard_same_size_valid_file(stream):
    """Another valid safetensors file of the same size: only the checksum tells."""
    m = _manifest(stream)
    a, b = (stream / m["shards"][0]["file"]), (stream / m["shards"][-1]["file"])
    assert a.stat().st_size == b.stat().st_size
    shutil.copy(b, a)
    _refused(stream, a.name, "checksum")


def test_not_json_and_old_format(stream):
    (stream / "manifest.json").write_text('{"format": "gatesim.stream/1", "steps": 1}')
    _refused(stream, "manifest.json", "without checksums")
    (stream / "manifest.json").write_text("{not json")
    _refused(stream, "manifest.json", "not valid JSON")
    (stream / "manifest.json").write_text('{"format": "%s", "seed": NaN}' % STREAM_FORMAT)
    _refused(stream, "manifest.json", "NaN")


def test_stream_of_a_killed_run_is_valid(tmp_path):
    """A run killed after some shards: the manifest (written last) describes only whole,
    checksummed shards, so the partial stream verifies and replays."""
    from gatesim.sim.stream import StreamWriter
    import torch
    w = StreamWriter(tmp_path / "p", torch.zeros(4, 3), config={}, policy="fp32", seed=0,
                     shard_steps=2)
    for step in range(5):
        w.add(torch.full((4, 3), 0.5), 1.0, 1.0, step)   # 2 shards flushed, 1 step pending
    s = Stream(tmp_path / "p")
    assert s.steps == 4 and not s.complete
    assert float(replay(s, "fp32").weights.sum()) == pytest.approx(4 * 12 * 0.5)
    with pytest.raises(ValueError, match="alpha"):
        w.add(torch.zeros(4, 3), 1e39, 1.0, 5)              # not finite in float32
