"""Does the reported interval cover the true mean as often as it says? Measured by simulation.

Paired differences are drawn with a known true mean from several distributions, at the seed counts the
ablations use. Each case is seeded, so the numbers are fixed; the thresholds are set ~3-4 binomial
standard errors from the theoretical value, so another seed would pass too. Run with ``-s`` to see the
measured coverages. Whole file: ~5 s on a busy 2-core machine.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from analysis import exact_tests, stats

TRUE_MEAN = 0.3

SYMMETRIC = {  # the sign-flip CI is exact for any continuous distribution symmetric about its mean
    "normal": lambda rng, shape: rng.normal(0.0, 1.0, shape),
    "t3 (heavy tails)": lambda rng, shape: rng.standard_t(3, shape),
    "laplace": lambda rng, shape: rng.laplace(0.0, 1.0, shape),
}
SKEWED = {  # centred so that the mean is 0; median and center of mass then disagree
    "exponential": lambda rng, shape: rng.exponential(1.0, shape) - 1.0,
    "lognormal(0, 1)": lambda rng, shape: rng.lognormal(0.0, 1.0, shape) - math.exp(0.5),
}


def exact_coverage(n: int, confidence: float) -> float:
    """1 - 2k/2^n with k = floor(alpha * 2^(n-1)): what Hartigan's interval covers under symmetry."""
    k = math.floor((1 - confidence) * 2 ** (n - 1))
    return 1 - 2 * k / 2 ** n


def sign_flip_coverage(draws: np.ndarray, confidence: float) -> float:
    """How often the interval the report prints (stats.paired_difference) holds the true mean."""
    hits = 0
    zeros = np.zeros(draws.shape[1])
    for d in draws:
        p = stats.paired_difference(d, zeros, confidence=confidence, power=None)
        hits += p.ci_low <= TRUE_MEAN <= p.ci_high
    return hits / len(draws)


def t_coverage(draws: np.ndarray, confidence: float) -> float:
    n = draws.shape[1]
    half = sps.t.ppf(1 - (1 - confidence) / 2, n - 1) * draws.std(axis=1, ddof=1) / math.sqrt(n)
    return float(np.mean(np.abs(draws.mean(axis=1) - TRUE_MEAN) <= half))


@pytest.mark.parametrize("name", list(SYMMETRIC))
@pytest.mark.parametrize(("n", "confidence", "n_draws"), [(5, 0.95, 1000), (5, 0.90, 2000), (6, 0.95, 2000),
                                                          (10, 0.95, 4000)])
def test_the_interval_covers_the_mean_as_promised_under_symmetry(name, n, confidence, n_draws):
    rng = np.random.default_rng([n, int(confidence * 100), list(SYMMETRIC).index(name)])
    draws = TRUE_MEAN + SYMMETRIC[name](rng, (n_draws, n))
    cov = sign_flip_coverage(draws, confidence)
    expected = exact_coverage(n, confidence)
    se = math.sqrt(expected * (1 - expected) / n_draws)
    print(f"\n{name:18s} n={n:2d} {confidence:.0%} CI: coverage {cov:.4f} (theory {expected:.4f}, "
          f"t-interval {t_coverage(draws, confidence):.4f}, {n_draws} draws)")
    if expected == 1.0:  # 5 seeds at 95%: the interval is unbounded, honestly, and covers everything
        assert cov == 1.0
        return
    assert abs(cov - expected) <= 4 * se  # neither under- nor needlessly over-covering
    if confidence == 0.95:
        assert cov >= 0.94
    else:  # 90% at n=5: k = 1 gives 1 - 2/32 = 0.9375; the assert is on the nominal level
        assert cov >= confidence


@pytest.mark.parametrize("name", list(SKEWED))
def test_skewed_differences_measured_honestly(name):
    """A sign-flip interval is exact for the center of a *symmetric* distribution. For a skewed one it
    covers the mean less often than it says: measured at n=10, 95%, with these seeds, 0.90 (centred
    exponential) and 0.85 (centred lognormal), about what the t-interval covers on the same draws
    (0.90 and 0.84): with 10 seeds no interval is exact for the mean of a strongly skewed distribution.
    So the assert is only that it stays there, not worse than the t-interval by more than 2 points."""
    rng = np.random.default_rng([10, list(SKEWED).index(name)])
    draws = TRUE_MEAN + SKEWED[name](rng, (3000, 10))
    cov, cov_t = sign_flip_coverage(draws, 0.95), t_coverage(draws, 0.95)
    print(f"\n{name:18s} n=10 95% CI: coverage {cov:.4f} (t-interval {cov_t:.4f}, skewed: no exact theory)")
    assert cov >= {"exponential": 0.87, "lognormal(0, 1)": 0.82}[name]
    assert cov >= cov_t - 0.02


def test_the_old_bootstrap_interval_undercovers():
    """The BCa bootstrap the report used to print: nominal 95%, measured ~83% at n=5 and ~90% at n=10,
    on normal differences, where the sign-flip interval is exact. The coverage test above has teeth."""
    rng = np.random.default_rng(83)
    for n, limit in ((5, 0.90), (10, 0.935)):
        draws = TRUE_MEAN + rng.normal(0.0, 1.0, (1000, n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sps.bootstrap((draws,), np.mean, axis=-1, n_resamples=1999, method="BCa",
                                confidence_level=0.95, rng=rng)
        lo, hi = res.confidence_interval
        cov = float(np.mean((lo <= TRUE_MEAN) & (TRUE_MEAN <= hi)))
        print(f"\nBCa bootstrap      n={n:2d} 95% CI: coverage {cov:.4f}")
        assert cov < limit


@pytest.mark.parametrize(("n", "alpha"), [(8, 0.05), (10, 0.05), (10, 0.05 / 3)])
def test_the_test_has_80_percent_power_at_the_reported_mde_and_its_size_under_the_null(n, alpha):
    rng = np.random.default_rng([n, 7])
    sd = 0.02
    mde = exact_tests.min_detectable_effect(n, sd, alpha=alpha)
    draws = rng.normal(0.0, sd, (2000, n))
    power = np.mean([exact_tests.sign_flip(mde + d, confidence=1 - alpha).p_value <= alpha for d in draws])
    size = np.mean([exact_tests.sign_flip(d, confidence=1 - alpha).p_value <= alpha for d in draws])
    attained = 2 * math.floor(alpha * 2 ** (n - 1)) / 2 ** n  # the exact size, <= alpha
    print(f"\nn={n} alpha={alpha:.4f}: MDE {mde / sd:.3f} sd, power there {power:.3f}, "
          f"size {size:.4f} (exact {attained:.4f})")
    assert power == pytest.approx(0.8, abs=0.03)  # 3.4 binomial SEs at 2000 draws, plus the MDE's own ~1%
    assert size <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws.shape[0])
