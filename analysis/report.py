"""The report of an ablation (``analysis.ablation``): the per-arm table (``analysis.effects``) as text,
the files ``report.md`` (and the same as ``report.html``, images embedded, for MLflow's artifact
viewer), ``arms.csv``, ``runs.csv``, ``effects.png`` and ``curves.png``, and the parent run's
description."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from analysis import stats
from analysis.effects import finite
from analysis.exact_tests import reach_note
from analysis.html import markdown_to_html
from analysis.runs import METRICS

if TYPE_CHECKING:
    from analysis.plan import Ablation


# -- reporting -------------------------------------------------------------------------------------

def _verdict(row) -> str:
    if row["guard runs"] == 0:
        return "n/a"
    kinds = row["guard kinds"].replace(",", ", ")  # a table cell may wrap between them
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


# The headline table's columns about the runs rather than the effect: a second table in the report, so
# that neither is too wide to read.
GUARD_COLUMNS = ("val/acc", "test/acc", "McNemar", "mode guard", "cost")


def display_table(ab: Ablation, table: pd.DataFrame) -> pd.DataFrame:
    """The headline table, as text cells."""
    m = ab.spec.metric
    split = m.split("/")[0]
    level = f"{table.attrs.get('confidence', 0.95):.0%}"
    rows = []
    for _, r in table.iterrows():
        paired = _paired_from_row(r, m)
        rows.append({
            "arm": r["arm"] + (" (control)" if not r["control"] else ""),
            "scored": "checkpoint" if r["scored"] == "checkpoint" else "trained",
            "vs": r["control"] or "—",
            "seeds": _seeds_text(r),
            "val/acc": stats.fmt_mean_std(r["val/acc mean"], r["val/acc std"]),
            "test/acc": stats.fmt_mean_std(r["test/acc mean"], r["test/acc std"]),
            f"Δ {m} [{level} CI]": stats.fmt_diff(paired) if paired else "—",
            "p (exact)": stats.fmt_p(paired.p_value) if paired else "—",
            "p (Holm)": stats.fmt_p(r[f"{m} p_holm"]) if paired else "—",
            "d_z": stats.fmt_num(paired.d_z, 2) if paired else "—",
            "detectable |Δ| ≥": _mde_text(r.get(f"{m} mde")) if paired else "—",
            f"McNemar ({split})": _mcnemar_text(r, split),
            "mode guard": _verdict(r),
            "cost": _cost(r) if r["control"] else "",
        })
    return pd.DataFrame(rows)


def _seeds_text(r) -> str:
    """How many seeds count, and what went badly among them (still counted)."""
    text = str(int(r["n"]))
    if r["diverged"]:
        chance = f", {int(r['chance scored'])} at chance level" if r.get("chance scored") else ""
        text += f" ({int(r['diverged'])} diverged{chance})"
    if r["missing"]:
        text += f" ({int(r['missing'])} missing: crashed)"
    return text


def _mde_text(mde) -> str:
    if mde is None or (isinstance(mde, float) and math.isnan(mde)):
        return "n/a"
    return "none: too few seeds" if math.isinf(mde) else stats.fmt_num(mde, 3)


def loss_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in table.iterrows():
        row = {"arm": r["arm"]}
        for k in METRICS:
            row[k] = stats.fmt_mean_std(r[f"{k} mean"], r[f"{k} std"])
        for k in METRICS:
            p = _paired_from_row(r, k)
            dropped = f", {int(r[f'{k} dropped'])} diverged left out" if p and r.get(f"{k} dropped") else ""
            row[f"Δ {k}"] = (stats.fmt_diff(p) + f" p={stats.fmt_p(p.p_value)}{dropped}") if p else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_from_row(r, k: str) -> stats.Paired | None:
    if not r.get("control") or f"{k} diff" not in r or pd.isna(r.get(f"{k} pairs")):
        return None
    return stats.Paired(int(r[f"{k} pairs"]), r[f"{k} diff"], r[f"{k} ci_low"], r[f"{k} ci_high"],
                        r[f"{k} p"], r[f"{k} p_wilcoxon"], r[f"{k} d_z"], min_p=r[f"{k} min_p"])


def _statistics_notes(ab: Ablation, table: pd.DataFrame) -> list[str]:
    """What the numbers mean, and what this design could not have found."""
    m, alpha = ab.spec.metric, 1 - table.attrs.get("confidence", 0.95)
    family = table.attrs.get("family_size", 0)
    lines = [
        f"Δ is arm minus control, per seed, averaged. p is the exact sign-flip permutation test over all "
        f"2^n sign patterns of the paired differences (two-sided; it assumes nothing about their "
        f"distribution, and is never 0: its smallest value with n seeds is 2/2^n); the CI is that test "
        f"inverted (Hartigan's subset means), so it excludes 0 exactly when p ≤ {alpha:.2g}. p (Holm) "
        f"adjusts p for the {family} arms compared in this ablation; the exact Wilcoxon signed-rank p and "
        f"the paired t p are in `arms.csv`. d_z is the mean difference over the standard deviation of the "
        f"differences (n/a when they do not vary). *Detectable |Δ| ≥* is the smallest true effect this "
        f"design finds with 80% power at the Holm level {alpha:.2g}/{family or 1} given the observed "
        f"spread: an arm with no significant effect has none larger than about that, not none at all.",
        "",
        "Every seed counts: a run that diverged is scored as what it measured when it stopped (chance-level "
        "accuracy when its weights were no longer finite), never dropped; only a run that crashed is "
        "missing (see Failures).",
    ]
    notes = {reach_note(int(n), alpha) for n in table[f"{m} pairs"].dropna()} - {""} if f"{m} pairs" in table else set()
    if family > 1:
        notes |= {reach_note(int(n), alpha / family) for n in table[f"{m} pairs"].dropna()} - {""}
    lines += [f"**{n}.**" for n in sorted(notes)]
    return lines


def write_report(ab: Ablation, table: pd.DataFrame, runs: pd.DataFrame, out: Path, *, parent_run_id: str,
                 wall_seconds: float, failures: Sequence[str] = ()) -> dict[str, Path]:
    from analysis.plots import plot_curves, plot_effects
    from harness.errors import mask_url
    from harness.tracking.store import tracking_uri

    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md", "html": out / "report.html", "arms": out / "arms.csv",
             "runs": out / "runs.csv", "effects": out / "effects.png", "curves": out / "curves.png"}
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
            histories = runs.loc[runs["arm"] == arm.name, "history"].dropna() if "history" in runs else []
            groups[arm.name] = [h[key] for h in histories if h and h.get(key)]  # none if every run failed
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
        *_statistics_notes(ab, table),
        "",
        "Arms *scored on checkpoints* change only evaluation: they are evaluated on the control's own "
        "final checkpoint (no retraining), and McNemar's exact test compares the two evaluations example "
        "by example (b: examples only the control gets right, c: only the arm; counts summed over seeds, "
        "p per seed). The mode guard column is its verdict on that arm's runs. The cost column is the "
        "ratio to the control of the median over seeds of each run's best epoch time (trained arms) or "
        "of the best of 5 interleaved evaluations (checkpoint arms); the autograd graph is the memory a "
        "missing `torch.no_grad()` holds per validation batch (on CUDA, the extra peak memory).",
        "",
        md_table(shown[[c for c in shown if not c.startswith(GUARD_COLUMNS)]]),
        "",
        "### What each arm's runs show",
        "",
        md_table(shown[["arm", *[c for c in shown if c.startswith(GUARD_COLUMNS)]]]),
        "",
        "## All metrics (mean ± std; Δ vs control with its CI and exact p)",
        "",
        md_table(loss_table(table)),
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
    files["html"].write_text(markdown_to_html(files["report"].read_text(), out, f"Ablation {ab.spec.name}"))
    return files


def md_table(df: pd.DataFrame) -> str:
    """A Markdown table whose cells may hold ``|`` (as in ``|Δ|``): escaped, or the row splits there."""
    def esc(v):
        return str(v).replace("|", "\\|")

    return df.rename(columns=esc).map(esc).to_markdown(index=False)


def parent_note(ab: Ablation, table: pd.DataFrame, *, experiment_id: str, parent_run_id: str, n_runs: int,
                failures: Sequence[str] = ()) -> str:
    """The parent run's description (Markdown, rendered by MLflow on the run page): what was compared,
    the effects table with each arm linked to its runs, and the full report."""
    from harness.tracking import links

    m = ab.spec.metric
    b = ab.base
    shown = display_table(ab, table)
    report = links.run_path(experiment_id, parent_run_id, artifact="ablation/report.html")
    arms = []
    for name in shown["arm"]:
        arm = name.split(" ")[0]
        runs = links.runs_path(experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                              f"tags.`ablation.arm` = '{arm}'")
        arms.append(f"[{name}]({runs})")
    shown["arm"] = arms
    cols = ["arm", "scored", "vs", "seeds", "test/acc" if m.startswith("test") else "val/acc",
            *[c for c in shown if c.startswith(("Δ", "p (Holm)"))], "mode guard"]
    return "\n".join([
        f"**Ablation `{ab.spec.name}`**: {len(ab.arms)} arms × {len(ab.seeds)} paired seeds of `{ab.spec.base}` "
        f"({b.data.dataset}, {b.model.arch}, {b.train.epochs} epochs); {n_runs} child runs"
        + (f", **{len(failures)} failed**" if failures else "") + f". [The full report]({report}) "
        f"(statistics, all metrics, figures); each arm's name links to its runs.",
        "",
        md_table(shown[cols]),
    ])
