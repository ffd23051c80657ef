"""analysis.ablation and analysis.compare end to end on tiny settings (2 seeds, 2 epochs, few arms),
against a temporary MLflow store; the ablation specs in experiments/ablations/ are all loaded."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.ablation import run_ablation
from analysis.plan import load_ablation
from analysis.compare import compare
from harness.errors import SpecError
from conftest import ROOT, run_cli

BASE = ROOT / "experiments" / "digits_lenet_modes.yaml"
ABLATIONS = sorted((ROOT / "experiments" / "ablations").glob("*.yaml"))

TINY_ABLATION = f"""
name: tiny-modes
base: {BASE}
overrides: {{train.epochs: 2, train.sanity_check: false}}
seeds: 2
arms:
  - name: none
  - name: no_eval
    set: {{mode_bug: no_eval}}
  - name: mc_dropout
    set: {{mode_bug: mc_dropout, train.mc_samples: 3}}
  - name: no_grad_missing
    set: {{mode_bug: no_grad_missing}}
    score: train
  - name: no_zero_grad
    set: {{mode_bug: no_zero_grad}}
"""


def write(tmp_path: Path, text: str, name: str = "ablation.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- the spec --------------------------------------------------------------------------------------

def test_ablation_specs_exist():
    assert ROOT / "experiments" / "ablations" / "mode_bugs.yaml" in ABLATIONS


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_spec_loads(path):
    ab = load_ablation(path)
    assert ab.arms and ab.seeds
    for name in ab.arms:
        for seed in ab.seeds[:2]:
            ab.arm_spec(name, seed)  # every arm x seed is a valid experiment spec


def test_mode_bugs_plan():
    ab = load_ablation(ROOT / "experiments" / "ablations" / "mode_bugs.yaml")
    assert ab.seeds == list(range(10))
    scored = {n: a.scored for n, a in ab.arms.items()}
    assert scored == {
        "none": "train", "no_eval": "checkpoint", "no_eval_val_batch_8": "checkpoint",
        "val_batch_8": "checkpoint", "mc_dropout": "checkpoint", "no_grad_missing": "train",
        "train_once": "train", "no_zero_grad": "train", "frozen_features": "train",
        "partial_freeze": "train", "no_dropout": "train",
    }
    assert ab.arms["partial_freeze"].control == "frozen_features"
    assert ab.arms["none"].control is None
    spec = ab.arm_spec("no_eval", 3)
    assert spec.seed == 3 and spec.name == ab.experiment and spec.guard == "warn"
    assert spec.train.checkpoint and not spec.train.log_model
    assert spec.train.threads == ab.base.train.threads  # the base's: the ablation changes no number-setting
    # paired: an arm differs from its control only in what it sets
    a, c = ab.arm_spec("train_once", 3).params(), ab.arm_spec("none", 3).params()
    assert {k for k in a if a[k] != c[k]} == {"mode_bug"}


def test_arm_selection_brings_the_controls_along_and_seeds_override():
    ab = load_ablation(ROOT / "experiments" / "ablations" / "mode_bugs.yaml", ["train.epochs=1"],
                       seeds=3, only=["partial_freeze"])
    assert set(ab.arms) == {"partial_freeze", "frozen_features", "none"}
    assert ab.seeds == [0, 1, 2] and ab.base.train.epochs == 1


@pytest.mark.parametrize("text, message", [
    ("name: x\nbase: {base}\narms: [{{name: a, sett: {{}}}}]", "arms.0.sett: unknown key"),
    ("name: x\nbase: {base}\narms: [{{name: a, control: nope}}]", "arms[a].control: no arm named 'nope'"),
    ("name: x\nbase: {base}\narms: [{{name: a}}, {{name: a}}]", "duplicate arm name"),
    ("name: x\nbase: {base}\narms: [{{name: a, set: {{model.dropout: 2}}}}]", "arms[a].set: model.dropout"),
    ("name: x\nbase: {base}\narms: [{{name: a, set: {{mode_bug: no_zero_grad}}, score: checkpoint}}]",
     "score: checkpoint is impossible: mode_bug=no_zero_grad changes training"),
    ("name: x\nbase: {base}\narms: [{{name: a, set: {{optimizer.lr: 0.1}}, score: checkpoint}}]",
     "it changes optimizer.lr"),
    ("name: x\nbase: nowhere.yaml\narms: [{{name: a}}]", "base: experiment spec 'nowhere.yaml' not found"),
    ("name: x\nbase: {base}\nseeds: 0\narms: [{{name: a}}]", "seeds"),
])
def test_ablation_spec_errors_name_the_field(tmp_path, text, message):
    with pytest.raises(SpecError, match=None) as info:
        load_ablation(write(tmp_path, text.format(base=BASE)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_auto_scoring_trains_what_changes_training(tmp_path):
    ab = load_ablation(write(tmp_path, f"""
