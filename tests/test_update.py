"""apply_update: every policy against the numba twin, invariants, Kahan, exact-sum SR."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatesim
from gatesim import reference as ref
from gatesim.precision import mode_index
from gatesim.testing import float32_arrays, modes
from gatesim.update import SUM_MODES, UpdateStats
from conftest import assert_same_bits

STORAGE_FORMATS = [gatesim.BF16, gatesim.FP16, gatesim.E4M3FN, gatesim.E5M2, gatesim.FP32,
                   gatesim.Format(4, 5, subnormals=False)]


def run_both(p32, d, fmt, mode, policy, sum_mode, alpha, decay, seed, offset, step,
             as_dtype, master=None, comp32=None):
    """Runs the kernel (param stored in fmt's dtype or in fp32) and the twin."""
    dtype = fmt.torch_dtype if (as_dtype and fmt.torch_dtype is not None) else torch.float32
    param = torch.from_numpy(p32.copy()).to(dtype) if dtype != torch.float32 else \
        torch.from_numpy(p32.copy())
    kw = dict(fmt=fmt, mode=mode, alpha=alpha, decay=decay, sum_mode=sum_mode, seed=seed,
              offset=offset, step=step)
    m_t = c_t = None
    if policy == "master":
        m_t = torch.from_numpy(master.copy())
        kw["master"] = m_t
    if policy == "kahan":
        c_t = torch.from_numpy(comp32.copy()).to(dtype) if dtype != torch.float32 else \
            torch.from_numpy(comp32.copy())
        kw["compensation"] = c_t
    stats = gatesim.apply_update(param, torch.from_numpy(d), **kw)
    path = {"storage": ref.STORAGE, "master": ref.MASTER, "kahan": ref.KAHAN}[policy]
    args = np.array(fmt.op_args(), dtype=np.int64)
    n = p32.size
    pn, mn, cn, counts, mass = ref.apply_update(
        p32, d, master if master is not None else np.zeros(n, np.float32),
        comp32 if comp32 is not None else np.zeros(n, np.float32), path, args,
        mode_index(mode), SUM_MODES.index(sum_mode), alpha, decay, seed or 0, offset, step)
    return param, m_t, c_t, stats, (pn, mn, cn, counts, mass)


def near_midpoints(rng: np.random.Generator, fmt, alpha: float, k: int) -> np.ndarray:
    """k float32 values d with alpha * d (computed exactly) within an fp32 ulp of the
    midpoint between two neighbours of fmt, at magnitudes of fmt's normal range: about
    half of them round differently when alpha * d is rounded to fp32 first (alpha != 1)."""
    m = fmt.mbits
    lo = max(fmt.emin, -20)
    mid = np.ldexp((rng.integers(2 ** m, 2 ** (m + 1), k) * 2 + 1).astype(np.float64), -(m + 1))
    mid = np.ldexp(mid, rng.integers(lo, lo + 12, k)) * rng.choice([-1.0, 1.0], k)
    return (mid / np.float64(np.float32(alpha))).astype(np.float32)


@settings(max_examples=150)
@given(data=st.data(), fmt=st.sampled_from(STORAGE_FORMATS), mode=modes(),
       policy=st.sampled_from(["storage", "master", "kahan"]), sum_mode=st.sampled_from(SUM_MODES),
       as_dtype=st.booleans())
def test_apply_update_equals_twin(data, fmt, mode, policy, sum_mode, as_dtype):
    x = data.draw(float32_arrays(fmt, min_size=1, max_size=200))
    n = x.size
    p32 = gatesim.quantize(torch.from_numpy(x), fmt).numpy()
    scale = data.draw(st.sampled_from([1e-9, 1e-5, 1e-3, 0.1, 10.0]))
    d = (data.draw(float32_arrays(fmt, min_size=n, max_size=n)) * np.float32(scale)).astype(np.float32)
    master = data.draw(float32_arrays(fmt, min_size=n, max_size=n))
    comp32 = gatesim.quantize(torch.from_numpy(
        (data.draw(float32_arrays(fmt, min_size=n, max_size=n, allow_nan=False)) * np.float32(1e-3))
        .astype(np.float32)), fmt).numpy()
    alpha = data.draw(st.sampled_from([1.0, -0.01, 3.0]))
    decay = data.draw(st.sampled_from([1.0, 0.999, 0.5]))
    seed, offset, step = data.draw(st.integers(0, 2 ** 40)), data.draw(st.integers(0, 2 ** 30)), \
        data.draw(st.integers(0, 1000))
    with np.errstate(all="ignore"):
        param, m_t, c_t, stats, (pn, mn, cn, counts, mass) = run_both(
            p32, d, fmt, mode, policy, sum_mode, alpha, decay, seed, offset, step, as_dtype,
            master, comp32)
    assert_same_bits(param.float(), pn, f"param {policy} {fmt} {mode} {sum_mode}", any_nan=True)
    if m_t is not None:
        assert_same_bits(m_t, mn, "master")
    if c_t is not None:
        assert_same_bits(c_t.float(), cn, "compensation", any_nan=True)
    want = UpdateStats.from_op(torch.from_numpy(counts), torch.tensor([mass], dtype=torch.float64))
    assert stats == want


@settings(max_examples=120)
@given(data=st.data(), fmt=st.sampled_from(STORAGE_FORMATS), sum_mode=st.sampled_from(SUM_MODES),
       as_dtype=st.booleans())
def test_storage_nearest_fast_paths_equal_twin(data, fmt, sum_mode, as_dtype):
    """Storage-only nearest-even has its own vectorized kernels (fp32: hardware rounding of
    the exact sum; formats of <= 21 bits: round-to-odd into fp32, then to the format):
    held to the twin here with more examples than the general test gives them."""
    x = data.draw(float32_arrays(fmt, min_size=1, max_size=300))
    n = x.size
    p32 = gatesim.quantize(torch.from_numpy(x), fmt).numpy()
    scale = data.draw(st.sampled_from([1e-30, 1e-9, 1e-5, 1e-3, 1.0, 1e30]))
    d = (data.draw(float32_arrays(fmt, min_size=n, max_size=n)) * np.float32(scale)).astype(np.float32)
    alpha = data.draw(st.sampled_from([1.0, -0.01, 3.0, -1e-20]))
    decay = data.draw(st.sampled_from([1.0, 0.999, 0.5, 1 - 2 ** -20]))
    rng_tie = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    tie = rng_tie.random(n) < 0.25  # p = 0 there: the sum is alpha * delta, near a midpoint
    d[tie] = near_midpoints(rng_tie, fmt, alpha, int(tie.sum()))
    p32[tie] = 0.0
    with np.errstate(all="ignore"):
        param, _, _, stats, (pn, _, _, counts, mass) = run_both(
            p32, d, fmt, "nearest_even", "storage", sum_mode, alpha, decay, None, 0, 0,
            as_dtype, None, None)
    assert_same_bits(param.float(), pn, f"param {fmt} {sum_mode}", any_nan=True)
    want = UpdateStats.from_op(torch.from_numpy(counts), torch.tensor([mass], dtype=torch.float64))
    assert stats == want


#: Special values the fast-path tests sprinkle into their inputs.
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 3.3e38, -3.39e38, 1e-45,
                     1.4e-45], np.float32)


