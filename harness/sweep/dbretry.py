"""Riding out a dropped database connection (a PostgreSQL restart, a failover) in a sweep.

SQLAlchemy's ``pool_pre_ping`` replaces a pooled connection that died while idle, but an operation that
runs while the server restarts, or that finds it still starting up, fails with ``OperationalError``
(Optuna wraps some of them in ``StorageInternalError``). Here every Optuna storage operation, and the
sweep's advisory lock, is retried with backoff for up to :data:`RETRY_S` seconds; a database that stays
away longer ends the sweep with one :class:`~harness.errors.StoreError` line (re-running the same command
resumes the study).

Retrying an operation whose commit reached the server but whose answer was lost is harmless for the
upserts (params, attributes, intermediate values, heartbeats); for ``set_trial_state_values`` the retry
finds the trial finished and Optuna raises ``UpdateFinishedTrialError``, which the sweep handles. Only
``create_new_trial`` could, in that narrow window, leave one extra RUNNING trial without a worker.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

from optuna.storages import RDBStorage

from harness.errors import StoreError, first_line

log = logging.getLogger("harness.sweep")

RETRY_S = 60.0


def is_disconnect(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is a lost or refused database connection."""
    import sqlalchemy.exc

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, sqlalchemy.exc.OperationalError):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if type(e).__name__ in ("OperationalError", "InterfaceError") and \
                type(e).__module__.split(".")[0] in ("psycopg2", "psycopg", "pymysql", "MySQLdb"):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def call_with_retry(fn: Callable[..., Any], *args: Any, what: str = "the Optuna storage",
                    **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, again after a lost connection, for up to :data:`RETRY_S` seconds."""
    import tenacity

    def warn_once(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            log.warning("%s: lost the database connection; retrying for up to %.0f s", what, RETRY_S)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_disconnect), stop=tenacity.stop_after_delay(RETRY_S),
        wait=tenacity.wait_exponential(multiplier=0.25, max=5.0), before_sleep=warn_once)
    try:
        return retrying(fn, *args, **kwargs)
    except tenacity.RetryError as gave_up:
        e = gave_up.last_attempt.exception()
        raise StoreError(f"{what}: the database has not answered for {RETRY_S:.0f} s "
                         f"({first_line(e)}); when it is back, run the same command again to "
                         f"resume") from None


class RetryingRDBStorage(RDBStorage):
    """Optuna's ``RDBStorage`` whose operations ride out a database restart (see the module doc)."""


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return call_with_retry(method, self, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
              "set_trial_param", "get_trial_param", "set_trial_state_values",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
              "get_trial_user_attrs", "get_trial_system_attrs", "get_best_trial", "get_n_trials",
              "record_heartbeat", "_get_stale_trial_ids",
              # what Optuna's _CachedStorage calls on the storage it wraps
              "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials"):
    if hasattr(RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))


@contextlib.contextmanager
def pg_advisory_lock(engine, key: int) -> Iterator[None]:
    """PostgreSQL's session advisory lock ``key``, taken through a database restart. If the connection
    dies while the lock is held, the server has released it already: the unlock is skipped.

    ``engine`` may pool its connections: one goes back to the pool only after its unlock succeeded;
    any other way out (an error, Ctrl-C mid-query) closes it, and its session's locks end with it."""
    import sqlalchemy

    def acquire():
        conn = engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except BaseException:
            _discard(conn)
            raise
        return conn

    conn = call_with_retry(acquire, what="the sweep's lock on the Optuna storage")
    unlocked = False
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            unlocked = True
        except Exception as e:
            if not is_disconnect(e):
                raise
        finally:
            if unlocked:
                with contextlib.suppress(Exception):
                    conn.close()  # back to the pool, its session holding nothing
            else:
                _discard(conn)


def _discard(conn) -> None:
    """Close ``conn``'s database session for good (not back to a pool): what it held is released."""
    with contextlib.suppress(Exception):
        conn.invalidate()
    with contextlib.suppress(Exception):
        conn.close()
