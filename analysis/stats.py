"""Statistics for paired comparisons over a handful of seeds, built so they cannot overstate certainty.

"Paired" means arm and control share everything but the intervention (seed, initial weights, data
order, validation split), so the per-seed difference ``d = arm - control`` is the unit of analysis.

The main test is the exact **sign-flip permutation test** of the mean difference: under "the arm
changes nothing", each difference is as likely to have come out with the opposite sign, so the 2^n
sign patterns are equally likely and the p-value is a count, never 0 (smallest: ``2 / 2^n``). Its
**confidence interval is the same test inverted** (Hartigan 1969), so the interval excludes 0 exactly
when ``p <= alpha``. With too few seeds the exact test cannot reach ``alpha`` at all (5 seeds: smallest
p = 0.0625 > 0.05); then the interval is honestly unbounded and :attr:`Paired.reachable` is False.

Beside it: the exact Wilcoxon signed-rank p (scipy), Cohen's d_z (NaN, never inf, without spread),
Holm's step-down adjustment across the arms of one ablation, the minimum detectable effect of the
design, and the exact McNemar test on per-example correctness.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from analysis.exact_tests import (EXACT_MAX_N, min_attainable_p, min_detectable_effect, sign_flip,
                                  tie_tolerance, wilcoxon_p)


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (ddof=1); nan when n < 2
    n: int

    def __str__(self) -> str:
        return fmt_mean_std(self.mean, self.std)


@dataclass(frozen=True)
class Paired:
    """Arm minus control over n paired seeds.

    The first seven fields are positional (analysis/report.py rebuilds a Paired from a table row), so
    new fields go after ``confidence`` with defaults; a Paired rebuilt from the seven numbers alone has
    NaN for the rest, and :attr:`reachable` then falls back on ``n``.
    """
    n: int
    mean_diff: float  # mean of the per-seed differences
    ci_low: float  # CI of the mean difference: the sign-flip test inverted; -inf/+inf when unreachable
    ci_high: float
    p_value: float  # exact sign-flip permutation test, two-sided; >= min_p, never 0 (t-test for n > 20)
    p_wilcoxon: float  # Wilcoxon signed-rank test, two-sided, exact (zeros dropped); secondary
    d_z: float  # Cohen's d_z = mean / sd of the differences; NaN when n < 2 or no spread, never inf
    confidence: float = 0.95
    p_t: float = math.nan  # paired t-test, for reference only (it assumes normal differences)
    min_p: float = math.nan  # smallest two-sided p the exact test can give with n pairs: 2 / 2^n
    sd: float = math.nan  # sample sd of the differences (ddof=1); 0 when they are all equal
    mde: float = math.nan  # minimum detectable effect at alpha = 1 - confidence, 80% power; inf: none at all
    method: str = ""  # how p_value and the CI were computed

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def reachable(self) -> bool:
        """Whether n pairs can give p <= alpha at all; when not, "no effect found" means nothing."""
        mp = self.min_p if math.isfinite(self.min_p) else min_attainable_p(self.n)
        return bool(mp <= self.alpha)

    @property
    def significant(self) -> bool:
        """p <= alpha, which is the same as: the CI excludes 0. Unadjusted: see :func:`holm`."""
        return bool(self.p_value <= self.alpha)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class McNemar:
    """Per-example paired test: ``b`` examples only the control gets right, ``c`` only the arm."""
    b: int
    c: int
    p_value: float  # exact: binomial test of b against b + c at p = 1/2, two-sided

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std (ddof=1) of the finite values."""
    x = _finite(values)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


# -- the paired comparison --------------------------------------------------------------------------

