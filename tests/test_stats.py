"""analysis.stats on inputs whose answers are known, and the properties its numbers promise."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import exact_tests, stats

ALPHAS = (0.05, 0.1, 0.01, 0.2, 0.25, 0.5, 0.0625, 0.03125)

# Fisher (1935), The Design of Experiments, sec. 21: Darwin's Zea mays, height of the crossed minus the
# self-fertilised plant of each pair, in eighths of an inch. Fisher counted 1,726 of the 2^15 = 32,768
# sign patterns with a sum at least as extreme as the observed 314: two-sided p = 5.267%.
DARWIN = [49, -67, 8, 16, 6, 23, 28, 41, 14, 29, 56, 24, 75, 60, -48]


def brute_force_p(d, mu0: float = 0.0) -> float:
    """The sign-flip test written out: all 2^n sign patterns of d - mu0, sum statistic, two-sided."""
    x = np.asarray(d, dtype=float) - mu0
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
    sums = signs @ x
    obs = sums[0]  # the all-plus pattern, summed in the same order as the others (float ties)
    return min(1.0, 2 * min(np.mean(sums >= obs), np.mean(sums <= obs)))


def random_diffs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Continuous, tied, zero-heavy and constant differences, mixed."""
    kind = rng.integers(6)
    if kind == 0:
        return rng.normal(rng.normal(0, 1), rng.uniform(0.1, 2), n)
    if kind == 1:  # small integers: ties and zero subset sums everywhere
        return rng.integers(-3, 4, n).astype(float)
    if kind == 2:  # many exact zeros
        return np.where(rng.random(n) < 0.5, 0.0, rng.normal(0.5, 1, n))
    if kind == 3:  # a constant difference (an arm that shifts every seed alike, or changes nothing)
        return np.full(n, rng.choice([0.0, 1.0, -0.25]))
    if kind == 4:  # one-signed
        return np.abs(rng.normal(1, 1, n)) * rng.choice([-1, 1])
    return rng.standard_t(2, n) + rng.choice([0.0, 3.0])


# -- summaries -------------------------------------------------------------------------------------

def test_summarize_uses_the_sample_std_and_skips_non_finite():
    s = stats.summarize([1.0, 2.0, 3.0, math.nan, math.inf])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    one = stats.summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and one.n == 1
    assert stats.summarize([]).n == 0
    assert str(stats.summarize([1.0, 2.0, 3.0])) == "2.000 ± 1.000"


# -- the paired comparison -------------------------------------------------------------------------

def test_paired_difference_of_a_known_shift():
    """arm = control - 0.05 + d, with d = +-0.01 alternating: every difference negative."""
    control = np.array([0.90, 0.92, 0.88, 0.91, 0.93, 0.89, 0.90, 0.94, 0.87, 0.92])
    noise = np.array([0.01, -0.01] * 5)
    arm = control - 0.05 + noise
    p = stats.paired_difference(arm, control)
    d = arm - control
    assert p.n == 10 and p.confidence == 0.95
    assert p.mean_diff == pytest.approx(-0.05)
    sd = d.std(ddof=1)  # = 0.01 * sqrt(10/9)
    assert p.sd == pytest.approx(0.01 * math.sqrt(10 / 9))
    assert p.d_z == pytest.approx(-0.05 / sd)
    assert p.p_value == 2 / 2 ** 10  # all ten negative: the one extreme pattern and its mirror image
    assert p.min_p == 2 / 2 ** 10
    t = -0.05 / (sd / math.sqrt(10))
    assert p.p_t == pytest.approx(2 * sps.t.sf(abs(t), df=9))
    assert p.p_wilcoxon == pytest.approx(2 / 2 ** 10)
    assert p.ci_low < -0.05 < p.ci_high < 0
    assert -0.06 - 1e-12 <= p.ci_low and p.ci_high <= -0.04 + 1e-12  # subset means lie within the data
    assert p.reachable and p.significant
    assert 0 < p.mde < 0.05 and "exact sign-flip" in p.method
    assert stats.fmt_diff(p).startswith("-0.050 [-0.0")


