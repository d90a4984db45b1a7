"""gatesim.tracking: the observed-statistics kernels (numba on CPU, tensor ops elsewhere)
against each other, apply_update's histogram and a numpy reference; module kinds; the log
reader, summary table, plot and TensorBoard scalars."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import assert_png_shows_a_plot
from hypothesis import given, settings
from hypothesis import strategies as st

import gatesim
from gatesim.tracking import module_kind, observed_stats, plot_absorbed, read_log, summarize
from test_track import assert_stats_equal, reference_stats, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _special(dtype, n, gen):
    """Stored values of `dtype` with zeros of both signs, subnormals, powers of two, inf and
    NaN mixed into N(0, 0.05)."""
    x = torch.randn(n, generator=gen) * 0.05
    fmt = gatesim.as_format(dtype)
    specials = torch.tensor([0.0, -0.0, fmt.min_subnormal, -3 * fmt.min_subnormal,
                             fmt.min_normal, 0.5, -2.0, float("inf"), float("-inf"),
                             float("nan"), fmt.max_finite], dtype=torch.float32)
    idx = torch.randint(0, n, (n // 5,), generator=gen)
    x[idx] = specials[torch.randint(0, len(specials), (n // 5,), generator=gen)]
    return x.to(dtype)


@settings(max_examples=40)
@given(seed=st.integers(0, 2 ** 31), dtype_i=st.integers(0, 2), n=st.integers(1, 300),
       scale=st.sampled_from([0.0, 1e-30, 1e-7, 1e-4, 1e-2, 10.0]))
def test_numba_and_torch_backends_agree_with_reference(seed, dtype_i, n, scale):
    """Random steps with special values everywhere: both backends give the numpy reference's
    counts and histogram exactly (the torch backend's histogram is apply_update's)."""
    dtype = DTYPES[dtype_i]
    gen = torch.Generator().manual_seed(seed)
    before = _special(dtype, n, gen)
    u = (torch.randn(n, generator=gen) * scale).float()
    u[torch.rand(n, generator=gen) < 0.2] = 0.0
    u[torch.rand(n, generator=gen) < 0.05] = float("nan")
    u[torch.rand(n, generator=gen) < 0.05] = float("inf")
    after = (before.float() + u).to(dtype)
    keep = torch.rand(n, generator=gen) < 0.3
    after[keep] = before[keep]  # some updates swallowed, some applied
    want = reference_stats(before, after, u)
    for backend in ("numba", "torch"):
        got = observed_stats(before, after, u, backend=backend)
        assert_stats_equal(got, want, backend)


def test_backends_agree_on_large_tensors_and_thread_counts():
    """Past one CPU chunk the numba pass runs on threads; counts and the absorbed mass are the
    same bits for 1 and 2 threads."""
    from gatesim import tracking as T
    gen = torch.Generator().manual_seed(3)
    n = T.CPU_CHUNK * 2 + 12345
    before = (torch.randn(n, generator=gen) * 0.05).bfloat16()
    u = torch.randn(n, generator=gen) * 1e-4
    after = (before.float() + u).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = observed_stats(before, after, u, backend="numba")
        torch.set_num_threads(2)
        two = observed_stats(before, after, u, backend="numba")
    finally:
        torch.set_num_threads(threads)
    assert one == two  # UpdateStats equality includes the mass, exactly
    tor = observed_stats(before, after, u, backend="torch")
    assert (tor.n, tor.changed, tor.absorbed, tor.zero, tor.hist) == \
        (one.n, one.changed, one.absorbed, one.zero, one.hist)
    assert tor.absorbed_mass == pytest.approx(one.absorbed_mass, rel=1e-12)
    assert 0 < one.absorbed < n


def test_fp16_decode_exhaustive():
    """The numba kernel decodes every fp16 bit pattern to the fp32 bits torch gives (NaNs: a
    NaN)."""
    from gatesim.tracking._observed_kernel import _f16_to_f32_bits
    import numba

    @numba.njit
    def decode_all(h):
        out = np.empty(h.size, dtype=np.int64)
        for i in range(h.size):
            out[i] = _f16_to_f32_bits(np.int64(h[i]))
        return out

    h = np.arange(65536, dtype=np.int64)
    got = decode_all(h).astype(np.uint32)
    want = torch.from_numpy(h.astype(np.int16)).view(torch.float16).float()
    wb = want.numpy().view(np.uint32)
    nan = np.isnan(want.numpy())
    assert np.array_equal(got[~nan], wb[~nan])
    assert np.isnan(got[nan].view(np.float32)).all()


def test_observed_stats_argument_checks():
    b = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        observed_stats(b, b.float(), torch.zeros(4))
    with pytest.raises(TypeError):
        observed_stats(b, b, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        observed_stats(b, b, torch.zeros(5))
    with pytest.raises(ValueError):
        observed_stats(b, b, torch.zeros(4), backend="cuda")


@pytest.mark.parametrize("name,kind", [
    ("encoder.layer.3.attention.self.query.weight", "attention.query"),
    ("encoder.layer.0.attention.output.dense.bias", "attention.output"),
    ("encoder.layer.0.attention.output.LayerNorm.weight", "attention.output.LayerNorm"),
    ("encoder.layer.5.intermediate.dense.weight", "intermediate"),
    ("encoder.layer.5.output.dense.weight", "output"),
    ("model.layers.7.mlp.down_proj.weight", "mlp.down_proj"),
    ("model.layers.7.self_attn.q_proj.weight", "self_attn.q_proj"),
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings"),
    ("lm_head.weight", "lm_head"),
    ("layers.3.weight", "layers"),
    ("0.weight", "weight"),
    ("weight", "weight"),
    ("_orig_mod.encoder.layer.1.attention.self.key.weight", "attention.key"),
])
def test_module_kind(name, kind):
    assert module_kind(name) == kind


@pytest.fixture(scope="module")
def run_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("track") / "log.jsonl"
    _, _, t = train(torch.bfloat16, "adamw", steps=6,
                    track_kw=dict(what_if=["master", "bf16_sr"], log=path))
    t.close()
    return path, t


def test_log_schema(run_log):
    path, _ = run_log
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    from gatesim.tracking import RECORD_KEYS
    assert all(tuple(r) == RECORD_KEYS for r in recs)
    own = [r for r in recs if r["policy"] == "own"]
    assert {(r["format"], r["mode"], r["dtype"], r["intended"]) for r in own} == {
        ("bf16", "observed", "bfloat16", "fp32")}
    sr = [r for r in recs if r["policy"] == "bf16_sr"]
    assert {(r["format"], r["mode"], r["master"]) for r in sr} == {("bf16", "stochastic", False)}
    for r in recs:
        assert sum(r["hist"]) + r["zero"] + r["nonfinite_delta"] == r["n"]
        assert r["absorbed_fraction"] == pytest.approx(
            r["absorbed"] / (r["n"] - r["zero"]) if r["n"] > r["zero"] else 0.0)


def test_summary_matches_log(run_log):
    path, t = run_log
    df = read_log(path)
    assert len(df) == 6 * 7 * 3
    for by in ("kind", "param"):
        from_log = summarize(df, by=by).set_index([by, "policy"]).sort_index()
        from_tracker = t.summary(by=by).set_index([by, "policy"]).sort_index()
        assert list(from_log.index) == list(from_tracker.index)
        for col in ("steps", "elements", "absorbed", "changed_fraction", "absorbed_fraction",
                    "absorbed_mass", "nonfinite"):
            assert np.allclose(from_log[col].to_numpy(float), from_tracker[col].to_numpy(float),
                               rtol=1e-12), (by, col)
    own = df[df.policy == "own"]
    row = summarize(df, by="kind").set_index(["kind", "policy"]).loc[("proj", "own")]
    sub = own[own.kind == "proj"]
    assert row["absorbed_fraction"] == pytest.approx(
        sub.absorbed.sum() / (sub.n.sum() - sub.zero.sum()))
    assert row["steps"] == 6 and row["elements"] == sub.n.sum()


def test_plot(run_log, tmp_path):
    path, t = run_log
    out = plot_absorbed(read_log(path), tmp_path / "a.png", title="test")
    assert_png_shows_a_plot(out)        # decodes, sane size, not blank
    out2 = t.plot(tmp_path / "b.png")
    assert_png_shows_a_plot(out2)
    with pytest.raises(ValueError):
        plot_absorbed(read_log(path).iloc[:0], tmp_path / "c.png")


def test_read_log_skips_a_torn_last_line(run_log, tmp_path):
    path, _ = run_log
    torn = tmp_path / "torn.jsonl"
    text = path.read_text()
    torn.write_text(text + text.splitlines()[0][:40])
    with pytest.warns(RuntimeWarning, match="incomplete"):
        df = read_log(torn)
    assert len(df) == len(text.splitlines())


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.flushed = 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1


def test_tensorboard_scalars_with_a_writer(tmp_path):
    """Any object with add_scalar receives one absorbed and one changed fraction per kind and
    policy per tracked step, equal to the log's."""
    w = FakeWriter()
    log = tmp_path / "l.jsonl"
    _, _, t = train(torch.bfloat16, "adamw", steps=3,
                    track_kw=dict(what_if=["master"], log=log, tensorboard=w))
    t.close()
    assert w.flushed == 1
    df = read_log(log)
    kinds = df.kind.unique()
    assert len(w.scalars) == 3 * len(kinds) * 2 * 2
    for tag, value, step in w.scalars:
        _, policy, what, kind = tag.split("/", 3)
        sub = df[(df.step == step) & (df.policy == policy) & (df.kind == kind)]
        if what == "absorbed_fraction":
            want = sub.absorbed.sum() / (sub.n.sum() - sub.zero.sum())
        else:
            want = sub.changed.sum() / sub.n.sum()
        assert value == pytest.approx(want), tag