def sprinkler(rng: np.random.Generator, frac: float):
    """A function that overwrites a fraction ``frac`` of an array with SPECIALS."""
    def sprinkle(x):
        pick = rng.random(x.size) < frac
        x[pick] = rng.choice(SPECIALS, pick.sum())
        return x
    return sprinkle


@settings(max_examples=100)
@given(data=st.data(), n=st.sampled_from([1, 15, 16, 17, 511, 513, 4095, 4097, 9000]))
def test_fp32_storage_fast_path_equals_twin(data, n):
    """The optimizers' fp32 policy step (fp32 storage, nearest-even, alpha 1, any decay,
    both sum modes) has a hand-written AVX-512 kernel fused with its statistics; held to
    the twin on ragged lengths with every special value sprinkled in."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sprinkle = sprinkler(rng, data.draw(st.sampled_from([0.0, 0.01, 0.2])))
    p32 = sprinkle((rng.standard_normal(n) * 0.02).astype(np.float32))
    d = rng.standard_normal(n) * data.draw(st.sampled_from([1e-12, 1e-9, 1e-5, 1e-3, 1e30]))
    d = sprinkle(d.astype(np.float32))
    if data.draw(st.booleans()):
        d[::5] = 0.0
    decay = data.draw(st.sampled_from([1.0, 0.99999, 0.999, 0.5, 0.0, 1 - 2 ** -20]))
    sum_mode = data.draw(st.sampled_from(SUM_MODES))
    with np.errstate(all="ignore"):
        param, _, _, stats, (pn, _, _, counts, mass) = run_both(
            p32, d, gatesim.FP32, "nearest_even", "storage", sum_mode, 1.0, decay, None, 0, 0,
            True)
    assert_same_bits(param, pn, f"param {sum_mode}", any_nan=True)
    assert stats == UpdateStats.from_op(torch.from_numpy(counts),
                                        torch.tensor([mass], dtype=torch.float64))


@settings(max_examples=120)
@given(data=st.data(), n=st.sampled_from([1, 15, 16, 17, 513, 4097, 9000]),
       fmt=st.sampled_from([gatesim.BF16, gatesim.FP16, gatesim.E4M3FN, gatesim.FP32]),
       mode=st.sampled_from(["nearest_even", "stochastic"]), sum_mode=st.sampled_from(SUM_MODES))
def test_kahan_fast_paths_equal_twin(data, n, fmt, mode, sum_mode):
    """Kahan in nearest-even or stochastic rounding has vectorized loops per sum mode (the
    exact sums with nearest-even by 32-bit roundings of odd32 values): held to the twin on
    ragged lengths, compensations of every size and every special value sprinkled in."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sprinkle = sprinkler(rng, data.draw(st.sampled_from([0.0, 0.01, 0.2])))
    q = lambda a: gatesim.quantize(torch.from_numpy(a.astype(np.float32)), fmt).numpy()
    p32 = q(sprinkle((rng.standard_normal(n) * 0.02).astype(np.float32)))
    comp32 = q(sprinkle((rng.standard_normal(n) * data.draw(
        st.sampled_from([0.0, 1e-6, 1e-3, 1e3]))).astype(np.float32)))
    d = rng.standard_normal(n) * data.draw(st.sampled_from([1e-30, 1e-9, 1e-5, 1e-3, 1.0, 1e30]))
    d = sprinkle(d.astype(np.float32))
    alpha = data.draw(st.sampled_from([1.0, -0.01, 3.0]))
    decay = data.draw(st.sampled_from([1.0, 0.999, 0.5, 0.0]))
    # A quarter of the elements with alpha * delta within an fp32 ulp of a rounding
    # midpoint of fmt and no compensation: where rounding that sum to fp32 first and then
    # to fmt would round twice (the odd32 detour must not).
    tie = rng.random(n) < 0.25
    d[tie] = near_midpoints(rng, fmt, alpha, int(tie.sum()))
    comp32[tie] = 0.0
    # Another quarter with alpha * delta within an fp32 ulp of half an ulp of the
    # compensation: c + alpha * delta then lies near a midpoint of fmt, and its fp32 sum
    # on one (how the exact sum c1 must not be formed).
    near = ~tie & (rng.random(n) < 1 / 3) & np.isfinite(comp32)
    with np.errstate(all="ignore"):
        half = gatesim.ulp(torch.from_numpy(comp32), fmt).numpy().astype(np.float64) / 2
        wobble = 1 + rng.choice([-1.0, 1.0], n) * np.ldexp(1.0, rng.integers(-30, -14, n))
        d = np.where(near, rng.choice([-1.0, 1.0], n) * half * wobble / np.float32(alpha),
                     d).astype(np.float32)
    with np.errstate(all="ignore"):
        param, _, c_t, stats, (pn, _, cn, counts, mass) = run_both(
            p32, d, fmt, mode, "kahan", sum_mode, alpha, decay, 11, 5, 3,
            data.draw(st.booleans()), None, comp32)
    assert_same_bits(param.float(), pn, f"param {fmt} {mode} {sum_mode}", any_nan=True)
    assert_same_bits(c_t.float(), cn, f"compensation {fmt} {mode} {sum_mode}", any_nan=True)
    assert stats == UpdateStats.from_op(torch.from_numpy(counts),
                                        torch.tensor([mass], dtype=torch.float64))


