"""The Optuna side of a sweep: the search space, sampler and pruner built from the spec, the study, and
the trial slots that several workers share. No MLflow here; ``harness.sweep`` links the two.

What counts toward ``--n-trials``: trials that finished with a result, COMPLETE and PRUNED (a diverged
trial is PRUNED). FAIL trials (a crash, a killed worker) do not count, so a study always ends with
``--n-trials`` informative trials; RUNNING trials count as reserved while their worker lives.
"""
from __future__ import annotations

import math
import os
import platform
import warnings
from collections import Counter
from typing import Any, Callable, ContextManager

import numpy as np
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from harness.spec import SearchParam, Spec, SpecError
from harness.stores import StoreError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
RESERVED = COUNTED + (TrialState.RUNNING,)
MEDIAN_STARTUP_TRIALS = 5  # the median pruner needs a few whole curves before it judges others
GRID_MAX_POINTS = 10_000


# -- search space ------------------------------------------------------------------------------------

def distributions(spec: Spec) -> dict[str, BaseDistribution]:
    """The spec's ``search.params`` as Optuna distributions; a bad block is a :class:`SpecError` naming
    the key. Both ends of every range are checked against the spec's own field rules up front, so no
    trial fails halfway through a sweep for a value the spec would refuse."""
    out: dict[str, BaseDistribution] = {}
    for key, p in spec.search.params.items():
        where = f"search.params.{key}"
        try:
            out[key] = _distribution(p)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{where}: {e}") from None
        for end in _ends(out[key]):
            try:
                spec.with_overrides({key: end})
            except SpecError as e:
                raise SpecError(f"{where}: the value {end!r} in the search range is not valid for the "
                                f"spec ({str(e).split(': ', 1)[-1]}); narrow the range") from None
    if not out:
        raise SpecError("search.params: nothing to search; declare at least one parameter")
    return out


def _distribution(p: SearchParam) -> BaseDistribution:
    if p.type == "categorical":
        return CategoricalDistribution(list(p.choices or ()))
    if p.type == "int":
        if p.low != int(p.low) or p.high != int(p.high) or (p.step is not None and p.step != int(p.step)):
            raise ValueError("an int parameter needs whole-number low, high and step")
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)