def test_three_pairs_of_the_same_sign_give_the_exact_p_not_zero():
    p = stats.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # a constant shift of +1
    assert (p.mean_diff, p.p_value, p.p_wilcoxon, p.min_p) == (1.0, 0.25, 0.25, 0.25)
    assert (p.ci_low, p.ci_high) == (-math.inf, math.inf)  # 3 seeds cannot reach p <= 0.05
    assert math.isnan(p.d_z) and p.sd == 0 and math.isnan(p.p_t)
    assert not p.reachable and not p.significant and p.mde == math.inf
    assert stats.fmt_diff(p) == "+1.000 [unbounded: 3 seeds]"


@pytest.mark.parametrize("n", range(1, 13))
def test_n_pairs_of_one_sign_give_two_over_two_to_the_n(n):
    rng = np.random.default_rng(n)
    d = rng.uniform(0.1, 1.0, n) * -1
    p = stats.paired_difference(d, np.zeros(n))
    assert p.p_value == min(1.0, 2 / 2 ** n) == p.min_p
    assert p.p_value > 0 and math.isfinite(p.d_z) == (n >= 2)
    assert p.reachable == (n >= 6) == (p.ci_high < 0)  # the CI excludes 0 iff the test can say so
    if n < 6:
        assert not p.significant and math.isinf(p.ci_low) and math.isinf(p.ci_high)


def test_identical_arms_have_no_difference():
    x = [0.9, 0.8, 0.95]
    p = stats.paired_difference(x, x)
    assert (p.mean_diff, p.p_value, p.p_wilcoxon) == (0, 1.0, 1.0)
    assert math.isnan(p.d_z) and (p.ci_low, p.ci_high) == (-math.inf, math.inf)  # 3 seeds: anything goes
    ten = np.linspace(0.8, 0.95, 10)
    q = stats.paired_difference(ten, ten)  # ten seeds, not one difference: the exact CI is the point 0
    assert (q.mean_diff, q.ci_low, q.ci_high, q.p_value) == (0, 0, 0, 1.0) and math.isnan(q.d_z)


def test_differences_equal_up_to_rounding_count_as_equal():
    # 0.9 - 0.8, 0.8 - 0.7, 0.95 - 0.85 are three different floats near 0.1; sd ~1e-17 must not make a
    # d_z of 1e15
    p = stats.paired_difference([0.9, 0.8, 0.95], [0.8, 0.7, 0.85])
    assert p.sd == 0 and math.isnan(p.d_z) and p.p_value == 0.25


