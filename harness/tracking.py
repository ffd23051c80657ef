"""The Tracker interface the harness logs through, an MLflow tracker (batched) and an in-memory one.

Metrics are buffered and sent with ``log_batch`` when :meth:`flush` is called (the run flushes once per
epoch): one synchronous ``log_metric`` costs ~10 ms on SQLite and ~45 ms against a server.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...


class MemoryTracker:
    """Keeps everything in dicts: for tests and for code that wants the numbers without a store."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.metrics[k].append((step, float(v)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.artifacts[artifact_file] = data

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts[artifact_file] = text

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        name = Path(local_path).name
        self.artifacts[f"{artifact_path}/{name}" if artifact_path else name] = Path(local_path).read_bytes()

    def flush(self) -> None:
        pass


class MlflowTracker:
    """Logs to one MLflow run through ``MlflowClient.log_batch`` (chunked to MLflow's limits)."""

    MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self._metrics: list = []

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), self.MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + self.MAX_PARAMS], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._metrics) >= 10 * self.MAX_METRICS:  # bound the buffer on very long epochs
            self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), self.MAX_TAGS):
            self.client.log_batch(self.run_id, tags=items[i:i + self.MAX_TAGS], synchronous=True)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def flush(self) -> None:
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), self.MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i:i + self.MAX_METRICS], synchronous=True)


def _param_str(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="harness-")
