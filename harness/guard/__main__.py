"""python -m harness.guard [--report FILE] [--allow KIND,...] [--fail] SCRIPT [args...]

Runs a PyTorch training script unchanged, as ``python SCRIPT args`` would (same ``sys.argv``,
``__main__``, working directory, exit status), with the mode guard watching every model it calls, then
prints what the guard found on stderr. The script's own output, traceback and exit status are kept.
"""
from __future__ import annotations

import argparse
import builtins
import importlib.machinery
import json
import os
import runpy
import signal
import sys
import tempfile
import traceback
import types

from harness.cli import user_errors
from harness.errors import UserError
from harness.guard.verdict import format_report
from harness.guard.watch import ALLOWABLE, Watcher

PROG = "python -m harness.guard"
EXIT_FINDINGS = 3
_TAKES_VALUE = ("--report", "--allow")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see {PROG} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=f"{PROG} [--report FILE] [--allow KIND,...] [--fail] SCRIPT [args...]",
                description="Run a PyTorch training script unchanged under the mode guard; print what "
                            "it found at exit. Options end at SCRIPT: the rest is the script's.",
                epilog=f"kinds to --allow: {', '.join(ALLOWABLE)}. Exit status: the script's own; "
                       f"with --fail, {EXIT_FINDINGS} when the script succeeded and the guard found something.")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--allow", metavar="KIND,...", action="append", default=[],
                   help="accept these findings (mc_dropout: dropout on at evaluation, on purpose)")
    p.add_argument("--fail", action="store_true", help=f"exit {EXIT_FINDINGS} on findings (for CI)")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, str, list[str]]:
    """Our options, the script, the script's arguments: option parsing stops at the script's path."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        if argv[i] == "--":
            argv = argv[:i] + argv[i + 1:]
            break
        i += 2 if argv[i] in _TAKES_VALUE else 1
    opts = _parser().parse_args(argv[:i])
    rest = argv[i:]
    if not rest:
        raise UserError(f"no script given: {PROG} [options] SCRIPT [args...]")
    opts.allow = [k.strip() for a in opts.allow for k in a.split(",") if k.strip()]
    bad = [k for k in opts.allow if k not in ALLOWABLE]
    if bad:
        raise UserError(f"--allow {bad[0]}: unknown kind; choose from {', '.join(ALLOWABLE)}")
    _check_script(rest[0])
    if opts.report:
        folder = os.path.dirname(os.path.abspath(opts.report))
        if not os.path.isdir(folder):
            raise UserError(f"--report {opts.report}: no such directory {folder}")
        opts.report = os.path.abspath(opts.report)  # where the user meant, even if the script chdir()s
    return opts, rest[0], rest[1:]


def _check_script(path: str) -> None:
    """What cannot be a training script: a missing file, a folder without ``__main__.py``, a file that
    is neither a ``.py`` file nor an executable with a ``python`` shebang (a CSV or YAML file given by
    mistake, which Python would try to run). A ``.py`` file with a syntax error is the script's own
    failure: Python's traceback, exit 1."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "__main__.py")):
            raise UserError(f"{path} is a folder without a __main__.py: give the training script")
        return
    if not os.path.isfile(path):
        raise UserError(f"no such script: {path}")
    if path.endswith((".py", ".pyw")):
        return
    with open(path, "rb") as f:
        first = f.readline(200)
    if not (first.startswith(b"#!") and b"python" in first):  # an executable Python script
        raise UserError(f"{path} is not a Python script: give the .py file that trains the model")


def run_script(path: str, args: list[str]) -> int:
    """``python path args`` in this process; the exit status it would have (``-SIGINT`` after Ctrl-C,
    as ``subprocess`` reports it). A failure's traceback is printed as Python prints it (from the
    script's first frame on)."""
    saved = sys.argv, sys.path[0]
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # the script's folder first, as with python
    try:
        if os.path.isdir(path):
            runpy.run_path(path, run_name="__main__")
        else:
            _exec_main(os.path.abspath(path))
        return 0
    except SystemExit as e:
        return _exit_status(e.code)
    except BaseException as e:  # noqa: BLE001 - every failure of the script is reported as Python would
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__):
            tb = tb.tb_next
        sys.stdout.flush()
        traceback.print_exception(type(e), e, tb)
        return -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1
    finally:
        sys.argv, sys.path[0] = saved


def _exec_main(path: str) -> None:
    """Run the file as the ``__main__`` module, as ``python path`` does (``runpy.run_path`` would set
    ``sys.argv[0]`` to the absolute path): classes defined there pickle as ``__main__.X``."""
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)  # not this module's __future__ flags
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = saved


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1


def write_report(path: str, report: dict) -> None:
    """Whole or not at all: written beside its destination, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=".guard-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    with user_errors(PROG):
        opts, script, args = parse(list(sys.argv[1:] if argv is None else argv))
    watcher = Watcher(allow=opts.allow)
    try:
        status = run_script(script, args)
    finally:
        watcher.close()
    report = {"script": script, "args": args, "exit_status": status, **watcher.report()}
    sys.stdout.flush()
    print(format_report(report, os.path.basename(script)), file=sys.stderr)
    if opts.report:
        write_report(opts.report, report)
    if status == 0 and opts.fail and report["findings"]:
        return EXIT_FINDINGS
    return status


if __name__ == "__main__":
    code = main()
    if code == -signal.SIGINT:
        # End as Python ends after Ctrl-C (killed by SIGINT, so a calling shell stops too, or exit 1
        # where torch's exit handlers change that): let Python handle an interrupt of its own, its
        # traceback already printed.
        sys.excepthook = lambda *exc: None
        raise KeyboardInterrupt
    sys.exit(code)
