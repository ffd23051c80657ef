"""The storage doctor: checks the Optuna storage and the MLflow store a sweep would use, before it starts.

    python -m harness.doctor [--storage URL] [--workers K] [--study NAME]
    python -m harness.sweep --check-storage ...     (the same checks, the sweep's own options)

Checks, one clear line per problem: each store is reachable; its schema is ready (or absent and
creatable: the first sweep creates it) and of this Optuna / MLflow version; SQLite is not used with
several workers; no trial is left stale in state RUNNING; Optuna and MLflow do not share one database.
Exit status 0 when all is well, 2 when there are problems. Nothing is written to either store.
URLs are printed with their passwords masked.
"""
from __future__ import annotations

import argparse
import os
import sys

from harness.cli import Parser
from harness.errors import mask_url
from harness.sweep import storage as sto
from harness.sweep.doctor_checks import (GRACE_PERIOD_S, MLFLOW_TABLES, OPTUNA_TABLES, STALE_AFTER_S,
                                         Report, Schema, alembic_revision, check_database,
                                         check_optuna)

# -- MLflow ------------------------------------------------------------------------------------------

def check_mlflow(uri: str | None = None) -> Report:
    from harness.tracking import store

    uri = uri or store.tracking_uri()
    name = f"MLflow store {mask_url(uri)}"
    r = Report()
    if uri.startswith(("http://", "https://")):
        return _check_mlflow_server(uri, name)
    if uri.startswith("file:") or "://" not in uri:
        r.problems.append(f"{name}: the old file store; MLflow 3.13+ refuses it: use sqlite:///mlflow.db "
                          f"(the default) or a tracking server")
        return r
    if uri.startswith("databricks"):
        r.ok.append(f"{name}: not checked (Databricks)")
        return r
    return check_database(uri, name, MLFLOW_SCHEMA, local=uri.startswith("sqlite"),
                           ready=lambda: Report(ok=[f"{name}: reachable, schema ready"]))


def _mlflow_schema(engine) -> tuple[str, str | None]:
    from mlflow.store.db.utils import _get_latest_schema_revision

    current = alembic_revision(engine)
    return _get_latest_schema_revision(), current


MLFLOW_SCHEMA = Schema(
    tool="MLflow", tables=frozenset(MLFLOW_TABLES),
    other_tool="Optuna", other_tables=frozenset(OPTUNA_TABLES), creator="run",
    cannot_create="no MLflow tables yet, and this user may not create tables in schema public",
    upgrade="mlflow db upgrade <URI>", versions=_mlflow_schema)


