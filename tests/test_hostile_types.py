"""Hostile inputs, classes 6 and 7 of issue 22: scalars are checked in the precision they
are used in (numpy scalars are numbers, bool is not), and every field has its type
(a TOML sweep can say None: ``"none"``)."""
import json

import numpy as np
import pytest
import torch

import gatesim
from gatesim.checks import ArgumentError, check_fields, check_real
from gatesim.formats import BF16, Format
from gatesim.update import apply_update


# ----- class 6: scalars in the precision they are used in ---------------------------------
def _state():
    g = torch.Generator().manual_seed(0)
    master = torch.randn(64, generator=g)
    return master.to(torch.bfloat16), master.clone(), torch.randn(64, generator=g)


@pytest.mark.parametrize("name, value", [("alpha", 1e39), ("decay", 1e39), ("alpha", -1e39),
                                         ("alpha", float("nan")), ("decay", np.float64(4e38))])
def test_finite_in_float64_infinite_in_float32_is_refused(name, value):
    p, m, d = _state()
    p0, m0 = p.clone(), m.clone()
    with pytest.raises(ValueError, match=name) as info:
        apply_update(p, d, master=m, check_finite=True, **{name: value})
    assert "float32" in str(info.value) or "finite" in str(info.value)
    assert torch.equal(p, p0) and torch.equal(m, m0), "nothing may be touched"


def test_numpy_scalars_are_numbers():
    results = []
    for alpha, decay, step in ((0.5, 0.999, 3), (np.float32(0.5), np.float32(0.999), np.int64(3)),
                               (np.float64(0.5), np.float64(np.float32(0.999)), np.int32(3))):
        p, m, d = _state()
        apply_update(p, d, master=m, alpha=alpha, decay=decay, step=step,
                     mode="stochastic", seed=np.int64(7))
        results.append((p.view(torch.int16).clone(), m.view(torch.int32).clone()))
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])


@pytest.mark.parametrize("kw", [dict(alpha=True), dict(decay=False), dict(step=True),
                                dict(alpha="0.5"), dict(step=1.0), dict(rand_bits=np.bool_(1))])
def test_bool_and_strings_are_not_numbers(kw):
    p, m, d = _state()
    with pytest.raises((TypeError, ValueError)):
        apply_update(p, d, master=m, **kw)


def test_check_real_names_the_precision():
    with pytest.raises(ArgumentError, match="float32.*3.4028235e\\+38"):
        check_real(1e39, "alpha", dtype=np.float32)
    assert check_real(1e39, "alpha") == 1e39                  # fine in float64
    assert check_real(np.float16(2.0), "x", dtype=np.float32, lo=0) == 2.0
    with pytest.raises(ArgumentError, match="does not fit"):
        check_real(10 ** 400, "x")


def test_diff_options_accept_numpy_scalars(tmp_path):
    from gatesim.diff.synthetic import save_sharded
    import gatesim.diff as gd
    save_sharded({"a.weight": torch.randn(8, 8).to(torch.bfloat16)}, tmp_path / "x")
    a = gd.diff(tmp_path / "x", tmp_path / "x", progress=False, k=2, eta=1e-3, atol=1e-5,
                alpha=0.05).rows
    b = gd.diff(tmp_path / "x", tmp_path / "x", progress=False, k=np.int64(2),
                eta=np.float32(1e-3), atol=np.float64(1e-5), alpha=np.float32(0.05)).rows
    assert a.drop(columns=["eta", "alpha"]).equals(b.drop(columns=["eta", "alpha"]))
    for bad in (dict(k=True), dict(eta=True), dict(sparsity_only=1), dict(k=2.0)):
        with pytest.raises((TypeError, ValueError)):
            gd.diff(tmp_path / "x", tmp_path / "x", progress=False, **bad)


def test_metric_checks_accept_numpy_scalars():
    from gatesim.metrics._checks import check_alpha, check_k, check_positive
    assert check_alpha(np.float32(0.5)) == 0.5
    assert check_k(np.int64(3), 8, 8) == 3
    assert check_positive(np.float64(1e-3), "eta") == 1e-3
    with pytest.raises(TypeError):
        check_k(True, 8, 8)


# ----- class 7: fields have their types ---------------------------------------------------
@pytest.mark.parametrize("kw, field", [(dict(inf="no"), "inf"), (dict(subnormals=2), "subnormals"),
                                       (dict(subnormals="yes"), "subnormals"),
                                       (dict(nan=1), "nan"), (dict(bias=True), "bias"),
                                       (dict(bias=7.0), "bias"), (dict(name=5), "name")])
def test_format_field_types(kw, field):
    with pytest.raises(ValueError, match=f"Format.{field}") as info:
        Format(8, 7, **kw)
    assert isinstance(info.value, TypeError)          # both: callers catching either work


def test_format_numpy_ints_are_ints():
    f = Format(np.int64(8), np.int32(7), bias=np.int16(127), subnormals=np.bool_(True))
    assert f == BF16 and type(f.ebits) is int and type(f.subnormals) is bool
    assert json.dumps([f.ebits, f.mbits, f.bias, f.subnormals])


def test_sweep_seed_true_is_refused(tmp_path):
    from gatesim.sim.config import CellConfig, SweepConfig, load_sweep
    with pytest.raises(ValueError, match="CellConfig.seed must be an int"):
        CellConfig(seed=True)
    with pytest.raises(ValueError, match="seed"):
        SweepConfig(grid={"seed": [0, True]})
    p = tmp_path / "s.toml"
    p.write_text('name = "t"\n[base]\nseed = true\n')
    with pytest.raises(ValueError, match="seed must be an int, got bool"):
        load_sweep(p)
    for bad in ('steps = 1.5', 'norm_matched = 1', 'clip = "0.2"', 'lr = true'):
        p.write_text(f'name = "t"\n[base]\n{bad}\n')
        with pytest.raises(ValueError, match=bad.split()[0]):
            load_sweep(p)


def test_toml_spelling_of_none(tmp_path):
    from gatesim.sim.config import load_sweep
    p = tmp_path / "s.toml"
    p.write_text('name = "t"\n[base]\nclip = "none"\n[variants.a]\nclip = "None"\n'
                 '[variants.b]\nclip = 0.1\n[grid]\nclip = ["none", 0.2]\n')
    sw = load_sweep(p)
    assert sw.base["clip"] is None and sw.variants["a"]["clip"] is None
    assert sw.grid["clip"] == [None, 0.2]
    assert {c.clip for _, c in sw.cells()} == {None, 0.2}
    # the recorded config says null, not the spelling
    assert json.loads(json.dumps(sw.to_dict()))["base"]["clip"] is None
    p.write_text('name = "t"\n[base]\nsteps = "none"\n')      # not an optional field
    with pytest.raises(ValueError, match="steps"):
        load_sweep(p)


def test_check_fields_is_generic():
    import dataclasses
    from typing import Optional

    @dataclasses.dataclass
    class New:               # a new config type inherits the rules by calling it
        n: int = 1
        x: float = 0.5
        flag: bool = False
        maybe: Optional[float] = None

        def __post_init__(self):
            check_fields(self)

    assert New(n=np.int64(2), x=np.float32(0.25)).n == 2
    for bad in (dict(n=True), dict(x="1"), dict(flag=0), dict(maybe=False)):
        with pytest.raises(ArgumentError):
            New(**bad)