def _ends(d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high]  # type: ignore[attr-defined]


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every point of a grid search: choices, every int step, every float step."""
    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif isinstance(d, IntDistribution):
            out[key] = list(range(d.low, d.high + 1, d.step))
        elif d.step is not None:  # type: ignore[union-attr]
            n = int(round((d.high - d.low) / d.step)) + 1  # type: ignore[union-attr]
            out[key] = [float(round(d.low + i * d.step, 12)) for i in range(n)]  # type: ignore[union-attr]
        else:
            raise SpecError(f"search.params.{key}: the grid sampler needs a 'step' or 'choices' for "
                            f"a float parameter (or use --sampler tpe)")
    size = math.prod(len(v) for v in out.values())
    if size > GRID_MAX_POINTS:
        raise SpecError(f"search.params: the grid has {size} points (more than {GRID_MAX_POINTS}); "
                        f"use larger steps or --sampler tpe")
    return out


# -- sampler and pruner -----------------------------------------------------------------------------

class PerTrialSeedSampler(BaseSampler):
    """Reseeds the wrapped sampler from (spec seed, trial number) before every trial.

    One worker replays the same proposals for the same seed and history; several workers (processes
    or machines) draw from different streams instead of proposing the same random points."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)

    def trial_seed(self, number: int) -> int:
        return int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])

    def before_trial(self, study, trial):
        self._inner = self._factory(self.trial_seed(trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        if isinstance(self._inner, optuna.samplers.GridSampler):
            return  # it calls study.stop(), which only works inside optimize(); we cap n_trials instead
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(name: str, spec: Spec, space: dict[str, BaseDistribution]) -> BaseSampler:
    if name == "random":
        factory: Callable[[int], BaseSampler] = lambda s: optuna.samplers.RandomSampler(seed=s)  # noqa: E731
    elif name == "grid":
        points = grid(space)
        factory = lambda s: optuna.samplers.GridSampler(points, seed=s)  # noqa: E731
    else:
        # constant_liar: a RUNNING trial counts as a bad result, so parallel workers spread out.
        factory = lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True)  # noqa: E731
    return PerTrialSeedSampler(factory, spec.seed)


def make_pruner(name: str, spec: Spec) -> optuna.pruners.BasePruner:
    epochs = spec.train.epochs
    if name == "median":
        # Judge from the second epoch on: the first epoch's val/acc mostly measures the init.
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=1 if epochs > 2 else 0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def grid_size(space: dict[str, BaseDistribution]) -> int:
    return math.prod(len(v) for v in grid(space).values())


# -- the study ----------------------------------------------------------------------------------------

def default_study_name(spec: Spec) -> str:
    """Same spec and overrides -> same study, so re-running a command resumes it."""
    return f"{spec.name}-{spec.hash()[:8]}"


def open_study(name: str, storage, spec: Spec, sampler: BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study or join it; a study made for another spec is refused (its trials would not be
    comparable)."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=spec.search.direction, load_if_exists=True)
    if study.direction.name.lower() != spec.search.direction:
        raise StoreError(f"--study {name}: that study {study.direction.name.lower()}s, the spec's "
                         f"search.direction is {spec.search.direction}; use another --study name")
    attrs = study.user_attrs
    if "spec_hash" not in attrs:
        study.set_user_attr("spec_hash", spec.hash())
        study.set_user_attr("spec_name", spec.name)
        study.set_user_attr("metric", spec.search.metric)
        study.set_user_attr("spec_yaml", spec.to_yaml())
    elif attrs["spec_hash"] != spec.hash():
        raise StoreError(f"--study {name}: that study was made for another spec (hash "
                         f"{attrs['spec_hash']}, this one is {spec.hash()}); pass the same spec and "
                         f"overrides to resume it, or choose a new --study name")
    return study


def counts(study: optuna.Study) -> Counter:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def n_counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# -- workers and stale trials ---------------------------------------------------------------------------

def this_worker(label: str = "") -> dict[str, Any]:
    """Who runs a trial (its user attribute ``worker``): host, pid and the process start time, so a
    reused pid is not mistaken for the worker. ``harness.doctor`` reads the same record."""
    import psutil

    return {"host": platform.node(), "pid": os.getpid(),
            "started": round(psutil.Process().create_time(), 2), "label": label}


def worker_alive(worker: dict[str, Any] | None) -> bool | None:
    """Whether a recorded worker is alive: True/False on this host, None when it cannot be told from
    here (another host, or no worker recorded)."""
    import psutil

    if not worker or worker.get("host") != platform.node() or not worker.get("pid"):
        return None
    try:
        proc = psutil.Process(int(worker["pid"]))
        started = float(worker.get("started") or proc.create_time())
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return None


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker on this machine is gone (killed, crashed). Trials of workers on
    other machines are left to the RDB heartbeat."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if worker_alive(t.user_attrs.get("worker")) is False]


def stale_reason(trial: FrozenTrial) -> str:
    w = trial.user_attrs.get("worker") or {}
    return f"stale: its worker {w.get('host')}:{w.get('pid')} is gone"


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with a reason; False if another process finished it first."""
    storage = study._storage
    try:
        # The reason first: a finished trial's attributes can no longer be written.
        storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


MAX_RETRIES = 3  # params that kill their worker every time are not queued forever


def retried_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the trials already queued again (Optuna's retry records them in the new trial)."""
    return {n for t in study.get_trials(deepcopy=False)
            for n in t.system_attrs.get("retry_history", [])}


def retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a FAIL trial's params again (Optuna's own retry callback), unless already queued."""
    if not trial.params or trial.number in retried_numbers(study):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
    return True


def reserve(study: optuna.Study, space: dict[str, BaseDistribution], n_trials: int,
            lock: Callable[[], ContextManager], worker: dict[str, Any],
            on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> optuna.Trial | None:
    """The next trial for this worker, or None when ``n_trials`` are finished or reserved.

    Counting and asking happen under the storage's lock, so concurrent workers never overshoot; stale
    trials (dead local workers; heartbeat-stale ones on RDB) are failed first and handed to
    ``on_stale``. The trial's params (the spec overrides) are sampled here, in ``trial.params``."""
    with lock():
        for t in stale_trials(study):
            if fail_trial(study, t, stale_reason(t)):
                on_stale(study, study._storage.get_trial(t._trial_id))
        fail_heartbeat_stale(study)
        if len(study.get_trials(deepcopy=False, states=RESERVED)) >= n_trials:
            return None
        with warnings.catch_warnings():
            # "Heartbeat ... supposed to be used with Study.optimize": the sweep beats itself.
            warnings.filterwarnings("ignore", message=".*Heartbeat.*", category=UserWarning)
            trial = study.ask(fixed_distributions=space)
        # Inside the lock: until these are written, another worker could take the trial for stale.
        for key, value in {"worker": worker, "mlflow_run_id": "", "failure_reason": ""}.items():
            trial.set_user_attr(key, value)
    return trial


def fail_heartbeat_stale(study: optuna.Study) -> None:
    """RDB storages: fail the trials whose heartbeat stopped; the storage's callback handles each."""
    storage = study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def finished_value(trial: FrozenTrial) -> float | None:
    """The value a trial is ranked by: its result, or for a pruned one its last reported value."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def best_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The ``k`` best COMPLETE trials, best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and not math.isnan(t.value)]
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")  # type: ignore[arg-type]
    return done[:k]


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def override_line(params: dict[str, Any]) -> str:
    """``optimizer.lr=0.0123 model.dropout=0.2``: paste after a spec path on the command line."""
    def one(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return " ".join(f"{k}={one(v)}" for k, v in params.items())
