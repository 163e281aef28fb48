#!/usr/bin/env bash
# Start a throwaway MariaDB server on loopback (a source database for the tests) and print its URL.
#   eval "$(bash scripts/mariadb.sh start)"   exports MAPPERDSL_TEST_MYSQL_URL and MAPPERDSL_MYSQL_DIR
#   bash scripts/mariadb.sh stop DIR          stops it and removes its files
set -euo pipefail

start() {
    if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
        echo "MariaDB is not installed; installing it" >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >&2
    fi
    local dir port user
    dir=$(mktemp -d "${TMPDIR:-/tmp}/mapperdsl-mariadb.XXXXXX")
    user=$(id -un)
    [ "$(id -u)" = 0 ] && { chown mysql "$dir"; user=mysql; }
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$user" --auth-root-authentication-method=normal \
        --skip-test-db >"$dir/install.log" 2>&1 || { cat "$dir/install.log" >&2; exit 1; }
    /usr/sbin/mariadbd --no-defaults --datadir="$dir/data" --user="$user" --port="$port" --bind-address=127.0.0.1 \
        --socket="$dir/mysqld.sock" --pid-file="$dir/mysqld.pid" --skip-log-bin --innodb-flush-log-at-trx-commit=0 \
        --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci >"$dir/server.log" 2>&1 &
    for _ in $(seq 1 120); do
        if mariadb --no-defaults --socket="$dir/mysqld.sock" -uroot -e "SELECT 1" >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    mariadb --no-defaults --socket="$dir/mysqld.sock" -uroot -e "
        CREATE USER 'mapperdsl'@'127.0.0.1' IDENTIFIED BY 'pw-Never-Shown-42';
        GRANT ALL ON *.* TO 'mapperdsl'@'127.0.0.1'; CREATE DATABASE mapperdsl;" \
        || { cat "$dir/server.log" >&2; stop "$dir"; exit 1; }
    echo "export MAPPERDSL_MYSQL_DIR=$dir"
    echo "export MAPPERDSL_TEST_MYSQL_URL=mysql://mapperdsl:pw-Never-Shown-42@127.0.0.1:$port/mapperdsl"
}

stop() {
    local dir=$1
    if [ -f "$dir/mysqld.pid" ]; then
        local pid
        pid=$(cat "$dir/mysqld.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:?usage: mariadb.sh stop DIR}" ;;
    *) echo "usage: mariadb.sh start | mariadb.sh stop DIR" >&2; exit 2 ;;
esac
