"""Statistics for paired comparisons, all from scipy: summaries, paired differences with a bootstrap
confidence interval, paired p-values, Cohen's d_z, and the exact McNemar test on discordant pairs.

"Paired" means arm and control share everything but the intervention (seed, initial weights, data
order, validation split), so the per-seed difference is the unit of analysis.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (ddof=1); nan when n < 2
    n: int

    def __str__(self) -> str:
        return fmt_mean_std(self.mean, self.std)


@dataclass(frozen=True)
class Paired:
    """Arm minus control, over the pairs where both are finite."""
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # paired t-test (scipy.stats.ttest_rel), two-sided
    p_wilcoxon: float  # Wilcoxon signed-rank test (exact for small n), two-sided
    d_z: float  # Cohen's d_z: mean difference / standard deviation of the differences
    confidence: float = 0.95

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


def paired_difference(arm: Sequence[float], control: Sequence[float], *, confidence: float = 0.95,
                      n_resamples: int = 9999, seed: int = 0) -> Paired:
    """Mean of ``arm - control`` with a bootstrap CI (``scipy.stats.bootstrap``, BCa; percentile when BCa
    cannot be computed), the paired t-test and Wilcoxon p-values, and Cohen's d_z.

    Pairs where either value is not finite are dropped. When every difference is the same (e.g. an arm
    that changes no metric), the CI is that value and the p-values are 1 (no difference) or 0."""
    a, c = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    if a.shape != c.shape:
        raise ValueError(f"paired samples need the same length, got {a.shape} and {c.shape}")
    keep = np.isfinite(a) & np.isfinite(c)
    d = a[keep] - c[keep]
    n = int(d.size)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    mean = float(d.mean())
    if n == 1:
        return Paired(1, mean, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    sd = float(d.std(ddof=1))
    if np.all(d == d[0]):  # no spread: the tests are undefined, the answer is not
        p = 1.0 if d[0] == 0 else 0.0
        d_z = 0.0 if d[0] == 0 else math.copysign(math.inf, d[0])
        return Paired(n, mean, mean, mean, p, p, d_z, confidence)
    lo, hi = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    p_t = float(stats.ttest_rel(a[keep], c[keep]).pvalue)
    nonzero = d[d != 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample and tie warnings: the p-value is still exact
        p_w = float(stats.wilcoxon(nonzero).pvalue) if nonzero.size else 1.0
    return Paired(n, mean, lo, hi, p_t, p_w, mean / sd if sd > 0 else math.nan, confidence)


def bootstrap_ci(diffs: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 9999,
                 seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of the mean of ``diffs`` (resampling pairs). BCa, or percentile as a fallback."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: handled by the fallback
            res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method=method, rng=rng)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return math.nan, math.nan


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
    """``+0.012 [-0.003, +0.027]``"""
    if p.n == 0 or not math.isfinite(p.mean_diff):
        return "n/a"
    if not (math.isfinite(p.ci_low) and math.isfinite(p.ci_high)):
        return f"{fmt_num(p.mean_diff, digits, sign=True)} [n/a]"
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


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[np.isfinite(x)]
