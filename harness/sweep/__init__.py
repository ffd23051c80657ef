"""Sweeping a spec with Optuna: ``python -m harness.sweep``.

``cli`` is the command, ``context`` what every process of a sweep opens, ``space`` the search space,
sampler and pruner, ``study`` the Optuna side (trial slots, stale trials, ranking), ``parent`` the MLflow
side (the parent run and the trials' child runs), ``worker`` the loop that runs trials, ``report`` the
end-of-sweep summary, ``storage`` and ``dbretry`` where the study lives, ``doctor`` the storage checks.
"""