@pytest.mark.parametrize("fmt", [gatesim.BF16, gatesim.FP16, gatesim.E4M3FN])
@pytest.mark.parametrize("alpha,decay", [(1.0, 1.0), (-0.01, 1.0), (3.0, 0.999)])
def test_kahan_exact_sums_near_midpoints_equal_twin(fmt, alpha, decay):
    """Kahan with exact sums and nearest-even, in each of its loops (no decay and alpha 1;
    no decay; the general one), with c + alpha * delta within an fp32 ulp of a midpoint
    of fmt for most elements: the sums that must be rounded once, not via fp32."""
    rng = np.random.default_rng(7)
    n = 4097
    q = lambda a: gatesim.quantize(torch.from_numpy(a.astype(np.float32)), fmt).numpy()
    p32 = q(rng.standard_normal(n) * 0.02)
    comp32 = q(rng.standard_normal(n) * 1e-3)
    half = gatesim.ulp(torch.from_numpy(comp32), fmt).numpy().astype(np.float64) / 2
    wobble = 1 + rng.choice([-1.0, 1.0], n) * np.ldexp(1.0, rng.integers(-30, -14, n))
    d = (rng.choice([-1.0, 1.0], n) * half * wobble / np.float32(alpha)).astype(np.float32)
    param, _, c_t, stats, (pn, _, cn, counts, mass) = run_both(
        p32, d, fmt, "nearest_even", "kahan", "exact", alpha, decay, None, 0, 0, True, None,
        comp32)
    assert_same_bits(param.float(), pn, "param", any_nan=True)
    assert_same_bits(c_t.float(), cn, "compensation", any_nan=True)
    assert stats == UpdateStats.from_op(torch.from_numpy(counts),
                                        torch.tensor([mass], dtype=torch.float64))


