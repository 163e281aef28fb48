#!/usr/bin/env bash
# Install the test dependencies, start a throwaway PostgreSQL 15 and MariaDB, run the whole suite.
# Extra arguments go to pytest:  bash scripts/test.sh -k scd2 -x  (-n 0: one process)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

eval "$(bash scripts/pg.sh start)"
trap 'bash scripts/pg.sh stop "$MAPPERDSL_PG_DIR"' EXIT
eval "$(bash scripts/mariadb.sh start)"  # a MariaDB source for tests/test_mysql.py
trap 'bash scripts/pg.sh stop "$MAPPERDSL_PG_DIR"; bash scripts/mariadb.sh stop "$MAPPERDSL_MYSQL_DIR"' EXIT

# Two pytest workers: most tests wait on subprocesses and servers, so two take a third off
# even on two cores. Every test has its own database and folder.
python3 -m pytest -n 2 "$@"
