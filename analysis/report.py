"""The per-arm summary of an ablation (``analysis.ablation``) and its report.

``analyse`` turns the runs (one row per arm x seed) into one row per arm: mean ± std of every metric, the
paired difference from the control (``analysis.stats``), McNemar counts, the mode guard's verdict and
the costs; ``display_table`` and ``loss_table`` are that table as text, and ``write_report`` writes
``report.md``, ``arms.csv``, ``runs.csv``, ``effects.png`` and ``curves.png``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from analysis import stats
from analysis.runs import METRICS
from harness.core.modes import POLICIES

if TYPE_CHECKING:
    from analysis.plan import Ablation, Arm


# -- analysing -------------------------------------------------------------------------------------

def analyse(ab: Ablation, runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean ± std of every metric, the paired difference from its control (bootstrap CI,
    paired t and Wilcoxon p, d_z), McNemar over examples (checkpoint arms), guard verdict, costs."""
    rows = []
    for arm in ab.arms.values():
        mine = runs[runs["arm"] == arm.name].set_index("seed")
        row: dict[str, Any] = {"arm": arm.name, "scored": arm.scored, "control": arm.control or "",
                               "mode_bug": arm.spec.mode_bug, "note": arm.note,
                               "n": int((mine["status"] == "ok").sum()),
                               "diverged": int((mine["status"] == "diverged").sum()),
                               "missing": int((mine["status"] == "missing").sum())}
        for k in METRICS:
            s = stats.summarize(mine[k] if k in mine else [])
            row[f"{k} mean"], row[f"{k} std"] = s.mean, s.std
        if arm.control is not None:
            ctrl = runs[runs["arm"] == arm.control].set_index("seed")
            seeds = [s for s in ab.seeds if s in mine.index and s in ctrl.index]
            for k in METRICS:
                if k not in mine or k not in ctrl:
                    continue
                p = stats.paired_difference(mine.loc[seeds, k].to_numpy(float), ctrl.loc[seeds, k].to_numpy(float))
                row.update({f"{k} diff": p.mean_diff, f"{k} ci_low": p.ci_low, f"{k} ci_high": p.ci_high,
                            f"{k} p": p.p_value, f"{k} p_wilcoxon": p.p_wilcoxon, f"{k} d_z": p.d_z,
                            f"{k} pairs": p.n})
            row.update(_costs(arm, mine, ctrl))
            if arm.scored == "checkpoint":
                row.update(_mcnemar_summary(mine))
        # the verdict
        flagged = mine["guard"].fillna("").astype(str) if "guard" in mine else pd.Series(dtype=str)
        finished = mine[mine["status"] != "missing"]
        kinds = sorted({k for g in flagged for k in g.split(";") if k})
        n_flagged = int((flagged != "").sum())
        row["guard kinds"] = ",".join(kinds)
        row["guard flagged"] = n_flagged
        row["guard runs"] = len(finished)
        expected_flag = POLICIES[arm.spec.mode_bug].expects_findings()
        row["guard as expected"] = (n_flagged == len(finished)) if expected_flag else (n_flagged == 0)
        rows.append(row)
    return pd.DataFrame(rows)


def _costs(arm: Arm, mine: pd.DataFrame, ctrl: pd.DataFrame) -> dict:
    out: dict[str, float] = {}
    if arm.scored == "checkpoint":
        a = mine.get("val/seconds", pd.Series(dtype=float)) + mine.get("test/seconds", pd.Series(dtype=float))
        c = mine.get("cost/control_val_seconds", pd.Series(dtype=float)) + mine.get(
            "cost/control_test_seconds", pd.Series(dtype=float))
        out["eval time ratio"] = stats.ratio_of_medians(a.to_numpy(float), c.to_numpy(float))
        out["train time ratio"] = math.nan
        out["autograd MB"] = float(pd.concat([mine.get("val/autograd_mb", pd.Series(dtype=float)),
                                              mine.get("test/autograd_mb", pd.Series(dtype=float))]).max())
        return out

    def col(df, k):
        return df[k].to_numpy(float) if k in df else []

    out["train time ratio"] = stats.ratio_of_medians(col(mine, "min:time/train_epoch_s"),
                                                     col(ctrl, "min:time/train_epoch_s"))
    out["eval time ratio"] = stats.ratio_of_medians(col(mine, "min:val/seconds"), col(ctrl, "min:val/seconds"))
    vals = col(mine, "max:val/autograd_mb")
    out["autograd MB"] = float(pd.Series(vals, dtype=float).max()) if len(vals) else math.nan
    if "max:val/peak_mem_mb" in mine and "max:val/peak_mem_mb" in ctrl:
        out["eval peak MB extra"] = float(mine["max:val/peak_mem_mb"].median() - ctrl["max:val/peak_mem_mb"].median())
    return out


