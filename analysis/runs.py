"""Reading runs back from MLflow for analysis: an experiment's runs, a metric's history, and an
ablation's children (one row per arm x seed). Reports read the store, not memory, so a resumed or
re-reported study shows the same numbers."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from harness.errors import UserError

if TYPE_CHECKING:
    from analysis.plan import Ablation
    from harness.spec import Spec

# The final metrics of every run, summarised per arm.
METRICS = ("val/acc", "test/acc", "val/loss", "test/loss")
# The per-epoch curves kept for trained arms (plots and costs).
HISTORY = ("val/acc", "train/loss", "time/train_epoch_s", "val/seconds", "val/autograd_mb")
# A checkpoint scoring's one-off numbers (McNemar counts, costs, the control rescored) are tags.
TAG_PREFIX = "scoring."


def to_tag(key: str) -> str:
    """``mcnemar/test_b`` -> ``scoring.mcnemar.test_b``."""
    return TAG_PREFIX + key.replace("/", ".", 1)


def from_tags(tags: dict[str, str]) -> dict[str, float]:
    """The scoring's one-off numbers back from its tags, under their metric-style keys."""
    return {k[len(TAG_PREFIX):].replace(".", "/", 1): float(v) for k, v in tags.items()
            if k.startswith(TAG_PREFIX)}


def report_dir(name: str, out: str | Path | None = None) -> Path:
    """``out``, or ``reports/<name>/`` with the name made safe as a folder name; made now, so that a
    folder that cannot be written is one line before any work, not a traceback after it."""
    path = Path(out) if out else Path("reports") / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot make the report folder ({e.strerror}); choose a folder you "
                        f"can write") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--out {path}: the report folder is not writable; choose a folder you can write")
    return path


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """A metric's history as (steps, values), in step order."""
    h = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in h], [m.value for m in h]


def curves(run_ids: Sequence[str], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per run, the metric's history as (steps, values)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return {rid: history(client, rid, metric) for rid in run_ids}


def existing_children(exp_id: str, parent: str) -> dict[tuple[str, int], Any]:
    """Finished (or diverged) children by (arm, seed); the latest one wins."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                      max_results=50_000, order_by=["attributes.start_time ASC"])
    out = {}
    for r in runs:
        tags = r.data.tags
        if "ablation.arm" not in tags:
            continue
        diverged = tags.get("failure_reason", "").startswith("diverged")
        if r.info.status == "FINISHED" or (r.info.status == "FAILED" and diverged):
            out[(tags["ablation.arm"], int(tags["ablation.seed"]))] = r
    return out


def collect(exp_id: str, parent: str, ab: Ablation) -> pd.DataFrame:
    """One row per arm x seed from MLflow (so a resumed or re-reported study reads the same numbers):
    final metrics, status, guard findings, costs and per-epoch histories (training runs)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    done = existing_children(exp_id, parent)
    rows = []
    for arm in ab.arms.values():
        for seed in ab.seeds:
            r = done.get((arm.name, seed))
            row: dict[str, Any] = {"arm": arm.name, "seed": seed, "scored": arm.scored,
                                   "control": arm.control or "", "run_id": r.info.run_id if r else "",
                                   "status": "missing"}
            if r is not None:
                tags = r.data.tags
                diverged = r.info.status == "FAILED"
                row["status"] = "diverged" if diverged else "ok"
                row.update(_final_metrics(r, diverged))
                row["guard"] = ";".join(sorted(k[len("mode_guard."):] for k in tags if k.startswith("mode_guard.")))
                row["seconds"] = ((r.info.end_time or 0) - (r.info.start_time or 0)) / 1000
                if arm.scored == "checkpoint":
                    row.update(from_tags(tags))  # McNemar counts, costs, the control rescored
                else:
                    hist = {k: history(client, r.info.run_id, k) for k in HISTORY}
                    row["history"] = hist
                    # Timings: the best epoch of the run (noise on a shared machine only adds time);
                    # memory: the largest.
                    for k, how in (("time/train_epoch_s", "min"), ("val/seconds", "min"),
                                   ("val/autograd_mb", "max"), ("val/peak_mem_mb", "max")):
                        vals = hist.get(k) or history(client, r.info.run_id, k)
                        row[f"{how}:{k}"] = float(getattr(pd.Series(vals[1], dtype=float), how)()) \
                            if vals and vals[1] else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def reuse(done: dict, arm: str, seed: int, spec: Spec) -> bool:
    """Whether (arm, seed) is already done; a run made from another spec is refused, not reused."""
    r = done.get((arm, seed))
    if r is None:
        return False
    if r.data.tags.get("spec_hash") != spec.hash():
        raise UserError(f"--resume: run {r.info.run_id} (arm {arm}, seed {seed}) was made from a different "
                        f"spec; start a new ablation instead of resuming this one")
    return True


def _final_metrics(r, diverged: bool) -> dict[str, Any]:
    """The run's final val/test metrics. A diverged run counts as what it measured when it stopped
    (``harness.run`` scores the model it ended with); one whose weights were no longer finite predicts
    nothing and scores chance-level accuracy. Its loss, when not finite, stays NaN: the report leaves
    such pairs out of the loss statistics and says how many."""
    m = r.data.metrics
    out: dict[str, Any] = {k: m.get(k, math.nan) for k in METRICS}
    out["chance_scored"] = False
    if diverged:
        chance = 1.0 / float(r.data.params.get("data.num_classes", 10))
        for k in METRICS:
            if k.endswith("/acc") and not math.isfinite(out[k]):
                out[k], out["chance_scored"] = chance, True
            elif k.endswith("/loss") and not math.isfinite(out[k]):
                out[k] = math.nan
    return out
