"""Where the wall time of ``python -m harness.train`` goes: imports, store, data, sanity step, training,
test, model log, exit; and how much of it is neither torch's import nor training and validation.

    python benchmarks/startup.py                          # 5 rounds on experiments/digits_lenet.yaml
    python benchmarks/startup.py --rounds 9 -- train.log_model=false

Each round, in a fresh temporary folder with its own SQLite store: ``python -c "import torch"`` (torch's
own import, in a process of its own), then the real command twice: the first creates the store (MLflow's
schema migrations, once per store), the second finds it, as every later command does. The command runs
unchanged under a thin wrapper (this file, ``--child``) that only times, from outside, the functions a
run goes through (an import hook wraps them as their modules load; nothing else is patched). Phases are
the main thread's: work overlapped on another thread shows up only where the main thread waits for it.

Printed: every round as it ends; a table of phases (median, min-max over rounds) for the second command;
and the result: wall time minus (torch import + training + validation), where training and validation
are the run's own ``time/train_epoch_s`` and ``val/seconds`` summed over its epochs (goal: <= 2 s).
The load average is printed at the start, every round and at the end.

The floor, measured every round too: the same spec run by ``harness.run.run`` with the in-memory tracker
(no MLflow: no import, no store, no model log) in a process of its own, and the same difference for it:
what no way of tracking, in this process or another, could take off the command.
"""
from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "digits_lenet.yaml"
IMPORTS = ("torch", "mlflow", "mlflow.pytorch", "torch._dynamo", "sklearn", "pytorch_lightning", "optuna",
           "pandas", "torchvision", "scipy")
WRAP = {  # module: functions (Class.method) timed as they run
    "harness.spec.load": ["load_spec"],
    "harness.tracking.store": ["setup_mlflow"],
    "harness.core.data": ["load_data"],
    "harness.core.loop": ["sanity_check"],
    "harness.epochs": ["train_epochs"],
    "harness.run": ["build", "run", "_log_start", "_tracked"],
    "harness.tracking.mlflow_tracker": ["MlflowTracker.log_model", "MlflowTracker.log_datasets"],
}


# -- the child: harness.train, timed from outside ------------------------------------------------------

def floor_child(argv: list[str], out: Path) -> None:
    """The spec run with nothing tracked: harness.train's own steps, an in-memory tracker for MLflow."""
    from harness.core.device import prepare_threads

    prepare_threads()
    from harness.spec import load_spec

    spec = load_spec(argv[0], [a for a in argv[1:] if a != "--quiet"])
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    h = run(spec, tracker=MemoryTracker(), progress=False).history
    out.write_text(json.dumps({"train+val": sum(h.get("time/train_epoch_s", [])) + sum(h.get("val/seconds", [])),
                               "mlflow imported": "mlflow" in sys.modules}))