def _mcnemar_summary(mine: pd.DataFrame) -> dict:
    out = {}
    for split in ("val", "test"):
        b, c, p = (mine.get(f"mcnemar/{split}_{x}") for x in ("b", "c", "p"))
        if b is None:
            continue
        ok = p.notna()
        out[f"mcnemar {split} b"] = int(b[ok].sum())
        out[f"mcnemar {split} c"] = int(c[ok].sum())
        out[f"mcnemar {split} median p"] = float(p[ok].median()) if ok.any() else math.nan
        out[f"mcnemar {split} significant"] = int((p[ok] < 0.05).sum())
        out[f"mcnemar {split} seeds"] = int(ok.sum())
    return out


# -- reporting -------------------------------------------------------------------------------------

def _verdict(row) -> str:
    if row["guard runs"] == 0:
        return "n/a"
    kinds = row["guard kinds"]
    text = f"flagged {row['guard flagged']}/{row['guard runs']}: {kinds}" if kinds else \
        f"clean {row['guard runs']}/{row['guard runs']}"
    return text if row["guard as expected"] else f"{text} (UNEXPECTED)"


def _cost(row) -> str:
    parts = []
    if row["scored"] == "checkpoint":
        parts.append("no training")
    elif finite(row.get("train time ratio")):
        parts.append(f"train epoch ×{row['train time ratio']:.2f}")
    if finite(row.get("eval time ratio")):
        parts.append(f"eval ×{row['eval time ratio']:.2f}")
    if finite(row.get("autograd MB")) and row["autograd MB"] > 0:
        parts.append(f"+{row['autograd MB']:.2f} MB autograd graph in eval")
    if finite(row.get("eval peak MB extra")) and row["eval peak MB extra"] > 0:
        parts.append(f"+{row['eval peak MB extra']:.1f} MB CUDA peak")
    return ", ".join(parts)


def _mcnemar_text(row, split: str) -> str:
    if row["scored"] != "checkpoint" or not finite(row.get(f"mcnemar {split} b")):
        return "—"
    return (f"b={int(row[f'mcnemar {split} b'])} c={int(row[f'mcnemar {split} c'])}; p<0.05 in "
            f"{int(row[f'mcnemar {split} significant'])}/{int(row[f'mcnemar {split} seeds'])} seeds "
            f"(median p {stats.fmt_p(row[f'mcnemar {split} median p'])})")


def display_table(ab: Ablation, table: pd.DataFrame) -> pd.DataFrame:
    """The headline table, as text cells."""
    m = ab.spec.metric
    split = m.split("/")[0]
    rows = []
    for _, r in table.iterrows():
        paired = _paired_from_row(r, m)
        n = f"{r['n']}" + (f" (+{r['diverged']} diverged)" if r["diverged"] else "") + (
            f" ({r['missing']} missing)" if r["missing"] else "")
        rows.append({
            "arm": r["arm"] + (" (control)" if not r["control"] else ""),
            "scored": "checkpoint" if r["scored"] == "checkpoint" else "trained",
            "vs": r["control"] or "—",
            "n": n,
            "val/acc": stats.fmt_mean_std(r["val/acc mean"], r["val/acc std"]),
            "test/acc": stats.fmt_mean_std(r["test/acc mean"], r["test/acc std"]),
            f"Δ {m} [95% CI]": stats.fmt_diff(paired) if paired else "—",
            "p (paired t)": stats.fmt_p(paired.p_value) if paired else "—",
            "d_z": stats.fmt_num(paired.d_z, 2) if paired else "—",
            f"McNemar ({split})": _mcnemar_text(r, split),
            "mode guard": _verdict(r),
            "cost": _cost(r) if r["control"] else "",
        })
    return pd.DataFrame(rows)


def loss_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in table.iterrows():
        row = {"arm": r["arm"]}
        for k in METRICS:
            row[k] = stats.fmt_mean_std(r[f"{k} mean"], r[f"{k} std"])
        for k in METRICS:
            p = _paired_from_row(r, k)
            row[f"Δ {k}"] = (stats.fmt_diff(p) + f" p={stats.fmt_p(p.p_value)}") if p else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_from_row(r, k: str) -> stats.Paired | None:
    if not r.get("control") or f"{k} diff" not in r or pd.isna(r.get(f"{k} pairs")):
        return None
    return stats.Paired(int(r[f"{k} pairs"]), r[f"{k} diff"], r[f"{k} ci_low"], r[f"{k} ci_high"],
                        r[f"{k} p"], r[f"{k} p_wilcoxon"], r[f"{k} d_z"])


