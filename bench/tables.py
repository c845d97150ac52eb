"""The benchmarks' table and the rows they write, derived from the table model.

``TABLE`` is the seed's table as ``employee.py`` describes it: the benchmarks create it on fresh
servers, where there is no catalog to read yet. Where the table exists, callers pass
``Table.load``'s reading of it. Values follow each column's kind, never its name.
"""

from __future__ import annotations

import random
from typing import Any

from psycopg2 import sql

from cdc.model.table import Column, Kind, Table
from employee import EMPLOYEES

TABLE = EMPLOYEES

WORDS = ("London", "Zürich", "東京", "Łódź", "O'Brien", "Ada", "Lovelace", "São Paulo")
INTEGER_TYPICAL = (20_000, 250_000)
DATE_FIRST = "1950-01-01"
NULL_EVERY = 20  # set-based fills: a nullable column is NULL in one row of this many


def create_table(table: Table = TABLE) -> sql.Composed:
    """CREATE TABLE IF NOT EXISTS for ``table``'s written columns and primary key (no defaults:
    every row the benchmarks write names its key)."""
    columns = [
        sql.SQL("{} {}{}").format(c.ident, sql.SQL(c.type), sql.SQL(" NOT NULL" if c.not_null else ""))
        for c in table.written
    ]
    key = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    return sql.SQL("CREATE TABLE IF NOT EXISTS {t} ({c}, PRIMARY KEY ({k}))").format(
        t=table.ident, c=sql.SQL(", ").join(columns), k=key
    )


def names(columns: tuple[Column, ...]) -> sql.Composable:
    return sql.SQL(", ").join(c.ident for c in columns)


def _typical(column: Column) -> tuple[int, int]:
    assert column.range is not None
    return max(column.range[0], INTEGER_TYPICAL[0]), min(column.range[1], INTEGER_TYPICAL[1])


# -- rows generated in Python (the change set, the latency writers) ---------------------------


def random_row(table: Table, rnd: random.Random, key: int, null_chance: float = 0.05) -> tuple[Any, ...]:
    """``key`` and a random value for every other written column (``table.values`` order)."""
    row: list[Any] = [key]
    for column in table.values:
        if not column.not_null and rnd.random() < null_chance:
            row.append(None)
        elif column.kind is Kind.INTEGER:
            row.append(rnd.randint(*_typical(column)))
        elif column.kind is Kind.DATE:
            row.append(f"{rnd.randint(1940, 2004)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}")
        else:
            row.append(rnd.choice(WORDS)[: column.length])
    return tuple(row)


def fixed_row(table: Table, key: int) -> tuple[Any, ...]:
    """``key`` and a plain value for every other written column."""
    row: list[Any] = [key]
    for column in table.values:
        if column.kind is Kind.INTEGER:
            lo, hi = _typical(column)
            row.append(lo + key % (hi - lo + 1))
        elif column.kind is Kind.DATE:
            row.append("1990-01-01")
        else:
            row.append("Latency"[: column.length])
    return tuple(row)


# -- rows generated set-based, by generate_series ----------------------------------------------


def fill(table: Table, *, key: bool, nulls: bool) -> sql.Composed:
    """INSERT of one deterministic row per ``g`` in ``generate_series(%(lo)s, %(hi)s)``: the same
    ``g`` gives the same values in any database. ``key``: the key is ``g`` (else the table's
    default gives it). ``nulls``: each nullable column NULL in one row of NULL_EVERY, text
    non-ASCII and quoted now and then."""
    g = sql.Identifier("g")
    columns = table.values
    exprs = [_expression(c, i, g, nulls) for i, c in enumerate(columns)]
    if key:
        columns = (table.key, *columns)
        exprs = [g, *exprs]
    return sql.SQL("INSERT INTO {t} ({c}) SELECT {e} FROM generate_series(%(lo)s, %(hi)s) AS g").format(
        t=table.ident, c=names(columns), e=sql.SQL(", ").join(exprs)
    )


def _expression(column: Column, i: int, g: sql.Identifier, nulls: bool) -> sql.Composable:
    """The value of the ``i``-th value column in row ``g``."""
    if column.kind is Kind.INTEGER:
        lo, hi = _typical(column)
        value = sql.SQL("({lo} + mod({g}::bigint * 37 + {i}, {span}))").format(
            lo=sql.Literal(lo), g=g, i=sql.Literal(i), span=sql.Literal(hi - lo + 1)
        )
    elif column.kind is Kind.DATE:
        value = sql.SQL("(date {first} + mod({g} + {i}, 20000)::int)").format(
            first=sql.Literal(DATE_FIRST), g=g, i=sql.Literal(i)
        )
    else:
        words = list(WORDS) if nulls else ["Bench"]
        value = sql.SQL("((ARRAY[{w}])[1 + mod({g} + {i}, {n})] || ' ' || {g})").format(
            w=sql.SQL(", ").join(sql.Literal(w) for w in words),
            g=g,
            i=sql.Literal(i),
            n=sql.Literal(len(words)),
        )
        if column.length is not None:
            value = sql.SQL("left({v}, {n})").format(v=value, n=sql.Literal(column.length))
    if nulls and not column.not_null:
        value = sql.SQL("CASE WHEN mod({g}, {every}) = {r} THEN NULL ELSE {v} END").format(
            g=g, every=sql.Literal(NULL_EVERY), r=sql.Literal((i + 1) % NULL_EVERY), v=value
        )
    return value
