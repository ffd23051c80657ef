#!/usr/bin/env bash
# The team set-up on one machine, as a recipe you can read: a PostgreSQL server for Optuna (and as the
# MLflow backend store) and one `mlflow server`, both bound to 127.0.0.1. CI uses this script as is.
#
#   scripts/servers.sh install     apt-get install postgresql (Debian/Ubuntu, as root) if missing
#   scripts/servers.sh start       start both (creating the database cluster on first use), wait until
#                                  they answer, then print the environment to use them
#   eval "$(scripts/servers.sh env)"   export HARNESS_PG_URL, PGPASSFILE, MLFLOW_TRACKING_URI, ...
#   scripts/servers.sh status | stop | restart-postgres | stop-mlflow | start-mlflow
#
# Everything lives under $HARNESS_SERVERS_DIR (default .servers/ at the repo root, ignored by git):
# the cluster's data, sockets, logs, pid files, the artifacts, and `pgpass`, the only place the
# generated database password is written. URLs carry no password: libpq reads it from PGPASSFILE.
# Ports: HARNESS_PG_PORT (default 5433, so a system PostgreSQL on 5432 is left alone) and
# HARNESS_MLFLOW_PORT (default 5055). As root, PostgreSQL runs as the `postgres` user.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HARNESS_SERVERS_DIR:-$ROOT/.servers}"
mkdir -p "$STATE" && STATE="$(cd "$STATE" && pwd)"
PG_PORT="${HARNESS_PG_PORT:-5433}"
MLFLOW_PORT="${HARNESS_MLFLOW_PORT:-5055}"
# One uvicorn worker: with more, uvicorn before 0.55 bound the socket so that asyncio left Nagle's
# algorithm on (uvicorn issue #3149) and every request on a kept-alive connection waited ~40 ms for a
# delayed ACK: measured here 48-84 ms a request with 2 workers, 2-15 ms with 1 (README 'Scaling out').
MLFLOW_WORKERS="${HARNESS_MLFLOW_WORKERS:-1}"
PG_USER=harness
OPTUNA_DB=harness_optuna
MLFLOW_DB=harness_mlflow
PGDATA="$STATE/pg/data"
PGSOCK="$STATE/pg/run"
PGPASS="$STATE/pgpass"
PYTHON="${PYTHON:-python}"

OPTUNA_URL="postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/$OPTUNA_DB"
MLFLOW_DB_URL="postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/$MLFLOW_DB"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"

say() { echo "servers.sh: $*" >&2; }
die() { say "error: $*"; exit 2; }

pg_bin() {  # directory holding initdb/pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/N/bin
    if command -v pg_ctl >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$d" ]] || die "PostgreSQL is not installed: run 'sudo scripts/servers.sh install' (or install it your way)"
    echo "$d"
}