@settings(max_examples=100)
@given(data=st.data(), n=st.sampled_from([1, 15, 16, 17, 511, 513, 4095, 4097, 9000]))
def test_bf16_storage_unit_fast_path_equals_twin(data, n):
    """bf16 storage, alpha 1, no decay (the replay step on a bf16 parameter alone) has a
    hand-written AVX-512 kernel fused with its statistics and, without statistics, a
    TwoSum-in-fp32 loop: held to the twin on ragged lengths, both sum modes, with every
    special value, sums past fp32's range and updates within an fp32 ulp of half a bf16
    ulp of the weight (where rounding the fp32 sum would round twice)."""
    fmt = gatesim.BF16
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sprinkle = sprinkler(rng, data.draw(st.sampled_from([0.0, 0.01, 0.2])))
    p32 = gatesim.quantize(torch.from_numpy(
        sprinkle((rng.standard_normal(n) * 0.02).astype(np.float32))), fmt).numpy()
    d = rng.standard_normal(n) * data.draw(st.sampled_from([1e-12, 1e-9, 1e-5, 1e-3, 1e30]))
    d = sprinkle(d.astype(np.float32))
    near = rng.random(n) < 0.25
    with np.errstate(all="ignore"):
        half = gatesim.ulp(torch.from_numpy(p32), fmt).numpy().astype(np.float64) / 2
        wobble = 1 + rng.choice([-1.0, 1.0], n) * np.ldexp(1.0, rng.integers(-30, -14, n))
        d = np.where(near & np.isfinite(p32), rng.choice([-1.0, 1.0], n) * half * wobble,
                     d).astype(np.float32)
    if data.draw(st.booleans()):
        d[::5] = 0.0
    stats_on = data.draw(st.booleans())
    sum_mode = data.draw(st.sampled_from(SUM_MODES))
    param = torch.from_numpy(p32.copy()).to(torch.bfloat16)
    with np.errstate(all="ignore"):
        stats = gatesim.apply_update(param, torch.from_numpy(d), sum_mode=sum_mode, stats=stats_on)
        pn, _, _, counts, mass = ref.apply_update(
            p32, d, np.zeros(n, np.float32), np.zeros(n, np.float32), ref.STORAGE,
            np.array(fmt.op_args(), dtype=np.int64), mode_index("nearest_even"),
            SUM_MODES.index(sum_mode), 1.0, 1.0, 0, 0, 0)
    assert_same_bits(param.float(), pn, f"param {sum_mode}", any_nan=True)
    if stats_on:
        assert stats == UpdateStats.from_op(torch.from_numpy(counts),
                                            torch.tensor([mass], dtype=torch.float64))


