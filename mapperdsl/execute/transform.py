"""From the rows a chunk read to the rows it may write: types, column map, rejects, row hash.

Nothing here touches a database. Rows that cannot be written are not dropped:
they come back as rejects (key, reason, the row as JSON) and are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import polars_hash as plh

from mapperdsl.dialects import dtype_to_text, infinity_sign, infinity_value, to_infinity_text

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


_NAIVE = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M",
          "%Y-%m-%d")
_AWARE = ("%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z",
          "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.fZ", "%Y-%m-%d %H:%M:%S%.fZ")


def convert(column: str, have: pl.DataType, want: pl.DataType) -> pl.Expr:
    """An expression turning ``column`` from ``have`` into ``want``; null where it cannot.

    Text dates and times (SQLite keeps them so) are read in any of the ISO forms
    people write, each value on its own; a value with an offset becomes UTC.
    """
    col = pl.col(column)
    if have == pl.Binary() and want != pl.Binary():  # bytes as UTF-8 text; NULL if they are not
        col, have = col.map_batches(_utf8, return_dtype=pl.String(), is_elementwise=True), \
            pl.String()
    if have == pl.String() and want == pl.Date():
        return _infinity_words(col, want, pl.coalesce(
            col.str.to_date("%Y-%m-%d", strict=False),
            _text_datetime(col, pl.Datetime("us")).dt.date()))
    if have == pl.String() and want == pl.Time():
        return col.str.to_time(strict=False)
    if have == pl.String() and want == pl.Boolean():  # (Polars casts no text to booleans)
        return pl.when(col.is_in(["true", "1"])).then(True).when(col.is_in(["false", "0"])) \
            .then(False).otherwise(None)
    if have == pl.String() and isinstance(want, pl.Datetime):
        return _infinity_words(col, want, _text_datetime(col, want))
    if isinstance(have, pl.Datetime) and isinstance(want, pl.Datetime) and want.time_zone:
        col = col.dt.replace_time_zone("UTC") if not have.time_zone else col
        return col.dt.convert_time_zone(want.time_zone).cast(want)
    if (have.is_float() or isinstance(have, pl.Decimal)) and want.is_integer():
        whole = col.cast(want, strict=False)  # (a cast alone cuts 1.5 to 1: not a fit)
        return pl.when(whole.cast(have, strict=False) == col).then(whole)
    return col.cast(want, strict=False)


def _utf8(values: pl.Series) -> pl.Series:
    try:
        return values.cast(pl.String())
    except pl.exceptions.ComputeError:  # (Polars fails them all: value by value, then)
        return pl.Series(values.name, [_utf8_value(v) for v in values], pl.String())


def _utf8_value(value: bytes | None) -> str | None:
    try:
        return None if value is None else value.decode()
    except UnicodeDecodeError:
        return None


def _infinity_words(col: pl.Expr, want: pl.DataType, parsed: pl.Expr) -> pl.Expr:
    """``parsed``, or infinity where the text says 'infinity' or '-infinity' (as mapperdsl
    writes PostgreSQL's infinities into a SQLite target), as ConnectorX reads them."""
    return (pl.when(col == "infinity").then(infinity_value(1, want))
            .when(col == "-infinity").then(infinity_value(-1, want)).otherwise(parsed))


def _text_datetime(col: pl.Expr, want: pl.Datetime) -> pl.Expr:
    unit = want.time_unit
    naive = [col.str.to_datetime(f, time_unit=unit, strict=False) for f in _NAIVE]
    if want.time_zone is None:
        return pl.coalesce(naive)
    aware = [col.str.to_datetime(f, time_unit=unit, time_zone="UTC", strict=False)
             for f in _AWARE]
    as_utc = [n.dt.replace_time_zone("UTC") for n in naive]
    return pl.coalesce(*aware, *as_utc).dt.convert_time_zone(want.time_zone)


def _usual_parse(values: pl.Series, want: pl.DataType) -> pl.Series | None:
    """Text dates and times parsed with one format, when it reads every value (the usual
    case): that spares trying each of the ISO forms on every value. None otherwise."""
    if values.dtype != pl.String() or not isinstance(want, (pl.Date, pl.Datetime)):
        return None
    if isinstance(want, pl.Date):
        parsed = values.str.to_date("%Y-%m-%d", strict=False)
    else:
        parsed = values.str.to_datetime(_NAIVE[0], time_unit=want.time_unit, strict=False)
        if want.time_zone:
            parsed = parsed.dt.replace_time_zone("UTC").dt.convert_time_zone(want.time_zone)
    return parsed if parsed.null_count() == values.null_count() else None


def _rounded(text: pl.Expr, scale: int) -> pl.Expr:
    # A decimal text with a non-zero digit past ``scale`` places would be rounded.
    return text.str.contains(rf"\.\d{{{scale}}}\d*[1-9]")


def _significant_digits(value: pl.Expr) -> pl.Expr:
    digits = value.cast(pl.String).str.replace_all(r"[-.]", "")
    return digits.str.strip_chars_start("0").str.strip_chars_end("0").str.len_chars()


def cast_checked(frame: pl.DataFrame, schema: dict[str, pl.DataType], keys: list[str],
                 stage: str, *, max_digits: int | None = None) -> tuple[pl.DataFrame,
                                                                         pl.DataFrame]:
    """``frame`` cast to ``schema``; rows with a value that did not fit become rejects.

    A value does not fit when the cast loses it (NULL from a value), when a decimal
    read from text would be rounded, or when a decimal has more than ``max_digits``
    significant digits (SQLite keeps 15). Each conversion runs once (the checks share
    it), and the reasons are only spelt out when some row is bad.
    """
    changes: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    reasons: list[str] = []
    for name, want in schema.items():
        have = frame.schema[name]
        limited = isinstance(want, pl.Decimal) and bool(max_digits) \
            and (want.precision or 38) > (max_digits or 0)
        if have == want and not limited:
            continue
        parsed = _usual_parse(frame.get_column(name), want) if have != want else None
        if parsed is not None:  # every value read: nothing to check
            changes.append(pl.lit(parsed).alias(name))
            continue
        new = pl.col(name) if have == want else convert(name, have, want)
        bad = new.is_null() & pl.col(name).is_not_null() if have != want else pl.lit(False)
        if isinstance(want, pl.Decimal) and have == pl.String():
            bad = bad | _rounded(pl.col(name), want.scale)
        detail = dtype_to_text(want)
        if limited:
            bad = bad | (_significant_digits(new) > max_digits)
            detail += f" (at most {max_digits} significant digits here)"
        if have != want:
            changes.append(new.alias(name))
        checks.append(bad.fill_null(False).alias(f"__bad{len(checks)}"))
        reasons.append(f"{stage}: column {name}: value does not fit {detail}")
    if not checks:
        return frame.with_columns(changes), _no_rejects()
    flags = [c.meta.output_name() for c in checks]
    out = frame.lazy().with_columns(*changes, *checks).collect()
    is_bad = out.select(pl.any_horizontal(flags)).to_series()
    if not is_bad.any():
        return out.drop(flags), _no_rejects()
    reason = pl.concat_str([pl.when(pl.col(f)).then(pl.lit(r)) for f, r in zip(flags, reasons,
                                                                                strict=True)],
                           separator="; ", ignore_nulls=True)
    why = out.filter(is_bad).select(reason).to_series()
    return out.filter(~is_bad).drop(flags), _rejects(frame.filter(is_bad), keys, pl.lit(why))


def prepare(frame: pl.DataFrame, *, read_schema: dict[str, pl.DataType],
            columns: list[tuple[str, pl.Expr]], target_schema: dict[str, pl.DataType],
            keys: list[str], key_sources: list[str], tracked: list[str],
            hash_column: str, keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
            max_digits: int | None = None, nul_free: bool = False,
            max_chars: dict[str, int] | None = None) -> Prepared:
    """Type the rows read, apply the column map, reject what cannot be loaded, hash the rest.

    NULL and duplicate business keys are found first, on the keys as read, so every
    row of a duplicated key is rejected whatever else is wrong with it. ``keep`` (a
    Python checkpoint) picks, from the typed rows, the ones to load. ``nul_free``: text
    holding a NUL character is rejected (PostgreSQL's text cannot store one). ``max_chars``:
    the most characters a target column holds (``varchar(n)``); longer text is rejected.
    An unsigned 64-bit number past the signed ones is rejected: both targets keep 64-bit
    integers with a sign (PostgreSQL's bigint, SQLite's INTEGER).
    """
    raw_keys = frame.select([convert(src, frame.schema[src], target_schema[key]).alias(key)
                             for key, src in zip(keys, key_sources, strict=True)])
    null_key = raw_keys.select(pl.any_horizontal(pl.all().is_null())).to_series()
    endless = _endless(raw_keys)
    no_key = null_key | endless
    duplicate = _duplicated(raw_keys) & ~no_key
    absent = frame.select(pl.any_horizontal(pl.col(src).is_null() for src in key_sources)) \
        .to_series() if null_key.any() else null_key  # (else a value unlike the key's type)
    rejects = [
        _rejects(frame.filter(null_key & absent), key_sources, pl.lit("business key is NULL")),
        _rejects(frame.filter(null_key & ~absent), key_sources, pl.lit(
            "business key does not fit its type (" + ", ".join(
                f"{key}: {target_schema[key]}" for key in keys) + ")")),
        _rejects(frame.filter(endless & ~null_key), key_sources, pl.lit(
            "business key is infinity or -infinity, which no key can be: map it to a date "
            "or time in the column map or a source query")),
        _rejects(frame.filter(duplicate), key_sources,
                 pl.lit("business key appears more than once in the source")),
    ]
    seen = raw_keys  # (an infinite key stays: a target row of it is not gone)
    if no_key.any() or duplicate.any():  # (the usual chunk has none: no copies)
        seen = raw_keys.filter(~null_key).unique()
        frame = frame.filter(~no_key & ~duplicate)
    frame, rejects_read = cast_checked(frame, read_schema, key_sources, "source")
    read = frame.height + rejects_read.height + sum(r.height for r in rejects)
    if keep is not None:
        kept = keep(frame)
        read -= frame.height - kept.height
        frame = kept
    mapped = frame.select([expr.alias(name) for name, expr in columns])
    mapped, rejects_cast = cast_checked(mapped, target_schema, keys, "target",
                                        max_digits=max_digits)
    checks = [(name, _has_nul(name), "text holds a NUL character (\\x00), which PostgreSQL "
               "cannot store") for name, dtype in mapped.schema.items()
              if nul_free and _textual(dtype)]
    checks += [(name, _longer(name, most), f"text longer than the {most} characters it holds")
               for name, most in (max_chars or {}).items()
               if name in mapped.columns and _textual(mapped.schema[name])]
    checks += [(name, pl.col(name) > _INT64_MAX, "a number past the signed 64-bit integers "
                "the target holds") for name, dtype in mapped.schema.items()
               if dtype == pl.UInt64()]
    if checks:
        mapped, rejects_checked = _without_failed(mapped, checks, keys)
        rejects.append(rejects_checked)
    rows = mapped.with_columns(row_hash(tracked).alias(hash_column))
    return Prepared(rows, pl.concat([*rejects, rejects_read, rejects_cast]), seen, read)


_INT64_MAX = 2 ** 63 - 1


def _without_failed(frame: pl.DataFrame, checks: list[tuple[str, pl.Expr, str]],
                    keys: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows no check flags, and the others as rejects that say why. ``checks``: (column,
    flag, what is wrong with its value) each."""
    flags = frame.select(flag.fill_null(False).alias(str(i))
                         for i, (_, flag, _) in enumerate(checks))
    is_bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    if not is_bad.any():
        return frame, _no_rejects()
    why = flags.filter(is_bad).select(pl.concat_str(
        [pl.when(pl.col(str(i))).then(pl.lit(f"target: column {name}: {what}"))
         for i, (name, _, what) in enumerate(checks)], separator="; ", ignore_nulls=True))
    return frame.filter(~is_bad), _rejects(frame.filter(is_bad), keys, pl.lit(why.to_series()))


def _longer(column: str, most: int) -> pl.Expr:
    """Text past ``most`` characters, as PostgreSQL refuses it for ``varchar(most)``: blanks
    past the limit it cuts off instead."""
    text = pl.col(column).cast(pl.String())
    return (text.str.len_chars() > most) & text.str.slice(most).str.contains("[^ ]")


def _textual(dtype: pl.DataType) -> bool:
    return dtype == pl.String() or isinstance(dtype, (pl.Categorical, pl.Enum))


def _has_nul(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.String()).str.contains("\x00", literal=True)


def _endless(keys: pl.DataFrame) -> pl.Series:
    """Where a date or time key holds a PostgreSQL infinity: no literal and no Python value
    holds one, so it can be neither looked up nor compared."""
    return _any(keys, [infinity_sign(k, t) != 0 for k, t in keys.schema.items()
                       if t == pl.Date() or isinstance(t, pl.Datetime)])


def unspellable(keys: pl.DataFrame) -> pl.Series:
    """Keys no SQL literal spells (dialects.key_literal), so none to look a row up by: a date
    or time at infinity, a float's infinities and NaN, and text holding a NUL character
    (which only SQLite's text spells: such keys are few, and looked up by range anywhere)."""
    return _endless(keys) | _any(keys, [
        _has_nul(k) if _textual(t) else ~pl.col(k).is_finite()
        for k, t in keys.schema.items() if _textual(t) or t.is_float()])


def _any(frame: pl.DataFrame, flags: list[pl.Expr]) -> pl.Series:
    if not flags:
        return pl.zeros(frame.height, pl.Boolean, eager=True)
    return frame.select(pl.any_horizontal(flags).fill_null(False)).to_series()


def _duplicated(keys: pl.DataFrame) -> pl.Series:
    """Whether each row's key is also another row's."""
    in_order = duplicated_in_order(keys)
    if in_order is not None:
        return in_order
    key = pl.col(keys.columns[0]) if keys.width == 1 else pl.struct(keys.columns)
    return keys.select(key.is_duplicated()).to_series()


def duplicated_in_order(keys: pl.DataFrame) -> pl.Series | None:
    """:func:`_duplicated` of a single integer, text or date key with no NULL read in
    ascending order (as a table loaded in key order reads), from its neighbours, with no
    hash table of every key; None for any other key."""
    first = keys.to_series(0)
    dtype = first.dtype
    if keys.width != 1 or not (dtype.is_integer() or dtype in (pl.String(), pl.Date())) \
            or first.null_count() or not first.is_sorted():
        return None
    same = first == first.shift(1)
    return (same | same.shift(-1)).fill_null(False)


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
    as_text = [_as_text(c, rows.schema[c]).alias(c) for c in body]
    if not keys:
        key = pl.lit(None, dtype=pl.String())
    elif len(keys) == 1:  # (a NUL character spelt out: a database's text may not hold it)
        key = _as_text(keys[0], rows.schema[keys[0]]).str.replace_all("\x00", "\\x00",
                                                                      literal=True)
    else:
        key = pl.struct([_as_text(k, rows.schema[k]).alias(k) for k in keys]).struct.json_encode()
    return rows.select(
        key.alias("key"),
        reason.cast(pl.String()).alias("reason"),
        pl.struct(as_text).struct.json_encode().alias("row"),
    )


def _as_text(column: str, dtype: pl.DataType) -> pl.Expr:
    """A rejected value as text: bytes in hex, PostgreSQL's infinities as 'infinity'."""
    if dtype == pl.Binary():
        return pl.col(column).bin.encode("hex")
    text = pl.col(column).cast(pl.String())
    if dtype == pl.Date() or isinstance(dtype, pl.Datetime):
        return to_infinity_text(column, dtype, text)
    return text


def _no_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECT_SCHEMA)
