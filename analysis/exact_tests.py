"""Exact paired tests over sign patterns: the sign-flip permutation test of the mean difference and
its inversion (the confidence interval), the exact Wilcoxon signed-rank p, how many seeds a design needs
to reach a level at all, and the smallest effect it could detect. ``analysis.stats`` builds the paired
comparison of an ablation arm from these."""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

#: Up to this many pairs the sign-flip test enumerates all 2^n sign patterns (2^20 ~ 1e6 sums, ~0.1 s).
#: Beyond it the t-test and t-interval stand in (the sign-flip distribution of the mean is then close
#: to normal); both come from one t statistic, so they still agree with each other.
EXACT_MAX_N = 20

_EPS = float(np.finfo(float).eps)


@dataclass(frozen=True)
class SignFlip:
    """The exact sign-flip test of ``mean(d) == 0`` and its inversion, the CI of the center of d."""
    n: int
    p_value: float  # two-sided: min(1, 2 * min(p_greater, p_less))
    p_greater: float  # P(sum of sign-flipped d >= observed sum), the one-sided p for "mean > 0"
    p_less: float  # P(sum of sign-flipped d <= observed sum), the one-sided p for "mean < 0"
    ci_low: float  # k-th smallest of the 2^n - 1 subset means, k = floor(alpha * 2^(n-1)); -inf if k = 0
    ci_high: float  # k-th largest subset mean; +inf if k = 0
    min_p: float  # 2 / 2^n: the p of n differences that all have the same sign
    confidence: float


def sign_flip(diffs: Sequence[float], *, confidence: float = 0.95, atol: float | None = None) -> SignFlip:
    """Exact sign-flip test of "d is symmetric about 0" with the sum (mean) statistic, and its inversion.

    Flipping the signs of the set S of differences changes the sum by ``-2 * sum(d[S])``, so a flipped
    sum is >= the observed one exactly when ``sum(d[S]) <= 0``: with s_S the 2^n - 1 nonempty subset
    sums, ``p_greater = (1 + #{S: s_S <= 0}) / 2^n`` (the 1 is the observed pattern itself) and
    ``p_less = (1 + #{S: s_S >= 0}) / 2^n``; two-sided ``p = min(1, 2 * min(p_greater, p_less))``
    (the definition of scipy.stats.permutation_test).

    Testing ``mu0`` instead of 0 shifts each subset mean m_S = s_S / |S| by mu0, so p(mu0) <= alpha iff
    ``1 + #{S: m_S <= mu0} <= alpha * 2^(n-1)`` (or the same with >=), i.e. iff mu0 < m_(k) or
    mu0 > m_(M+1-k), with k = floor(alpha * 2^(n-1)), M = 2^n - 1 and m_(j) the j-th smallest subset
    mean. The CI {mu0: p(mu0) > alpha} is therefore the closed interval [m_(k), m_(M+1-k)] (Hartigan
    1969), ties included, and 0 is outside it exactly when p <= alpha. Coverage is 1 - 2k/2^n >= 1 - alpha
    for any continuous distribution symmetric about its mean (for a skewed one the interval tracks a
    central value between median and mean, and covered the mean of a centred exponential ~90% and of a
    lognormal ~85% of the time at n = 10, as the t-interval does). k = 0 (n pairs cannot reach alpha):
    (-inf, +inf).

    ``atol``: subset sums within it of 0 count as exactly 0 (ties that rounding broke); the default
    covers the rounding of the sums themselves.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(diffs, dtype=float).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip needs finite differences")
    n = int(d.size)
    if n == 0:
        return SignFlip(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    if n > EXACT_MAX_N:
        raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; n = {n} > {EXACT_MAX_N}")
    sums, sizes = _subset_sums(d)
    tol = tie_tolerance(d) if atol is None else max(float(atol), tie_tolerance(d))
    sums[np.abs(sums) <= tol] = 0.0  # so p (signs of the sums) and the CI (the means) share the ties
    total = 2.0 ** n
    p_greater = (1 + int(np.count_nonzero(sums <= 0))) / total
    p_less = (1 + int(np.count_nonzero(sums >= 0))) / total
    p = min(1.0, 2 * min(p_greater, p_less))
    k = math.floor((1.0 - confidence) * 2.0 ** (n - 1))  # exact in floating point: a power-of-2 scaling
    if k == 0:
        lo, hi = -math.inf, math.inf
    else:
        means = sums / sizes
        m = means.size
        part = np.partition(means, [k - 1, m - k])
        lo, hi = float(part[k - 1]), float(part[m - k])
    return SignFlip(n, p, p_greater, p_less, lo, hi, min_attainable_p(n), confidence)


def min_attainable_p(n: int) -> float:
    """Smallest two-sided p the exact sign-flip test can give with n pairs: 2/2^n (all signs equal).

    The Wilcoxon signed-rank test has the same floor. n = 1: 1.0 (one pair proves nothing); n = 0: NaN.
    """
    if n <= 0:
        return math.nan
    return min(1.0, 2.0 ** (1 - n))


def seeds_needed(alpha: float = 0.05) -> int:
    """Fewest pairs with which the exact test can reach p <= alpha: 6 at 0.05, 7 at 0.05/3 (Holm, 3 arms)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = 1
    while min_attainable_p(n) > alpha:
        n += 1
    return n