def test_accuracies_tie_like_the_integer_counts_they_come_from():
    """Accuracy = correct / N: the float differences must give the p and CI of the exact integers."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(2, 11))
        N = int(rng.choice([100, 1000, 1797, 10000]))
        kc = rng.integers(int(0.8 * N), int(0.95 * N), n)
        ka = kc + rng.integers(-3, 4, n)  # small integer differences: exact-zero subset sums are common
        p = stats.paired_difference(ka / N, kc / N, power=None)  # the MDE is tested elsewhere
        exact = exact_tests.sign_flip((ka - kc).astype(float))
        assert p.p_value == exact.p_value
        if math.isfinite(exact.ci_low):
            assert p.ci_low == pytest.approx(exact.ci_low / N, abs=1e-12)
            assert p.ci_high == pytest.approx(exact.ci_high / N, abs=1e-12)
        assert (p.ci_low > 0 or p.ci_high < 0) == (p.p_value <= 0.05)


def test_non_finite_values_raise_instead_of_being_dropped():
    with pytest.raises(ValueError, match="1 of 4 pairs"):
        stats.paired_difference([1.0, math.nan, 3.0, 5.0], [0.0, 1.0, 1.0, 2.0])
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0, math.inf])
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0)
    a, c, dropped = stats.drop_nonfinite_pairs([1.0, math.nan, 3.0, 5.0], [0.0, 1.0, 1.0, math.inf])
    assert a.tolist() == [1.0, 3.0] and c.tolist() == [0.0, 1.0] and dropped == 2
    p = stats.paired_difference(a, c)
    assert p.n == 2 and p.mean_diff == pytest.approx(1.5)


def test_zero_and_one_pair():
    none = stats.paired_difference([], [])
    assert none.n == 0 and math.isnan(none.mean_diff) and math.isnan(none.p_value)
    assert stats.fmt_diff(none) == "n/a"
    one = stats.paired_difference([2.0], [1.0])
    assert one.n == 1 and one.mean_diff == 1.0 and one.p_value == 1.0 and one.min_p == 1.0
    assert math.isinf(one.ci_low) and math.isnan(one.d_z) and one.mde == math.inf
    assert stats.fmt_diff(one) == "+1.000 [unbounded: 1 seed]"


def test_other_confidence_levels():
    d = np.array([0.3, 0.5, 0.1, 0.7, 0.2])  # five positive: p = 2/32 = 0.0625
    p95 = stats.paired_difference(d, np.zeros(5))
    p90 = stats.paired_difference(d, np.zeros(5), confidence=0.90)
    assert p95.p_value == p90.p_value == 0.0625
    assert not p95.reachable and math.isinf(p95.ci_low)
    assert p90.reachable and p90.significant and 0 < p90.ci_low <= 0.1 and p90.ci_high >= 0.7 - 1e-12
    assert p90.ci_low == pytest.approx(0.1) and p90.ci_high == pytest.approx(0.7)  # k=1: extreme subset means


def test_paired_can_be_rebuilt_positionally_from_a_report_row():
    """analysis/report.py does Paired(n, diff, lo, hi, p, p_wilcoxon, d_z) from its table."""
    p = stats.Paired(3, -0.84, -math.inf, math.inf, 0.25, 0.25, math.nan)
    assert p.confidence == 0.95 and math.isnan(p.min_p) and p.method == ""
    assert not p.reachable and not p.significant  # falls back on n
    assert stats.fmt_diff(p) == "-0.840 [unbounded: 3 seeds]"
    assert stats.Paired(8, 0.1, 0.02, 0.2, 0.01, 0.02, 1.2).reachable
    fields = list(stats.Paired.__dataclass_fields__)
    assert fields[:8] == ["n", "mean_diff", "ci_low", "ci_high", "p_value", "p_wilcoxon", "d_z", "confidence"]
    assert set(p.as_dict()) >= {"p_t", "min_p", "sd", "mde", "method"}


def test_large_n_uses_the_t_test_and_agrees_with_its_interval():
    rng = np.random.default_rng(5)
    for n in (21, 30, 60):
        for shift in (0.0, 0.3, 1.0):
            d = rng.normal(shift, 1, n)
            p = stats.paired_difference(d, np.zeros(n))
            assert p.method.startswith("t-test") and p.p_value == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
            half = sps.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
            assert (p.ci_low, p.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
            assert (p.ci_low > 0 or p.ci_high < 0) == (p.p_value <= 0.05)
    const = stats.paired_difference(np.full(25, 2.0), np.ones(25))
    assert const.p_value == 2 / 2 ** 25 and (const.ci_low, const.ci_high) == (1.0, 1.0) and math.isnan(const.d_z)
    huge = stats.paired_difference(rng.normal(1e6, 1, 30), np.zeros(30))
    assert huge.p_value >= 2 / 2 ** 30  # no p = 0 from float underflow


# -- the sign-flip test and its interval -----------------------------------------------------------

def test_sign_flip_p_matches_scipy_permutation_test():
    rng = np.random.default_rng(0)
    samples = [rng.normal(0.4, 1, n) for n in range(2, 11)] + [
        rng.integers(-4, 5, 8).astype(float), np.array(DARWIN, dtype=float), np.array([3.0, -1.0, 2.0])]
    for d in samples:
        ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                   vectorized=True, alternative="two-sided")
        got = exact_tests.sign_flip(d)
        assert got.p_value == pytest.approx(ref.pvalue, rel=1e-12), d
        assert got.p_value == pytest.approx(brute_force_p(d), rel=1e-12) if d.size <= 12 else True
        greater = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                       vectorized=True, alternative="greater")
        assert got.p_greater == pytest.approx(greater.pvalue, rel=1e-12)


def test_fisher_darwin_zea_mays():
    """Published: Fisher's 1726/32768 for the sign-flip test; the Wilcoxon p in scipy's documentation."""
    p = stats.paired_difference(DARWIN, [0] * 15)
    assert p.p_value == 1726 / 32768  # 0.05267: not below 0.05 ...
    assert p.ci_low < 0 < p.ci_high  # ... so the inverted CI contains 0
    assert p.p_wilcoxon == pytest.approx(0.041259765625, rel=1e-12)  # ... while Wilcoxon's is 0.041
    assert p.mean_diff == pytest.approx(314 / 15)
    k = math.floor(0.05 * 2 ** 14)  # 819
    means = sorted(sum(s) / len(s) for r in range(1, 16) for s in itertools.combinations(DARWIN, r))
    assert (p.ci_low, p.ci_high) == pytest.approx((means[k - 1], means[-k]))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.25, 0.0625])
def test_ci_endpoints_match_a_brute_force_inversion_of_the_test(alpha):
    """Scan mu0, compute p(mu0) by enumerating sign patterns: accepted exactly on [ci_low, ci_high]."""
    rng = np.random.default_rng(int(alpha * 1e4))
    datasets = [rng.normal(0.3, 1, n) for n in (2, 3, 5, 6, 7, 8)] + [
        np.array([1.0, 1.0, 2.0, -1.0, 0.0, 2.0, 3.0]), np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])]
    for d in datasets:
        ci = exact_tests.sign_flip(d, confidence=1 - alpha)
        subset_means = np.array([np.mean(s) for r in range(1, d.size + 1) for s in itertools.combinations(d, r)])
        span = max(np.ptp(d), 1.0)
        grid = np.linspace(d.min() - span, d.max() + span, 801)
        grid = grid[np.min(np.abs(grid[:, None] - subset_means[None, :]), axis=1) > 1e-9 * span]
        for mu0 in grid:
            accepted = brute_force_p(d, mu0) > alpha
            assert accepted == (ci.ci_low <= mu0 <= ci.ci_high), (d, mu0, ci)
        eps = 1e-7 * span
        for end, outside in ((ci.ci_low, -1), (ci.ci_high, 1)):
            if math.isfinite(end):  # the endpoint is where p crosses alpha: tight, not just valid
                assert brute_force_p(d, end + outside * eps) <= alpha
                if ci.ci_high - ci.ci_low > 2 * eps:
                    assert brute_force_p(d, end - outside * eps) > alpha
                else:  # a point interval (constant differences): the point itself is accepted
                    assert brute_force_p(d, end) > alpha


def test_the_ci_excludes_zero_exactly_when_p_is_at_most_alpha():
    """The promise of the inversion, over random data: ties, zeros, constants, n = 1..12, many alphas."""
    rng = np.random.default_rng(2024)
    seen = {True: 0, False: 0}
    for i in range(3000):
        n = int(rng.integers(1, 13))
        alpha = ALPHAS[i % len(ALPHAS)]
        d = random_diffs(rng, n)
        s = exact_tests.sign_flip(d, confidence=1 - alpha)
        excludes = s.ci_low > 0 or s.ci_high < 0
        assert excludes == (s.p_value <= alpha), (d, alpha, s)
        if alpha == 0.05:  # 0.05 * 2^k is never an integer, so p never equals 0.05: "<" is the same
            assert excludes == (s.p_value < alpha)
        assert s.min_p <= s.p_value <= 1 and s.p_value > 0
        assert s.ci_low <= s.ci_high
        assert (math.isinf(s.ci_low) and math.isinf(s.ci_high)) == (s.min_p > alpha)
        mirrored = exact_tests.sign_flip(-d, confidence=1 - alpha)  # the test cannot prefer a direction
        assert mirrored.p_value == s.p_value and (mirrored.ci_low, mirrored.ci_high) == (-s.ci_high, -s.ci_low)
        seen[excludes] += 1
    assert min(seen.values()) > 300  # both outcomes were exercised


def test_the_property_holds_through_paired_difference_too():
    rng = np.random.default_rng(7)
    for i in range(300):
        n = int(rng.integers(1, 13))
        conf = 1 - ALPHAS[i % len(ALPHAS)]
        control = rng.uniform(0.5, 1.0, n)
        p = stats.paired_difference(control + random_diffs(rng, n), control, confidence=conf, power=None)
        assert (p.ci_low > 0 or p.ci_high < 0) == p.significant == (p.p_value <= 1 - conf)
        assert not math.isinf(p.d_z) and p.p_value > 0
        if n >= 2 and p.sd > 0:
            assert p.d_z == pytest.approx(p.mean_diff / p.sd)


def test_sign_flip_refuses_what_it_cannot_enumerate():
    with pytest.raises(ValueError):
        exact_tests.sign_flip(np.ones(exact_tests.EXACT_MAX_N + 1))
    with pytest.raises(ValueError):
        exact_tests.sign_flip([1.0, math.nan])


def test_min_p_and_seeds_needed():
    assert [exact_tests.min_attainable_p(n) for n in (1, 2, 3, 5, 6)] == [1.0, 0.5, 0.25, 0.0625, 0.03125]
    assert math.isnan(exact_tests.min_attainable_p(0))
    assert exact_tests.seeds_needed(0.05) == 6 and exact_tests.seeds_needed(0.05 / 3) == 7 and exact_tests.seeds_needed(0.1) == 5
    assert exact_tests.reach_note(6) == ""
    assert exact_tests.reach_note(5) == ("5 seeds cannot reach p ≤ 0.05 with an exact test "
                                   "(smallest possible p = 0.0625); 6 seeds can")


# -- Wilcoxon, d_z ---------------------------------------------------------------------------------

def test_wilcoxon_is_scipys_exact_test_and_exact_with_ties():
    rng = np.random.default_rng(3)
    for n in range(1, 12):
        d = rng.normal(0.5, 1, n)
        assert exact_tests.wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d, method="exact").pvalue)
    # ties and zeros: zeros dropped, then the exact permutation distribution of the signed-rank sum
    d = np.array([1.0, 1.0, 2.0, -1.0, 0.0, 3.0, 3.0, 2.0])
    nz = d[d != 0]
    ranks = sps.rankdata(np.abs(nz))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=nz.size)))
    w = (signs > 0) @ ranks
    obs = ranks[nz > 0].sum()
    expected = min(1.0, 2 * min(np.mean(w >= obs), np.mean(w <= obs)))
    assert exact_tests.wilcoxon_p(d) == pytest.approx(expected)
    for _ in range(20):  # and what scipy computes when asked for the exact permutation distribution
        d = rng.integers(-3, 4, int(rng.integers(2, 11))).astype(float)
        if np.count_nonzero(d) >= 2:  # scipy's permutation_test needs two
            ref = sps.wilcoxon(d[d != 0], method=sps.PermutationMethod(n_resamples=np.inf)).pvalue
            assert exact_tests.wilcoxon_p(d) == pytest.approx(ref, rel=1e-12), d
    assert exact_tests.wilcoxon_p([0.0, 0.0]) == 1.0 and math.isnan(exact_tests.wilcoxon_p([]))


def test_cohens_dz_is_never_infinite():
    assert stats.cohens_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert math.isnan(stats.cohens_dz([1.0, 1.0, 1.0]))
    assert math.isnan(stats.cohens_dz([5.0]))
    assert math.isnan(stats.cohens_dz([]))


# -- Holm ------------------------------------------------------------------------------------------

def test_holm_known_answer():
    """By hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max
    0.02, 0.03, 0.06, 0.06; back in the input order: 0.03, 0.06, 0.06, 0.02."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.02]) == pytest.approx([0.02])  # one arm: nothing to adjust
    assert stats.holm([]).size == 0


