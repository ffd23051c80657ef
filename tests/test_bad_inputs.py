"""A corpus of wrong inputs, as tired researchers really type them, across every command: each must end
with exit status 2 and one line on stderr (bounded, naming the field or file and what to do), no
traceback, and nothing made: no run, no trial, no file.

The commands run in-process (their ``main``), which is what ``python -m`` runs after the imports; a few
are also run as real subprocesses at the end, to show the same line reaches a user's terminal."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from conftest import ROOT, all_runs, run_cli

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")
MODES = str(ROOT / "experiments" / "digits_lenet_modes.yaml")
ABLATION = str(ROOT / "experiments" / "ablations" / "mode_bugs.yaml")
TINY = ["train.epochs=1", "data.limit_train=100", "train.sanity_check=false", "train.log_model=false"]
MAX_LINE = 400


def _main(command: str):
    if command == "train":
        from harness.train import main
    elif command == "sweep":
        from harness.sweep.cli import main
    elif command == "doctor":
        from harness.sweep.doctor import main
    elif command == "ablation":
        from analysis.ablation import main
    else:
        from analysis.compare import main
    return main


def _idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    path.write_bytes(struct.pack(">I" + "I" * len(dims), magic, *dims) + payload)


def _mnist(root: Path, n_train: int = 40, n_test: int = 20, labels: bytes | None = None,
           images_short: bool = False, label_count: int | None = None) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        body = bytes(n * 28 * 28)
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, [n, 28, 28], body[: len(body) // 2] if images_short else body)
        lab = labels if labels is not None else bytes(i % 10 for i in range(n))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, [label_count or n], lab[: label_count or n])


# (id, command, argv, setup(tmp) -> None, env, the words the line must hold)
CASES = [
    # -- harness.train: the spec file ------------------------------------------------------------
    ("no such spec", "train", ["nope.yaml"], None, {}, "nope.yaml: spec file not found"),
    ("spec is a directory", "train", ["specdir"], lambda t: (t / "specdir").mkdir(), {}, "specdir"),
    ("spec is binary", "train", ["bin.yaml"], lambda t: (t / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\0\0"), {},
     "bin.yaml"),
    ("spec in latin-1", "train", ["latin.yaml"], lambda t: (t / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1")),
     {}, "latin.yaml"),
    ("spec is a list", "train", ["list.yaml"], lambda t: (t / "list.yaml").write_text("- a\n- b\n"), {}, "mapping"),
    ("spec is malformed YAML", "train", ["bad.yaml"], lambda t: (t / "bad.yaml").write_text("train: {epochs: 3\n"),
     {}, "bad.yaml"),
    ("repeated key", "train", ["dup.yaml"], lambda t: (t / "dup.yaml").write_text("seed: 1\nseed: 2\n"), {}, "seed"),
    ("alias bomb", "train", ["bomb.yaml"], lambda t: (t / "bomb.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "name: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"), {}, "bomb.yaml"),
    ("unknown key", "train", [DIGITS, "trian.epochs=3"], None, {}, "trian"),
    ("misspelt field", "train", [DIGITS, "optimizer.learning_rate=0.1"], None, {}, "optimizer.learning_rate"),
    ("epochs not a number", "train", [DIGITS, "train.epochs=ten"], None, {}, "train.epochs"),
    ("epochs zero", "train", [DIGITS, "train.epochs=0"], None, {}, "train.epochs"),
    ("epochs yes", "train", [DIGITS, "train.epochs=yes"], None, {}, "train.epochs: expected a number, not a yes/no"),
    ("lr true", "train", [DIGITS, "optimizer.lr=true"], None, {}, "optimizer.lr: expected a number, not a yes/no"),
    ("empty experiment name", "train", [DIGITS, "name="], None, {}, "name: String should have at least 1"),
    ("experiment name too long", "train", [DIGITS, "name=" + "x" * 201], None, {}, "at most 200 characters"),
    ("run name too long", "train", [DIGITS, "--run-name", "r" * 251], None, {}, "--run-name: expected a name of 1 to 250"),
    ("run name blank", "train", [DIGITS, "--run-name", "  "], None, {}, "got a blank one"),
    ("resume an unset variable", "train", [DIGITS, "--resume", ""], None, {}, "--resume: expected an MLflow run id"),
    ("store in memory", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "sqlite:///:memory:"}, "names no file"),
    ("store with no path", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "sqlite:///"}, "names no file"),
    ("store database not running", "train", [DIGITS, *TINY], None,
     {"MLFLOW_TRACKING_URI": "postgresql+psycopg2://u:pw@127.0.0.1:9/db"}, "the database does not answer"),
    ("store database of no known dialect", "train", [DIGITS, *TINY], None,
     {"MLFLOW_TRACKING_URI": "postgres://u@127.0.0.1:9/db"}, "missing database driver"),
    ("lr infinite", "train", [DIGITS, "optimizer.lr=inf"], None, {}, "optimizer.lr"),
    ("lr nan", "train", [DIGITS, "optimizer.lr=.nan"], None, {}, "optimizer.lr"),
    ("lr negative", "train", [DIGITS, "optimizer.lr=-0.1"], None, {}, "optimizer.lr"),
    ("dropout 1", "train", [DIGITS, "model.dropout=1"], None, {}, "model.dropout"),
    ("seed negative", "train", [DIGITS, "seed=-1"], None, {}, "seed"),
    ("seed too large", "train", [DIGITS, f"seed={2 ** 32}"], None, {}, "seed"),
    ("split seed too large", "train", [DIGITS, f"data.split_seed={2 ** 40}"], None, {}, "data.split_seed"),
    ("no CUDA here", "train", [DIGITS, "train.device=cuda"], None, {}, "train.device"),
    ("no such GPU", "train", [DIGITS, "train.device=cuda:3"], None, {}, "train.device"),
    ("no MPS here", "train", [DIGITS, "train.device=mps"], None, {}, "train.device"),
    ("device typo", "train", [DIGITS, "train.device=gpu"], None, {}, "train.device"),
    ("zero threads", "train", [DIGITS, "train.threads=0"], None, {}, "train.threads"),
    ("threads in words", "train", [DIGITS, "train.threads=two"], None, {}, "train.threads"),
    ("override without =", "train", [DIGITS, "train.epochs"], None, {}, "train.epochs"),
    ("override without key", "train", [DIGITS, "=5"], None, {}, "key.sub=value"),
    ("override with empty part", "train", [DIGITS, "model..arch=mlp"], None, {}, "model..arch"),
    ("override into a value", "train", [DIGITS, "seed.x=1"], None, {}, "seed"),
    ("unknown mode bug", "train", [DIGITS, "mode_bug=no_evla"], None, {}, "mode_bug"),
    ("unknown guard action", "train", [DIGITS, "guard=maybe"], None, {}, "guard"),
    ("unknown architecture", "train", [DIGITS, "model.arch=vgg99"], None, {}, "model.arch"),
    ("missing model module", "train", [DIGITS, "model.arch=no_such_module:build"], None, {}, "model.arch"),
    ("freeze a missing submodule", "train", [DIGITS, "model.freeze=[backbone]"], None, {}, "backbone"),
    ("unknown dataset", "train", [DIGITS, "data.dataset=imagenet"], None, {}, "data.dataset"),
    ("validation eats the data", "train", [DIGITS, "data.val_fraction=0.9999"], None, {}, "data.val_fraction"),
    ("one training example", "train", [DIGITS, "data.limit_train=1"], None, {}, "data.limit_train"),
    ("batch of one under BatchNorm", "train", [MODES, "data.batch_size=1"], None, {}, "data.batch_size"),
    ("MNIST missing, no download", "train", [DIGITS, "data.dataset=mnist", "data.download=false", "data.root=d"],
     None, {}, "d/MNIST/raw"),
    ("MNIST images truncated", "train", [DIGITS, "data.dataset=mnist", "data.download=false", "data.root=d"],
     lambda t: _mnist(t / "d", images_short=True), {}, "images-idx3-ubyte"),
    ("MNIST labels out of range", "train", [DIGITS, "data.dataset=mnist", "data.download=false", "data.root=d"],
     lambda t: _mnist(t / "d", labels=bytes([200] * 40)), {}, "labels-idx1-ubyte"),
    ("MNIST lengths disagree", "train", [DIGITS, "data.dataset=mnist", "data.download=false", "data.root=d"],
     lambda t: _mnist(t / "d", label_count=30), {}, "labels-idx1-ubyte"),
    # -- harness.train: the stores and --resume ---------------------------------------------------------
    ("tracking URI of an unknown scheme", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "mlflw://x"},
     "unknown scheme"),
    ("the old file store", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"},
     "old file store"),
    ("a bare path as tracking URI", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "mlruns"},
     "old file store"),
    ("tracking file is not a database", "train", [DIGITS, *TINY], lambda t: (t / "notes.txt").write_text("hello\n"),
     {"MLFLOW_TRACKING_URI": "sqlite:///notes.txt"}, "notes.txt is not a SQLite database"),
    ("tracking database is a directory", "train", [DIGITS, *TINY], lambda t: (t / "db").mkdir(),
     {"MLFLOW_TRACKING_URI": "sqlite:///db"}, "is a directory"),
    ("tracking directory cannot be made", "train", [DIGITS, *TINY], None,
     {"MLFLOW_TRACKING_URI": "sqlite:////proc/harness/mlflow.db"}, "cannot create the directory /proc/harness"),
    ("tracking server not there", "train", [DIGITS, *TINY], None, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
     "not reachable"),
    ("tracking database is Optuna's", "train", [DIGITS, *TINY], "optuna_db",
     {"MLFLOW_TRACKING_URI": "sqlite:///optuna.db"}, "holds Optuna's tables"),
    ("resume a run that is not there", "train", [DIGITS, *TINY, "--resume", "0123456789abcdef"], None, {},
     "--resume 0123456789abcdef"),
    ("unknown option", "train", [DIGITS, "--epochs", "3"], None, {}, "--epochs"),
    # -- harness.sweep ------------------------------------------------------------------------------------
    ("zero trials", "sweep", [DIGITS, "--n-trials", "0"], None, {}, "--n-trials"),
    ("trials not a number", "sweep", [DIGITS, "--n-trials", "lots"], None, {}, "--n-trials"),
    ("negative workers", "sweep", [DIGITS, "--workers", "-2"], None, {}, "--workers"),
    ("negative timeout", "sweep", [DIGITS, "--timeout", "-5"], None, {}, "--timeout"),
    ("study name too long", "sweep", [DIGITS, "--study", "s" * 245], None, {}, "--study: expected a name of 1 to 244"),
    ("more workers than the memory holds", "sweep", [DIGITS, "--workers", "100000"], None, {}, "GiB available"),
    ("unknown sampler", "sweep", [DIGITS, "--sampler", "bayes"], None, {}, "--sampler"),
    ("Optuna in the MLflow database", "sweep", [DIGITS, "--storage", "sqlite:///mlflow.db"], None,
     {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "that is the MLflow database"),
    ("Optuna storage holds MLflow's tables", "sweep", [DIGITS, "--storage", "sqlite:///other.db"], "mlflow_db",
     {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "holds MLflow's tables"),
    ("SQLite with two workers", "sweep", [DIGITS, "--storage", "sqlite:///o.db", "--workers", "2"], None, {},
     "--workers 2"),
    ("journal path is a directory", "sweep", [DIGITS, "--storage", "journals"],
     lambda t: (t / "journals").mkdir(), {}, "journals is a directory"),
    ("journal path is a SQLite file", "sweep", [DIGITS, "--storage", "optuna.db"], "optuna_db", {},
     "is a SQLite database, not a journal file"),
    ("database server not there", "sweep", [DIGITS, *TINY, "--storage", "postgresql+psycopg2://u@127.0.0.1:9/db"],
     None, {}, "not reachable"),
    ("float range on an int field", "sweep", [DIGITS, "search.params={train.epochs: {type: float, low: 1, high: 10}}"],
     None, {}, "takes whole numbers only"),
    ("grid of billions", "sweep", [DIGITS, "--sampler", "grid",
                                   "search.params={optimizer.lr: {type: float, low: 0.001, high: 0.1, step: 1.0e-10}}"],
     None, {}, "the grid has"),
    ("grid without steps", "sweep", [DIGITS, "--sampler", "grid"], None, {}, "needs a 'step'"),
    ("search a key the spec lacks", "sweep", [DIGITS, "search.params.optimizer.beta={type: float, low: 0, high: 1}"],
     None, {}, "optimizer.beta"),
    ("search range upside down", "sweep", [DIGITS, "search.params.optimizer.lr.low=2"], None, {}, "low"),
    ("search range outside the field", "sweep", [DIGITS, "search.params.model.dropout.high=1.5"], None, {},
     "model.dropout"),
    ("log range from zero", "sweep", [DIGITS, "search.params={model.dropout: {type: float, low: 0, high: 0.5, log: true}}"],
     None, {}, "log"),
    ("search range infinite", "sweep", [DIGITS, "search.params.optimizer.lr.high=.inf"], None, {}, "optimizer.lr"),
    ("tune on the test split", "sweep", [DIGITS, "search.metric=test/acc"], None, {}, "never tune on test"),
    ("objective no run logs", "sweep", [DIGITS, *TINY, "search.metric=val/accuracy", "--n-trials", "1"], None, {},
     "val/accuracy"),
    # -- harness.doctor -------------------------------------------------------------------------------------
    ("doctor: workers not a number", "doctor", ["--workers", "many"], None, {}, "--workers"),
    ("doctor: no such spec", "doctor", ["nope.yaml"], None, {}, "nope.yaml"),
    ("doctor: unknown option", "doctor", ["--stroage", "x"], None, {}, "--stroage"),
    # -- analysis.ablation ------------------------------------------------------------------------------------
    ("no such ablation spec", "ablation", ["nope.yaml"], None, {}, "nope.yaml"),
    ("ablation with an unknown key", "ablation", ["ab.yaml"], lambda t: (t / "ab.yaml").write_text(
        f"name: x\nbase: {MODES}\narms: [{{name: a, sett: {{}}}}]\n"), {}, "unknown key"),
    ("ablation arm sets a bad value", "ablation", ["ab.yaml"], lambda t: (t / "ab.yaml").write_text(
        f"name: x\nbase: {MODES}\narms: [{{name: a, set: {{model.dropout: 2}}}}]\n"), {}, "model.dropout"),
    ("ablation base missing", "ablation", ["ab.yaml"], lambda t: (t / "ab.yaml").write_text(
        "name: x\nbase: nowhere.yaml\narms: [{name: a}]\n"), {}, "nowhere.yaml"),
    ("ablation control unknown", "ablation", ["ab.yaml"], lambda t: (t / "ab.yaml").write_text(
        f"name: x\nbase: {MODES}\narms: [{{name: a, control: b}}]\n"), {}, "no arm named 'b'"),
    ("ablation: unknown arm", "ablation", [ABLATION, "--arms", "no_evl"], None, {}, "no_evl"),
    ("ablation: zero seeds", "ablation", [ABLATION, "--seeds", "0"], None, {}, "--seeds"),
    ("ablation: resume an unset variable", "ablation", [ABLATION, "--resume", " "], None, {}, "a blank one"),
    ("ablation: report folder under a file", "ablation", [ABLATION, *TINY, "--seeds", "1", "--arms", "no_eval",
                                                         "--out", "notes.txt/report"],
     lambda t: (t / "notes.txt").write_text("mine"), {}, "--out notes.txt/report: cannot make the report folder"),
    ("ablation: more workers than the memory holds", "ablation", [ABLATION, *TINY, "--seeds", "1", "--workers",
                                                                   "100000"], None, {}, "GiB available"),
    ("ablation: override typo", "ablation", [ABLATION, "train.epoch=2"], None, {}, "train.epoch"),
    ("ablation: resume a stranger", "ablation", [ABLATION, "--resume", "0123456789abcdef"], None, {},
     "--resume 0123456789abcdef"),
    # -- analysis.compare ---------------------------------------------------------------------------------------
    ("compare: no such experiment", "compare", ["--experiment", "nope"], "one_run", {}, "no such experiment"),
    ("compare: report folder under a file", "compare", ["--experiment", "digits-lenet", "--out", "notes.txt/r"],
     ("one_run", lambda t: (t / "notes.txt").write_text("")), {}, "cannot make the report folder"),
    ("compare: no such metric", "compare", ["--experiment", "digits-lenet", "--metric", "val/accuracy"], "one_run", {},
     "--metric val/accuracy"),
    ("compare: no such key", "compare", ["--experiment", "digits-lenet", "--group-by", "lr"], "one_run", {},
     "--group-by lr"),
    ("compare: filter syntax", "compare", ["--experiment", "digits-lenet", "--filter", "params.seed = = 0"],
     "one_run", {}, "--filter"),
    ("compare: experiment missing", "compare", [], None, {}, "--experiment"),
    ("compare: unknown direction", "compare", ["--experiment", "x", "--direction", "up"], None, {}, "--direction"),
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An Optuna SQLite database, an MLflow one and an MLflow one holding a finished run, made once."""
    import shutil

    import optuna

    from harness.run import run
    from harness.spec import load_spec

    made = tmp_path_factory.mktemp("stores")
    optuna.create_study(storage=f"sqlite:///{made / 'optuna.db'}", study_name="s")
    uri = f"sqlite:///{made / 'one_run.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(made)
        run(load_spec(DIGITS, TINY), progress=False)
    shutil.copy(made / "one_run.db", made / "mlflow_db.db")
    return made


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_made(case, tmp_path, monkeypatch, capsys, stores):
    import shutil

    _, command, argv, setup, env, words = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for step in setup if isinstance(setup, tuple) else (setup,):
        if step == "optuna_db":
            shutil.copy(stores / "optuna.db", tmp_path / "optuna.db")
        elif step == "mlflow_db":
            shutil.copy(stores / "mlflow_db.db", tmp_path / "other.db")
        elif step == "one_run":
            shutil.copy(stores / "one_run.db", tmp_path / "mlflow.db")
        elif step is not None:
            step(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _tree(tmp_path)
    runs_before = len(all_runs(os.environ["MLFLOW_TRACKING_URI"])) if (tmp_path / "mlflow.db").exists() else 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _main(command)(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and words in lines[0], lines[0]
    assert len(lines[0]) <= MAX_LINE and "Traceback" not in err
    made = _tree(tmp_path) - before
    assert not made, f"made {sorted(made)}"
    if (tmp_path / "mlflow.db").exists():
        assert len(all_runs(os.environ["MLFLOW_TRACKING_URI"])) == runs_before


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert {c[1] for c in CASES} == {"train", "sweep", "doctor", "ablation", "compare"}


@pytest.mark.parametrize("module, args, words", [
    ("harness.train", [DIGITS, "optimizer.lr=inf"], "optimizer.lr"),
    ("harness.sweep", [DIGITS, "--workers", "-2"], "--workers"),
    ("analysis.compare", ["--experiment", "nope"], "no MLflow store"),
])
def test_the_same_line_reaches_a_terminal(tmp_path, module, args, words):
    r = run_cli(module, *args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert words in line
    assert not list(tmp_path.iterdir())
