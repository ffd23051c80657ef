"""Training a run, torch only: data, models, mode policies, the loop, checkpoints, RNG and device.

Nothing here imports MLflow, Optuna, ``harness.tracking`` or ``harness.sweep`` (a contract the tests
enforce): the loop reports to callbacks and ``harness.run`` wires it to a tracker."""
