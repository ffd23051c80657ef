"""The spec: bad specs end in one line + exit 2 and no MLflow run; good specs are typed and stable."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, all_runs, run_cli
from harness.errors import SpecError
from harness.spec import Spec, load_spec, parse_overrides

# Spec files for the bad cases set no model.arch on purpose: validating an arch imports torch (the
# registry lives in harness.models), and every other mistake must be reported without it.
GOOD = "name: spec-test\ndata:\n  dataset: digits\noptimizer:\n  lr: 0.05\n"

# (id, spec file text or None for "no such file", overrides, the field path the error must name)
BAD = [
    ("unknown-top-key", "name: x\nepoch: 3\n", [], "epoch"),
    ("unknown-nested-key", "optimizer:\n  learning_rate: 0.1\n", [], "optimizer.learning_rate"),
    ("unknown-section", "trainer:\n  epochs: 3\n", [], "trainer"),
    ("epochs-not-int", "train:\n  epochs: three\n", [], "train.epochs"),
    ("epochs-fractional", "train:\n  epochs: 2.5\n", [], "train.epochs"),
    ("lr-not-number", "optimizer:\n  lr: fast\n", [], "optimizer.lr"),
    ("lr-zero", "optimizer:\n  lr: 0\n", [], "optimizer.lr"),
    ("lr-negative-override", GOOD, ["optimizer.lr=-0.1"], "optimizer.lr"),
    ("dropout-one", "model:\n  dropout: 1.0\n", [], "model.dropout"),
    ("dropout-negative-override", GOOD, ["model.dropout=-0.2"], "model.dropout"),
    ("momentum-one", "optimizer:\n  momentum: 1.0\n", [], "optimizer.momentum"),
    ("momentum-negative-override", GOOD, ["optimizer.momentum=-0.5"], "optimizer.momentum"),
    ("epochs-zero", "train:\n  epochs: 0\n", [], "train.epochs"),
    ("unknown-dataset", "data:\n  dataset: imagenet\n", [], "data.dataset"),
    ("unknown-arch-override", GOOD, ["model.arch=resnet9000"], "model.arch"),
    ("unknown-optimizer", "optimizer:\n  name: rmsprop\n", [], "optimizer.name"),
    ("unknown-mode-bug", GOOD, ["mode_bug=forgot_everything"], "mode_bug"),
    ("batch-size-zero", "data:\n  batch_size: 0\n", [], "data.batch_size"),
    ("val-fraction-one", "data:\n  val_fraction: 1.0\n", [], "data.val_fraction"),
    ("unknown-device", GOOD, ["train.device=tpu"], "train.device"),
    ("bool-garbage", GOOD, ["data.download=maybe"], "data.download"),
    ("section-is-scalar", "optimizer: 0.1\n", [], "optimizer"),
    ("missing-file", None, [], "no-such-spec.yaml"),
    ("malformed-yaml", "optimizer:\n  lr: [0.1\n  momentum: 0.9\n", [], "spec.yaml"),
    ("yaml-not-mapping", "- optimizer\n- lr\n", [], "spec.yaml"),
    ("override-without-equals", GOOD, ["optimizer.lr"], "optimizer.lr"),
    ("override-empty-key-part", GOOD, ["optimizer..lr=0.1"], "optimizer..lr"),
    ("override-into-scalar", GOOD, ["seed.value=1"], "seed"),
    ("search-low-above-high",
     "search:\n  params:\n    optimizer.lr: {type: float, low: 1.0, high: 0.1}\n", [],
     "search.params.optimizer.lr"),
    ("search-log-nonpositive",
     "search:\n  params:\n    optimizer.momentum: {type: float, low: 0.0, high: 0.9, log: true}\n", [],
     "search.params.optimizer.momentum"),
    ("search-categorical-no-choices", "search:\n  params:\n    model.batchnorm: {type: categorical}\n",
     [], "search.params.model.batchnorm"),
    ("search-unknown-key", "search:\n  params:\n    optimizer.learning_rate: {low: 0.1, high: 1}\n",
     [], "search.params"),
    ("search-on-test-metric", GOOD, ["search.metric=test/acc"], "search.metric"),
]


def _write_spec(tmp_path, text):
    if text is None:
        return "no-such-spec.yaml"
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, overrides, field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_fails_in_one_line_with_exit_2_and_no_run(store, tmp_path, text, overrides, field):
    spec = _write_spec(tmp_path, text)
    r = run_cli("harness.train", spec, *overrides, "--quiet", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("harness.train: error: ")
    assert field in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # No half-made run: the store was never touched, or holds no run.
    db = tmp_path / "mlflow.db"
    assert not db.exists() or all_runs(store) == []
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("text, overrides, field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_raises_spec_error_in_process(tmp_path, text, overrides, field):
    # The same cases through the library: callers (the sweep, the ablation) get a SpecError, not a crash.
    spec = _write_spec(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(spec, overrides)
    msg = str(e.value)
    assert "\n" not in msg and field in msg


def test_bad_spec_cli_does_not_import_torch_or_mlflow(tmp_path):
    # Bad input must fail fast: nothing heavy is imported before the spec is validated.
    spec = _write_spec(tmp_path, "optimizer:\n  lr: 0\n")
    code = textwrap.dedent(f"""
        import sys
        from harness.train import main
        try:
            main([{spec!r}, "--quiet"])
        except SystemExit as e:
            assert e.code == 2, e.code
        heavy = sorted(m for m in ("torch", "mlflow") if m in sys.modules)
        print("heavy:", heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


# -- the good path ---------------------------------------------------------------------------------

def test_defaults_follow_the_tutorial():
    s = load_spec(None)
    assert s.optimizer.name == "sgd"
    assert s.optimizer.lr == 0.05
    assert s.optimizer.momentum == 0.9
    assert s.data.batch_size == 100
    assert s.train.epochs == 8
    assert s.mode_bug == "none"
    assert s.data.dataset == "digits"
    assert s.model.arch == "lenet"


def test_overrides_are_typed():
    s = load_spec(None, ["optimizer.lr=0.01", "model.dropout=0.3", "train.epochs=3", "model.batchnorm=true",
                         "seed=7", "name=my-exp", "model.freeze=[features]", "optimizer.weight_decay=1e-4",
                         "data.limit_train=500"])
    assert s.optimizer.lr == 0.01 and type(s.optimizer.lr) is float
    assert s.model.dropout == 0.3
    assert s.train.epochs == 3 and type(s.train.epochs) is int
    assert s.model.batchnorm is True
    assert s.seed == 7 and type(s.seed) is int
    assert s.name == "my-exp"
    assert s.model.freeze == ("features",)
    # "1e-4" is a string to YAML 1.1; the spec still makes it the float the user meant.
    assert s.optimizer.weight_decay == pytest.approx(1e-4) and type(s.optimizer.weight_decay) is float
    assert s.data.limit_train == 500


def test_overrides_layer_over_the_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: layered\noptimizer:\n  lr: 0.2\n  momentum: 0.5\ntrain:\n  epochs: 4\n")
    s = load_spec(p, ["optimizer.lr=0.01"])
    assert s.optimizer.lr == 0.01  # the override wins
    assert s.optimizer.momentum == 0.5  # the file's other values stay
    assert s.train.epochs == 4
    assert s.name == "layered"
    assert s.data.batch_size == 100  # unset keys keep their defaults


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "c=0.5", "d=true", "e=[x, y]", "f=text", "g="]) == {
        "a.b": 1, "c": 0.5, "d": True, "e": ["x", "y"], "f": "text", "g": ""}


