"""A run's final model as an MLflow LoggedModel: logged from the active run, with the run's params and its
final val/* and test/* metrics linked to it, so the experiment's Models page can rank models."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from harness.tracking.tracker import param_str


def log_model(client, run_id: str, model, input_example, params: dict[str, Any] | None = None) -> None:
    """``model`` as a LoggedModel of the active run ``run_id``, named after the run (pickle format: MLflow
    3's default pt2 export needs more), with ``params``, and its final val/* and test/* metrics linked to
    it (each with the dataset it was measured on)."""
    import mlflow
    import torch

    name = model_name(mlflow.active_run().info.run_name or "model")
    flavor = mlflow_pytorch()
    # The pickle format is chosen on purpose: MLflow's warning about it on every model is noise.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Explicit requirements: MLflow's inference of them imports the model in a subprocess (~6 s).
        info = flavor.log_model(
            model, name=name, input_example=input_example, serialization_format="pickle",
            params={k: param_str(v) for k, v in (params or {}).items()} or None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    link_metrics(client, run_id, info.model_id)


def link_metrics(client, run_id: str, model_id: str, keys=("val/acc", "val/loss", "test/acc", "test/loss")) -> None:
    """The last value of each of ``keys`` logged again with the model's id and its dataset: the same
    key, step, time and value, so the run's own history gains no point (MLflow keeps one row)."""
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    splits = {"validation": "val", "test": "test"}
    data = {}
    for d in run.inputs.dataset_inputs:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "")
        if context in splits:
            data[splits[context]] = (d.dataset.name, d.dataset.digest)
    linked = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        ds_name, ds_digest = data.get(key.split("/")[0], (None, None))
        linked.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id,
                             dataset_name=ds_name, dataset_digest=ds_digest))
    if linked:
        client.log_batch(run_id, metrics=linked, synchronous=True)


def model_name(run_name: str) -> str:
    """A LoggedModel's name from its run's (MLflow refuses / : . % and quotes in model names)."""
    clean = "".join("-" if ch in '/:.%"\'' else ch for ch in run_name).strip("-")
    return clean or "model"


def ready(model) -> bool:
    return getattr(model.status, "value", model.status) == "READY"


def mlflow_pytorch():
    """``mlflow.pytorch``, imported without its Lightning autologging callback: where Lightning is
    installed, that import loads Lightning, torchmetrics and scipy.signal, 2.5-4 s of every run's end for a
    class the harness never uses (``mlflow.pytorch.autolog`` imports Lightning itself when called). An
    import that already happened, or the callback imported first by someone else, is left as it is."""
    if "mlflow.pytorch" in sys.modules:
        return sys.modules["mlflow.pytorch"]
    callback = "mlflow.pytorch._lightning_autolog"
    block = callback not in sys.modules
    if block:
        sys.modules[callback] = None  # its import raises ImportError, which mlflow.pytorch expects
    try:
        import mlflow.pytorch
    finally:
        if block and sys.modules.get(callback, "") is None:
            del sys.modules[callback]
    return mlflow.pytorch
