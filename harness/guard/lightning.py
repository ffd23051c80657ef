"""The mode guard as a Lightning callback (``pip install -e ".[lightning]"``)::

    from harness.guard.lightning import ModeGuardCallback
    trainer = pl.Trainer(callbacks=[ModeGuardCallback()], logger=MLFlowLogger(...))

It watches the LightningModule with the phase-inferring detector (Lightning's own loop needs no
markers) and records what it finds in every logger of the trainer: ``mode_guard/findings`` per epoch
(the number of modules flagged in that epoch, step = epoch, 1-based), and the modules per finding kind
as ``mode_guard.<kind>`` (tags of the MLflow run with MLFlowLogger, hyperparameters with any other
logger): the names and values ``python -m harness.train`` writes. Imports Lightning, never MLflow: an
MLFlowLogger is reached through its own client, ``logger.experiment``.
"""
from __future__ import annotations

import logging

try:  # the standalone package (what the extra installs), else the unified one
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import MLFlowLogger
except ImportError:  # pragma: no cover - depends on what is installed
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

from harness.guard.detector import FINDINGS, ROOT
from harness.guard.watch import Watcher

log = logging.getLogger("harness.guard")


class ModeGuardCallback(pl.Callback):
    """``allow``: finding kinds to accept, and ``mc_dropout``; see :class:`harness.guard.Watcher`.
    After a stage, ``summary`` holds ``{kind: [modules]}`` over everything watched so far."""

    def __init__(self, allow=()):
        super().__init__()
        self.allow = tuple(allow)
        Watcher.check_allow(self.allow)
        self.watcher: Watcher | None = None
        self.summary: dict[str, list[str]] = {}
        self.epochs: list[int] = []  # the count logged for each training epoch, in order

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.watcher is None:
            self.watcher = Watcher(pl_module, allow=self.allow, name=ROOT)  # the harness's module names

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.watcher is not None:
            count = self._record(trainer, self.watcher.end_epoch())
            self.epochs.append(count)
            self._log(trainer, {"mode_guard/findings": count}, step=trainer.current_epoch + 1)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish(trainer)  # a run that dies (a NaN, Ctrl-C) still records what was seen

    def _finish(self, trainer) -> None:
        """Close the watcher; findings after the last training epoch (validate, test) join it."""
        if self.watcher is None:
            return
        watcher, self.watcher = self.watcher, None
        watcher.close()
        report = watcher.end_epoch()
        if report["count"]:
            self._record(trainer, report)
            step = max(trainer.current_epoch, 1) if self.epochs else 1
            self._log(trainer, {"mode_guard/findings": report["count"]}, step=step)

    def _record(self, trainer, report: dict) -> int:
        """Merge an epoch's findings into ``summary``; tag the kinds whose modules changed."""
        new = {}
        for kind, modules in report["findings"].items():
            merged = sorted(set(self.summary.get(kind, ())) | set(modules))
            if merged != self.summary.get(kind):
                if kind not in self.summary:
                    log.warning("mode guard: %s: %s", FINDINGS[kind], ", ".join(modules))
                self.summary[kind] = new[kind] = merged
        if new and trainer.is_global_zero:
            tags = {f"mode_guard.{k}": ",".join(v) for k, v in new.items()}
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    for key, value in tags.items():
                        logger.experiment.set_tag(logger.run_id, key, value)
                else:
                    logger.log_hyperparams(tags)
        return report["count"]

    @staticmethod
    def _log(trainer, metrics: dict, step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
