"""harness/dbretry.py without a server: what counts as a lost connection, retry then give up with one
line. (The real thing, PostgreSQL restarted mid-sweep, is in test_postgres.py.)"""
from __future__ import annotations

import pytest
import sqlalchemy.exc

from harness.sweep import dbretry
from harness.errors import StoreError

pytestmark = pytest.mark.filterwarnings("ignore")


def _dropped() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))


def test_what_counts_as_a_lost_connection():
    import optuna

    assert dbretry.is_disconnect(_dropped())
    try:  # Optuna wraps commit errors; the cause decides
        try:
            raise _dropped()
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("commit failed") from e
    except optuna.exceptions.StorageInternalError as wrapped:
        assert dbretry.is_disconnect(wrapped)
    assert not dbretry.is_disconnect(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("dup")))
    assert not dbretry.is_disconnect(ValueError("bad value"))
    assert not dbretry.is_disconnect(None)


def test_retries_until_the_database_is_back(monkeypatch):
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise _dropped()
        return x * 2

    assert dbretry.call_with_retry(flaky, 21) == 42 and len(calls) == 3


def test_other_errors_are_not_retried(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        dbretry.call_with_retry(broken)
    assert calls == [1]


def test_gives_up_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(dbretry, "RETRY_S", 0.0)

    def down():
        raise _dropped()

    with pytest.raises(StoreError) as e:
        dbretry.call_with_retry(down, what="the Optuna storage postgresql://u:***@db/optuna")
    msg = str(e.value)
    assert "\n" not in msg and "has not answered" in msg and "run the same command again" in msg


def test_retrying_storage_is_a_working_rdb_storage(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = dbretry.RetryingRDBStorage(f"sqlite:///{tmp_path}/o.db", heartbeat_interval=5)
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.trials) == 3
    assert isinstance(study._storage._backend, dbretry.RetryingRDBStorage)  # Optuna's cache wraps it
