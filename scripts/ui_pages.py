"""What a researcher sees in MLflow's UI, in a real browser: a small store made by the real commands (one
run, a sweep with a pruned trial, an ablation), ``mlflow ui`` serving it, and headless Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by Selenium) opening its pages.

Used by ``tests/test_browser.py`` (what the pages must show) and ``scripts/screenshots.py`` (the README's
pictures). Nothing here reaches the network: Chromium runs with its background networking off.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("HARNESS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HARNESS_CHROMEDRIVER", "/usr/bin/chromedriver")
# Headless, and nothing that phones home (Chromium otherwise tries Google's hosts and waits on them).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
SPEC = ROOT / "experiments" / "digits_lenet.yaml"
ABLATION = ROOT / "experiments" / "ablations" / "mode_bugs.yaml"
PRUNED_TRIAL = 2


@dataclass
class Store:
    """The ids of what :func:`make_store` made."""
    uri: str
    folder: Path
    experiment: str  # the sweep's and the run's experiment
    run: str  # python -m harness.train
    sweep_parent: str
    best_trial: str
    pruned_trial: str
    ablation_experiment: str
    ablation_parent: str


def make_store(folder: Path, *, epochs: int = 3, trials: int = 4, limit_train: int = 400, seeds: int = 2) -> Store:
    """Run, in ``folder``, what a new user runs first: ``harness.train``, a sweep of ``trials`` trials
    (trial 2 is pruned at epoch 2 by a pruner made for it, so every store shows one) and an
    ablation of two mode bugs over ``seeds`` seeds. ~45 s on 2 cores with the defaults."""
    fast = ["train.threads=1", f"data.limit_train={limit_train}"]
    import mlflow

    import harness.sweep.space
    from analysis.ablation import run_ablation
    from analysis.plan import load_ablation
    from harness.spec import load_spec
    from harness.sweep.cli import main as sweep
    from harness.train import main as train

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = os.getcwd()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI",)}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(folder)
    make_pruner = harness.sweep.space.make_pruner
    harness.sweep.space.make_pruner = lambda name, spec: PruneOne(PRUNED_TRIAL, step=2)
    try:
        assert train([str(SPEC), *fast, f"train.epochs={epochs}", "--quiet"]) == 0
        # Trials on all of digits, 12 epochs or more: ~1 s each, so each outlasts the shortest tail that
        # system metrics sample (harness.tracking.sysmetrics.MIN_TAIL_S) even on a fast machine.
        assert sweep([str(SPEC), "train.threads=1", f"train.epochs={max(epochs, 12)}", "train.log_model=false",
                      "--n-trials", str(trials), "--quiet"]) == 0
        run_ablation(load_ablation(ABLATION, [*fast, f"train.epochs={max(2, epochs // 2)}"], seeds=seeds,
                                   only=["no_eval", "no_zero_grad"]), echo=lambda *_: None)
    finally:
        harness.sweep.space.make_pruner = make_pruner
        os.chdir(here)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(load_spec(SPEC).name).experiment_id
    runs = client.search_runs([exp], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    abl = client.get_experiment_by_name(load_ablation(ABLATION).experiment).experiment_id
    (abl_parent,) = client.search_runs([abl], filter_string="tags.`ablation.role` = 'parent'")
    return Store(uri=uri, folder=folder, experiment=exp,
                 run=next(r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags
                          and "sweep.role" not in r.data.tags),
                 sweep_parent=parent.info.run_id, best_trial=parent.data.tags["best.mlflow_run_id"],
                 pruned_trial=next(r.info.run_id for r in runs
                                   if r.data.tags.get("optuna.trial_number") == str(PRUNED_TRIAL)),
                 ablation_experiment=abl, ablation_parent=abl_parent.info.run_id)


class PruneOne(optuna.pruners.BasePruner):
    """Prunes one trial at one step, and no other: a pruned trial in every demo store."""

    def __init__(self, number: int, step: int):
        self.number, self.step = number, step

    def prune(self, study, trial) -> bool:
        return trial.number == self.number and (trial.last_step or 0) >= self.step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: Store, timeout: float = 240) -> Iterator[str]:
    """``mlflow ui`` on the store (one worker), from the store's folder; its URL once ``/health``
    answers."""
    port = free_port()
    with _serving("mlflow-ui", [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store.uri,
                   "--default-artifact-root", str(store.folder / "mlruns"), "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1"],
                  store.folder, f"http://127.0.0.1:{port}", "/health", timeout) as url:
        yield url


@contextlib.contextmanager
def optuna_dashboard(store: Store, timeout: float = 120) -> Iterator[str]:
    """``optuna-dashboard`` on the store's Optuna journal; its URL once it answers."""
    port = free_port()
    script = Path(sys.executable).with_name("optuna-dashboard")
    with _serving("optuna-dashboard", [str(script) if script.exists() else "optuna-dashboard",
                                       "mlruns/optuna.journal", "--host", "127.0.0.1", "--port", str(port)],
                  store.folder, f"http://127.0.0.1:{port}", "/api/studies", timeout) as url:
        yield url


@contextlib.contextmanager
def _serving(name: str, cmd: list[str], cwd: Path, url: str, probe: str, timeout: float) -> Iterator[str]:
    """Start ``cmd`` in its own process group, wait until ``url + probe`` answers 200, yield ``url``;
    stop the group at the end."""
    log_path = cwd / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): "
                                       f"{log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url + probe, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer on {url} within {timeout:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium with a fresh profile, driven by Selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="harness-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, base: str, path: str, *, shows: str, timeout: float = 90) -> str:
    """Open ``base/path`` (an MLflow UI hash route) and wait until the page's text contains ``shows``
    (MLflow's UI is a React app: the first HTML is empty). The page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not driver.current_url.startswith(base):
        driver.get(base + "/")
        # Once per profile: MLflow's assistant panel closed, so the page has its full width.
        driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
    driver.get(f"{base}/{path}")
    text = {}

    def ready(d) -> bool:
        text["body"] = d.find_element(By.TAG_NAME, "body").text
        return shows in text["body"]

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(ready, f"{path}: never showed {shows!r}")
    time.sleep(0.5)  # let the last requests of the page settle before anyone looks
    return driver.find_element(By.TAG_NAME, "body").text