def test_holm_passes_nan_through_and_does_not_count_it():
    out = stats.holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert math.isnan(out[1])
    assert np.delete(out, 1) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(stats.holm([math.nan, math.nan])).all()
    with pytest.raises(ValueError):
        stats.holm([0.5, 1.5])


def test_holm_properties():
    rng = np.random.default_rng(9)
    for _ in range(500):
        m = int(rng.integers(1, 9))
        p = rng.choice([rng.uniform(0, 1), rng.uniform(0, 0.05), 0.03125, 1.0], m)
        adj = stats.holm(p)
        assert np.all(adj >= p) and np.all(adj <= np.minimum(1, m * p) + 1e-15)  # between raw and Bonferroni
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= 0)  # a smaller raw p never gets a larger adjusted one


# -- minimum detectable effect ---------------------------------------------------------------------

def test_mde_is_infinite_when_the_exact_test_cannot_reach_alpha():
    for n in range(1, 6):
        assert exact_tests.min_detectable_effect(n, 1.0, alpha=0.05) == math.inf
    assert exact_tests.min_detectable_effect(6, 1.0, alpha=0.05 / 3) == math.inf  # Holm's first step, 3 arms
    assert math.isfinite(exact_tests.min_detectable_effect(7, 1.0, alpha=0.05 / 3))
    assert math.isnan(exact_tests.min_detectable_effect(0, 1.0))
    assert math.isnan(exact_tests.min_detectable_effect(8, math.nan)) and math.isnan(exact_tests.min_detectable_effect(8, 0.0))


