"""The layout is a contract: the layers in pyproject.toml ([tool.importlinter]) hold, a forbidden import
breaks them, no module grows past ~300 lines, production code never asks whether it runs under pytest,
and a new mode bug is one class in one file."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("harness", "analysis")
MAX_LINES = 300


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("harness/core/loop.py", "import mlflow", "never MLflow or Optuna"),
    ("harness/guard/detector.py", "import optuna", "never MLflow or Optuna"),
    ("harness/core/data.py", "import harness.tracking.store", "Stories"),
    ("harness/errors.py", "import harness.spec", "Stories"),
    ("harness/run.py", "import analysis.stats", "Stories"),
    ("harness/sweep/study.py", "import harness.sweep.worker", "The sweep's own layers"),
    ("harness/core/rng.py", "import harness.core.checkpoint", "No import cycle"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, broken):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert broken in r.stdout.split("Broken contracts", 1)[-1], r.stdout


def test_no_module_is_longer_than_a_screenful_or_three():
    long = {str(p.relative_to(ROOT)): n for name in PACKAGES for p in (ROOT / name).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"


def test_production_code_never_asks_whether_it_runs_under_pytest():
    hits = [str(p.relative_to(ROOT)) for name in PACKAGES for p in (ROOT / name).rglob("*.py")
            if "PYTEST_CURRENT_TEST" in p.read_text() or "import pytest" in p.read_text()]
    assert not hits


def test_a_new_mode_bug_is_one_class_in_one_file(tmp_path, monkeypatch, request):
    """A policy defined in a module of its own is accepted by the spec, watched by the guard with the
    expectation its scope implies, and planned by an ablation (scored on checkpoints: it changes only
    evaluation)."""
    from harness.core import modes
    from harness.run import run
    from harness.spec import load_spec
    from harness.tracking.tracker import MemoryTracker

    (tmp_path / "my_bugs.py").write_text(textwrap.dedent('''
        from harness.core.modes import Correct, register

        @register
        class EvalOnceOnly(Correct):
            """model.eval() at the first evaluation only: later evaluations run in training mode."""
            name = "eval_once_only"
            scope = "eval"

            def start_eval(self, model):
                if not getattr(self, "_done", False):
                    model.eval()  # BUG: only once
                    self._done = True
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: (modes.POLICIES.pop("eval_once_only", None), sys.modules.pop("my_bugs", None)))
    import importlib

    importlib.import_module("my_bugs")
    policy = modes.POLICIES["eval_once_only"]
    assert policy.expects_findings()

    base = ROOT / "experiments" / "digits_lenet_modes.yaml"
    spec = load_spec(base, ["mode_bug=eval_once_only", "train.epochs=2", "train.log_model=false",
                            "train.sanity_check=false", "data.limit_train=300"])
    tracker = MemoryTracker()
    result = run(spec, tracker=tracker, progress=False)
    assert "eval_in_train_mode" in result.guard  # the second epoch's validation ran in training mode

    from analysis.plan import load_ablation

    ablation = tmp_path / "ab.yaml"
    ablation.write_text(f"name: new-bug\nbase: {base}\nseeds: 2\narms:\n"
                        f"  - name: eval_once_only\n    set: {{mode_bug: eval_once_only}}\n")
    ab = load_ablation(ablation)
    assert ab.arms["eval_once_only"].scored == "checkpoint"
    with pytest.raises(Exception, match="unknown mode bug"):
        load_spec(base, ["mode_bug=eval_twice"])
