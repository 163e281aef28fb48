#!/usr/bin/env bash
# Install the test dependencies, start a throwaway PostgreSQL 15 and run the whole suite.
# Extra arguments go to pytest:  bash scripts/test.sh -k scd2 -x
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

eval "$(bash scripts/pg.sh start)"
trap 'bash scripts/pg.sh stop "$MAPPERDSL_PG_DIR"' EXIT

python3 -m pytest "$@"