def test_spec_is_frozen():
    s = load_spec(None)
    with pytest.raises(Exception):
        s.optimizer.lr = 1.0  # type: ignore[misc]


def test_flattened_params_have_dotted_keys():
    params = load_spec(None, ["optimizer.lr=0.01", "model.dropout=0.25", "seed=3"]).params()
    assert params["optimizer.lr"] == 0.01
    assert params["model.dropout"] == 0.25
    assert params["mode_bug"] == "none"
    assert params["seed"] == 3
    assert params["data.dataset"] == "digits"
    assert params["optimizer.momentum"] == 0.9
    assert params["train.epochs"] == 8
    assert all(not isinstance(v, dict) for v in params.values())
    assert not any(k.startswith("search") for k in params)  # the search space is not a run param


def test_spec_hash_is_stable(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("name: h\nseed: 1\noptimizer:\n  lr: 0.1\n  momentum: 0.8\n")
    b.write_text("optimizer:\n  momentum: 0.8\n  lr: 0.1\nseed: 1\nname: h\n")  # same content, other order
    h = load_spec(a).hash()
    assert h == load_spec(a).hash() == load_spec(b).hash()
    assert h == load_spec(None, ["name=h", "seed=1", "optimizer.lr=0.1", "optimizer.momentum=0.8"]).hash()
    assert h != load_spec(a, ["optimizer.lr=0.2"]).hash()
    assert h != load_spec(a, ["seed=2"]).hash()
    # ... and across processes (no dict-order or hash-randomisation dependence).
    code = f"from harness.spec import load_spec; print(load_spec({str(a)!r}).hash())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == h, out.stderr


def test_resolved_spec_round_trips(tmp_path):
    s = load_spec(None, ["optimizer.lr=0.02", "model.freeze=[features]", "model.dropout=0.1",
                         "search.metric=val/loss", "search.direction=minimize"])
    p = tmp_path / "resolved.yaml"
    p.write_text(s.to_yaml())
    back = load_spec(p)
    assert back == s
    assert back.hash() == s.hash()


def test_with_overrides_revalidates():
    s = load_spec(None)
    t = s.with_overrides({"optimizer.lr": 0.3, "search.params.optimizer.lr.high": 0.5})
    assert t.optimizer.lr == 0.3 and s.optimizer.lr == 0.05
    assert t.search.params["optimizer.lr"].high == 0.5
    assert t.search.params["optimizer.lr"].low == s.search.params["optimizer.lr"].low
    with pytest.raises(SpecError, match="optimizer.momentum"):
        s.with_overrides({"optimizer.momentum": 1.5})


def test_default_search_space():
    p = load_spec(None).search.params
    assert set(p) == {"optimizer.lr", "optimizer.momentum", "model.dropout"}
    assert p["optimizer.lr"].log is True
    assert isinstance(load_spec(None), Spec)


def test_guard_off_survives_yaml(tmp_path):
    # YAML 1.1 turns a bare `off` into False: both the file and the override must still mean "off".
    p = tmp_path / "g.yaml"
    p.write_text("guard: off\n")
    assert load_spec(p).guard == "off"
    assert load_spec(None, ["guard=off"]).guard == "off"
    with pytest.raises(SpecError, match="guard"):
        load_spec(None, ["guard=true"])


def test_search_overrides_edit_the_default_space(tmp_path):
    # No search block in the file: one bound of one default parameter can be changed on the command
    # line, and a new parameter joins the defaults instead of replacing them.
    p = tmp_path / "s.yaml"
    p.write_text("name: s\n")
    defaults = load_spec(p).search.params
    s = load_spec(p, ["search.params.optimizer.lr.high=0.5"])
    assert s.search.params["optimizer.lr"].high == 0.5
    assert s.search.params["optimizer.lr"].low == defaults["optimizer.lr"].low
    assert s.search.params["optimizer.lr"].log is True
    assert set(s.search.params) == set(defaults)
    s = load_spec(p, ["search.params.model.batchnorm={type: categorical, choices: [true, false]}"])
    assert set(s.search.params) == set(defaults) | {"model.batchnorm"}
    # Replacing the whole space stays possible, and a file's own space is edited, not the defaults.
    assert set(load_spec(p, ["search.params={optimizer.lr: {low: 0.01, high: 0.1}}"]).search.params) == {
        "optimizer.lr"}
    q = tmp_path / "q.yaml"
    q.write_text("search:\n  params:\n    optimizer.lr: {low: 0.001, high: 0.1, log: true}\n")
    s = load_spec(q, ["search.params.optimizer.lr.high=0.2"])
    assert set(s.search.params) == {"optimizer.lr"} and s.search.params["optimizer.lr"].high == 0.2
    # An override that restates a default leaves the spec (and its hash) unchanged.
    assert load_spec(p, ["search.params.optimizer.lr.high=1.0"]).hash() == load_spec(p).hash()
