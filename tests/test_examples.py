"""The example project (examples/shapes/): a researcher's own model (BatchNorm + a custom mode-dependent
layer) and dataset factory, run from its spec lines through the real commands: train, a 2-trial sweep,
a 2-seed ablation in which the mode guard flags the bug arms exactly as it does on the built-in models."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import ROOT, all_runs, run_cli
from harness.spec import load_spec

EXAMPLE = ROOT / "examples" / "shapes"
SMALL = ["train.epochs=2", "data.args.n_train=400", "data.args.n_test=200", "train.log_model=false"]


def test_the_example_spec_names_its_own_code():
    spec = load_spec(EXAMPLE / "spec.yaml")
    assert spec.model.arch == "shapeslab.models:small_cnn" and spec.data.dataset == "shapeslab.data:shapes"
    assert set(spec.search.params) == {"optimizer.lr", "model.args.noise"}
    assert spec.params()["model.args.width"] == 16


def test_train(fast_store, tmp_path):
    r = run_cli("harness.train", str(EXAMPLE / "spec.yaml"), *SMALL, "--quiet", cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    (run,) = all_runs(fast_store)
    assert run.info.status == "FINISHED" and run.data.tags["sanity_check"] == "ok"
    assert run.data.params["data.num_classes"] == "4" and run.data.params["model.args.noise"] == "0.2"
    assert run.data.metrics["val/acc"] > 0.3  # 4 classes: above chance after two short epochs
    assert run.data.metrics["mode_guard/findings"] == 0


def test_sweep_two_trials(fast_store, tmp_path):
    r = run_cli("harness.sweep", str(EXAMPLE / "spec.yaml"), *SMALL, "data.args.n_train=200", "data.args.n_test=100",
                "train.sanity_check=false", "train.checkpoint=false", "--n-trials", "2", "--quiet",
                "--pruner", "none", cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    runs = all_runs(fast_store)
    trials = [x for x in runs if "optuna.trial_number" in x.data.tags]
    assert len(trials) == 2 and all(t.data.tags["optuna.state"] == "COMPLETE" for t in trials)
    assert len({t.data.params["model.args.noise"] for t in trials}) == 2  # the factory's argument, searched
    (parent,) = [x for x in runs if x.info.run_name.startswith("sweep:")]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow  # ~30-60 s; CI's slow pass runs it
def test_ablation_two_seeds_the_guard_flags_the_bugs(fast_store, tmp_path):
    r = run_cli("analysis.ablation", str(EXAMPLE / "ablation.yaml"), *SMALL, "data.args.n_train=200",
                "data.args.n_test=100", "train.sanity_check=false", "--seeds", "2",
                "--out", str(tmp_path / "report"), cwd=tmp_path, timeout=280)
    assert r.returncode == 0, r.stderr
    arms = pd.read_csv(tmp_path / "report" / "arms.csv").set_index("arm")
    kinds = arms["guard kinds"].fillna("").to_dict()
    # The same verdicts as on the built-in models (tests/test_analysis.py, experiments/ablations/).
    assert kinds == {"none": "", "frozen_backbone": "",
                     "no_eval": "bn_stats_changed_in_eval,eval_in_train_mode",
                     "train_once": "train_in_eval_mode", "no_zero_grad": "missing_zero_grad",
                     "partial_freeze": "frozen_in_train_mode"}
    assert arms["guard as expected"].all() and (arms["guard runs"] == 2).all()
    kids = [x for x in all_runs(fast_store) if x.data.tags.get("mlflow.parentRunId")]
    assert len(kids) == 12 and all(k.info.status == "FINISHED" for k in kids)