name: x
base: {BASE}
arms:
  - {{name: small_eval_batches, set: {{data.val_batch_size: 16}}}}
  - {{name: mc, set: {{mode_bug: mc_dropout, train.mc_samples: 4}}}}
  - {{name: lr, set: {{optimizer.lr: 0.01}}}}
  - {{name: frozen, set: {{model.freeze: [features]}}}}
  - {{name: no_eval_on_frozen, set: {{mode_bug: no_eval, model.freeze: [features]}}, control: frozen}}
  - {{name: forced, set: {{mode_bug: no_eval}}, score: train}}
"""))
    assert {n: a.scored for n, a in ab.arms.items()} == {
        "none": "train", "small_eval_batches": "checkpoint", "mc": "checkpoint", "lr": "train",
        "frozen": "train", "no_eval_on_frozen": "checkpoint", "forced": "train"}


# -- a tiny ablation, run once for the tests below --------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("ablation")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        ab = load_ablation(write(tmp, TINY_ABLATION))
        lines: list[str] = []
        result = run_ablation(ab, echo=lines.append)
        yield {"ab": ab, "result": result, "uri": uri, "tmp": tmp, "lines": lines, "mp": mp}
        while mlflow.active_run() is not None:
            mlflow.end_run()


def children(uri: str, parent: str):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def row(table: pd.DataFrame, arm: str) -> pd.Series:
    return table.set_index("arm").loc[arm]


def test_tiny_ablation_runs_are_children_of_one_parent(tiny):
    from mlflow import MlflowClient

    res = tiny["result"]
    parent = MlflowClient(tiny["uri"]).get_run(res.parent_run_id)
    assert parent.info.run_name == "ablation:tiny-modes" and parent.info.status == "FINISHED"
    kids = children(tiny["uri"], res.parent_run_id)
    by_arm: dict[str, list] = {}
    for r in kids:
        by_arm.setdefault(r.data.tags["ablation.arm"], []).append(r)
        assert r.info.status == "FINISHED"
        assert r.info.experiment_id == parent.info.experiment_id
    assert {a: len(rs) for a, rs in by_arm.items()} == {
        "none": 2, "no_eval": 2, "mc_dropout": 2, "no_grad_missing": 2, "no_zero_grad": 2}
    control = {r.data.tags["ablation.seed"]: r for r in by_arm["none"]}
    for r in by_arm["no_eval"]:  # scored on the control's own checkpoint of the same seed
        c = control[r.data.tags["ablation.seed"]]
        assert r.data.tags["ablation.scored_on"] == c.info.run_id
        assert r.data.tags["ablation.scored"] == "checkpoint"
        assert r.data.params["mode_bug"] == "no_eval" and r.data.params["seed"] == r.data.tags["ablation.seed"]
        # it trained nothing: no training params, and only what every run has as metrics (no one-point
        # charts of McNemar counts and costs: those are tags)
        assert not [k for k in r.data.params if k.startswith(("optimizer.", "train.epochs"))]
        assert set(r.data.metrics) == {"val/acc", "val/loss", "test/acc", "test/loss", "mode_guard/findings"}
        # the control's evaluation, redone on its checkpoint, reproduces the control run's numbers
        assert float(r.data.tags["scoring.control.test_acc_rescored"]) == c.data.metrics["test/acc"]
        assert float(r.data.tags["scoring.control.val_acc_rescored"]) == c.data.metrics["val/acc"]
    assert all(r.data.tags["ablation.scored"] == "train" for r in by_arm["no_zero_grad"])


def test_tiny_ablation_statistics(tiny):
    t = tiny["result"].table
    # no_grad_missing: trained for real, not a single number changes; the graph it builds is measured
    ngm = row(t, "no_grad_missing")
    for k in ("val/acc", "test/acc", "val/loss", "test/loss"):
        assert ngm[f"{k} diff"] == 0 and ngm[f"{k} p"] == 1.0
    assert ngm["autograd MB"] > 0
    # no_zero_grad: catastrophic, but two seeds cannot show it at 95%: the exact test's smallest p is
    # 2/2^2, so the interval is honestly unbounded and the design could detect nothing
    nzg = row(t, "no_zero_grad")
    assert nzg["test/acc diff"] < -0.3 and nzg["test/acc p"] == 0.5
    assert nzg["test/acc ci_low"] == -math.inf and nzg["test/acc ci_high"] == math.inf
    assert nzg["test/acc mde"] == math.inf and nzg["test/acc p_holm"] == 1.0
    assert nzg["test/acc mean"] < 0.4
    # checkpoint arms: McNemar counts, seed-level stats on 2 pairs
    ne = row(t, "no_eval")
    assert ne["n"] == 2 and ne["test/acc pairs"] == 2
    assert ne["mcnemar test b"] + ne["mcnemar test c"] > 0
    assert row(t, "mc_dropout")["eval time ratio"] > 1  # three passes per batch
    # the guard's verdict, arm by arm
    verdict = t.set_index("arm")["guard kinds"].to_dict()
    assert verdict == {"none": "", "mc_dropout": "", "no_eval": "bn_stats_changed_in_eval,eval_in_train_mode",
                       "no_grad_missing": "grad_enabled_in_eval", "no_zero_grad": "missing_zero_grad"}
    assert t["guard as expected"].all()


def test_mcnemar_counts_match_the_logged_predictions(tiny):
    from mlflow.artifacts import load_dict

    kids = [r for r in children(tiny["uri"], tiny["result"].parent_run_id)
            if r.data.tags["ablation.arm"] == "no_eval"]
    b = c = 0
    for r in kids:
        preds = load_dict(f"runs:/{r.info.run_id}/predictions.json")["test"]
        ctrl, arm = preds["control_correct"], preds["arm_correct"]
        rb = sum(1 for x, y in zip(ctrl, arm) if x and not y)
        rc = sum(1 for x, y in zip(ctrl, arm) if y and not x)
        assert (rb, rc) == (float(r.data.tags["scoring.mcnemar.test_b"]), float(r.data.tags["scoring.mcnemar.test_c"]))
        b, c = b + rb, c + rc
    t = row(tiny["result"].table, "no_eval")
    assert (t["mcnemar test b"], t["mcnemar test c"]) == (b, c)


def test_tiny_ablation_report_files_and_parent_artifacts(tiny):
    from mlflow import MlflowClient

    res = tiny["result"]
    out = tiny["tmp"] / "reports" / "tiny-modes"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.html", "arms.csv", "runs.csv", "effects.png",
                                               "curves.png"}
    report = (out / "report.md").read_text()
    for arm in ("none", "no_eval", "mc_dropout", "no_grad_missing", "no_zero_grad"):
        assert f"| {arm}" in report
    assert "Δ test/acc [95% CI]" in report and "flagged 2/2: missing_zero_grad" in report
    assert "+2." in report or "MB autograd graph" in report
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and set(runs["status"]) == {"ok"}
    arms = pd.read_csv(out / "arms.csv")
    assert list(arms["arm"]) == ["none", "no_eval", "mc_dropout", "no_grad_missing", "no_zero_grad"]
    logged = {f.path for f in MlflowClient(tiny["uri"]).list_artifacts(res.parent_run_id, "ablation")}
    assert {"ablation/report.md", "ablation/arms.csv", "ablation/effects.png", "ablation/curves.png",
            "ablation/ablation_spec.yaml"} <= logged
    parent = MlflowClient(tiny["uri"]).get_run(res.parent_run_id)
    assert float(parent.data.tags["effect.no_zero_grad.test_acc"]) < -0.3
    assert not [k for k in parent.data.metrics if not k.startswith("system/")]  # no one-point charts
    # the description: the effects, each arm linked to its runs, and the HTML report
    note = parent.data.tags["mlflow.note.content"]
    exp = parent.info.experiment_id
    assert f"(#/experiments/{exp}/runs/{res.parent_run_id}/artifacts/ablation/report.html" in note
    assert "[no_zero_grad](#/experiments/" in note and "ablation.arm" in note and "10 child runs" in note
    # the HTML report: the Markdown rendered, both figures inside it, nothing left as Markdown syntax
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 2 and "![" not in html
    # every table is one (a "|" inside a cell, as in |Δ|, used to split the headline one into text)
    assert html.count("<table>") == 3 and re.search(r"<th[^>]*>detectable \|Δ\| ≥</th>", html)
    assert "flagged 2/2: missing_zero_grad" in html
    assert "ablation/report.html" in logged
    assert any("no_zero_grad seed 1" in line for line in tiny["lines"])


def test_resume_keeps_the_runs_it_has(tiny):
    ab, res = tiny["ab"], tiny["result"]
    before = {r.info.run_id for r in children(tiny["uri"], res.parent_run_id)}
    again = run_ablation(ab, resume=res.parent_run_id, echo=lambda *_: None)
    assert again.parent_run_id == res.parent_run_id
    assert {r.info.run_id for r in children(tiny["uri"], res.parent_run_id)} == before
    cols = ["arm", "test/acc mean", "test/acc diff"]
    pd.testing.assert_frame_equal(again.table[cols], res.table[cols])


def test_compare_groups_the_ablation_runs(tiny):
    res = compare("tiny-modes", group_by=["ablation.arm"], metric="test/acc", out=tiny["tmp"] / "cmp")
    table = res["table"].set_index("ablation.arm" if "ablation.arm" in res["table"] else "arm")
    assert set(table.index) == {"none", "no_eval", "mc_dropout", "no_grad_missing", "no_zero_grad"}
    assert (table["n"] == 2).all()
    assert table.index[-1] == "no_zero_grad"  # sorted best first
    assert table.loc["none", "mean"] == pytest.approx(row(tiny["result"].table, "none")["test/acc mean"])
    files = res["files"]
    assert all(Path(f).is_file() for f in files.values())
    assert re.search(r"\| ablation.arm +\|", Path(files["md"]).read_text())
    by_bug = compare("tiny-modes", group_by=["mode_bug"], metric="val/loss", plot=False,
                     out=tiny["tmp"] / "cmp2")["table"]
    assert by_bug.iloc[0]["mode_bug"] in ("none", "no_grad_missing", "no_eval", "mc_dropout")  # min first
    assert math.isclose(by_bug["n"].sum(), 10)


def test_compare_cli(tiny):
    r = run_cli("analysis.compare", "--experiment", "tiny-modes", "--group-by", "mode_bug",
                "--metric", "test/acc", cwd=tiny["tmp"], env={"MLFLOW_TRACKING_URI": tiny["uri"]})
    assert r.returncode == 0, r.stderr
    assert "no_zero_grad" in r.stdout and "best_run_id" in r.stdout
    assert (tiny["tmp"] / "reports" / "tiny-modes" / "compare.csv").is_file()
    assert (tiny["tmp"] / "reports" / "tiny-modes" / "compare_curves.png").is_file()
    bad = run_cli("analysis.compare", "--experiment", "nope", cwd=tiny["tmp"],
                  env={"MLFLOW_TRACKING_URI": tiny["uri"]})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "analysis.compare: error: --experiment 'nope': no such experiment" in bad.stderr
    bad = run_cli("analysis.compare", "--experiment", "tiny-modes", "--group-by", "nope",
                  cwd=tiny["tmp"], env={"MLFLOW_TRACKING_URI": tiny["uri"]})
    assert bad.returncode == 2 and "--group-by nope" in bad.stderr


def test_ablation_cli_dry_run_and_errors(tmp_path):
    r = run_cli("analysis.ablation", str(ROOT / "experiments" / "ablations" / "mode_bugs.yaml"),
                "--dry-run", "--seeds", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no_eval" in r.stdout and "checkpoint" in r.stdout and "14 training runs" in r.stdout
    assert not (tmp_path / "mlflow.db").exists()  # a dry run touches no store
    bad = run_cli("analysis.ablation", str(write(tmp_path, "name: x\nbase: nowhere.yaml\narms: [{name: a}]")),
                  cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "base:" in bad.stderr


@pytest.mark.slow
def test_two_workers_on_sqlite(store, tmp_path):
    ab = load_ablation(write(tmp_path, TINY_ABLATION.replace("name: tiny-modes", "name: tiny-workers")))
    res = run_ablation(ab, workers=2, echo=lambda *_: None)
    assert not res.failures
    assert (res.runs["status"] == "ok").all() and len(res.runs) == 10
    assert row(res.table, "no_grad_missing")["test/acc diff"] == 0


def test_the_ablation_measures_what_harness_train_measures(tiny):
    """Same spec and seed, same numbers: the ablation changes nothing that determines them."""
    from harness.run import run
    from harness.spec import load_spec
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(BASE, ["train.epochs=2", "train.sanity_check=false", "name=tiny-modes", "seed=1"])
    alone = run(spec, tracker=MemoryTracker(), progress=False)
    runs = tiny["result"].runs.set_index(["arm", "seed"])
    assert runs.loc[("none", 1), "test/acc"] == alone.metrics["test/acc"]
    assert runs.loc[("none", 1), "val/loss"] == alone.metrics["val/loss"]


def test_a_diverging_arm_counts_every_seed_and_compare_counts_it_too(store, tmp_path):
    ab = load_ablation(write(tmp_path, f"""
