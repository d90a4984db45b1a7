"""Hostile or broken checkpoints: each raises the documented gatesim.diff error, naming the
file (and tensor), and nothing is written."""
import json
import os
import pickle
import struct

import pytest
import torch

import gatesim.diff as gd
from gatesim.diff.synthetic import save_sharded


def _tensors():
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(bf),
            "model.layers.0.mlp.down_proj.weight": torch.randn(4, 8, generator=g).to(bf),
            "model.norm.weight": torch.ones(4)}


def _raw(path, header, data: bytes, hlen=None):
    h = json.dumps(header).encode() if isinstance(header, dict) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if hlen is None else hlen))
        f.write(h)
        f.write(data)


@pytest.fixture
def good(tmp_path):
    save_sharded(_tensors(), tmp_path / "good", shard_bytes=100)
    return tmp_path / "good"


def _expect(exc, base, tuned, tmp_path, match=None):
    out = tmp_path / "out_should_not_exist"
    with pytest.raises(exc, match=match) as info:
        gd.diff(base, tuned, out, progress=False)
    assert not out.exists(), "an error must leave no output behind"
    assert isinstance(info.value, gd.CheckpointError)
    return info.value


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _set_index(folder, idx):
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_good_pair_runs(good, tmp_path):
    res = gd.diff(good, good, progress=False)
    assert (res.rows["changed"] == 0).all()


@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/../../x.safetensors",
                                 "/etc/passwd", "C:/x.safetensors", "a\\..\\b.safetensors"])
def test_index_escape_rejected(good, tmp_path, bad):
    idx = _index(good)
    idx["weight_map"]["model.norm.weight"] = bad
    _set_index(good, idx)
    e = _expect(gd.UnsafePathError, good, good, tmp_path)
    assert "model.norm.weight" in str(e) and e.tensor == "model.norm.weight"


def test_symlink_outside_rejected(good, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    idx = _index(good)
    shard = idx["weight_map"]["model.norm.weight"]
    os.replace(good / shard, outside)
    os.symlink(outside, good / shard)
    e = _expect(gd.UnsafePathError, good, good, tmp_path, match="outside the checkpoint")
    assert shard in str(e)


def test_hf_cache_symlinks_allowed(tmp_path):
    """Hub cache: snapshots/<rev>/* are symlinks into ../../blobs, which is allowed."""
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    save_sharded(_tensors(), tmp_path / "tmpw", shard_bytes=100)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "tmpw").iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        os.replace(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    res = gd.diff(snap, snap, progress=False)
    assert len(res.rows) == 3


def test_missing_shard(good, tmp_path):
    shard = _index(good)["weight_map"]["model.norm.weight"]
    (good / shard).unlink()
    e = _expect(gd.MissingShardError, good, good, tmp_path)
    assert shard in str(e)


def test_index_malformed(good, tmp_path):
    (good / "model.safetensors.index.json").write_text("{not json")
    _expect(gd.IndexFormatError, good, good, tmp_path, match="not valid JSON")
    _set_index(good, {"weight_map": {"a": 3}})
    _expect(gd.IndexFormatError, good, good, tmp_path, match="not a string")
    _set_index(good, {"metadata": {}})
    _expect(gd.IndexFormatError, good, good, tmp_path, match="weight_map")


def test_index_names_tensor_missing_from_shard(good, tmp_path):
    idx = _index(good)
    idx["weight_map"]["model.ghost.weight"] = idx["weight_map"]["model.norm.weight"]
    _set_index(good, idx)
    e = _expect(gd.IndexFormatError, good, good, tmp_path, match="does not hold it")
    assert e.tensor == "model.ghost.weight"


def _single(tmp_path, header, data, hlen=None):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    _raw(d / "model.safetensors", header, data, hlen)
    return d


def test_header_huge_length(good, tmp_path):
    d = _single(tmp_path, b"{}", b"", hlen=2 ** 40)
    _expect(gd.HeaderError, good, d, tmp_path, match="exceeds")


def test_header_length_past_end(good, tmp_path):
    d = _single(tmp_path, b"{}", b"", hlen=1000)
    _expect(gd.TruncatedFileError, good, d, tmp_path, match="larger than")


def test_file_shorter_than_8_bytes(good, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    _expect(gd.TruncatedFileError, good, d, tmp_path, match="8-byte")


@pytest.mark.parametrize("header,match", [
    (b"[1, 2]", "not an object"),
    (b"{\"a\": 1", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "duplicate"),
    (b"{\"t\": {\"dtype\": \"F32\", \"shape\": [NaN], \"data_offsets\": [0, 4]}}", "JSON"),
    (b"[" * 100000 + b"]" * 100000, "nested|not an object|JSON"),
])
def test_header_not_json_object(good, tmp_path, header, match):
    d = _single(tmp_path, header, b"\0" * 4)
    _expect(gd.HeaderError, good, d, tmp_path, match=match)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "non-negative"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "begin <= end"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "begin"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2]}, "data_offsets"),
])
def test_header_entry_lies(good, tmp_path, entry, match):
    d = _single(tmp_path, {"w": entry}, b"\0" * 8)
    e = _expect(gd.HeaderError, good, d, tmp_path, match=match)
    assert e.tensor == "w"


