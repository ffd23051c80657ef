"""python -m harness.guard SCRIPT [args...]: the script runs as ``python SCRIPT args`` would (argv,
__main__, working directory, output, traceback, exit status, Ctrl-C), the guard adds its report and
never hides a failure, --report/--fail/--allow, and bad arguments get one line and exit status 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from harness.guard.__main__ import EXIT_FINDINGS, main

PROG = "python -m harness.guard"

# A small training script with a switch for each way it can end, and one mode bug (no model.eval()).
SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from torch import nn

    def train_and_test():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
        with torch.no_grad():
            model(torch.randn(5, 4))  # model.eval() forgotten

    def fail(kind):
        if kind == "crash":
            raise ValueError("the loss went NaN at epoch 3")
        if kind == "interrupt":  # wait for the test's Ctrl-C
            print("ready", flush=True)
            import time
            time.sleep(60)
        if kind == "exit":
            sys.exit(7)
        if kind == "message":
            sys.exit("stopping: out of patience")

    print(json.dumps({"argv": sys.argv, "name": __name__, "cwd": os.getcwd(), "path0": sys.path[0],
                      "file": __file__}))
    train_and_test()
    if len(sys.argv) > 1:
        fail(sys.argv[1])
''')


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "sub" / "train.py"
    path.parent.mkdir()
    path.write_text(SCRIPT)
    return path


def _run(args, cwd, guard: bool):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(["-m", "harness.guard"] if guard else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _traceback(stderr: str) -> str:
    return stderr.split("mode guard:", 1)[0]


@pytest.mark.parametrize("ending", ["exit", "crash"])
def test_the_script_runs_as_python_would_run_it(script, tmp_path, ending):
    """Same stdout (argv, __name__, cwd, sys.path[0], __file__), same traceback, same exit status;
    the report comes after, on stderr."""
    args = ["sub/train.py", ending, "--lr", "0.1"]
    plain, guarded = _run(args, tmp_path, guard=False), _run(args, tmp_path, guard=True)
    assert guarded.stdout == plain.stdout
    seen = json.loads(plain.stdout)
    assert seen["argv"] == args[:1] + args[1:] and seen["name"] == "__main__"
    assert seen["cwd"] == str(tmp_path) and seen["path0"] == str(script.parent)
    assert guarded.returncode == plain.returncode == (7 if ending == "exit" else 1)
    assert _traceback(guarded.stderr) == plain.stderr
    if ending == "crash":
        assert plain.stderr.startswith("Traceback (most recent call last):\n  File \"")
        assert "harness" not in plain.stderr and "runpy" not in _traceback(guarded.stderr)
    report = guarded.stderr[len(plain.stderr):]
    assert report.startswith("mode guard: 1 finding in train.py") and "eval_in_train_mode" in report


def test_ctrl_c_ends_the_guarded_script_as_it_ends_python(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ended = []
    for guard in (False, True):
        cmd = [sys.executable, *(["-m", "harness.guard"] if guard else []), "sub/train.py", "interrupt"]
        # A shell's background job (CI started with '&') inherits SIGINT ignored; a terminal's Ctrl-C
        # reaches a process that has it at its default, so give the script that.
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while p.stdout.readline().strip() != "ready":
            pass
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        ended.append((p.returncode, err))
    (plain_rc, plain_err), (guarded_rc, guarded_err) = ended
    # Python ends by SIGINT, or exits 1 once torch's optimizers are imported (an exit handler of theirs)
    assert guarded_rc == plain_rc and plain_rc in (1, -signal.SIGINT)
    assert _traceback(guarded_err) == plain_err and plain_err.endswith("KeyboardInterrupt\n")
    assert "eval_in_train_mode" in guarded_err


def test_report_file_and_fail(script, tmp_path, capsys):
    report = tmp_path / "guard.json"
    assert main(["--report", str(report), str(script)]) == 0  # findings alone do not fail the run
    rep = json.loads(report.read_text())
    assert rep["exit_status"] == 0 and rep["script"] == str(script) and rep["args"] == []
    (finding,) = rep["findings"]
    assert finding["kind"] == "eval_in_train_mode" and finding["modules"] == ["model.1"]
    assert finding["count"] == 1 and list(finding["sites"].values()) == [1]
    assert finding["sites"] and next(iter(finding["sites"])).endswith("train.py:15")
    assert rep["models"] == [{"name": "model", "class": "Sequential", "updated_by": ["opt"],
                              "forwards": {"train": 3, "eval": 1, "eval_grad": 0}}]
    assert main(["--fail", str(script)]) == EXIT_FINDINGS
    assert main(["--fail", "--allow", "eval_in_train_mode", str(script)]) == 0
    assert main(["--fail", "--report", str(report), str(script), "crash"]) == 1  # the script's own status
    assert json.loads(report.read_text())["exit_status"] == 1
    assert json.loads(report.read_text())["findings"]  # seen before the crash, reported after it
    assert main([str(script), "message"]) == 1
    assert "stopping: out of patience" in capsys.readouterr().err


def test_the_report_lands_where_the_user_meant_even_if_the_script_changes_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored after the test, whatever the script does
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cd.py").write_text("import os\nos.chdir('elsewhere')\n")
    assert main(["--report", "r.json", "cd.py"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["exit_status"] == 0
    assert not (tmp_path / "elsewhere" / "r.json").exists()


def test_options_after_the_script_belong_to_the_script(script, tmp_path, capsys):
    assert main([str(script), "--fail", "--report", str(tmp_path / "r.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["argv"][1:] == ["--fail", "--report", str(tmp_path / "r.json")]
    assert not (tmp_path / "r.json").exists()
    assert main(["--", str(script)]) == 0


def test_a_syntax_error_in_the_script_is_the_scripts_failure(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nfor epoch in range(3)\n    pass\n")
    assert main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "SyntaxError" in err and "broken.py" in err and "mode guard:" in err


@pytest.mark.parametrize("argv, says", [
    ([], "no script given"),
    (["missing.py"], "no such script: missing.py"),
    (["data.csv"], "data.csv is not a Python script"),
    (["folder"], "folder is a folder without a __main__.py"),
    (["--bogus", "ok.py"], "unrecognized arguments: --bogus"),
    (["--allow", "mc_dropuot", "ok.py"], "--allow mc_dropuot: unknown kind"),
    (["--report", "nowhere/r.json", "ok.py"], "--report nowhere/r.json: no such directory"),
    (["--report"], "expected one argument"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("epoch,loss\n1,0.5\n")  # valid Python syntax, as it happens
    (tmp_path / "folder").mkdir()
    (tmp_path / "ok.py").write_text("open('ran', 'w').write('yes')\n")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: error: ") and says in err, err
    assert not (tmp_path / "ran").exists()  # the script never started
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "folder", "ok.py"]  # nothing half-written
