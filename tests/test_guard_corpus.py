"""python -m harness.guard on every script of the study's corpus (benchmarks/guard_corpus/): the verdict
is exactly the script's labelled bugs, each planted bug found and nothing reported on correct scripts.
The scripts run in this process through the command's own main(), as ``python -m harness.guard`` runs
them; benchmarks/guard_study.py runs the same corpus as subprocesses and prints the table."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT
from harness.guard.__main__ import main

_spec = importlib.util.spec_from_file_location("guard_study", ROOT / "benchmarks" / "guard_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

SCRIPTS = study.scripts()


def test_the_corpus_has_bugs_of_every_kind_and_correct_scripts():
    kinds = set().union(*(study.labels(s)[0] for s in SCRIPTS))
    assert kinds == set(study.FINDINGS)
    assert sum(not study.labels(s)[0] for s in SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_the_guard_gives_each_script_its_labelled_verdict(script, tmp_path, monkeypatch, capsys):
    truth, allow = study.labels(script)
    monkeypatch.chdir(tmp_path)  # whatever a script writes lands here
    report = tmp_path / "report.json"
    argv = ["--report", str(report), *(["--allow", ",".join(allow)] if allow else []), str(script)]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    rep = json.loads(report.read_text())
    assert {f["kind"] for f in rep["findings"]} == truth, capsys.readouterr().err[-3000:]
    for f in rep["findings"]:  # each finding says where in the script: a line of this very file
        assert f["count"] > 0 and f["modules"]
        file_line = next(iter(f["sites"]))
        assert file_line.rsplit(":", 1)[0].endswith(script.name), f
    assert rep["guard_error"] is None and rep["models"]
