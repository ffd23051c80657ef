"""Scoring an evaluation-only arm of an ablation on its control's checkpoints (``analysis.ablation``).

An arm that changes only evaluation (``no_eval``, ``mc_dropout``, ``no_grad_missing``, validation batch
size, MC samples) needs no training of its own: the control run's last checkpoint
(``checkpoints/last.pt``) is evaluated the control's way and the arm's way, and the two evaluations are
compared example by example (McNemar). Each scoring is logged as a child run of the ablation, with tag
``ablation.scored_on`` naming the control run it used.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import stats
from analysis.runs import reuse, to_tag
from harness.spec import Spec

if TYPE_CHECKING:
    from analysis.plan import Ablation, Arm

# The scorings are part of the ablation's output: same logger name as its runs.
log = logging.getLogger("analysis.ablation")


# What a scoring logs as metrics: the keys every run of the experiment has (runs table, compare).
CURVES = ("val/acc", "val/loss", "test/acc", "test/loss", "mode_guard/findings")
# Spec keys that only shape training: the scored checkpoint's (its control run has them), not the scoring's.
TRAINING_ONLY = ("optimizer.", "data.batch_size", "data.limit_train", "data.augment", "train.epochs",
                 "train.log_every", "train.checkpoint", "train.sanity_check", "train.log_model")
def child_tags(ab: Ablation, arm: Arm, seed: int) -> dict[str, str]:
    """The tags of every child run of an ablation, trained or scored on a checkpoint."""
    return {"ablation": ab.spec.name, "ablation.arm": arm.name, "ablation.seed": str(seed),
            "ablation.scored": arm.scored, "ablation.control": arm.control or "",
            "ablation.task": f"{arm.name}/{seed}"}


def score_on_checkpoint(arm_spec: Spec, control_spec: Spec, checkpoint: str | Path, *,
                        repeats: int = 5) -> dict:
    """Evaluate one trained model (``checkpoint``) the control's way and the arm's way, on val and
    test, with a mode guard watching each. Returns per side and split the metrics, the per-example
    correctness, the best-of-``repeats`` evaluation time, and the arm's guard verdict and ledger.

    The weights are reloaded before every pass (an evaluation in training mode changes BatchNorm
    statistics), and every pass starts from the same seed, so MC dropout and the like are repeatable."""
    import torch

    from harness.core.checkpoint import load_checkpoint
    from harness.core.loop import evaluate
    from harness.guard import ModeGuard
    from harness.run import build

    state = load_checkpoint(checkpoint)
    sides = {"control": control_spec, "arm": arm_spec}
    parts = {side: build(spec) for side, spec in sides.items()}
    guards = {side: ModeGuard(p.model, frozen=p.policy.frozen,
                              allow_stochastic_eval=p.policy.allows_stochastic_eval)
              for side, p in parts.items()}
    out: dict[str, dict[str, Any]] = {side: {} for side in sides}
    for split in ("val", "test"):
        times: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(repeats):
            for side, p in parts.items():  # interleaved, so a busy neighbour slows both alike
                p.model.load_state_dict(state["model"])
                torch.manual_seed(sides[side].seed)
                first = rep == 0  # watched and kept; the timing is the best of the repeats
                r = evaluate(p.model, getattr(p.data, split), p.device, policy=p.policy,
                             guard=guards[side] if first else None, prefix=split, keep_predictions=first)
                times[side].append(r[f"{split}/seconds"])
                if first:
                    out[side][f"{split}_correct"] = (r.pop("predictions") == r.pop("targets")).numpy()
                    out[side][split] = r
        for side in sides:
            out[side][split][f"{split}/seconds"] = min(times[side])
    for side, guard in guards.items():
        report = guard.end_epoch(state["epoch"])
        guard.close()
        out[side].update(guard=guard.summary(), guard_count=report["count"], ledger=guard.ledger)
    return out


def score_arm(ab: Ablation, arm: Arm, seed: int, control_run_id: str, parent: str) -> dict:
    """Score ``arm`` on the control run's last checkpoint and log it as a child run; its metrics."""
    from harness.run import git_commit
    from harness.tracking.mlflow_tracker import MlflowTracker

    spec, cspec = ab.arm_spec(arm.name, seed), ab.arm_spec(arm.control, seed)
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        path = MlflowTracker(control_run_id).download_artifact("checkpoints/last.pt", tmp)
        s = score_on_checkpoint(spec, cspec, path)
    c, a = s["control"], s["arm"]
    epoch = spec.train.epochs
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        metrics.update({k: v for k, v in a[split].items()})
        metrics[f"cost/control_{split}_seconds"] = c[split][f"{split}/seconds"]
        mc = stats.mcnemar(c[f"{split}_correct"], a[f"{split}_correct"])
        metrics.update({f"mcnemar/{split}_b": mc.b, f"mcnemar/{split}_c": mc.c, f"mcnemar/{split}_p": mc.p_value})
        metrics[f"control/{split}_acc_rescored"] = c[split][f"{split}/acc"]
    metrics["mode_guard/findings"] = a["guard_count"]
    tags = {**child_tags(ab, arm, seed), "ablation.scored_on": control_run_id,
            "checkpoint": f"runs:/{control_run_id}/checkpoints/last.pt", "spec_hash": spec.hash(),
            "mode_bug": spec.mode_bug, "git_commit": git_commit(), "torch_version": _torch_version()}
    tags.update({f"mode_guard.{k}": ",".join(v) for k, v in a["guard"].items()})
    # The numbers a user compares across runs stay metrics (at the checkpoint's epoch, as a trained run's
    # final ones); the one-off numbers of the scoring are tags, not 14 one-point charts.
    tags.update({to_tag(k): repr(float(v)) for k, v in metrics.items() if k not in CURVES})
    t = MlflowTracker()
    with t.start(experiment=ab.experiment, run_name=f"{arm.name}-s{seed}", parent_run_id=parent,
                 tags=tags, system_metrics=False):
        # It trained nothing: its params are what its evaluation used, not the control's training.
        t.log_params({k: v for k, v in spec.params().items() if not k.startswith(TRAINING_ONLY)})
        t.log_metrics({k: v for k, v in metrics.items() if k in CURVES}, step=epoch)
        t.flush()
        t.log_dict({str(k): v for k, v in a["ledger"].items()}, "mode_guard/ledger.json")
        t.log_dict({split: {"control_correct": c[f"{split}_correct"].astype(int).tolist(),
                            "arm_correct": a[f"{split}_correct"].astype(int).tolist()}
                    for split in ("val", "test")}, "predictions.json")
    if c["guard"]:
        log.warning("the control's own evaluation was flagged by the mode guard: %s", c["guard"])
    return metrics


