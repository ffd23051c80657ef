"""The MLflow tracker: one MLflow run's life (start, final status, a tracking server that goes away) and
everything logged to it, batched.

Metrics are buffered and sent with ``log_batch`` when :meth:`MlflowTracker.flush` is called (the run
flushes once per epoch): one synchronous ``log_metric`` costs ~10 ms on SQLite and 5-15 ms against a
server here (~50 ms where each answer waits for a delayed ACK: ``harness.tracking.connections``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, ContextManager, Iterator

from harness import failpoints
from harness.cli import check_interrupt, sigterm_as_interrupt, temp_env
from harness.core.loop import Diverged, Stopped
from harness.errors import UserError
from harness.tracking import store, sysmetrics
from harness.tracking.logged_models import ready
from harness.tracking.sender import Sender
from harness.tracking.tracker import RunSnapshot, final_status, param_str

log = logging.getLogger("harness.tracking")


class MlflowTracker:
    """Logs to one MLflow run through ``MlflowClient.log_batch`` (chunked to MLflow's limits).

    ``MlflowTracker(run_id)`` refers to an existing run (to resume it, or to log to it without
    starting it); ``start()`` opens a new run (or resumes ``run_id``) as MLflow's active run."""

    MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100

    def __init__(self, run_id: str | None = None):
        store.setup_mlflow()  # checked here; a local store is created by the first run, not before
        self.run_id = run_id
        self._client = self._repo = self._artifact_uri = None
        self._metrics: list = []
        self._send = Sender()  # requests to the store: now, or in the background in order

    @property
    def client(self):
        if self._client is None:  # MLflow creates a local database on first contact
            from mlflow import MlflowClient

            self._client = MlflowClient()
        return self._client

    # -- the run's life --------------------------------------------------------------------------
    @contextlib.contextmanager
    def start(self, *, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None, resume: bool = False,
              system_metrics: bool | None = None) -> Iterator["MlflowTracker"]:
        """The run as MLflow's active run, always ended in a final state: FINISHED (also when stopped
        on purpose), FAILED on an exception, KILLED on Ctrl-C or SIGTERM. Never left RUNNING, short of
        SIGKILL (a sweep's next start or ``--resume`` mends that) or a tracking server that is gone
        (the run stays RUNNING there for ``--resume``; the error says so in one line).

        ``system_metrics`` None: on unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``."""
        import mlflow

        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        def begin(again: bool = False):
            # System metrics are sampled here (harness.tracking.sysmetrics), not by MLflow's start_run:
            # its monitor drops the samples of the last interval, so short runs had none.
            # The parent goes in as MLflow's own tag: given as parent_run_id, start_run first asks the
            # store for the parent run (a request to a tracking server for every trial of a sweep).
            tagged = {k: str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                tagged[MLFLOW_PARENT_RUN_ID] = parent_run_id
            return mlflow.start_run(
                run_id=self.run_id if resume else None,
                experiment_id=None if resume else store.experiment_id(experiment, again=again),
                run_name=None if resume else run_name, nested=parent_run_id is not None,
                tags=None if resume else tagged, log_system_metrics=False)

        with _server_gone_is_clear(self), sigterm_as_interrupt():
            try:
                active = begin()
            except MlflowException as e:  # the experiment this process knew was deleted since
                if resume or e.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                    raise
                active = begin(again=True)
            self.run_id, self._artifact_uri = active.info.run_id, active.info.artifact_uri
            if resume:
                self._discard_unfinished_models()
            else:
                failpoints.reach("after_run_created")
            error: BaseException | None = None
            with sysmetrics.sampling(self.run_id, on=system_metrics, resume=resume) as last_sample:
                try:
                    yield self
                    check_interrupt()  # a signal Python swallowed meanwhile: the run ends KILLED
                except BaseException as e:
                    error = e
                    raise
                finally:
                    late = self._send.settle(quietly=error is not None)
                    if error is None and late is None:
                        last_sample()  # sent while the run is ended
                    _end_run(final_status(error or late))
                    if late is not None and error is None:
                        raise late

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any], tags: dict[str, Any] | None = None) -> None:
        """``params`` (and ``tags``, if any) in as few requests as MLflow's limits allow: one, usually."""
        from mlflow.entities import Param, RunTag

        items = [Param(k, param_str(v)) for k, v in params.items()]
        extra = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        riding = extra if items and len(extra) <= self.MAX_TAGS else []  # the tags sent with the params
        for i in range(0, len(items), self.MAX_PARAMS):
            self._send(self.client.log_batch, self.run_id, params=items[i:i + self.MAX_PARAMS],
                       tags=riding if i == 0 else [], synchronous=True)
        if extra and not riding:
            self.set_tags(tags)

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
            self._send(self.client.log_batch, self.run_id, tags=items[i:i + self.MAX_TAGS], synchronous=True)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        folder = Path(artifact_file).parent

        def put() -> None:
            with tempfile.TemporaryDirectory(prefix="harness-artifact-") as tmp:
                path = Path(tmp) / Path(artifact_file).name
                path.write_text(text, encoding="utf-8")
                self._artifacts().log_artifact(str(path), None if folder == Path(".") else folder.as_posix())

        self._send(put)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._send(lambda: self._artifacts().log_artifact(str(local_path), artifact_path))

    def _artifacts(self):
        """The run's artifact repository, from the artifact URI its start returned (MlflowClient asks the
        store for the run again first: a request to a tracking server per run)."""
        if self._repo is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            uri = self._artifact_uri or self.client.get_run(self.run_id).info.artifact_uri
            self._repo = get_artifact_repository(uri, tracking_uri=store.tracking_uri())
        return self._repo

    def flush(self) -> None:
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), self.MAX_METRICS):
            self._send(self.client.log_batch, self.run_id, metrics=pending[i:i + self.MAX_METRICS], synchronous=True)

    def in_background(self) -> ContextManager[None]:
        """What is logged inside goes out in the background (:class:`~harness.tracking.sender.Sender`)."""
        return self._send.background()

    def snapshot(self) -> RunSnapshot:
        self._send.wait()
        store.require_existing(store.tracking_uri())
        run = self.client.get_run(self.run_id)
        last = {}
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            last[key] = max(steps) if steps else 0
        return RunSnapshot(run.info.status, dict(run.data.params), dict(run.data.tags), last,
                           has_model=any(ready(m) for m in self._models(run.info.experiment_id)))

    def _models(self, experiment_id: str) -> list:
        return list(self.client.search_logged_models([experiment_id],
                                                     filter_string=f"source_run_id = '{self.run_id}'"))

    def _discard_unfinished_models(self) -> None:
        """A model whose logging was cut short (the process died) is deleted; the resume logs it again."""
        for m in self._models(self.client.get_run(self.run_id).info.experiment_id):
            if not ready(m):
                self.client.delete_logged_model(m.model_id)

    def reachable(self) -> bool:
        """False when the tracking server is gone: logging more would retry for minutes, then fail."""
        return not store.tracking_server_down()

    def log_datasets(self, splits: list[tuple[str, Any, Any, str]], *, source: str) -> None:
        """Splits ``(name, x, y, context)`` as the run's MLflow dataset inputs, in one request (a nicety:
        never fails the run). ``source``: an absolute path (the files the data was read from) or the code
        that made it (a factory call)."""
        def put() -> None:
            import mlflow
            from mlflow.data.code_dataset_source import CodeDatasetSource
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "the source can be interpreted in multiple ways"
                    src = Path(source).as_uri() if Path(source).is_absolute() else \
                        CodeDatasetSource({"mlflow.source.name": source, "mlflow.source.type": "LOCAL"})
                    inputs = [DatasetInput(mlflow.data.from_numpy(x, targets=y, name=name, source=src)._to_mlflow_entity(),
                                           [InputTag(MLFLOW_DATASET_CONTEXT, context)]) for name, x, y, context in splits]
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as e:
                log.debug("dataset inputs not logged: %s", e)

        self._send(put)

    def log_model(self, model, input_example, params: dict[str, Any] | None = None) -> None:
        """The final model as a LoggedModel (:func:`harness.tracking.logged_models.log_model`)."""
        from harness.tracking.logged_models import log_model

        self._send.wait()
        log_model(self.client, self.run_id, model, input_example, params)

    def download_artifact(self, artifact_path: str, dst_dir: str | Path) -> Path:
        """One artifact of this run into ``dst_dir`` (no progress bar: a refusal stays one line)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            with temp_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
                return Path(mlflow.artifacts.download_artifacts(
                    run_id=self.run_id, artifact_path=artifact_path, dst_path=str(dst_dir)))
        except MlflowException as e:
            raise UserError(f"run {self.run_id}: no {artifact_path} in it "
                            f"({str(e).splitlines()[0][:100]})") from None


def _end_run(status: str) -> None:
    """``mlflow.end_run``; when a failed run's tracking server is gone, end it here at once (the
    server keeps it RUNNING until ``--resume``) instead of retrying for minutes over the first error."""
    import mlflow

    if status != "FINISHED" and store.tracking_server_down():
        with temp_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
            try:
                mlflow.end_run(status)
            except Exception:  # the run is off this process's stack; the server could not be told
                pass
        return
    mlflow.end_run(status)


@contextlib.contextmanager
def _server_gone_is_clear(tracker: MlflowTracker) -> Iterator[None]:
    """A run whose tracking server stopped answering (after MLflow's own retries, ~4 min by default:
    a server back within that window is not noticed) ends with one clear
    :class:`~harness.errors.TrackingServerGone`."""
    try:
        yield
    except (UserError, Stopped, Diverged):
        raise
    except Exception as e:
        if not store.tracking_server_down():
            raise
        if tracker.run_id is None:
            raise store.server_gone_error("before the run started") from e
        raise store.server_gone_error(
            f"during run {tracker.run_id} (what it logged before is kept there)",
            then=f"continue it with --resume {tracker.run_id} (a sweep: run the same command "
                 f"again)") from e
