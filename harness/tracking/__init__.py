"""Tracking a run: the Tracker interface, its MLflow and in-memory implementations, and the MLflow store.

The MLflow run's whole life (start, final status, a tracking server that goes away, the dataset input,
the logged model) is here; ``harness.run`` only talks to a :class:`~harness.tracking.tracker.Tracker`."""