name: diverging
base: {BASE}
overrides: {{train.epochs: 2, train.sanity_check: false, data.limit_train: 300}}
seeds: 3
arms:
  - {{name: explode, set: {{optimizer.lr: 1.0e+6}}}}
"""))
    res = run_ablation(ab, echo=lambda *_: None)
    r = row(res.table, "explode")
    assert r["n"] == 3 and r["diverged"] == 3 and r["test/acc pairs"] == 3  # none dropped
    runs = res.runs[res.runs["arm"] == "explode"]
    assert runs["test/acc"].notna().all() and (runs["test/acc"] <= 0.5).all()
    assert r["test/acc diff"] < -0.3 and r["test/acc p"] == 0.25  # 3 seeds of one sign: 2/2^3
    report = (tmp_path / "reports" / "diverging" / "report.md").read_text()
    assert "3 (3 diverged" in report and "cannot reach p ≤ 0.05" in report
    out = compare("diverging", group_by=["ablation.arm"], metric="test/acc", out=tmp_path / "cmp", plot=False)
    table = out["table"].set_index("ablation.arm")
    assert table.loc["explode", "n"] == 3 and table.loc["explode", "diverged"] == 3


@pytest.mark.slow
def test_resume_goes_on_with_the_plan_its_parent_recorded(fast_store, tmp_path):
    """As the README writes it: the resume names only the spec and the parent, not the first command's
    overrides, seeds and arms; nothing is retrained, and the parent ends FINISHED, not FAILED."""
    from mlflow import MlflowClient

    spec = str(ROOT / "experiments" / "ablations" / "mode_bugs.yaml")
    first = run_cli("analysis.ablation", spec, "train.epochs=1", "data.limit_train=200", "--seeds", "2",
                    "--arms", "no_eval", cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr
    parent = re.search(r"parent run (\w+)", first.stdout).group(1)
    again = run_cli("analysis.ablation", spec, "--resume", parent, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "0 training runs to do" in again.stdout and "no_eval" in again.stdout
    client = MlflowClient(fast_store)
    assert client.get_run(parent).info.status == "FINISHED"
    kids = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(kids) == 4  # none and no_eval, 2 seeds each: nothing made twice
    bad = run_cli("analysis.ablation", spec, "train.epochs=3", "--resume", parent, cwd=tmp_path)
    assert bad.returncode == 2 and "--resume goes on with the plan" in bad.stderr
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.parametrize("rows", [
    # the README's ablation: effects from -0.84 to +0.02, tight intervals
    [{"arm": "no_zero_grad (vs none)", "style": "train", "val/acc": (-0.84, -0.88, -0.80),
      "test/acc": (-0.84, -0.88, -0.80)},
     {"arm": "no_eval (vs none)", "style": "checkpoint", "val/acc": (-0.03, -0.042, -0.019),
      "test/acc": (-0.03, -0.042, -0.019)},
     {"arm": "partial_freeze (vs frozen_features)", "style": "train", "val/acc": (0.019, 0.007, 0.033),
      "test/acc": (0.019, 0.007, 0.033)}],
    # two seeds: unbounded intervals, one effect at each edge of the panel, one arm with no value
    [{"arm": "no_eval (vs none)", "style": "checkpoint", "val/acc": (-0.023, -math.inf, math.inf),
      "test/acc": (-0.015, -math.inf, math.inf)},
     {"arm": "no_zero_grad (vs none)", "style": "train", "val/acc": (-0.785, -math.inf, math.inf),
      "test/acc": (-0.776, -math.inf, math.inf)},
     {"arm": "crashed (vs none)", "style": "train"}],
])
def test_effect_labels_stay_inside_their_panel(rows):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analysis.plots import effects_figure

    fig = effects_figure(rows, metrics=["val/acc", "test/acc"], title="ablation x: 2 paired seeds")
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(110)
    canvas.draw()  # lays the figure out, as saving it does
    renderer = canvas.get_renderer()
    labels = 0
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        for text in ax.texts:  # the value labels, "CI unbounded", "n/a"
            t = text.get_window_extent(renderer)
            assert box.x0 <= t.x0 and t.x1 <= box.x1 and box.y0 <= t.y0 and t.y1 <= box.y1, text.get_text()
            labels += 1
    assert labels >= 2 * len([r for r in rows if "val/acc" in r])
