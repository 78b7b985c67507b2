#!/usr/bin/env bash
# A throwaway PostgreSQL for the profile store's tests (tests/test_profile_store.py): a cluster
# in PADLM_PG_DIR (default /tmp/padlm-pg) listening on 127.0.0.1 only, port PADLM_PG_PORT
# (default 55432, or the next free one), with a `padlm` role that may CREATEDB (each test makes
# its own database). Prints the URL on stdout and nothing else, so callers can write
#   export PADLM_TEST_POSTGRES_URL="$(bash scripts/start-postgres.sh)"
# Idempotent: a cluster already running from PADLM_PG_DIR is reused. Installs Debian's
# `postgresql` package when no server binaries exist (needs root or passwordless sudo then).
# Local trust auth and fsync=off: test data on a loopback socket, nothing worth a password or
# surviving a power cut. Stop it with: pg_ctl -D "$PADLM_PG_DIR/data" stop (as postgres).
set -euo pipefail

DIR="${PADLM_PG_DIR:-/tmp/padlm-pg}"
PORT="${PADLM_PG_PORT:-55432}"
ROLE=padlm

log() { echo "start-postgres: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "needs root (or passwordless sudo) to run: $*"
        exit 1
    fi
}

server_bin() {  # the newest installed server's bin directory, or nothing
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -n "$bin" ] && [ -x "$bin/postgres" ]; then echo "$bin"; fi
}

BIN="$(server_bin)"
if [ -z "$BIN" ]; then
    log "installing postgresql (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >&2
    BIN="$(server_bin)"
    [ -n "$BIN" ] || { log "no /usr/lib/postgresql/*/bin/postgres after installing"; exit 1; }
fi

# postgres refuses to run as root: as root, run the server as the `postgres` user (the
# package creates it); as anyone else, as that user.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DIR" postgres
    OWNER=postgres
    pg() { runuser -u postgres -- "$@"; }
else
    OWNER="$(id -un)"
    pg() { "$@"; }
fi

DATA="$DIR/data"
mkdir -p "$DIR"
chown "$OWNER" "$DIR"
chmod 700 "$DIR"

url() { echo "postgresql://$ROLE@127.0.0.1:$1/postgres"; }

if pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    # already running: its port is line 4 of postmaster.pid
    RUNNING_PORT="$(sed -n 4p "$DATA/postmaster.pid")"
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$RUNNING_PORT" -t 30
    log "already running from $DATA"
    url "$RUNNING_PORT"
    exit 0
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    pg "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; exit 1; }
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 20); do
    port_busy "$PORT" || break
    log "port $PORT is taken, trying $((PORT + 1))"
    PORT=$((PORT + 1))
done
port_busy "$PORT" && { log "no free port found; set PADLM_PG_PORT"; exit 1; }

pg "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" \
    >&2 || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 30

"$BIN/psql" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 >&2 <<SQL
SELECT 'CREATE ROLE $ROLE LOGIN CREATEDB'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') \gexec
SQL
log "running from $DATA on 127.0.0.1:$PORT"
url "$PORT"
