"""From the rows a chunk read to the rows it may write: types, column map, rejects, row hash.

Nothing here touches a database. Rows that cannot be written are not dropped:
they come back as rejects (key, reason, the row as JSON) and are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import polars_hash as plh

from mapperdsl.dialects import dtype_to_text

REJECT_SCHEMA = {"key": pl.String(), "reason": pl.String(), "row": pl.String()}


@dataclass(frozen=True)
class Prepared:
    """A chunk's rows ready to merge (mapped, typed, hashed) and the rows it rejected.

    ``keys_seen`` holds every non-NULL key the source had in the chunk, rejected or
    not, so that a rejected row never makes its key look deleted.
    """

    rows: pl.DataFrame
    rejects: pl.DataFrame
    keys_seen: pl.DataFrame
    read: int


def convert(column: str, have: pl.DataType, want: pl.DataType) -> pl.Expr:
    """An expression turning ``column`` from ``have`` into ``want``; null where it cannot."""
    col = pl.col(column)
    if have == pl.String() and want == pl.Date():
        return col.str.to_date(strict=False)
    if have == pl.String() and want == pl.Time():
        return col.str.to_time(strict=False)
    if have == pl.String() and isinstance(want, pl.Datetime):
        return col.str.to_datetime(time_unit=want.time_unit, time_zone=want.time_zone,
                                   strict=False)
    if isinstance(have, pl.Datetime) and isinstance(want, pl.Datetime) and want.time_zone:
        col = col.dt.replace_time_zone("UTC") if not have.time_zone else col
        return col.dt.convert_time_zone(want.time_zone).cast(want)
    return col.cast(want, strict=False)


def cast_checked(frame: pl.DataFrame, schema: dict[str, pl.DataType], keys: list[str],
                 stage: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``frame`` cast to ``schema``; rows with a value that did not fit become rejects."""
    changes, failures = [], []
    for name, want in schema.items():
        have = frame.schema[name]
        if have == want:
            continue
        new = convert(name, have, want)
        changes.append(new.alias(name))
        failures.append(pl.when(new.is_null() & pl.col(name).is_not_null()).then(
            pl.lit(f"{stage}: column {name}: value does not fit {dtype_to_text(want)}")))
    if not changes:
        return frame, _no_rejects()
    reason = pl.when(pl.any_horizontal([f.is_not_null() for f in failures])).then(
        pl.concat_str(failures, separator="; ", ignore_nulls=True))
    marked = frame.with_columns(reason.alias("__reason"))
    bad = marked.filter(pl.col("__reason").is_not_null())
    good = marked.filter(pl.col("__reason").is_null()).drop("__reason").with_columns(changes)
    return good, _rejects(bad, keys, pl.col("__reason"))


def prepare(frame: pl.DataFrame, *, read_schema: dict[str, pl.DataType],
            columns: list[tuple[str, pl.Expr]], target_schema: dict[str, pl.DataType],
            keys: list[str], key_sources: list[str], tracked: list[str],
            hash_column: str,
            keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> Prepared:
    """Type the rows read, apply the column map, reject what cannot be loaded, hash the rest.

    ``keep`` (a Python checkpoint) picks, from the typed rows, the ones to load.
    """
    seen = frame.select([
        convert(src, frame.schema[src], target_schema[key]).alias(key)
        for key, src in zip(keys, key_sources, strict=True)
    ]).drop_nulls().unique()
    frame, rejects_read = cast_checked(frame, read_schema, [], "source")
    if keep is not None:
        frame = keep(frame)
    read = frame.height + rejects_read.height
    mapped = frame.select([expr.alias(name) for name, expr in columns])
    mapped, rejects_cast = cast_checked(mapped, target_schema, keys, "target")
    key_cols = [pl.col(k) for k in keys]

    null_key = pl.any_horizontal([c.is_null() for c in key_cols])
    keyed = mapped.filter(~null_key)
    duplicate = (pl.struct(keys) if len(keys) > 1 else key_cols[0]).is_duplicated()
    rejects = pl.concat([
        rejects_read,
        rejects_cast,
        _rejects(mapped.filter(null_key), keys, pl.lit("business key is NULL")),
        _rejects(keyed.filter(duplicate), keys,
                 pl.lit("business key appears more than once in the source")),
    ])
    rows = keyed.filter(~duplicate).with_columns(row_hash(tracked).alias(hash_column))
    return Prepared(rows, rejects, seen, read)


def row_hash(tracked: list[str]) -> pl.Expr:
    """The stable row hash: polars-hash ``hash_rows`` (NULLs and column boundaries encoded)
    then xxHash64, as a signed 64-bit integer every database can store."""
    if not tracked:
        return pl.lit(0, dtype=pl.Int64())
    return plh.hash_rows([pl.col(c) for c in tracked]).nchash.xxhash64().reinterpret(signed=True)


def _rejects(rows: pl.DataFrame, keys: list[str], reason: pl.Expr) -> pl.DataFrame:
    if rows.height == 0:
        return _no_rejects()
    body = [c for c in rows.columns if c != "__reason"]
    as_text = [(pl.col(c).bin.encode("hex") if rows.schema[c] == pl.Binary()
                else pl.col(c).cast(pl.String())).alias(c) for c in body]
    if not keys:
        key = pl.lit(None, dtype=pl.String())
    elif len(keys) == 1:
        key = pl.col(keys[0]).cast(pl.String())
    else:
        key = pl.struct([pl.col(k).cast(pl.String()) for k in keys]).struct.json_encode()
    return rows.select(
        key.alias("key"),
        reason.cast(pl.String()).alias("reason"),
        pl.struct(as_text).struct.json_encode().alias("row"),
    )


def _no_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECT_SCHEMA)
