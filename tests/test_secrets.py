"""Passwords in URLs appear in no repr, plan, log line, error or job-log row."""

from __future__ import annotations

import json
import logging
import pickle

import polars as pl
import pytest
from sqlalchemy.engine import make_url

import mapperdsl as md
from mapperdsl.dsl.url import Url, redact_text

from conftest import PG_PASSWORD, Engine


def test_url_display_hides_the_password() -> None:
    url = Url.parse("postgresql://etl:s3cr%40t@db.example:5432/dw?sslmode=require")
    for text in (repr(url), str(url), url.redacted):
        assert "s3cr" not in text and "***" in text
    assert url.to_json(password_variable="PW") == "postgresql://etl:${PW}@db.example:5432/dw?sslmode=require"
    assert "s3cr@t" not in redact_text("failed: password s3cr@t rejected")  # decoded form too
    env = Url.parse("postgresql://etl:${DW_PASSWORD}@db/dw")
    assert str(env) == "postgresql://etl:${DW_PASSWORD}@db/dw"  # a variable name is no secret
    assert "pw=" not in redact_text("postgresql://db/dw?password=abc")
    assert "abc" not in redact_text("postgresql://db/dw?password=abc")
    assert pickle.loads(pickle.dumps(url)) == url


def test_a_password_with_an_unescaped_at_sign_is_refused_without_showing_it() -> None:
    # SQLAlchemy's password ends at the first "@": the rest of it would become the host, and
    # be shown in every error about that host. The URL is refused where it is declared.
    with pytest.raises(md.DeclarationError) as info:
        md.mapping("at").source("postgresql://etl:Secr@tPart2@db.example:5432/dw", table="t")
    message = str(info.value)
    assert "Secr" not in message and "tPart2" not in message
    assert "an '@' in its password" in message and "%40" in message and "db.example:5432" in message
    azure = md.mapping("at").source("postgresql://etl@server:pw@db.example/dw", table="t")
    assert make_url(azure.source_def.url.written).username == "etl@server"  # (a user's '@' is
    # SQLAlchemy's to read)


@pytest.mark.parametrize("url, said", [
    ("postgresql://etl:pw@db:notaport/dw", "has a port that is not a number: 'notaport'"),
    ("sqlite://relative.db", "three slashes before a relative path (sqlite:///shop.db)"),
    ("postgresql+asyncpg://etl:pw@db/dw", "names the driver 'asyncpg'; mapperdsl connects to "
                                          "postgresql with psycopg"),
    ("mysql+mysqldb://etl:pw@db/dw", "with pymysql"),
])
def test_urls_that_would_fail_only_when_connecting_fail_where_declared(url: str, said: str) -> None:
    with pytest.raises(md.DeclarationError) as info:
        md.mapping("m").source(url, table="t")
    assert said in str(info.value) and "pw@" not in str(info.value)
    assert str(info.value).startswith("`source(url)` ")


def test_a_password_with_blanks_is_hidden_too() -> None:
    # SQLAlchemy reads the password up to the "@", blanks and all.
    written = "postgresql://etl:my se cret@db/dw"
    assert make_url(written).password == "my se cret"
    dim = (md.mapping("blank").source(written, table="t").key("id").columns(id="id")
           .target("sqlite:///dw.db", table="d"))
    saved = json.dumps(dim.to_dict())
    assert "se cret" not in saved and "etl:${MAPPERDSL_SOURCE_PASSWORD}@db" in saved
    for text in (repr(dim), str(dim), repr(dim.source_def.url), redact_text(f"bad: {written}")):
        assert "se cret" not in text and "etl:***@db" in text, text


def test_missing_environment_variable_is_named() -> None:
    url = Url.parse("postgresql://etl:${MAPPERDSL_TEST_UNSET_VAR}@db/dw")
    with pytest.raises(md.ExecutionError, match="MAPPERDSL_TEST_UNSET_VAR"):
        url.resolved()


def everything_shown(*objects: object) -> str:
    parts = []
    for obj in objects:
        parts += [repr(obj), str(obj)]
        if hasattr(obj, "_repr_html_"):
            parts.append(obj._repr_html_())
    return "\n".join(parts)


def test_password_never_leaks(pg_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    engine = pg_engine
    assert PG_PASSWORD in engine.source
    engine.execute(engine.source, "CREATE TABLE src (id integer, v text)",
                   "INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 50) g",
                   "UPDATE src SET v = 'bad' WHERE id = 7")
    dim = (md.mapping("secret").source(engine.source, table="src").key("id")
           .columns(id="id", v=pl.col("v").str.strip_prefix("v").cast(pl.Int64))
           .scd2().chunks(count=3).target(engine.target, table="dim_secret"))
    plan = dim.plan()
    caplog.set_level(logging.DEBUG, logger="mapperdsl")
    result = md.run(plan, n_jobs=2, progress=False)
    assert result.status == "FAILED"  # chunk 1 cannot cast 'bad': an error message to check
    shown = everything_shown(dim, plan, result, *result.chunks)
    shown += plan.to_json() + json.dumps(dim.to_dict()) + caplog.text
    rows = []
    for table in ("mapperdsl_jobs", "mapperdsl_chunks", "mapperdsl_checkpoints", "mapperdsl_rejects"):
        rows += engine.query(engine.target, f"SELECT * FROM {table}")
    shown += repr(rows)
    assert "bad" in shown and "secret" in shown  # the texts are really there
    assert PG_PASSWORD not in shown

    wrong_port = make_url(engine.source).set(port=1).render_as_string(hide_password=False)
    for broken in (dim.source(wrong_port, table="src"),
                   dim.columns(id="id", v=pl.col("nope"))):
        with pytest.raises(md.MapperError) as info:
            broken.plan()
        assert PG_PASSWORD not in str(info.value) and PG_PASSWORD not in repr(info.value)


def test_a_password_in_the_query_string_is_never_saved() -> None:
    url = Url.parse("postgresql://etl@db/dw?password=Qu3ry%40Secret&sslmode=require")
    dim = (md.mapping("q").source(url, table="t").key("id").columns(id="id")
           .target("sqlite:///dw.db", table="d"))
    saved = json.dumps(dim.to_dict())
    assert "Qu3ry" not in saved and "password=${MAPPERDSL_SOURCE_PASSWORD}" in saved
    assert "Qu3ry" not in repr(dim) + str(dim)
    assert redact_text("driver said: password Qu3ry@Secret is wrong") == \
        "driver said: password *** is wrong"


def test_credentials_from_environment_variables(pg_engine: Engine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine = pg_engine
    engine.execute(engine.source, "CREATE TABLE src (id integer, v text)",
                   "INSERT INTO src VALUES (1, 'a'), (2, 'b')")
    monkeypatch.setenv("DW_TEST_PASSWORD", PG_PASSWORD)
    url = engine.target.replace(PG_PASSWORD, "${DW_TEST_PASSWORD}")
    dim = (md.mapping("env").source(url, table="src").key("id").scd1()
           .target(url, table="dim_env"))
    plan = dim.plan()
    assert "${DW_TEST_PASSWORD}" in plan.to_json() and PG_PASSWORD not in plan.to_json()
    assert md.run(plan, progress=False).inserted == 2
    logged = engine.query(engine.target, "SELECT plan_json FROM mapperdsl_jobs")[0][0]
    assert "${DW_TEST_PASSWORD}" in logged and PG_PASSWORD not in logged
