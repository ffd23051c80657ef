"""analysis.stats on inputs whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats


def test_summarize_uses_the_sample_std_and_skips_non_finite():
    s = stats.summarize([1.0, 2.0, 3.0, math.nan, math.inf])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    one = stats.summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and one.n == 1
    assert stats.summarize([]).n == 0
    assert str(stats.summarize([1.0, 2.0, 3.0])) == "2.000 ± 1.000"


def test_paired_difference_of_a_known_shift():
    """arm = control - 0.05 + d, with d = +-0.01 alternating: mean diff -0.05, sd of diffs known."""
    control = np.array([0.90, 0.92, 0.88, 0.91, 0.93, 0.89, 0.90, 0.94, 0.87, 0.92])
    noise = np.array([0.01, -0.01] * 5)
    arm = control - 0.05 + noise
    p = stats.paired_difference(arm, control, n_resamples=2000)
    d = arm - control
    assert p.n == 10
    assert p.mean_diff == pytest.approx(-0.05)
    sd = d.std(ddof=1)  # = 0.01 * sqrt(10/9)
    assert sd == pytest.approx(0.01 * math.sqrt(10 / 9))
    assert p.d_z == pytest.approx(-0.05 / sd)
    t = -0.05 / (sd / math.sqrt(10))
    assert p.p_value == pytest.approx(2 * sps.t.sf(abs(t), df=9))
    assert p.p_wilcoxon == pytest.approx(2 / 2 ** 10)  # every difference negative: exact two-sided p
    assert p.ci_low < -0.05 < p.ci_high
    assert -0.0575 < p.ci_low and p.ci_high < -0.0425  # within the range of the differences
    assert stats.fmt_diff(p).startswith("-0.050 [")


def test_bootstrap_ci_matches_the_normal_interval_for_many_pairs():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, 2000)
    lo, hi = stats.bootstrap_ci(d, n_resamples=2000, seed=1)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.01)
    assert hi == pytest.approx(d.mean() + half, abs=0.01)
    assert stats.bootstrap_ci(d, n_resamples=500, seed=7) == stats.bootstrap_ci(d, n_resamples=500, seed=7)


def test_identical_arms_have_no_difference():
    x = [0.9, 0.8, 0.95]
    p = stats.paired_difference(x, x)
    assert (p.mean_diff, p.ci_low, p.ci_high, p.p_value, p.p_wilcoxon, p.d_z) == (0, 0, 0, 1.0, 1.0, 0.0)


def test_a_constant_shift_has_a_degenerate_but_exact_answer():
    p = stats.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert (p.mean_diff, p.ci_low, p.ci_high, p.p_value) == (1.0, 1.0, 1.0, 0.0)
    assert p.d_z == math.inf


def test_pairs_with_a_missing_side_are_dropped():
    p = stats.paired_difference([1.0, math.nan, 3.0, 5.0], [0.0, 1.0, 1.0, 2.0])
    assert p.n == 3
    assert p.mean_diff == pytest.approx((1 + 2 + 3) / 3)
    assert stats.paired_difference([math.nan], [1.0]).n == 0
    one = stats.paired_difference([2.0], [1.0])
    assert one.n == 1 and one.mean_diff == 1.0 and math.isnan(one.ci_low)
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_mcnemar_exact_on_known_counts():
    assert stats.mcnemar_counts(10, 0).p_value == pytest.approx(2 * 0.5 ** 10)
    assert stats.mcnemar_counts(0, 0).p_value == 1.0
    assert stats.mcnemar_counts(5, 5).p_value == 1.0
    # b=1, c=9: two-sided exact p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024
    assert stats.mcnemar_counts(1, 9).p_value == pytest.approx(22 / 1024)
    with pytest.raises(ValueError):
        stats.mcnemar_counts(-1, 2)


def test_mcnemar_counts_only_discordant_examples():
    control = [1, 1, 1, 0, 0, 1, 0, 1]
    arm = [1, 0, 0, 0, 1, 1, 0, 0]
    m = stats.mcnemar(control, arm)
    assert (m.b, m.c) == (3, 1)  # control-only right: 3; arm-only right: 1
    assert m.p_value == pytest.approx(stats.mcnemar_counts(3, 1).p_value)
    assert stats.mcnemar(control, control).b == 0


def test_ratio_of_medians():
    assert stats.ratio_of_medians([2.0, 4.0, 100.0], [1.0, 2.0, 2.0]) == 2.0
    assert math.isnan(stats.ratio_of_medians([], [1.0]))


def test_formatting():
    assert stats.fmt_p(0.0004) == "<0.001" and stats.fmt_p(0.0432) == "0.043" and stats.fmt_p(math.nan) == "n/a"
    assert stats.fmt_num(1234567.0) == "1.23e+06"
    assert stats.fmt_num(0.5, sign=True) == "+0.500"
    assert stats.fmt_mean_std(math.nan, 1.0) == "n/a"
