"""The numbers of an ablation: one row per arm from the runs (one row per arm x seed). ``analysis.report``
turns them into tables and files."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis import stats
from analysis.exact_tests import min_detectable_effect
from analysis.runs import METRICS
from harness.core.modes import POLICIES

if TYPE_CHECKING:
    from analysis.plan import Ablation, Arm


def analyse(ab: Ablation, runs: pd.DataFrame, *, confidence: float = 0.95, power: float = 0.8) -> pd.DataFrame:
    """Per arm: mean ± std of every metric; the paired difference from its control with the exact
    sign-flip p and the CI that inverts it, the Wilcoxon p, d_z, the Holm-adjusted p across the arms,
    and the smallest effect the design could detect; McNemar over examples (checkpoint arms); the
    guard's verdict; costs.

    Every seed counts: a diverged run is scored as what it measured (chance-level accuracy when its
    weights were no longer finite, see ``analysis.runs``). Only a run that is missing (it crashed: the
    report lists it under failures) leaves its pair out, and a diverged run's non-finite loss leaves the
    loss statistics (``<metric> dropped`` says how many)."""
    rows = []
    for arm in ab.arms.values():
        mine = runs[runs["arm"] == arm.name].set_index("seed")
        row: dict[str, Any] = {"arm": arm.name, "scored": arm.scored, "control": arm.control or "",
                               "mode_bug": arm.spec.mode_bug, "note": arm.note,
                               "n": int((mine["status"] != "missing").sum()),
                               "diverged": int((mine["status"] == "diverged").sum()),
                               "chance scored": int(mine.get("chance_scored", pd.Series(dtype=bool)).fillna(False).sum()),
                               "missing": int((mine["status"] == "missing").sum())}
        for k in METRICS:
            s = stats.summarize(mine[k] if k in mine else [])
            row[f"{k} mean"], row[f"{k} std"] = s.mean, s.std
        if arm.control is not None:
            ctrl = runs[runs["arm"] == arm.control].set_index("seed")
            row.update(_paired(ab, mine, ctrl, confidence))
            row.update(_costs(arm, mine, ctrl))
            if arm.scored == "checkpoint":
                row.update(_mcnemar_summary(mine))
        row.update(_verdict_counts(arm, mine))
        rows.append(row)
    table = pd.DataFrame(rows)
    return _family(table, confidence, power)


def _paired(ab: Ablation, mine: pd.DataFrame, ctrl: pd.DataFrame, confidence: float) -> dict:
    present = [s for s in ab.seeds if s in mine.index and s in ctrl.index
               and mine.at[s, "status"] != "missing" and ctrl.at[s, "status"] != "missing"]
    out: dict[str, Any] = {}
    for k in METRICS:
        if k not in mine or k not in ctrl:
            continue
        a, c, dropped = stats.drop_nonfinite_pairs(mine.loc[present, k].to_numpy(float),
                                                   ctrl.loc[present, k].to_numpy(float))
        p = stats.paired_difference(a, c, confidence=confidence, power=None)
        out.update({f"{k} diff": p.mean_diff, f"{k} ci_low": p.ci_low, f"{k} ci_high": p.ci_high,
                    f"{k} p": p.p_value, f"{k} p_wilcoxon": p.p_wilcoxon, f"{k} d_z": p.d_z,
                    f"{k} pairs": p.n, f"{k} sd": p.sd, f"{k} min_p": p.min_p, f"{k} p_t": p.p_t,
                    f"{k} dropped": dropped})
    return out


def _family(table: pd.DataFrame, confidence: float, power: float) -> pd.DataFrame:
    """Holm's adjustment over the arms compared with a control (one family per metric), and each arm's
    minimum detectable effect at the level Holm holds it to at most (alpha / number of arms)."""
    compared = table["control"] != ""
    m = int(compared.sum())
    alpha = 1.0 - confidence
    for k in METRICS:
        if f"{k} p" not in table:
            continue
        table[f"{k} p_holm"] = math.nan
        table.loc[compared, f"{k} p_holm"] = stats.holm(table.loc[compared, f"{k} p"].to_numpy(float))
        table[f"{k} mde"] = [
            min_detectable_effect(int(n), sd, alpha=alpha / max(m, 1), power=power)
            if ctl and finite(n) else math.nan
            for n, sd, ctl in zip(table[f"{k} pairs"], table[f"{k} sd"], table["control"])]
    table.attrs.update(family_size=m, confidence=confidence, power=power)
    return table


def _verdict_counts(arm: Arm, mine: pd.DataFrame) -> dict:
    flagged = mine["guard"].fillna("").astype(str) if "guard" in mine else pd.Series(dtype=str)
    finished = mine[mine["status"] != "missing"]
    kinds = sorted({k for g in flagged for k in g.split(";") if k})
    n_flagged = int((flagged != "").sum())
    expected_flag = POLICIES[arm.spec.mode_bug].expects_findings()
    return {"guard kinds": ",".join(kinds), "guard flagged": n_flagged, "guard runs": len(finished),
            "guard as expected": (n_flagged == len(finished)) if expected_flag else (n_flagged == 0)}


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


def finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