def paired_difference(arm: Sequence[float], control: Sequence[float], *, confidence: float = 0.95,
                      power: float | None = 0.8) -> Paired:
    """Mean of ``arm - control`` over paired seeds with the exact sign-flip p and the CI that inverts it.

    Every value must be finite: a non-finite value raises ValueError instead of being dropped
    silently. Score a diverged run explicitly (e.g. chance-level accuracy) or drop it on purpose with
    :func:`drop_nonfinite_pairs`, and say how many were dropped.

    ``p_value``: exact sign-flip test (all 2^n sign patterns) for n <= EXACT_MAX_N, else the t-test.
    CI: the same test inverted, so ``ci_low > 0 or ci_high < 0`` exactly when ``p_value <= 1 - confidence``;
    (-inf, +inf) when n pairs cannot reach that level (``reachable`` is False). ``mde``: the smallest
    true mean difference found with probability ``power`` at alpha = 1 - confidence, see
    :func:`min_detectable_effect` (pass a Holm-adjusted alpha there yourself); ``power=None`` skips it
    (it simulates the design once per (n, alpha, power), ~0.3 s, then comes from a cache).
    """
    _check_confidence(confidence)
    a, c = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    if a.ndim != 1 or a.shape != c.shape:
        raise ValueError(f"paired samples need two 1-d arrays of the same length, got {a.shape} and {c.shape}")
    bad = ~(np.isfinite(a) & np.isfinite(c))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {a.size} pairs have a non-finite value (NaN/inf): score them "
                         "(e.g. a diverged run at chance level) or drop them with drop_nonfinite_pairs() "
                         "and report how many")
    n = int(a.size)
    alpha = 1.0 - confidence
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, confidence,
                      method="no pairs")
    d = a - c
    # rounding in arm and control (0.9 - 0.8 != 0.1) must not make equal numbers look different
    tol = tie_tolerance(d, scale=float(np.max(np.abs(np.concatenate([a, c])))))
    mean = float(d.mean())
    sd = _sd(d, tol)
    p_t = _t_test(d, sd)
    p_w = wilcoxon_p(d)
    min_p = min_attainable_p(n)
    mde = math.nan if power is None else min_detectable_effect(n, sd, alpha=alpha, power=power)
    if n <= EXACT_MAX_N:
        sf = sign_flip(d, confidence=confidence, atol=tol)
        p, lo, hi = sf.p_value, sf.ci_low, sf.ci_high
        method = f"exact sign-flip over 2^{n} sign patterns; CI by inverting it (Hartigan 1969)"
    elif sd == 0:  # every difference equal: the exact answer is known without enumerating
        zero = abs(mean) <= tol
        p = 1.0 if zero else min_p
        lo = hi = 0.0 if zero else mean
        method = "exact sign-flip (all differences equal)"
    else:
        p = max(p_t, min_p)  # the exact test could not give less; p = 0 would be a float underflow
        half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        method = f"t-test and t-interval (n > {EXACT_MAX_N}: normal approximation of the sign-flip test)"
    return Paired(n, mean, float(lo), float(hi), float(p), p_w, cohens_dz(d, sd=sd), confidence,
                  p_t=p_t, min_p=min_p, sd=sd, mde=mde, method=method)


def cohens_dz(diffs: Sequence[float], *, sd: float | None = None) -> float:
    """Cohen's d_z = mean / sd of the differences (ddof=1). NaN when n < 2 or the differences have no
    spread: a constant difference has no finite standardized size, and inf would read as certainty."""
    d = np.asarray(diffs, dtype=float).ravel()
    s = _sd(d, tie_tolerance(d)) if sd is None else sd
    if d.size < 2 or not math.isfinite(s) or s <= 0:
        return math.nan
    return float(d.mean() / s)