@pytest.mark.skipif(HAVE_TENSORBOARD, reason="tensorboard is installed: see the enabled test")
def test_tensorboard_missing_disables_scalars(tmp_path):
    """tensorboard=<dir> without tensorboard installed: one RuntimeWarning, no directory,
    tracking and the log work as usual."""
    with pytest.warns(RuntimeWarning, match="TensorBoard scalars disabled"):
        _, _, t = train(torch.bfloat16, "sgd", steps=2,
                        track_kw=dict(tensorboard=tmp_path / "tb", log=tmp_path / "l.jsonl"))
    assert not (tmp_path / "tb").exists()
    assert t.steps_tracked == 2 and len(read_log(tmp_path / "l.jsonl")) == 2 * 7


@pytest.mark.skipif(not HAVE_TENSORBOARD,
                    reason="tensorboard not installed (optional); the writer protocol is "
                           "covered by test_tensorboard_scalars_with_a_writer")
def test_tensorboard_event_files(tmp_path):
    _, _, t = train(torch.bfloat16, "sgd", steps=2, track_kw=dict(tensorboard=tmp_path / "tb"))
    t.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_tensorboard_scalars_read_back_with_tensorboard(tmp_path):
    """The real tensorboard package: the tracker writes event files through
    torch.utils.tensorboard, tensorboard's EventAccumulator reads them back, and every scalar
    equals the fraction computed from the JSON log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = tmp_path / "l.jsonl"
    _, _, t = train(torch.bfloat16, "adamw", steps=3,
                    track_kw=dict(what_if=["master"], log=log, tensorboard=tmp_path / "tb"))
    t.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    df = read_log(log)
    tags = acc.Tags()["scalars"]
    assert len(tags) == len(df.kind.unique()) * 2 * 2  # kinds x policies x two fractions
    for tag in tags:
        _, policy, what, kind = tag.split("/", 3)
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2]
        for e in events:
            sub = df[(df.step == e.step) & (df.policy == policy) & (df.kind == kind)]
            want = (sub.absorbed.sum() / (sub.n.sum() - sub.zero.sum())
                    if what == "absorbed_fraction" else sub.changed.sum() / sub.n.sum())
            assert e.value == pytest.approx(want, rel=1e-6), tag  # event files hold float32


def test_save_tables_csv_and_parquet_agree_with_the_summaries(tmp_path):
    """save_tables writes each table as CSV and as Parquet (pyarrow) with the same rows as
    Tracker.frame / summary, and the per-tensor rows sum to the log's records."""
    import pandas as pd
    import pyarrow.parquet as pq
    log = tmp_path / "l.jsonl"
    _, _, t = train(torch.bfloat16, "adamw", steps=3,
                    track_kw=dict(what_if=["bf16_master"], log=log))
    t.close()
    paths = t.save_tables(tmp_path / "tables")
    assert set(paths) == {"steps", "per_param", "per_kind"}
    want = {"steps": t.frame(), "per_param": t.summary(by="param"),
            "per_kind": t.summary(by="kind")}
    for name, df in want.items():
        from_parquet = pq.read_table(paths[name]["parquet"]).to_pandas()
        from_csv = pd.read_csv(paths[name]["csv"])
        assert list(from_parquet.columns) == list(df.columns) == list(from_csv.columns)
        pd.testing.assert_frame_equal(from_parquet, df.reset_index(drop=True),
                                      check_dtype=False)
        pd.testing.assert_frame_equal(from_csv, df.reset_index(drop=True), check_dtype=False)
    rows = pq.read_table(paths["per_param"]["parquet"]).to_pandas()
    recs = read_log(log)
    assert set(rows.policy) == set(recs.policy) == {"own", "bf16+master"}  # canonical label
    for col in ("elements", "absorbed"):
        src = "n" if col == "elements" else col
        assert rows[col].sum() == recs[src].sum()