@settings(max_examples=150)
@given(data=st.data(), n=st.sampled_from([1, 15, 16, 17, 511, 513, 4095, 4097, 9000]))
def test_replay_step_fast_path_equals_twin(data, n):
    """The master step into bf16 with nearest-even (the replay step: alpha 1, no decay; and
    the optimizers' scaled step; bf16 storage or bf16 values in fp32) has a hand-written
    AVX-512 kernel; held to the twin on ragged lengths (16-lane tails, 512-element runs,
    4096-element blocks) with every special value sprinkled in."""
    fmt = gatesim.BF16
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sprinkle = sprinkler(rng, data.draw(st.sampled_from([0.0, 0.01, 0.2])))
    master = sprinkle((rng.standard_normal(n) * 0.02).astype(np.float32))
    p32 = gatesim.quantize(torch.from_numpy(
        sprinkle(master + np.float32(1e-4) * rng.standard_normal(n).astype(np.float32))),
        fmt).numpy()
    d = (rng.standard_normal(n) * data.draw(st.sampled_from([1e-9, 1e-5, 1e-3, 1e30])))
    d = sprinkle(d.astype(np.float32))
    alpha = data.draw(st.sampled_from([1.0, -0.01, 3.0]))
    decay = data.draw(st.sampled_from([1.0, 0.999, 0.5, 0.0]))
    as_dtype = data.draw(st.booleans())  # bf16 tensor, or bf16 values in an fp32 tensor
    if not as_dtype and data.draw(st.booleans()):
        p32.view(np.uint32)[::7] |= 1  # some stored values not in the format
    with np.errstate(all="ignore"):
        param, m_t, _, stats, (pn, mn, _, counts, mass) = run_both(
            p32, d, fmt, "nearest_even", "master", "exact", alpha, decay, None, 0, 0, as_dtype,
            master)
    assert_same_bits(param.float(), pn, "param", any_nan=True)
    assert_same_bits(m_t, mn, "master")
    assert stats == UpdateStats.from_op(torch.from_numpy(counts),
                                        torch.tensor([mass], dtype=torch.float64))


def test_large_update_equals_twin_across_blocks_and_threads():
    """Several 4096-element blocks: counts and the fixed-order mass are bit-identical."""
    torch.manual_seed(0)
    n = 50_001
    w = gatesim.quantize(torch.randn(n) * 0.02, gatesim.BF16)
    d = torch.randn(n) * 1e-5
    d[::7] = 0.0
    for policy in ("master", "storage"):
        master = (w + torch.randn(n) * 1e-6).numpy()
        res = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            param, m_t, _, stats, twin = run_both(
                w.numpy(), d.numpy(), gatesim.BF16, "nearest_even", policy, "exact", 1.0, 1.0,
                1, 0, 0, True, master=master)
            res.append((param.clone(), stats))
            assert_same_bits(param.float(), twin[0], policy)
            assert stats == UpdateStats.from_op(torch.from_numpy(twin[3]), torch.tensor([twin[4]], dtype=torch.float64))
        assert res[0][1] == res[1][1]
    torch.set_num_threads(2)


@pytest.mark.parametrize("fmt", [gatesim.BF16, gatesim.FP16], ids=str)
def test_invariants(fmt):
    torch.manual_seed(1)
    n = 200_000
    w32 = gatesim.quantize(torch.randn(n) * 0.05, fmt)
    u = gatesim.ulp(w32, fmt)
    d = torch.randn(n) * u * torch.logspace(-3, 1, n)[torch.randperm(n)]
    p = w32.clone()
    s = gatesim.apply_update(p, d, fmt=fmt)
    assert s.n == n and s.changed + s.unchanged == n
    assert s.absorbed <= s.unchanged
    assert sum(s.hist) + s.zero == n
    # nearest: |delta| < ulp/4 is always absorbed (the gap toward zero at a power of two is
    # ulp/2), |delta| < ulp/2 away from zero too; |delta| >= ulp never is
    small = d.abs() < u / 4
    away_half = (d.abs() < u / 2) & (torch.sign(d) == torch.sign(w32))
    big = d.abs() >= u
    unchanged = (p.view(torch.int32) == w32.view(torch.int32)) | ((p == 0) & (w32 == 0))
    assert unchanged[small].all() and unchanged[away_half].all()
    assert not unchanged[big].any()
    # histogram bins 0..23 are |u|/ulp < 1/2
    below_half = int((d.abs() < u / 2).sum())
    assert sum(s.hist[:24]) == below_half


