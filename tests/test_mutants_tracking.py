"""gatesim.tracking.logs on hand-made records: read_log's torn-line count, summarize's
sums and row order, plot_absorbed's panels, lines and axis (the plotted fractions computed
here by hand); written to kill mutants the mutation run (docs/mutation.md) found surviving."""
import json
import math
import warnings

import pytest

from gatesim.tracking import plot_absorbed, read_log, summarize
from gatesim.tracking.records import RECORD_KEYS


def _rec(step, kind, policy, n, changed, absorbed, zero, param=None):
    r = {k: 0 for k in RECORD_KEYS}
    r.update(step=step, kind=kind, policy=policy, param=param or f"{kind}.w", n=n,
             changed=changed, absorbed=absorbed, zero=zero, absorbed_mass=0.5 * absorbed,
             nonfinite_delta=0, nonfinite_result=0, hist=[])
    return r


RECS = [  # deliberately not in (kind, policy) order
    _rec(0, "mlp", "own", 10, 6, 2, 2),
    _rec(0, "attn", "own", 8, 4, 4, 0),
    _rec(1, "attn", "own", 8, 2, 4, 4),
    _rec(0, "attn", "bf16", 8, 1, 6, 1),
    _rec(1, "mlp", "own", 10, 10, 0, 0),
]


def _write(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


def test_read_log_warns_only_for_bad_lines_and_counts_them(tmp_path):
    p = tmp_path / "log.jsonl"
    _write(p, RECS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a clean log: no warning at all
        df = read_log(p)
    assert len(df) == 5 and list(df.columns) == list(RECORD_KEYS)
    _write(p, RECS[:2], tail='{"step": 1, "ki\n\n{"step"')
    with pytest.warns(RuntimeWarning, match="skipped 2 incomplete line"):
        df = read_log(p)
    assert len(df) == 2


def test_summarize_sums_by_kind_and_policy_in_sorted_order(tmp_path):
    p = tmp_path / "log.jsonl"
    _write(p, RECS)
    s = summarize(read_log(p), by="kind")
    assert list(zip(s["kind"], s["policy"])) == [("attn", "bf16"), ("attn", "own"),
                                                 ("mlp", "own")]
    attn_own = s.iloc[1]
    assert attn_own["steps"] == 2 and attn_own["elements"] == 16
    assert attn_own["changed_fraction"] == pytest.approx(6 / 16)
    assert attn_own["absorbed_fraction"] == pytest.approx(8 / (16 - 4))
    assert attn_own["absorbed"] == 8 and attn_own["absorbed_mass"] == pytest.approx(4.0)
    mlp = s.iloc[2]
    assert mlp["absorbed_fraction"] == pytest.approx(2 / 18)


def test_plot_absorbed_draws_one_panel_per_policy_one_line_per_kind(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
    p = tmp_path / "log.jsonl"
    _write(p, RECS)
    out = plot_absorbed(read_log(p), tmp_path / "a.png", by="kind", title="T")
    assert out == str(tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    (fig,) = figs
    axes = [ax for ax in fig.axes if ax.get_lines()]
    # "own" (observed storage) first, then the simulated policies in sorted order
    assert [ax.get_title() for ax in axes] == ["own storage (observed)", "policy: bf16"]
    own = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
           for ln in axes[0].get_lines()}
    # absorbed / (n - zero), per kind and step
    assert own["attn"][0] == [0, 1] and own["attn"][1] == pytest.approx([4 / 8, 4 / 4])
    assert own["mlp"][0] == [0, 1] and own["mlp"][1] == pytest.approx([2 / 8, 0.0])
    bf16 = {ln.get_label(): list(ln.get_ydata()) for ln in axes[1].get_lines()}
    assert list(bf16) == ["attn"] and bf16["attn"] == pytest.approx([6 / 7])
    for ax in axes:     # a fraction axis: [0, 1] with a small margin
        lo, hi = ax.get_ylim()
        assert -0.05 < lo < 0 and 1 < hi < 1.05
        assert ax.get_ylabel() == "absorbed fraction"
    assert axes[-1].get_xlabel() == "optimizer step"
    assert fig._suptitle is not None and fig._suptitle.get_text() == "T"


def test_plot_absorbed_fraction_is_nan_without_non_zero_updates(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    p = tmp_path / "log.jsonl"
    _write(p, [_rec(0, "attn", "own", 4, 0, 0, 4)])
    plot_absorbed(read_log(p), tmp_path / "a.png")
    (line,) = [ln for ax in figs[0].axes for ln in ax.get_lines()]
    assert math.isnan(line.get_ydata()[0])


def test_replaying_is_true_exactly_inside_the_shadow_steps():
    """gatesim.tracking.replay.replaying(): True while a what-if replays a step (the
    optimizer's own step function sees it set when it runs for a shadow optimizer), False
    for the real steps and afterwards."""
    import torch
    from gatesim.tracking.replay import replaying
    from test_track import Net, train

    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append((self, replaying()))
            return super().step(closure)

    torch.manual_seed(0)
    model = Net(torch.bfloat16)
    opt = Recording(model.parameters(), lr=1e-4, weight_decay=0.1)
    _, _, tracker = train(torch.bfloat16, steps=2, model=model, optimizer=opt,
                          track_kw=dict(what_if=["master"]))
    tracker.close()
    real = [flag for o, flag in seen if o is opt]
    shadow = [flag for o, flag in seen if o is not opt]
    assert real == [False, False]
    assert shadow and all(shadow)
    assert replaying() is False


def test_records_describe_the_observed_storage_and_each_what_if(tmp_path):
    """A record's (mode, master, kahan, format): the real storage is "observed" with neither
    master nor Kahan, in the parameter's own format; a what-if carries its policy's."""
    import torch
    from test_track import train

    log = tmp_path / "log.jsonl"
    _, _, t = train(torch.bfloat16, steps=1,
                    track_kw=dict(what_if=["master", "bf16_kahan"], log=log))
    t.close()
    df = read_log(log)
    got = {pol: set(map(tuple, rows[["mode", "master", "kahan", "format"]].values.tolist()))
           for pol, rows in df.groupby("policy")}
    assert got["own"] == {("observed", False, False, "bf16")}
    assert got["master"] == {("nearest_even", True, False, "bf16")}
    assert got["bf16+kahan"] == {("nearest_even", False, True, "bf16")}


def test_track_takes_options_and_keywords_replace_their_fields():
    import torch
    from gatesim.tracking import TrackOptions, track
    from test_track import Net

    opts = TrackOptions(what_if=["master"], every=3, on_error="raise")
    model = Net(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = track(opt, opts, model=model)
    try:
        assert t.options.every == 3 and t.options.what_if == ["master"]
        assert t.options.on_error == "raise" and t.options.model is model
        assert list(t.what_ifs) == ["master"]
    finally:
        t.close()


def test_a_parameter_keeps_its_name_when_its_group_changes():
    """Without a model, a parameter is named by its place when first seen
    ("group<i>.param<j>") and keeps that name: removing an earlier parameter from the group
    does not rename the ones after it."""
    import torch
    from gatesim.tracking import track

    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    opt = torch.optim.SGD([a, b, c], lr=0.1)
    t = track(opt, on_error="raise")
    try:
        for p in (a, b, c):
            p.grad = torch.ones(3)
        opt.step()
        assert {k[0] for k in t.last_stats} == {"group0.param0", "group0.param1",
                                                "group0.param2"}
        opt.param_groups[0]["params"].remove(a)
        t.last_stats.clear()
        opt.step()
        assert {k[0] for k in t.last_stats} == {"group0.param1", "group0.param2"}
    finally:
        t.close()