def write_report(ab: Ablation, table: pd.DataFrame, runs: pd.DataFrame, out: Path, *, parent_run_id: str,
                 wall_seconds: float, failures: Sequence[str] = ()) -> dict[str, Path]:
    from analysis.plots import plot_curves, plot_effects
    from harness.errors import mask_url
    from harness.tracking.store import tracking_uri

    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md", "arms": out / "arms.csv", "runs": out / "runs.csv",
             "effects": out / "effects.png", "curves": out / "curves.png"}
    table.to_csv(files["arms"], index=False)
    runs.drop(columns=["history"], errors="ignore").to_csv(files["runs"], index=False)

    effect_rows = []
    for _, r in table.iterrows():
        if not r["control"]:
            continue
        row = {"arm": f"{r['arm']} (vs {r['control']})", "style": "train" if r["scored"] == "train" else "checkpoint"}
        for k in ("val/acc", "test/acc"):
            row[k] = (r.get(f"{k} diff", math.nan), r.get(f"{k} ci_low", math.nan), r.get(f"{k} ci_high", math.nan))
        effect_rows.append(row)
    title = f"ablation {ab.spec.name}: {len(ab.seeds)} paired seeds"
    if effect_rows:
        plot_effects(effect_rows, files["effects"], metrics=["val/acc", "test/acc"], title=title)
    else:
        files.pop("effects")
    panels = []
    for key in ("val/acc", "train/loss"):
        groups = {}
        for arm in ab.arms.values():
            if arm.scored != "train":
                continue
            mine = runs[(runs["arm"] == arm.name) & runs["history"].notna()] if "history" in runs else runs.iloc[0:0]
            groups[arm.name] = [h[key] for h in mine["history"] if h and h.get(key)]
        panels.append((key, groups))
    plot_curves(panels, files["curves"], title=f"{title}: trained arms, mean ± std over seeds",
                log_metrics=("train/loss",))

    shown = display_table(ab, table)
    b = ab.base
    lines = [
        f"# Ablation `{ab.spec.name}`",
        "",
        f"- base spec: `{ab.spec.base}` ({b.data.dataset}, {b.model.arch}, dropout {b.model.dropout}, "
        f"batchnorm {b.model.batchnorm}, noise_std {b.model.noise_std}, {b.optimizer.name} lr {b.optimizer.lr}, "
        f"{b.train.epochs} epochs)",
        f"- seeds: {len(ab.seeds)} paired seeds ({ab.seeds[0]}..{ab.seeds[-1]}); every arm shares seed, "
        f"initial weights, data order and validation split with its control",
        f"- MLflow: experiment `{ab.experiment}`, parent run `{parent_run_id}` (`ablation:{ab.spec.name}`), "
        f"store `{mask_url(tracking_uri())}`",
        f"- wall time: {wall_seconds:.0f} s",
        "",
        f"## Effects on {ab.spec.metric}",
        "",
        "Δ is arm minus control, per seed, averaged; the 95% CI is a bootstrap (BCa) over seeds; p is the "
        "paired t-test (the Wilcoxon signed-rank p is in `arms.csv`); d_z is the mean difference over the "
        "standard deviation of the differences. Arms *scored on checkpoints* change only evaluation: "
        "they are evaluated on the control's own final checkpoint (no retraining), and McNemar's exact "
        "test compares the two evaluations example by example (b: examples only the control gets "
        "right, c: only the arm; counts summed over seeds, p per seed). The mode guard column is its "
        "verdict on that arm's runs. The cost column is the ratio to the control of the median over seeds "
        "of each run's best epoch time (trained arms) or of the best of 5 interleaved evaluations "
        "(checkpoint arms); the autograd graph is the memory a missing `torch.no_grad()` holds per "
        "validation batch (on CUDA, the extra peak memory).",
        "",
        shown.to_markdown(index=False),
        "",
        "## All metrics (mean ± std; Δ vs control with 95% CI and paired-t p)",
        "",
        loss_table(table).to_markdown(index=False),
        "",
    ]
    if "effects" in files:
        lines += ["## Figures", "", "![effects](effects.png)", "", "![curves](curves.png)", ""]
    notes = [f"- **{r['arm']}**: {r['note']}" for _, r in table.iterrows() if r["note"]]
    if notes:
        lines += ["## Arms", "", *notes, ""]
    if failures:
        lines += ["## Failures", "", *[f"- {f}" for f in failures], ""]
    files["report"].write_text("\n".join(lines) + "\n")
    return files


def finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