def test_fp32_storage_absorbed_is_exactly_fl32_no_change():
    torch.manual_seed(2)
    w = torch.randn(300_000)
    d = torch.randn(300_000) * torch.logspace(-10, 0, 300_000)
    expect_absorbed = int(((w + d) == w).sum() - (d == 0).sum())
    p = w.clone()
    s = gatesim.apply_update(p, d)
    assert s.absorbed == expect_absorbed
    assert torch.equal(p, w + d)


def test_stochastic_rounding_of_the_exact_sum_is_unbiased():
    """An update of 2**-20 ULP is invisible to fp32-sum-then-SR but kept, on average, by
    SR of the exact sum (5-sigma bound)."""
    n = 1 << 22
    ulp = 2.0 ** -7
    frac = 2.0 ** -20
    d = torch.full((n,), frac * ulp)
    p = torch.ones(n, dtype=torch.bfloat16)
    s = gatesim.apply_update(p, d, mode="stochastic", seed=3)
    ups = int((p.float() > 1.0).sum())
    sigma = math.sqrt(n * frac * (1 - frac))
    assert abs(ups - n * frac) <= 5 * sigma + 1
    assert s.changed == ups and s.sum_differs == ups  # fp32-sum SR would never move
    p2 = torch.ones(n, dtype=torch.bfloat16)
    s2 = gatesim.apply_update(p2, d, mode="stochastic", seed=3, sum_mode="fp32")
    assert s2.changed == 0 and s2.absorbed == n


def test_kahan_tracks_fp32_while_plain_bf16_drifts():
    """1000 steps of an update far below half a bf16 ULP. Documented bound: the Kahan run
    stays within one bf16 ULP of the fp32 reference; the plain run does not move at all."""
    torch.manual_seed(4)
    n = 10_000
    w0 = gatesim.quantize(torch.rand(n) + 0.5, gatesim.BF16)  # in [0.5, 1.5]
    delta = torch.full((n,), 2.0 ** -12)  # 1/16 .. 1/32 of a bf16 ULP
    ref32 = w0.clone()
    plain = w0.to(torch.bfloat16)
    kahan = w0.to(torch.bfloat16)
    comp = torch.zeros(n, dtype=torch.bfloat16)
    for _ in range(1000):
        ref32 += delta
        gatesim.apply_update(plain, delta, stats=False)
        gatesim.apply_update(kahan, delta, compensation=comp, stats=False)
    ulp = gatesim.ulp(ref32, gatesim.BF16)
    err_kahan = (kahan.float() - ref32).abs()
    err_plain = (plain.float() - ref32).abs()
    assert (err_kahan <= ulp).all()
    assert torch.equal(plain, w0.to(torch.bfloat16))  # every step absorbed
    assert (err_plain > 10 * ulp).all()  # 1000 * 2**-12 = 0.244: many ULPs of drift


def test_master_path_matches_fp32_accumulation():
    torch.manual_seed(5)
    m = torch.randn(10_000) * 0.02
    p = gatesim.to_dtype(m, torch.bfloat16)
    ref32 = m.clone()
    for step in range(20):
        d = torch.randn(10_000) * 1e-4
        ref32 += d
        s = gatesim.apply_update(p, d, master=m, step=step)
        assert s.n == 10_000
    assert torch.equal(m, ref32)
    assert torch.equal(p, gatesim.to_dtype(ref32, torch.bfloat16))


