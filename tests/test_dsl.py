"""The DSL: frozen builders, early errors that name the argument, value and what is allowed."""

from __future__ import annotations

import pickle

import polars as pl
import pytest

import mapperdsl as md
from mapperdsl.dsl.mapping import Mapping


def base() -> Mapping:
    return (md.mapping("dim_customer").source("sqlite:///shop.db", table="customer").key("id")
            .columns(id="id", name=pl.col("name").str.strip_chars(), email="email")
            .target("sqlite:///dw.db", table="dim_customer"))


def test_every_call_returns_a_new_mapping() -> None:
    m = base()
    a = m.target("sqlite:///dw.db", table="dim_a")
    b = m.target("sqlite:///dw.db", table="dim_b")
    assert m.target_def and a.target_def and b.target_def
    assert (m.target_def.table, a.target_def.table, b.target_def.table) == \
        ("dim_customer", "dim_a", "dim_b")
    with pytest.raises(AttributeError):
        m.name = "other"  # type: ignore[misc]
    assert m.scd2() == m.scd2() and m.scd2() != m


def test_mapping_is_equal_hashable_picklable_and_json_round_trips() -> None:
    m = base().scd2(track=["name"], deletes="close").chunks(count=4)
    assert hash(m) == hash(base().scd2(track=["name"], deletes="close").chunks(count=4))
    assert pickle.loads(pickle.dumps(m)) == m
    assert Mapping.from_dict(m.to_dict()) == m
    assert m.fingerprint() == m.chunks(rows=10).parallel(n_jobs=4).retries(attempts=5).fingerprint()
    assert m.fingerprint() != m.scd2(track=["email"], deletes="close").fingerprint()


@pytest.mark.parametrize("build, message", [
    (lambda: md.mapping(""), "`mapping(name)` must be a non-empty string, got ''"),
    (lambda: base().key([]), "`key(...)` must be a column name or a non-empty list of names, got []"),
    (lambda: base().key(["id", "id"]), "`key(...)` names a column twice"),
    (lambda: base().scd2(deletes="purge"),
     "`scd2(deletes=...)` must be one of 'ignore', 'close', got 'purge'"),
    (lambda: base().scd1(deletes="archive"),
     "`scd1(deletes=...)` must be one of 'ignore', 'delete', 'close', got 'archive'"),
    (lambda: base().scd2(track=["nmae"]),
     "`scd2(track=...)` names columns that are not mapped: ['nmae']. Mapped: id, name, email"),
    (lambda: base().scd2(track=["id"]), "must not name key columns"),
    (lambda: base().chunks(rows=0), "`chunks(rows=...)` must be a whole number >= 1, got 0"),
    (lambda: base().chunks(rows=5, count=2), "takes one of rows= or count= (or neither, to size chunks "
     "from the data), got rows=5, count=2"),
    (lambda: base().source("sqlite:///x.db"), "takes exactly one of table= or query="),
    (lambda: base().source("shop.db", table="t"), "must be a SQLAlchemy URL"),
    (lambda: base().source("oracle://u@h/db", table="t"),
     "uses the database 'oracle'; supported: sqlite, postgresql, mysql"),
    (lambda: base().columns(name=3), "`columns(name=...)` must be a source column name or a "
                                     "Polars expression, got int 3"),
    (lambda: base().columns(id=pl.col("id") + 1, name="name"),
     "key column 'id' must copy a source column"),
    (lambda: base().scd2(valid_from="x", valid_to="x"), "column names must differ"),
    (lambda: base().columns(id="id", valid_to="x").scd2(),
     "clash with the scd2 columns"),
    (lambda: base().incremental([]), "`incremental(...)` must be a column name"),
    (lambda: base().incremental(["a", "b"], lag=5), "works on one checkpoint column"),
    (lambda: base().incremental("a", lag="1 day"), "must be a number or a timedelta"),
    (lambda: base().parallel(n_jobs=0), "must be a non-zero whole number (-1: one per core) or "
                                        "None, got 0"),
    (lambda: base().run(n_jobs=0), "`run(n_jobs=...)` must be a non-zero whole number"),
    (lambda: base().resume(n_jobs=1.5), "`resume(n_jobs=...)` must be a non-zero whole number"),
    (lambda: base().key(5), "`key(...)` must be a column name or a non-empty list of names, got 5"),
    (lambda: base().scd2(track=5), "`scd2(track=...)` must be a column name or a non-empty list"),
    (lambda: base().incremental(5), "`incremental(...)` must be a column name or a non-empty list"),
    (lambda: base().lease(seconds="60"), "`lease(seconds=...)` must be a number of seconds >= 1, "
                                         "got '60'"),
    (lambda: base().retries(max_delay=-1), "`retries(max_delay=...)` must be a number of seconds"),
    (lambda: base().plan(effective_time="2026-01-01"),
     "`effective_time` must be a timezone-aware datetime"),
    (lambda: base().source("sqlite:///x.db", query="select 1; drop table t"),
     "must be one SELECT statement"),
])
def test_static_mistakes_fail_at_once_with_a_clear_message(build: object, message: str) -> None:
    with pytest.raises(md.DeclarationError) as info:
        build()  # type: ignore[operator]
    assert message in str(info.value)


def test_incomplete_mapping_says_what_is_missing() -> None:
    with pytest.raises(md.DeclarationError) as info:
        md.mapping("m").key("id").plan()
    assert "`source(...)` is not declared" in str(info.value)
    assert "`target(...)` is not declared" in str(info.value)


def test_display_tiers() -> None:
    m = base().scd2(deletes="close")
    assert repr(m) == ("<Mapping dim_customer: sqlite:///shop.db customer -> sqlite:///dw.db "
                       "dim_customer, key=id, scd2, full>")
    assert "\n" not in repr(m)
    text = str(m)
    assert text.splitlines()[0] == "Mapping dim_customer"
    assert "    name = col(\"name\").str.strip_chars" in text
    assert "history scd2, deletes=close, track=name, email" in text
    html = m._repr_html_()
    assert "<table>" in html and "&rarr;" in html and "tracked" in html
    assert repr(md.mapping("x")) == "<Mapping x: ? -> ?, key=?, scd1, full>"


def test_html_escapes_names() -> None:
    m = md.mapping("<script>").source("sqlite:///a.db", table="t<b>").key("id").columns(id="id")
    html = m._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html
