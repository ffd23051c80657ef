"""What every process of a sweep (the command itself and each worker) resolves once: the spec and its
search space, the Optuna study, the MLflow experiment and the parent run's id."""
from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from harness.epochs import EPOCH_METRICS
from harness.errors import SpecError
from harness.run import build
from harness.spec import Spec, load_spec
from harness.sweep import space as sp
from harness.sweep import storage as sto
from harness.sweep import study as st
from harness.tracking import store


@dataclass
class Context:
    """What every sweep process (the main one and each worker) resolves once."""
    spec: Spec
    spec_path: str
    overrides: list[str]
    space: dict
    study: optuna.Study
    study_name: str
    storage_url: str | None
    experiment_id: str
    n_trials: int
    timeout: float | None = None
    retry_failed: bool = False
    workers: int = 1
    sampler: str = "tpe"
    pruner: str = "median"
    label: str = ""
    quiet: bool = False
    log_models: bool = False  # each trial logs its final model (--log-models)
    parent_run_id: str = ""
    _data: dict = field(default_factory=dict)

    def lock(self):
        return sto.storage_lock(self.storage_url)


def open_context(args, label: str = "", on_stale=None) -> Context:
    """Load the spec, open (or create) the study and set up MLflow; user mistakes are UserErrors.
    ``on_stale(study, trial)`` handles each trial the RDB heartbeat finds dead."""
    spec = load_spec(args.spec, args.overrides)
    if spec.search.metric not in EPOCH_METRICS:
        raise SpecError(f"search.metric: {spec.search.metric!r} is not a metric a run logs every epoch; "
                        f"choose one of {', '.join(m for m in EPOCH_METRICS if 'peak' not in m)}")
    space = sp.distributions(spec)
    n_trials = args.n_trials
    if args.sampler == "grid":
        n_trials = min(n_trials, sp.grid_size(space))
    # The spec built once (data, model, optimizer) before any store is touched: a model or dataset
    # factory that fails does so here, in one line, with no parent run made; the data serves trial 1.
    parts = build(spec)
    store.setup_mlflow()  # checked, not created: nothing is made until both stores answer
    storage = sto.optuna_storage(
        args.storage, args.workers, heartbeat_interval=args.heartbeat or sto.HEARTBEAT_INTERVAL_S,
        on_stale=on_stale)
    exp_id = store.experiment_id(spec.name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = args.study or st.default_study_name(spec)
    with sto.quiet_experimental():
        study = st.open_study(name, storage, spec, sp.make_sampler(args.sampler, spec, space),
                              sp.make_pruner(args.pruner, spec))
    ctx = Context(spec=spec, spec_path=str(args.spec), overrides=list(args.overrides), space=space,
                   study=study, study_name=name, storage_url=args.storage, experiment_id=exp_id,
                   n_trials=n_trials, timeout=args.timeout, retry_failed=args.retry_failed,
                   workers=args.workers,
                   sampler=args.sampler, pruner=args.pruner, label=label, quiet=args.quiet,
                   log_models=getattr(args, "log_models", False))
    ctx._data[data_key(spec)] = parts.data
    return ctx


def data_key(spec: Spec) -> tuple:
    """Trials whose data settings agree share the loaded data."""
    return (spec.data.model_dump_json(), spec.seed, spec.train.device)
