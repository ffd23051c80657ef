"""The mode guard: finds mode bugs (``model.eval()`` forgotten, ``model.train()`` called once,
``zero_grad()`` forgotten, ...) at run time, in the harness's loop or in anyone's.

    from harness.guard import ModeGuard
    guard = ModeGuard(model)
    with guard.phase("train"): ...
    with guard.phase("val"): ...
    report = guard.end_epoch(epoch)

Torch only: never MLflow or Optuna (the harness logs what it finds through its own tracker).
"""
from harness.guard.detector import FINDINGS, ROOT, ModeGuard, ModeGuardError

__all__ = ["FINDINGS", "ROOT", "ModeGuard", "ModeGuardError"]