def test_nonfinite_inputs_are_counted_or_refused():
    p = torch.ones(6, dtype=torch.bfloat16)
    d = torch.tensor([1e-4, math.nan, math.inf, -math.inf, 0.0, 1.0])
    s = gatesim.apply_update(p, d)
    assert s.nonfinite_delta == 3 and s.nonfinite_result == 3 and s.zero == 1
    p2 = torch.ones(6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="inf or NaN"):
        gatesim.apply_update(p2, d, check_finite=True)
    assert torch.equal(p2, torch.ones(6, dtype=torch.bfloat16))  # untouched


@pytest.mark.parametrize("call,exc,match", [
    (lambda p, d: gatesim.apply_update(p, d[:3]), ValueError, "delta has shape"),
    (lambda p, d: gatesim.apply_update(p, d.double()), TypeError, "delta must be float32"),
    (lambda p, d: gatesim.apply_update(p.int(), d), TypeError, "param must be one of"),
    (lambda p, d: gatesim.apply_update(p, d, master=d.bfloat16()), TypeError, "master must be float32"),
    (lambda p, d: gatesim.apply_update(p, d, master=d[:2]), ValueError, "master has shape"),
    (lambda p, d: gatesim.apply_update(p, d, compensation=d), TypeError, "compensation"),
    (lambda p, d: gatesim.apply_update(p, d, master=d.clone(), compensation=p.clone()),
     ValueError, "not both"),
    (lambda p, d: gatesim.apply_update(p, d, fmt="fp16"), TypeError, "does not match"),
    (lambda p, d: gatesim.apply_update(p, d, sum_mode="double"), ValueError, "sum_mode must be"),
    (lambda p, d: gatesim.apply_update(p, d, mode="stochastic"), ValueError, "seed is required"),
    (lambda p, d: gatesim.apply_update(p, d, step=-1), ValueError, "step"),
    (lambda p, d: gatesim.apply_update(p, d, alpha=math.nan), ValueError, "alpha"),
    (lambda p, d: gatesim.apply_update(p, d.t()), ValueError, "contiguous"),
])
def test_bad_input(call, exc, match):
    p = torch.ones(4, 4, dtype=torch.bfloat16)
    d = torch.ones(4, 4) * 1e-3
    with pytest.raises(exc, match=match):
        call(p, d)


