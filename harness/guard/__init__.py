"""The mode guard: finds mode bugs (``model.eval()`` forgotten, ``model.train()`` called once,
``zero_grad()`` forgotten, ...) at run time, in the harness's loop or in anyone's.

    from harness.guard import ModeGuard          # phases marked by the loop (the harness's own)
    guard = ModeGuard(model)
    with guard.phase("train"): ...
    with guard.phase("val"): ...
    report = guard.end_epoch(epoch)

    from harness.guard import watch              # no markers: phases inferred from what the loop does
    guard = watch(model)
    ...any training loop...
    print(guard.format())

``python -m harness.guard SCRIPT [args...]`` runs any training script under the watcher.
Torch only: never MLflow or Optuna (the harness logs what it finds through its own tracker).
"""
from harness.guard.detector import FINDINGS, ROOT, ModeGuard, ModeGuardError
from harness.guard.watch import Watcher, watch

__all__ = ["FINDINGS", "ROOT", "ModeGuard", "ModeGuardError", "Watcher", "watch"]