# -- several arms, one control ---------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of the p-values of the arms of one ablation (family-wise error).

    Sorted ascending, p_(j) becomes ``max_{i <= j} min(1, (m - i + 1) * p_(i))`` with m the number of
    non-NaN p-values; compare the adjusted p with alpha. NaN stays NaN and does not count in m.
    Example: [0.01, 0.04, 0.03, 0.005] -> [0.03, 0.06, 0.06, 0.02].
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, math.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    if np.any((q < 0) | (q > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {q[(q < 0) | (q > 1)]}")
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


# -- dropping pairs, on purpose only ----------------------------------------------------------------

def drop_nonfinite_pairs(arm: Sequence[float], control: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    """The pairs where both values are finite, and how many were dropped (report that number).

    paired_difference no longer drops anything itself: a diverged run is a result, not missing data,
    so dropping must be a visible decision of the caller."""
    a, c = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    if a.shape != c.shape:
        raise ValueError(f"paired samples need the same length, got {a.shape} and {c.shape}")
    keep = np.isfinite(a) & np.isfinite(c)
    return a[keep], c[keep], int((~keep).sum())


# -- per-example tests ------------------------------------------------------------------------------

def mcnemar(control_correct: Sequence[bool], arm_correct: Sequence[bool]) -> McNemar:
    """Exact McNemar test on per-example correctness of the same examples under control and arm."""
    a = np.asarray(control_correct, dtype=bool)
    b_ = np.asarray(arm_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired predictions need the same length, got {a.shape} and {b_.shape}")
    return mcnemar_counts(int(np.sum(a & ~b_)), int(np.sum(~a & b_)))


def mcnemar_counts(b: int, c: int) -> McNemar:
    """``b``: control right, arm wrong; ``c``: control wrong, arm right. No discordant pair: p = 1."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, p)


def ratio_of_medians(arm: Sequence[float], control: Sequence[float]) -> float:
    """Cost ratio robust to the odd slow measurement on a shared machine."""
    a, c = _finite(arm), _finite(control)
    if a.size == 0 or c.size == 0 or np.median(c) <= 0:
        return math.nan
    return float(np.median(a) / np.median(c))


# -- formatting ------------------------------------------------------------------------------------

def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{fmt_num(mean, digits)} ± {fmt_num(std, digits)}" if math.isfinite(std) else fmt_num(mean, digits)


def fmt_diff(p: Paired, digits: int = 3) -> str:
    """``+0.012 [-0.003, +0.027]``; ``-0.840 [unbounded: 5 seeds]`` when n pairs cannot reach alpha."""
    if p.n == 0 or not math.isfinite(p.mean_diff):
        return "n/a"
    if math.isnan(p.ci_low) or math.isnan(p.ci_high):
        return f"{fmt_num(p.mean_diff, digits, sign=True)} [n/a]"
    if math.isinf(p.ci_low) and math.isinf(p.ci_high):
        return f"{fmt_num(p.mean_diff, digits, sign=True)} [unbounded: {p.n} seed{'s' if p.n != 1 else ''}]"
    return (f"{fmt_num(p.mean_diff, digits, sign=True)} [{fmt_num(p.ci_low, digits, sign=True)}, "
            f"{fmt_num(p.ci_high, digits, sign=True)}]")


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def fmt_num(x: float, digits: int = 3, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a" if math.isnan(x) else ("+inf" if x > 0 else "-inf")
    if x != 0 and (abs(x) >= 10 ** 5 or abs(x) < 10 ** -digits / 2):
        return f"{x:+.2e}" if sign else f"{x:.2e}"
    s = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return s


# -- helpers ---------------------------------------------------------------------------------------

def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[np.isfinite(x)]


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _sd(d: np.ndarray, tol: float) -> float:
    """Sample sd (ddof=1); exactly 0 when the differences differ by rounding only; NaN for n < 2."""
    if d.size < 2:
        return math.nan
    if float(np.ptp(d)) <= tol:
        return 0.0
    return float(d.std(ddof=1))


def _t_test(d: np.ndarray, sd: float) -> float:
    """One-sample t-test of the differences, two-sided; NaN when undefined (n < 2 or no spread)."""
    if d.size < 2 or not sd > 0:
        return math.nan
    return float(stats.ttest_1samp(d, 0.0).pvalue)