def test_header_overlap_gap_trailing(good, tmp_path):
    f4 = lambda b, e: {"dtype": "F32", "shape": [(e - b) // 4], "data_offsets": [b, e]}  # noqa
    d = _single(tmp_path, {"a": f4(0, 8), "b": f4(4, 12)}, b"\0" * 12)
    _expect(gd.HeaderError, good, d, tmp_path, match="overlap")
    d = _single(tmp_path, {"a": f4(0, 4), "b": f4(8, 12)}, b"\0" * 12)
    _expect(gd.HeaderError, good, d, tmp_path, match="belong to no tensor")
    d = _single(tmp_path, {"a": f4(0, 4)}, b"\0" * 12)
    _expect(gd.HeaderError, good, d, tmp_path, match="trailing")


def test_truncated_shard(good, tmp_path):
    shard = good / _index(good)["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    e = _expect(gd.TruncatedFileError, good, good, tmp_path, match="truncated")
    assert e.path == str(shard.resolve())


@pytest.mark.parametrize("method", ["mmap", "pread"])
def test_truncated_after_validation(good, tmp_path, method):
    """A file that shrinks after validation: the read fails naming file and tensor."""
    ck = gd.open_checkpoint(good)
    ref = ck.tensors["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(gd.read_tensor(ref, method=method).view(torch.int16),
                       _tensors()[ref.name].view(torch.int16))
    with open(ref.path, "r+b") as f:
        f.truncate(ref.offset + 3)
    with pytest.raises(gd.TruncatedFileError) as info:
        gd.read_tensor(ref, method=method)
    assert info.value.tensor == ref.name and ref.path in str(info.value)


def test_truncated_during_run_writes_no_row(good, tmp_path, monkeypatch):
    """The executor raises for the tensor whose file shrank; the rows stored before stay,
    no row is stored for it, and the error names file and tensor."""
    import gatesim.diff.core as core
    out = tmp_path / "o"
    ck = gd.open_checkpoint(good)
    victim = ck.tensors["model.norm.weight"]
    real = core.read_tensor

    def shrinking(ref, *a, **k):
        if ref.name == victim.name:
            with open(ref.path, "r+b") as f:
                f.truncate(ref.offset + 1)
        return real(ref, *a, **k)

    monkeypatch.setattr(core, "read_tensor", shrinking)
    with pytest.raises(gd.TruncatedFileError, match="model.norm.weight"):
        gd.diff(good, good, out, progress=False)
    keys = [json.loads(x)["key"] for x in (out / "rows.jsonl").read_text().splitlines()]
    assert "model.norm.weight" not in keys


def test_malicious_pickle_not_run(good, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "evil"
    d.mkdir()
    import zipfile
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    # replace the pickle inside the zip with one that runs a command when unpickled
    src = d / "pytorch_model.bin"
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        items = {n: z.read(n) for n in names}
    pkl = [n for n in names if n.endswith("data.pkl")][0]
    items[pkl] = pickle.dumps({"w": Evil()}, protocol=2)
    with zipfile.ZipFile(src, "w") as z:
        for n in names:
            z.writestr(n, items[n])
    _expect(gd.UnsupportedFormatError, good, d, tmp_path, match="weights_only")
    assert not marker.exists()


def test_legacy_bin_refused(good, tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    _expect(gd.UnsupportedFormatError, good, d, tmp_path, match="legacy")


def test_no_weights_and_unknown_extension(good, tmp_path):
    (tmp_path / "empty").mkdir()
    _expect(gd.CheckpointNotFoundError, good, tmp_path / "empty", tmp_path)
    (tmp_path / "w.npz").write_bytes(b"x")
    _expect(gd.UnsupportedFormatError, good, tmp_path / "w.npz", tmp_path)


def test_map_collision_and_bad_rule(good, tmp_path):
    with pytest.raises(gd.NameMapError, match="same name"):
        gd.diff(good, good, tmp_path / "o", map=["model.layers.0.mlp.up_proj.=x.",
                                                 "model.layers.0.mlp.down_proj.=x."],
                progress=False)
    with pytest.raises(gd.NameMapError, match="no '='"):
        gd.diff(good, good, tmp_path / "o", map="model.", progress=False)
    assert not (tmp_path / "o").exists()


def test_nonfinite_counted_not_fatal(tmp_path):
    t = _tensors()
    u = {k: v.clone() for k, v in t.items()}
    u["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    u["model.norm.weight"][1] = float("nan")
    save_sharded(t, tmp_path / "a")
    save_sharded(u, tmp_path / "b")
    res = gd.diff(tmp_path / "a", tmp_path / "b", progress=False)
    r = res.rows.set_index("name")
    assert r.loc["model.layers.0.mlp.up_proj.weight", "inf_tuned"] == 1
    assert r.loc["model.layers.0.mlp.up_proj.weight", "spectral"] == "skipped: non-finite values"
    assert r.loc["model.norm.weight", "nan_tuned"] == 1
    assert r.loc["model.layers.0.mlp.down_proj.weight", "spectral"] == "ok"