def reach_note(n: int, alpha: float = 0.05) -> str:
    """"" when n pairs can reach p <= alpha, else one sentence that says they cannot, for the report."""
    mp = min_attainable_p(n)
    if n > 0 and mp <= alpha:
        return ""
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    return (f"{seeds} cannot reach p ≤ {alpha:.3g} with an exact test (smallest possible p = {mp:.3g}); "
            f"{seeds_needed(alpha)} seeds can")


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of the nonzero differences (zeros dropped, as Wilcoxon did).

    Exact: scipy's exact null distribution without ties. With tied |d|, the signed-rank statistic is
    the sign-flip test of the signed midranks, so that is what runs (exact, what scipy's
    ``PermutationMethod(n_resamples=inf)`` computes, 100x faster); scipy's normal approximation beyond
    EXACT_MAX_N nonzero differences with ties. No nonzero difference: 1.0.
    """
    d = np.asarray(diffs, dtype=float).ravel()
    nz = d[d != 0]
    if nz.size == 0:
        return math.nan if d.size == 0 else 1.0
    ties = np.unique(np.abs(nz)).size < nz.size
    if ties and nz.size <= EXACT_MAX_N:
        return sign_flip(np.sign(nz) * stats.rankdata(np.abs(nz))).p_value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample warnings: the p-value is exact
        return float(stats.wilcoxon(nz, method="exact" if not ties and nz.size <= 50 else "auto").pvalue)


# -- what the design could have found --------------------------------------------------------------

def min_detectable_effect(n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference that n paired seeds detect with probability ``power`` at ``alpha``.

    Model: differences ~ Normal(delta, sd) with sd the observed sd (itself uncertain with few seeds),
    tested by the test paired_difference uses. The answer is ``factor(n, alpha, power) * sd``:

    - n <= 12: the power of the exact sign-flip test itself, from 4,000-50,000 seeded simulated
      designs (the same ones for every delta; error ~1% of the MDE). The test rejects "delta <= 0" iff delta exceeds minus the k-th smallest
      subset mean of the noise, so the factor is a quantile, found without a root search. The
      noncentral t is optimistic here: at n = 6, alpha = 0.05 the exact test rejects only when all six
      differences share a sign and needs 1.79 sd, where the t-test needs 1.44 sd.
    - n > 12: noncentral t (scipy.stats.nct, solved with brentq) at the level the exact test actually
      attains, 2k/2^n <= alpha; it is within ~1% of the simulation at n = 12 and 14.

    ``inf`` when n pairs cannot reach alpha at all (then "no effect found" means nothing); NaN when sd
    is undefined (n < 2, not finite, or 0). For Holm across m arms, pass alpha / m: the first step's
    threshold and the strictest an arm can face, so the answer is conservative.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}")
    if n <= 0:
        return math.nan
    if min_attainable_p(n) > alpha:
        return math.inf
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    return _mde_factor(int(n), float(alpha), float(power)) * float(sd)


_MDE_SIM_MAX_N = 12


@functools.lru_cache(maxsize=256)
def _mde_factor(n: int, alpha: float, power: float) -> float:
    """MDE in units of sd (see min_detectable_effect); depends on (n, alpha, power) only, so cached."""
    k = math.floor(alpha * 2.0 ** (n - 1))
    if n > _MDE_SIM_MAX_N:
        return _nct_factor(n, 2 * k / 2.0 ** n, power)
    draws = min(50_000, max(4_000, 2 ** 24 // 2 ** n))  # ~2^24 subset means: ~0.3 s, error ~1% of the MDE
    z = np.random.default_rng(20240601 + n).standard_normal((draws, n))
    m = 2 ** n - 1
    up = np.empty(z.shape[0])  # the test says "mean > 0" iff delta > up[r]
    down = np.empty(z.shape[0])  # the test says "mean < 0" iff delta < down[r]
    for s in range(0, z.shape[0], 512):
        sums, sizes = _subset_sums_rows(z[s:s + 512])
        part = np.partition(sums / sizes, [k - 1, m - k], axis=1)
        up[s:s + 512], down[s:s + 512] = -part[:, k - 1], -part[:, m - k]
    up.sort()
    down.sort()
    # power just above delta = up[j]: rows with up < delta say "> 0", rows with down > delta say "< 0"
    hits = np.searchsorted(up, up, side="right") + (down.size - np.searchsorted(down, up, side="right"))
    ok = (hits >= power * up.size) & (up >= 0)
    return float(up[np.argmax(ok)]) if ok.any() else math.inf


def _nct_factor(n: int, alpha: float, power: float) -> float:
    """delta/sd at which the two-sided one-sample t-test at alpha has the given power (noncentral t)."""
    df = n - 1
    tc = float(stats.t.ppf(1 - alpha / 2, df))

    def gap(e: float) -> float:
        nc = e * math.sqrt(n)
        wrong_side = float(np.nan_to_num(stats.nct.cdf(-tc, df, nc)))  # scipy gives NaN far in this tail
        return float(stats.nct.sf(tc, df, nc)) + wrong_side - power

    hi = 1.0
    while gap(hi) < 0 and hi < 1e6:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-6))


# -- helpers ---------------------------------------------------------------------------------------

def tie_tolerance(d: np.ndarray, scale: float = 0.0) -> float:
    """How far from 0 a sum of some of the d may land by rounding alone: each d carries the rounding
    of its inputs (relative to ``scale``, their magnitude), and summing up to n of them adds more."""
    n = d.size
    return 8.0 * _EPS * n * (scale + float(np.abs(d).sum()))


def _subset_sums(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sizes of the 2^n - 1 nonempty subsets of d (subset i holds d[j] where bit j of i is 1)."""
    sums, sizes = np.zeros(1), np.zeros(1, dtype=np.int64)
    for x in d:
        sums = np.concatenate([sums, sums + x])
        sizes = np.concatenate([sizes, sizes + 1])
    return sums[1:], sizes[1:]


def _subset_sums_rows(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_subset_sums for every row of z at once."""
    sums, sizes = np.zeros((z.shape[0], 1)), np.zeros(1)
    for j in range(z.shape[1]):
        sums = np.concatenate([sums, sums + z[:, j:j + 1]], axis=1)
        sizes = np.concatenate([sizes, sizes + 1])
    return sums[:, 1:], sizes[1:]
