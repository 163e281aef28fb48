#!/usr/bin/env bash
# Start a throwaway PostgreSQL 15 cluster on loopback and print the URL of it.
#   eval "$(bash scripts/pg.sh start)"   exports MAPPERDSL_TEST_PG_URL and MAPPERDSL_PG_DIR
#   bash scripts/pg.sh start stock       the same with PostgreSQL's own settings (fsync on,
#                                        max_connections 100), for benchmarks; the tests'
#                                        server runs with fsync off and 200 connections
#   bash scripts/pg.sh stop DIR          stops it and removes its files
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

as_owner() {
    # initdb refuses to run as root: run the server as the postgres user then.
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
    local settings="-c fsync=off -c max_connections=200"
    case "$*" in
        "") ;;
        stock) settings="" ;;
        *) echo "usage: pg.sh start [stock]" >&2; exit 2 ;;
    esac
    if [ ! -x "$PGBIN/initdb" ]; then
        echo "PostgreSQL 15 is not installed; installing it" >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >&2
    fi
    local dir port
    dir=$(mktemp -d "${TMPDIR:-/tmp}/mapperdsl-pg.XXXXXX")
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $settings" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    echo "export MAPPERDSL_PG_DIR=$dir"
    echo "export MAPPERDSL_TEST_PG_URL=postgresql://postgres@127.0.0.1:$port/postgres"
}

stop() {
    local dir=$1
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop "${2:?usage: pg.sh stop DIR}" ;;
    *) echo "usage: pg.sh start [stock] | pg.sh stop DIR" >&2; exit 2 ;;
esac
