"""gatesim.stats (across-seed intervals, the verdict rule) and metrics.cosine, against
numbers computed by hand."""
import math

import pytest
import torch

from gatesim.metrics import cosine, cosine_baseline_sd
from gatesim.stats import mean_interval, verdict


def test_mean_interval_by_hand():
    # values 1, 2, 3: mean 2, sd 1; with 2 degrees of freedom Student's t quantile has the
    # closed form t_p = (2p - 1) / sqrt(2 p (1 - p)), p = 0.975
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.sd == 1.0 and iv.n == 3
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) / math.sqrt(3)
    assert iv.lo == pytest.approx(2 - half, rel=1e-12)
    assert iv.hi == pytest.approx(2 + half, rel=1e-12)


def test_mean_interval_drops_missing_and_single_is_infinite():
    iv = mean_interval([None, 0.5, float("nan")])
    assert iv.n == 1 and iv.lo == -math.inf and iv.hi == math.inf
    assert mean_interval([None]) is None
    with pytest.raises(ValueError, match="infinite"):
        mean_interval([1.0, math.inf])
    with pytest.raises(TypeError):
        mean_interval(["a"])
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.5)


@pytest.mark.parametrize("values,threshold,side,expected", [
    ([0.5, 0.6, 0.7], 0.1, "above", "holds"),
    ([0.5, 0.6, 0.7], 0.1, "below", "fails"),
    ([0.5, 0.6, 0.7], 0.9, "below", "holds"),
    ([0.5, 0.6, 0.7], 0.9, "above", "fails"),
    ([0.0, 0.6, 1.2], 0.5, "above", "inconclusive"),   # interval straddles 0.5
    ([0.0, 0.6, 1.2], 0.5, "below", "inconclusive"),
    ([0.7], 0.1, "above", "inconclusive"),              # one seed never decides
])
def test_verdict_sides(values, threshold, side, expected):
    assert verdict(mean_interval(values), threshold, side) == expected


def test_verdict_bad_input():
    assert verdict(None, 0.0, "above") == "not tested"
    with pytest.raises(ValueError, match="side"):
        verdict(mean_interval([1.0, 2.0]), 0.0, "over")


def test_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    c = cosine(a, b)
    assert c.value == pytest.approx(1 / (math.sqrt(5) * math.sqrt(2)), rel=1e-15)
    assert c.baseline == 0.0 and c.baseline_sd == 0.5 and c.n == 4
    assert math.isnan(cosine(a, torch.zeros(2, 2)).value)
    with pytest.raises(ValueError):
        cosine(a, torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        cosine(a, torch.tensor([[1.0, float("nan")], [0.0, 0.0]]))
    assert cosine_baseline_sd(100) == 0.1


def test_cosine_same_bits_whatever_the_thread_count():
    # torch's float64 dot of 3M entries gives other last digits at 1 and 2 threads on this
    # machine (a pool driver and a Ray driver disagreed); the cosine must not
    from gatesim.metrics.similarity import dot64
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3_000_000, generator=g)
    b = torch.randn(3_000_000, generator=g)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            got.append((cosine(a, b).value, dot64(a, b)))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1] == got[2]
    # against an exact sum: the float32 products are exact in float64, math.fsum adds exactly
    exact = math.fsum((a.double() * b.double()).tolist())
    assert abs(got[0][1] - exact) <= 1e-9 * math.fsum((a.double() * b.double()).abs().tolist())


def test_cosine_baseline_matches_random_directions():
    # the empirical sd of cosines of independent Gaussian directions is within 10% of 1/sqrt(n)
    g = torch.Generator().manual_seed(0)
    n = 400
    vals = [cosine(torch.randn(n, generator=g), torch.randn(n, generator=g)).value
            for _ in range(2000)]
    sd = math.sqrt(sum(v * v for v in vals) / len(vals))
    assert abs(sd / cosine_baseline_sd(n) - 1) < 0.1