as_pg() {  # PostgreSQL refuses to run as root: as root, run its tools as the postgres user
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_admin() { as_pg "$(pg_bin)/psql" -h "$PGSOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

cmd_install() {
    if ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
        say "PostgreSQL already installed"; return
    fi
    [[ $EUID -eq 0 ]] || die "install needs root: sudo scripts/servers.sh install"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    # Debian starts its own cluster on 5432; we use our own cluster, so leave that one stopped.
    pg_ctlcluster "$(ls /usr/lib/postgresql | sort -V | tail -n 1)" main stop 2>/dev/null || true
    say "PostgreSQL installed"
}

init_cluster() {
    [[ -f "$PGDATA/PG_VERSION" ]] && return
    say "creating a PostgreSQL cluster in $PGDATA"
    mkdir -p "$PGDATA" "$PGSOCK"
    [[ $EUID -eq 0 ]] && chown -R postgres: "$STATE/pg"
    chmod 700 "$PGDATA" "$PGSOCK"
    # Local socket (in a private directory): trust, for admin; TCP: passwords only (scram-sha-256).
    as_pg "$(pg_bin)/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >/dev/null
}

start_postgres() {
    init_cluster
    if as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        say "PostgreSQL already running on 127.0.0.1:$PG_PORT"
    else
        as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -l "$STATE/pg/postgres.log" -w -t 60 start \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PGSOCK -c max_connections=200" >/dev/null \
            || die "PostgreSQL did not start; see $STATE/pg/postgres.log"
    fi
    "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 30 || die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT"
    # The harness user, its password (kept only in pgpass, mode 600) and one database per tool:
    # Optuna and MLflow both keep an alembic_version table, so they cannot share a database.
    if [[ ! -s "$PGPASS" ]]; then
        local pw
        pw="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')"
        (umask 077; printf '127.0.0.1:%s:*:%s:%s\nlocalhost:%s:*:%s:%s\n' \
            "$PG_PORT" "$PG_USER" "$pw" "$PG_PORT" "$PG_USER" "$pw" > "$PGPASS")
    fi
    local pw
    pw="$(head -n 1 "$PGPASS" | cut -d: -f5-)"
    if [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'")" != 1 ]]; then
        psql_admin -c "CREATE ROLE $PG_USER LOGIN" >/dev/null
    fi
    # Passed on stdin, not the command line, so it never shows in `ps`.
    echo "ALTER ROLE $PG_USER PASSWORD '$pw'" | psql_admin >/dev/null
    for db in "$OPTUNA_DB" "$MLFLOW_DB"; do
        if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]]; then
            psql_admin -c "CREATE DATABASE $db OWNER $PG_USER" >/dev/null
        fi
    done
    say "PostgreSQL ready: $OPTUNA_URL (Optuna), $MLFLOW_DB_URL (MLflow)"
}

mlflow_pid() { [[ -f "$STATE/mlflow.pid" ]] && kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null && cat "$STATE/mlflow.pid"; }

wait_http() {  # wait_http URL SECONDS
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

start_mlflow() {
    if mlflow_pid >/dev/null; then
        say "mlflow server already running at $MLFLOW_URL"
    else
        mkdir -p "$STATE/mlartifacts"
        # setsid: its own process group, so `stop` ends the server and all its workers, nothing else.
        # Bound to 127.0.0.1 (never 0.0.0.0 here): see the README's 'Scaling out' to expose it safely.
        PGPASSFILE="$PGPASS" setsid nohup "$PYTHON" -m mlflow server \
            --backend-store-uri "$MLFLOW_DB_URL" \
            --artifacts-destination "$STATE/mlartifacts" \
            --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
            > "$STATE/mlflow.log" 2>&1 < /dev/null &
        echo $! > "$STATE/mlflow.pid"
    fi
    # The first start on an empty database runs MLflow's schema migrations (~15 s).
    wait_http "$MLFLOW_URL/health" "${HARNESS_MLFLOW_WAIT:-180}" \
        || { tail -n 20 "$STATE/mlflow.log" >&2; die "mlflow server did not answer $MLFLOW_URL/health; see $STATE/mlflow.log"; }
    say "mlflow server ready: $MLFLOW_URL (backend $MLFLOW_DB_URL, artifacts $STATE/mlartifacts)"
}

stop_mlflow() {
    local pid
    if pid="$(mlflow_pid)"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        say "mlflow server stopped"
    fi
    rm -f "$STATE/mlflow.pid"
}

stop_postgres() {
    if [[ -f "$PGDATA/PG_VERSION" ]] && as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
        say "PostgreSQL stopped"
    fi
}

cmd_env() {
    cat <<EOF
export HARNESS_SERVERS_DIR='$STATE'
export HARNESS_PG_PORT='$PG_PORT'
export HARNESS_MLFLOW_PORT='$MLFLOW_PORT'
export PGPASSFILE='$PGPASS'
export HARNESS_PG_URL='$OPTUNA_URL'
export HARNESS_MLFLOW_DB_URL='$MLFLOW_DB_URL'
export HARNESS_MLFLOW_URL='$MLFLOW_URL'
export MLFLOW_TRACKING_URI='$MLFLOW_URL'
EOF
}

cmd_status() {
    local rc=0
    if "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; then say "PostgreSQL: up on 127.0.0.1:$PG_PORT"
    else say "PostgreSQL: down"; rc=1; fi
    if wait_http "$MLFLOW_URL/health" 2; then say "mlflow server: up at $MLFLOW_URL"
    else say "mlflow server: down"; rc=1; fi
    return $rc
}

# Keep git out of the state directory without touching the repo's .gitignore.
[[ -f "$STATE/.gitignore" ]] || echo '*' > "$STATE/.gitignore"

case "${1:-}" in
    install) cmd_install ;;
    start) start_postgres; start_mlflow; cmd_env ;;
    stop) stop_mlflow; stop_postgres ;;
    env) cmd_env ;;
    status) cmd_status ;;
    restart-postgres)  # for the fault tests: every open connection is dropped
        as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w restart \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PGSOCK -c max_connections=200" >/dev/null
        say "PostgreSQL restarted" ;;
    stop-postgres) stop_postgres ;;
    start-postgres) start_postgres ;;
    stop-mlflow) stop_mlflow ;;
    start-mlflow) start_mlflow ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
