"""The seed statistics of the tables against values computed apart: the t quantile by numeric integration of the
t density (and the closed forms for 1 and 2 degrees of freedom), the intervals from their textbook formulas."""

from __future__ import annotations

import math

import pytest

from kdlab.tools import stats


def t_density(t: float, df: float) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + t * t / df) ** (-(df + 1) / 2)


def integral_0_to(q: float, df: float, n: int = 20_000) -> float:
    """Simpson's rule on [0, q] in float64."""
    h = q / n
    s = t_density(0.0, df) + t_density(q, df)
    s += sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, n))
    return s * h / 3


def quantile_by_integration(p: float, df: float) -> float:
    lo, hi = 0.0, 200.0 if df < 1.5 else 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + integral_0_to(mid, df, 4000) < p else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1.0, 2.0, 3.0, 4.7, 9.0, 30.0])
@pytest.mark.parametrize("p", [0.975, 0.9, 0.6])
def test_t_quantile_integrates_to_its_probability(df, p):
    q = stats.t_quantile(p, df)
    assert 0.5 + integral_0_to(q, df) == pytest.approx(p, abs=1e-9)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-q, abs=1e-12)


def test_t_quantile_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_mean_interval_by_hand():
    s = stats.summary([71.0, 72.0, 73.0, 74.0])
    mean, std = 72.5, math.sqrt(5 / 3)  # sum of squares 1.5^2*2 + 0.5^2*2 = 5, over n-1 = 3
    half = 3.182446305284263 * std / 2  # t(0.975, 3) from the tables; sqrt(4) = 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert (s["lo"], s["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-9)
    one = stats.summary([70.0])
    assert one["std"] is None and one["lo"] is None and stats.fmt_summary(one) == "70.00 (1 seed)"
    assert stats.fmt_summary(s) == f"72.50 ± {std:.2f} [{mean - half:.2f}, {mean + half:.2f}]"


def test_welch_difference_by_hand():
    a, b = [70.0, 71.0, 72.0], [68.0, 70.0, 72.0, 74.0]
    va, vb = 1.0 / 3, (20 / 3) / 4  # variances of the means: s^2 / n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    d = stats.difference(a, b)
    assert d["kind"] == "welch" and d["diff"] == pytest.approx(0.0) and d["df"] == pytest.approx(df)
    half = quantile_by_integration(0.975, df) * math.sqrt(va + vb)
    assert (d["lo"], d["hi"]) == pytest.approx((-half, half), abs=1e-6)
    assert d["within_noise"] and "within noise" in stats.fmt_difference(d)
    far = stats.difference([80.0, 81.0, 82.0], b)
    assert far["within_noise"] is False and "within noise" not in stats.fmt_difference(far)


def test_one_seed_is_read_against_the_baseline_noise():
    d = stats.difference([75.0], [71.0, 72.0, 73.0])
    half = 4.302652729749464 * 1.0 * math.sqrt(1 + 1 / 3)  # t(0.975, 2), s = 1, a new run's spread
    assert d["kind"] == stats.ONE_SEED and d["diff"] == pytest.approx(3.0)
    assert (d["lo"], d["hi"]) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-9)
    assert stats.ONE_SEED in stats.fmt_difference(d)
    both = stats.difference([75.0], [71.0])
    assert both["lo"] is None and both["kind"] == stats.NO_NOISE and stats.NO_NOISE in stats.fmt_difference(both)