def test_mde_at_six_seeds_is_the_all_same_sign_test():
    """At n = 6, alpha = 0.05 the exact test rejects only when all six differences share a sign:
    power(delta) = Phi(delta)^6 + Phi(-delta)^6 with sd = 1, so the MDE solves that = 0.8."""
    from scipy import optimize
    exact = optimize.brentq(lambda e: sps.norm.cdf(e) ** 6 + sps.norm.cdf(-e) ** 6 - 0.8, 0.1, 5)
    assert exact == pytest.approx(1.7927, abs=1e-3)
    assert exact_tests.min_detectable_effect(6, 1.0) == pytest.approx(exact, rel=0.02)
    assert exact_tests.min_detectable_effect(6, 0.02) == pytest.approx(0.02 * exact_tests.min_detectable_effect(6, 1.0))


def test_mde_shrinks_with_seeds_and_alpha_and_matches_the_t_test_for_many_seeds():
    mdes = [exact_tests.min_detectable_effect(n, 1.0) for n in range(6, 16)]
    assert all(b < a for a, b in itertools.pairwise(mdes))
    assert exact_tests.min_detectable_effect(10, 1.0, alpha=0.1) < mdes[4] < exact_tests.min_detectable_effect(10, 1.0, alpha=0.01)
    assert exact_tests.min_detectable_effect(10, 1.0, power=0.9) > mdes[4]
    # textbook approximation (t_{1-alpha/2} + t_{power}) * sd / sqrt(n); good for many seeds
    for n in (12, 30, 100):
        approx = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) / math.sqrt(n)
        assert exact_tests.min_detectable_effect(n, 1.0) == pytest.approx(approx, rel=0.04)
    assert stats.paired_difference(np.arange(8.0), np.zeros(8)).mde == pytest.approx(
        exact_tests.min_detectable_effect(8, np.arange(8.0).std(ddof=1)))


# -- the rest --------------------------------------------------------------------------------------

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
    assert stats.fmt_num(math.inf) == "+inf" and stats.fmt_num(-math.inf) == "-inf"
    assert stats.fmt_mean_std(math.nan, 1.0) == "n/a"
    assert stats.fmt_diff(stats.Paired(6, 0.012, -0.003, 0.027, 0.2, 0.2, 0.5)) == "+0.012 [-0.003, +0.027]"
    assert stats.fmt_diff(stats.Paired(2, 0.012, math.nan, math.nan, 0.5, 0.5, math.nan)) == "+0.012 [n/a]"