def _check_mlflow_server(uri: str, name: str) -> Report:
    from harness.errors import StoreError
    from harness.tracking import store

    r = Report()
    try:
        store.check_tracking_server(uri)
    except StoreError:
        r.problems.append(f"{name}: tracking server not reachable (no answer on /health); start it "
                          f"(scripts/servers.sh start) or fix MLFLOW_TRACKING_URI")
        return r
    # /health answers without the database; a real API call also checks the server's backend store.
    import requests

    try:
        resp = requests.post(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                             json={"max_results": 1}, timeout=15, auth=_basic_auth(uri))
    except requests.RequestException as e:
        r.problems.append(f"{name}: the tracking server does not answer API calls ({type(e).__name__})")
        return r
    if resp.status_code in (401, 403):
        r.problems.append(f"{name}: the tracking server refuses our credentials (HTTP {resp.status_code}); "
                          f"set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    elif resp.status_code != 200:
        r.problems.append(f"{name}: the tracking server answers /health but its API fails "
                          f"(HTTP {resp.status_code}): is its backend database up?")
    else:
        r.ok.append(f"{name}: tracking server reachable, its backend store answers")
        slow = store.slow_keepalive(uri)
        if slow:
            r.warnings.append(slow)
    return r


def _basic_auth(uri: str):
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parts.username
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
    return (user, password) if user and password else None


# -- together ----------------------------------------------------------------------------------------

def check(storage: str | None = None, tracking_uri: str | None = None, *, workers: int = 1,
          study: str | None = None, grace_period: int = GRACE_PERIOD_S,
          stale_after: int = STALE_AFTER_S) -> Report:
    """Every check; nothing is written to either store."""
    from harness.tracking import store

    storage = storage or sto.DEFAULT_OPTUNA_JOURNAL
    tracking_uri = tracking_uri or store.tracking_uri()
    r = check_optuna(storage, workers=workers, study=study, grace_period=grace_period,
                     stale_after=stale_after)
    r.extend(check_mlflow(tracking_uri))
    if sto.optuna_storage_kind(storage) == "rdb" and not tracking_uri.startswith(("http://", "https://",
                                                                       "postgresql", "mysql")):
        r.warnings.append(f"the Optuna storage is shared but the MLflow store {mask_url(tracking_uri)} is "
                          f"local to this machine: workers on other machines cannot log under the same "
                          f"parent run; set MLFLOW_TRACKING_URI to the team's mlflow server")
    if sto.optuna_storage_kind(storage) == "rdb" and storage == tracking_uri:
        r.problems.append("the Optuna storage and the MLflow store are the same database; give each "
                          "its own")
    return r


def print_report(r: Report, file=sys.stdout) -> None:
    for line in r.ok:
        print(f"ok: {line}", file=file)
    for line in r.warnings:
        print(f"warning: {line}", file=file)
    for line in r.problems:
        print(f"problem: {line}", file=file)
    n = len(r.problems)
    print(f"storage doctor: {'no problems' if not n else f'{n} problem' + ('s' if n > 1 else '')}",
          file=file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="python -m harness.doctor",
        description="Check the Optuna storage and the MLflow store (MLFLOW_TRACKING_URI) before a sweep: "
                    "reachable, schema ready, SQLite not used with several workers, no stale RUNNING "
                    "trials. Exit status 2 when there are problems. Writes nothing. "
                    "Also: python -m harness.sweep [SPEC] [options] --check-storage.")
    p.add_argument("spec", nargs="?", help="the sweep's spec: only its study's trials are looked at "
                                           "(default: every study in the storage)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the sweep's spec overrides")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default mlruns/optuna.journal)")
    p.add_argument("--workers", type=int, default=1, help="workers the sweep will run on this machine")
    p.add_argument("--study", help="only look at this study's trials")
    p.add_argument("--heartbeat", type=int, default=None, metavar="S",
                   help="the sweep's heartbeat interval; stale after 3x (default "
                        f"{sto.HEARTBEAT_INTERVAL_S}, i.e. {GRACE_PERIOD_S} s)")
    p.add_argument("--grace-period", type=int, default=None, metavar="S",
                   help="seconds without heartbeat before a RUNNING trial is stale")
    p.add_argument("--stale-after", type=int, default=STALE_AFTER_S, metavar="S",
                   help="a RUNNING trial without heartbeat whose worker cannot be checked from here is "
                        f"reported after S seconds (default {STALE_AFTER_S})")
    # The sweep's other options, so `python -m harness.sweep ... --check-storage` can hand over its argv.
    for opt in ("--n-trials", "--timeout", "--pruner", "--sampler", "--worker-index"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    for flag in ("--retry-failed", "--quiet"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if args.spec is not None and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.spec)
        args.spec = None
    if args.grace_period is None:
        args.grace_period = 3 * args.heartbeat if args.heartbeat else GRACE_PERIOD_S
    return args


def _study_of(spec_path: str, overrides: list[str]) -> str | None:
    """The study a sweep of this spec uses by default (``<spec name>-<spec hash>``)."""
    from harness.spec import load_spec
    from harness.sweep.study import default_study_name

    return default_study_name(load_spec(spec_path, overrides))


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.doctor``; returns 0 (all well) or 2 (problems)."""
    args = parse_args(argv)
    import logging

    from harness.cli import setup_logging, user_errors

    setup_logging()
    logging.getLogger("sqlalchemy").setLevel(logging.ERROR)
    with user_errors("harness.doctor"):
        study = args.study or (_study_of(args.spec, args.overrides) if args.spec else None)
        report = check(args.storage, workers=args.workers, study=study, grace_period=args.grace_period,
                       stale_after=args.stale_after)
    print_report(report)
    return 2 if report.problems else 0

