"""The Tracker interface a run logs through, and an in-memory tracker.

A tracker is one run's record: ``start()`` opens the run and always ends it in a final state
(FINISHED, FINISHED for a run stopped on purpose, KILLED on Ctrl-C/SIGTERM, FAILED on anything else);
in between the run logs params, metrics (buffered until :meth:`flush`), tags, artifacts, its input data
and its final model. ``harness.tracking.mlflow_tracker.MlflowTracker`` is the real one; the
:class:`MemoryTracker` here keeps everything in dicts, so the loop and the run's composition are tested
without any store.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Protocol

from harness.core.loop import Stopped

_ids = itertools.count(1)


@dataclass
class RunSnapshot:
    """What a run already holds, read before resuming it."""
    status: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    last_steps: dict[str, int] = field(default_factory=dict)  # per metric key, its last logged step
    has_model: bool = False  # a whole final model is logged already


class Tracker(Protocol):
    run_id: str | None

    def start(self, *, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None, resume: bool = False,
              system_metrics: bool | None = None) -> ContextManager["Tracker"]: ...
    def log_params(self, params: dict[str, Any], tags: dict[str, Any] | None = None) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, splits: list[tuple[str, Any, Any, str]], *, source: str) -> None: ...
    def log_model(self, model, input_example, params: dict[str, Any] | None = None) -> None: ...
    def download_artifact(self, artifact_path: str, dst_dir: str | Path) -> Path: ...
    def flush(self) -> None: ...
    def in_background(self) -> ContextManager[None]: ...
    def reachable(self) -> bool: ...
    def snapshot(self) -> RunSnapshot: ...


def final_status(e: BaseException | None) -> str:
    """The status a run ends with when ``e`` (None: nothing) leaves it."""
    if e is None or isinstance(e, Stopped):
        return "FINISHED"
    return "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"


class MemoryTracker:
    """Keeps everything in dicts: for tests and for code that wants the numbers without a store."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id
        self.status: str | None = None
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}
        self.datasets: list[dict] = []
        self.model = None

    @contextlib.contextmanager
    def start(self, *, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None, resume: bool = False,
              system_metrics: bool | None = None) -> Iterator["MemoryTracker"]:
        if not resume:
            self.run_id = self.run_id or f"memory-{next(_ids)}"
            self.tags.update({"experiment": experiment, "run_name": run_name or "",
                              "parent_run_id": parent_run_id or ""})
            self.set_tags(tags or {})
        self.status = "RUNNING"
        try:
            yield self
        except BaseException as e:
            self.status = final_status(e)
            raise
        self.status = final_status(None)

    def log_params(self, params: dict[str, Any], tags: dict[str, Any] | None = None) -> None:
        self.params.update(params)
        self.set_tags(tags or {})

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

    def log_datasets(self, splits: list[tuple[str, Any, Any, str]], *, source: str) -> None:
        for name, _x, y, context in splits:
            self.datasets.append({"name": name, "source": source, "context": context, "n": len(y)})

    def log_model(self, model, input_example, params: dict[str, Any] | None = None) -> None:
        self.model = model

    def download_artifact(self, artifact_path: str, dst_dir: str | Path) -> Path:
        from harness.errors import UserError

        if artifact_path not in self.artifacts:
            raise UserError(f"run {self.run_id}: no artifact {artifact_path}")
        dst = Path(dst_dir) / Path(artifact_path).name
        data = self.artifacts[artifact_path]
        dst.write_bytes(data if isinstance(data, bytes) else str(data).encode())
        return dst

    def flush(self) -> None:
        pass

    def in_background(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def reachable(self) -> bool:
        return True

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(self.status or "RUNNING", {k: param_str(v) for k, v in self.params.items()},
                           dict(self.tags),
                           {k: max(step for step, _ in v) for k, v in self.metrics.items() if v},
                           has_model=self.model is not None)


def param_str(v: Any) -> str:
    """A param as the store keeps it: a string (lists as JSON)."""
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)
