"""Plots for compare and ablation: learning curves per group (mean ± std band) and effects with CIs.

Uses matplotlib's object API (``Figure``, no pyplot), so importing it never touches the caller's
backend and it works headless.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

Curve = tuple[Sequence[float], Sequence[float]]  # (steps, values) of one run


def mean_curve(curves: Sequence[Curve], log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align runs on their steps: (steps, mean, std, n) over the runs that logged each step.
    With ``log`` the statistics are of log10 of the (positive) values: a geometric mean and std."""
    by_step: dict[float, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values):
            if v is not None and math.isfinite(v) and (v > 0 or not log):
                by_step.setdefault(s, []).append(math.log10(v) if log else v)
    steps = np.array(sorted(by_step), dtype=float)
    vals = [np.array(by_step[s]) for s in steps]
    mean = np.array([v.mean() for v in vals])
    std = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])
    n = np.array([v.size for v in vals])
    return steps, mean, std, n


def plot_curves(panels: Sequence[tuple[str, Mapping[str, Sequence[Curve]]]], path: str | Path, *,
                title: str = "", xlabel: str = "epoch", log_metrics: Sequence[str] = ()) -> Path:
    """One panel per ``(metric, {group: [curves]})``: each group's mean with a ± std band.
    Metrics named in ``log_metrics`` get a log y axis, with the geometric mean and a x/÷ geometric-std
    band (a loss that explodes in one arm stays readable next to the others)."""
    fig = Figure(figsize=(6.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, groups) in zip(axes, panels):
        log = metric in log_metrics
        for i, (name, curves) in enumerate(groups.items()):
            steps, mean, std, n = mean_curve(curves, log=log)
            if steps.size == 0:
                continue
            lo, hi = mean - std, mean + std
            if log:
                mean, lo, hi = 10 ** mean, 10 ** lo, 10 ** hi
            color = f"C{i % 10}"
            label = f"{name} (n={int(n.max())})"
            marker = "o" if steps.size < 3 else None
            # line styles cycle too: identical curves (an arm that changes nothing) stay visible
            ax.plot(steps, mean, color=color, label=label, marker=marker, lw=1.6,
                    ls=("-", "--", ":", "-.")[i % 4])
            if np.any(std > 0):
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (geometric mean)" if log else metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_effects(rows: Sequence[dict], path: str | Path, *, metrics: Sequence[str], title: str = "") -> Path:
    return _save(effects_figure(rows, metrics=metrics, title=title), path)


def effects_figure(rows: Sequence[dict], *, metrics: Sequence[str], title: str = "") -> Figure:
    """Forest plot: per arm (rows top to bottom) the mean paired difference and its CI, one panel per
    metric. ``rows``: ``{"arm": name, "<metric>": (mean, low, high), "style": "train"|"checkpoint"}``.
    Labels sit beside their point on the side of the panel's middle, so none runs off the panel."""
    fig = Figure(figsize=(5.0 * len(metrics), 0.45 * len(rows) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    y = np.arange(len(rows))[::-1]
    for ax, metric in zip(axes, metrics):
        left, right = _limits([v for row in rows for v in row.get(metric, ()) if math.isfinite(v)] + [0.0])
        ax.set_xlim(left, right)
        middle = (left + right) / 2
        for yi, row in zip(y, rows):
            mean, lo, hi = row.get(metric, (math.nan, math.nan, math.nan))
            if not math.isfinite(mean):
                ax.text(middle, yi, "n/a", va="center", ha="center", fontsize=8, color="grey")
                continue
            color = "C0" if row.get("style") == "train" else "C1"
            side, dx = ("left", 5) if mean <= middle else ("right", -5)
            label = dict(textcoords="offset points", ha=side, fontsize=7, color=color,
                         bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(mean, yi, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3)
            else:  # too few seeds for the level: the interval is the whole axis, and says so
                ax.plot(mean, yi, "o", color=color)
                ax.axhline(yi, color=color, lw=0.8, ls=":")
                ax.annotate("CI unbounded (too few seeds)", (mean, yi), xytext=(dx, -11), **label)
            ax.annotate(f"{mean:+.3f}", (mean, yi), xytext=(dx, 5), **label)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {metric} vs control (95% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r["arm"] for r in rows])
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    if title:
        fig.suptitle(title + "   (blue: own training runs, orange: scored on the control's checkpoints)",
                     fontsize=9)
    return fig


def _limits(values: Sequence[float]) -> tuple[float, float]:
    """The x range of a forest panel: every value, with room on both sides for the labels."""
    lo, hi = min(values), max(values)
    pad = 0.15 * (hi - lo) if hi > lo else 0.05
    return lo - pad, hi + pad


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