def test_buffers_that_share_memory_are_refused():
    """Aliased buffers would read values the call has already written: refused, untouched."""
    buf = torch.ones(2, 8)
    d = torch.full((8,), 1e-3)
    cases = [
        (lambda: gatesim.apply_update(buf[0], buf[0]), "delta and param share memory"),
        (lambda: gatesim.apply_update(buf.view(16)[:8], d, master=buf.view(16)[4:12]),
         "master and param share memory"),
        (lambda: gatesim.apply_update(buf[1], buf[0], master=buf[0]), "master and delta"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
        assert torch.equal(buf, torch.ones(2, 8))
    p16 = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compensation and param share memory"):
        gatesim.apply_update(p16, d, compensation=p16[:].view(8))
    # separate rows of one tensor do not overlap: fine
    gatesim.apply_update(buf[1], buf[0], check_finite=True)
    assert torch.equal(buf[1], torch.full((8,), 2.0))


def test_stats_are_json_and_add_up():
    p = torch.ones(100, dtype=torch.bfloat16)
    a = gatesim.apply_update(p, torch.full((100,), 1e-5))
    b = gatesim.apply_update(p, torch.full((100,), 1.0))
    c = a + b
    assert c.n == 200 and c.absorbed == a.absorbed + b.absorbed
    import json
    assert json.loads(a.to_json())["absorbed"] == 100


def test_opcheck_apply_update():
    p = torch.ones(64, dtype=torch.bfloat16)
    d = torch.randn(64) * 1e-3
    m = torch.ones(64)
    torch.library.opcheck(torch.ops.gatesim.apply_update.default,
                          (p, d, m, None, gatesim.BF16.op_args(), 0, 0, 1.0, 1.0, 0, 0, 0, True))


def test_flush_denormal_mode_does_not_change_results():
    """torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread; the kernels run
    with IEEE denormals regardless, so subnormal inputs and results keep their bits."""
    g = torch.Generator().manual_seed(3)
    n = 20_000
    tiny = torch.randn(n, generator=g) * 1e-39  # mostly fp32 subnormals
    # inputs made before the mode is switched on (torch's own ops would flush them)
    d_half, d_quarter, d_milli = tiny * 0.5, tiny * 0.25, tiny * 1e-3
    p0 = tiny.to(torch.bfloat16)

    def run():
        m, p, w = tiny.clone(), p0.clone(), tiny.clone()
        s1 = gatesim.apply_update(p, d_half, master=m)
        s2 = gatesim.apply_update(w, d_quarter)
        q = gatesim.quantize(tiny, gatesim.BF16)
        a = gatesim.absorbed(w, d_milli, gatesim.FP32, check=False)
        return [s1, s2], [p.view(torch.int16), m.view(torch.int32), w.view(torch.int32),
                          q.view(torch.int32), a]

    want_stats, want = run()
    assert want_stats[0].changed > n // 2 and want_stats[1].changed > n // 2
    assert torch.set_flush_denormal(True)
    try:
        assert (tiny * 1.0 == 0).all()  # the setting is live on this thread
        got_stats, got = run()
    finally:
        torch.set_flush_denormal(False)
    assert got_stats == want_stats
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_stats_to_host_keeps_every_bit():
    """The one-copy transfer of the statistics from a GPU (exercised here on CPU tensors)."""
    from gatesim.update import _stats_to_host
    counts = torch.arange(42, dtype=torch.int64) * 1_000_000_007
    for m in (0.0, 3.5e-300, 1e300, float("inf"), float("nan"), 5e-324):
        mass = torch.tensor([m], dtype=torch.float64)
        c, mm = _stats_to_host(counts, mass)
        assert torch.equal(c, counts)
        assert mm.view(torch.int64).item() == mass.view(torch.int64).item()
        assert UpdateStats.from_op(c, mm) == UpdateStats.from_op(counts, mass)


def test_sum_keyword_still_works_with_a_deprecation_warning():
    g = torch.Generator().manual_seed(4)
    d = torch.randn(1000, generator=g) * 1e-3
    new, old = torch.ones(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)
    s_new = gatesim.apply_update(new, d, mode="stochastic", seed=3, sum_mode="fp32")
    with pytest.warns(DeprecationWarning, match="sum_mode"):
        s_old = gatesim.apply_update(old, d, mode="stochastic", seed=3, sum="fp32")
    assert torch.equal(new.view(torch.int16), old.view(torch.int16)) and s_new == s_old
    with pytest.raises(TypeError, match="both sum= and sum_mode="):
        gatesim.apply_update(old, d, sum="fp32", sum_mode="exact")


def test_update_stats_equality_compares_fields_by_name():
    from gatesim.stat_layout import HIST_BINS, STAT_FIELDS
    base = UpdateStats(n=10, changed=3, absorbed=2, zero=1, absorbed_mass=0.5,
                       hist=list(range(HIST_BINS)))
    assert base == UpdateStats(**{**base.__dict__, "hist": list(base.hist)})
    for f in STAT_FIELDS:
        assert base != UpdateStats(**{**base.__dict__, f: getattr(base, f) + 1}), f
    assert base != UpdateStats(**{**base.__dict__, "absorbed_mass": 0.25})
    assert base != UpdateStats(**{**base.__dict__, "hist": [0] * HIST_BINS})
    nan = UpdateStats(absorbed_mass=math.nan)
    assert nan == UpdateStats(absorbed_mass=math.nan)       # NaN masses count as equal


def test_stat_layout_is_the_ops_layout():
    """The statistics vector of the op has the length gatesim.stat_layout gives it, and the
    fake kernel (torch.compile's view of the op) agrees."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from gatesim.stat_layout import HIST_BINS, N_STATS
    p, d = torch.ones(8, dtype=torch.bfloat16), torch.full((8,), 1e-3)
    args = (None, None, gatesim.BF16.op_args(), 0, 0, 1.0, 1.0, 0, 0, 0, True)
    counts, _ = torch.ops.gatesim.apply_update(p, d, *args)
    assert counts.shape == (N_STATS,)
    with FakeTensorMode() as mode:
        fc, _ = torch.ops.gatesim.apply_update(mode.from_tensor(p), mode.from_tensor(d), *args)
    assert tuple(fc.shape) == (N_STATS,)
    assert len(UpdateStats().hist) == HIST_BINS == len(gatesim.update.HIST_EDGES_LOG2) + 1