def child(argv: list[str], out: Path) -> None:
    marks: list[tuple[str, str, float, float]] = []  # (what, thread, start, end), seconds since t0
    t0 = float(os.environ["STARTUP_T0"])  # the parent's clock just before it started this process
    now = time.time

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = now()
            try:
                result = fn(*a, **k)
            finally:
                marks.append((name, threading.current_thread().name, t - t0, now() - t0))
            if name == "harness.run.run":
                h = result.history
                marks.append(("train+val", "metrics", 0.0,
                              sum(h.get("time/train_epoch_s", [])) + sum(h.get("val/seconds", []))))
            return result
        return wrapper

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in IMPORTS and name not in WRAP:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run_module = spec.loader.exec_module

            def exec_module(module):
                t = now()
                run_module(module)
                marks.append((f"import {name}", threading.current_thread().name, t - t0, now() - t0))
                for qual in WRAP.get(name, ()):
                    owner, attr = module, qual
                    if "." in qual:
                        cls, attr = qual.split(".")
                        owner = getattr(module, cls)
                    setattr(owner, attr, timed(f"{name}.{qual}", getattr(owner, attr)))

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
    import runpy

    sys.argv = ["harness.train", *argv]
    marks.append(("python start-up", "MainThread", 0.0, now() - t0))
    code = 0
    try:
        runpy.run_module("harness.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code or 0
    marks.append(("main returned", "MainThread", now() - t0, now() - t0))
    out.write_text(json.dumps(marks))
    sys.stdout.flush()
    raise SystemExit(code)


# -- the parent ------------------------------------------------------------------------------------------

def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def timed_command(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"startup.py: {' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def run_child(role: str, work: Path, argv: list[str], env: dict) -> tuple[object, float]:
    """This file as ``--child`` (harness.train, timed) or ``--floor-child`` (nothing tracked) in ``work``:
    what it wrote and its wall time."""
    out = work / f"{role}.json"
    env = {**env, "STARTUP_T0": repr(time.time())}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, f"--{role}", str(out), "--", *argv], cwd=work, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"startup.py: {role} failed ({r.returncode}):\n{r.stdout[-1000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text()), wall


def one_command(work: Path, argv: list[str], env: dict) -> dict[str, float]:
    """The phases of one harness.train command (main thread, seconds) and its wall time."""
    return phases(*run_child("child", work, argv, env))


def phases(marks: list, wall: float) -> dict[str, float]:
    main = {}
    for name, thread, start, end in marks:
        if thread in ("MainThread", "metrics"):
            main.setdefault(name, (start, end))  # the first call (evaluate, load_data: the run's own)
    imports = {n[7:]: e - s for n, th, s, e in marks if n.startswith("import ") and th == "MainThread"}

    def at(name, end=False):
        return main[name][1 if end else 0] if name in main else None

    run_s, run_e = at("harness.run.run"), at("harness.run.run", True)
    spec_e = at("harness.spec.load.load_spec", True)
    build_s, build_e = at("harness.run.build"), at("harness.run.build", True)
    data = main["harness.core.data.load_data"]
    logstart_s, logstart_e = at("harness.run._log_start"), at("harness.run._log_start", True)
    sanity = main.get("harness.core.loop.sanity_check", (0.0, 0.0))
    dataset = main.get("harness.tracking.mlflow_tracker.MlflowTracker.log_datasets", (0.0, 0.0))
    epochs_s, epochs_e = at("harness.epochs.train_epochs"), at("harness.epochs.train_epochs", True)
    model = main.get("harness.tracking.mlflow_tracker.MlflowTracker.log_model")
    tracked_e = at("harness.run._tracked", True)
    returned = at("main returned")
    train_val = main["train+val"][1]
    setup = main.get("harness.tracking.store.setup_mlflow", (run_s, run_s))
    tracked_s = at("harness.run._tracked")
    out = {
        "python start-up": at("python start-up", True),
        "spec (harness CLI, pydantic, YAML)": spec_e - at("python start-up", True),
        "imports before the run (torch, harness)": run_s - spec_e,
        "mlflow import + store check": setup[1] - setup[0],
        "data": data[1] - data[0],
        "model, optimizer": (build_e - build_s) - (data[1] - data[0]),
        "MLflow run created (guard, git, run)": tracked_s - build_e,
        "params, spec, dataset input": (logstart_e - logstart_s) - (sanity[1] - sanity[0]),
        "  of which the dataset input": dataset[1] - dataset[0],
        "sanity step": sanity[1] - sanity[0],
        "training + validation (run's metrics)": train_val,
        "per-epoch bookkeeping (metrics, checkpoints, ledger)": (epochs_e - epochs_s) - train_val,
        "test split, final metrics": (model[0] if model else tracked_e) - epochs_e,
        "model log": (model[1] - model[0]) if model else 0.0,
        "run ended": run_e - tracked_e,
        "final lines": returned - run_e,
        "exit (interpreter shutdown)": wall - returned,
        "wall": wall,
    }
    out.update({f"import {k}": v for k, v in imports.items()})
    out["train+val"] = train_val
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[3:], Path(argv[1]))
    if argv[:1] == ["--floor-child"]:
        return floor_child(argv[3:], Path(argv[1]))
    p = argparse.ArgumentParser(prog="python benchmarks/startup.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--spec", default=str(SPEC), help="experiment spec (default experiments/digits_lenet.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, after --")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends like Ctrl-C
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [args.spec, *args.overrides, "--quiet"]
    print(f"python -m harness.train {' '.join(cmd)}: {args.rounds} round(s); {load()}", flush=True)
    first, later, torch_s, floor = [], [], [], []
    t0 = time.perf_counter()
    try:
        for rnd in range(1, args.rounds + 1):
            with tempfile.TemporaryDirectory(prefix="harness-startup-") as tmp:
                work = Path(tmp)
                env_r = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
                torch_s.append(timed_command([sys.executable, "-c", "import torch"], work, env_r))
                first.append(one_command(work, cmd, env_r))
                later.append(one_command(work, cmd, env_r))
                floor.append(floor_command(work, cmd, env_r))
            f, s = first[-1], later[-1]
            print(f"  round {rnd}: import torch {torch_s[-1]:.2f} s; first command {f['wall']:.2f} s (store "
                  f"created), next {s['wall']:.2f} s, of which training + validation {s['train+val']:.2f} s; "
                  f"untracked {floor[-1]['wall']:.2f} s; {load()}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    except KeyboardInterrupt:
        print("startup.py: interrupted; the results so far:", file=sys.stderr, flush=True)
    if floor:
        report(first[:len(floor)], later[:len(floor)], torch_s[:len(floor)], floor)
    print(f"{load()} at the end")
    return 0


def floor_command(work: Path, argv: list[str], env: dict) -> dict:
    """The wall time and training + validation of the spec run with nothing tracked."""
    out, wall = run_child("floor-child", work, argv, env)
    return {**out, "wall": wall}


def report(first: list[dict], later: list[dict], torch_s: list[float], floor: list[dict]) -> None:
    n = len(later)
    print(f"\nthe second command's wall time by phase (main thread), seconds over {n} round(s): median (min-max)")
    keys = [k for k in later[0] if k not in ("wall", "train+val") and not k.startswith("import ")]
    for k in keys:
        print(f"  {k:55s} {spread([r.get(k, 0.0) for r in later])}")
    print(f"  {'wall':55s} {spread([r['wall'] for r in later])}")
    print(f"  {'first command (creates the store)':55s} {spread([r['wall'] for r in first])}")
    print("imports on the main thread (cumulative, each inside the phase that needed it):")
    for k in sorted({k for r in later for k in r if k.startswith("import ")}):
        print(f"  {k:55s} {spread([r.get(k, 0.0) for r in later])}")
    alone = "import torch in a process of its own"
    print(f"  {alone:55s} {spread(torch_s)}")
    rest = [r["wall"] - t - r["train+val"] for r, t in zip(later, torch_s)]
    m = statistics.median(rest)
    print(f"RESULT wall - (torch import + training + validation) = {m:.2f} s, median of {n} "
          f"({min(rest):.2f}-{max(rest):.2f}) (goal <= 2 s: {'met' if m <= 2 else 'NOT met'}); "
          f"wall {statistics.median(r['wall'] for r in later):.2f} s")
    bare = [r["wall"] - t - r["train+val"] for r, t in zip(floor, torch_s)]
    print(f"FLOOR the same spec with nothing tracked (in-memory tracker; MLflow imported: "
          f"{any(r['mlflow imported'] for r in floor)}): wall - (torch import + training + validation) = "
          f"{statistics.median(bare):.2f} s ({min(bare):.2f}-{max(bare):.2f}); wall "
          f"{statistics.median(r['wall'] for r in floor):.2f} s")


if __name__ == "__main__":
    sys.exit(main())
