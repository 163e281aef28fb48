"""Fixtures: one ``engine`` fixture runs each integration test on SQLite and PostgreSQL.

PostgreSQL comes from ``MAPPERDSL_TEST_PG_URL`` (``scripts/test.sh`` starts a
throwaway server and sets it). In CI (``CI=true``) a missing server fails the
run; elsewhere its tests skip with a loud reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

PG_URL = os.environ.get("MAPPERDSL_TEST_PG_URL")
MYSQL_URL = os.environ.get("MAPPERDSL_TEST_MYSQL_URL")  # a MariaDB server (scripts/mariadb.sh)
PG_PASSWORD = "pw-Never-Shown-42"  # trust auth ignores it; the tests check it never leaks


@dataclass
class Engine:
    """A database to test on: URLs, and helpers to run SQL and read tables back."""

    name: str
    source: str
    target: str
    folder: Path

    def execute(self, url: str, *statements: str, rows: list[tuple[Any, ...]] | None = None,
                insert: str | None = None) -> None:
        eng = sa.create_engine(_driver(url))
        with eng.begin() as conn:
            for stmt in statements:
                conn.exec_driver_sql(stmt)
            if insert and rows:
                conn.exec_driver_sql(insert, rows)
        eng.dispose()

    def query(self, url: str, sql: str) -> list[tuple[Any, ...]]:
        eng = sa.create_engine(_driver(url))
        with eng.connect() as conn:
            out = [tuple(r) for r in conn.exec_driver_sql(sql).all()]
        eng.dispose()
        return out

    def frame(self, url: str, sql: str) -> pl.DataFrame:
        from mapperdsl.dsl.url import Url
        from mapperdsl.execute.read import read_sql

        return read_sql(Url.parse(url), sql)

    def placeholders(self, n: int) -> str:
        return ", ".join(["?" if self.name == "sqlite" else "%s"] * n)


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
        "mysql://", "mysql+pymysql://", 1)


def pg_available() -> str | None:
    if not PG_URL:
        return "MAPPERDSL_TEST_PG_URL is not set (run the suite with: bash scripts/test.sh)"
    try:
        eng = sa.create_engine(_driver(PG_URL))
        with eng.connect():
            pass
        eng.dispose()
    except Exception as exc:
        return f"PostgreSQL at MAPPERDSL_TEST_PG_URL does not answer: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_server() -> str:
    return pg_server_url()


def _pg_database(server: str) -> Iterator[str]:
    name = "t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(_driver(server), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(server).set(database=name, password=PG_PASSWORD)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The same test on SQLite files and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield Engine("sqlite", f"sqlite:///{tmp_path / 'src.db'}",
                     f"sqlite:///{tmp_path / 'dw.db'}", tmp_path)
        return
    server = request.getfixturevalue("pg_server")
    for url in _pg_database(server):
        yield Engine("postgresql", url, url, tmp_path)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    return Engine("sqlite", f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dw.db'}",
                  tmp_path)


@pytest.fixture
def pg_engine(tmp_path: Path) -> Iterator[Engine]:
    """PostgreSQL alone, for tests that compare it with SQLite."""
    server = pg_server_url()
    for url in _pg_database(server):
        yield Engine("postgresql", url, url, tmp_path)


def pg_server_url() -> str:
    reason = pg_available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run in CI: {reason}")
        pytest.skip(f"!!! PostgreSQL tests SKIPPED: {reason}")
    assert PG_URL
    return PG_URL


@pytest.fixture
def mysql_source() -> Iterator[str]:
    """A fresh database on the MariaDB server of ``MAPPERDSL_TEST_MYSQL_URL`` (a source)."""
    if not MYSQL_URL:
        reason = "MAPPERDSL_TEST_MYSQL_URL is not set (run the suite with: bash scripts/test.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"MariaDB tests must run in CI: {reason}")
        pytest.skip(f"!!! MariaDB tests SKIPPED: {reason}")
    name = "t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(_driver(MYSQL_URL), poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