def _torch_version() -> str:
    import torch

    return torch.__version__


def run_scoring(ab: Ablation, parent: str, done: dict, echo) -> list[str]:
    """Score every evaluation-only arm x seed not scored yet (``done``: the children so far)."""
    failures = []
    arms = [a for a in ab.arms.values() if a.scored == "checkpoint"]
    total = len(arms) * len(ab.seeds)
    n = 0
    for arm in arms:
        for seed in ab.seeds:
            n += 1
            spec = ab.arm_spec(arm.name, seed)
            if reuse(done, arm.name, seed, spec):
                continue
            control = done.get((arm.control, seed))
            if control is None or control.info.status != "FINISHED":
                msg = f"{arm.name} seed {seed}: no finished {arm.control} run to score on"
                echo(f"  [{n}/{total}] {msg}")
                failures.append(msg)
                continue
            try:
                m = score_arm(ab, arm, seed, control.info.run_id, parent)
            except Exception as e:
                msg = f"{arm.name} seed {seed}: scoring failed: {type(e).__name__}: {e}"
                echo(f"  [{n}/{total}] {msg}")
                failures.append(msg)
                continue
            echo(f"  [{n}/{total}] {arm.name} seed {seed} (on {arm.control}'s checkpoint): "
                 f"val/acc {m['val/acc']:.4f} test/acc {m['test/acc']:.4f}, McNemar on test: "
                 f"b={int(m['mcnemar/test_b'])} c={int(m['mcnemar/test_c'])}")
    return failures
