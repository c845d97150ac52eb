"""A replicated table, described once, from the database catalog.

``Table.load`` reads a table's columns (name, type, length limit, NOT NULL, generated,
identity) and its primary key from ``pg_catalog``. Everything that handles the table's rows
derives from that description: the event SQL the producer runs on the source
(``cdc.source.outbox``), the statements the sink runs on the destination (``cdc.sink``), the
validation of an event's values (``cdc.model.event``), the workload, ``verify`` and the
benchmarks. The SQL files are hand-written and name the columns themselves.

What each column's values look like in an event depends on its kind (``Kind``): integers as
JSON numbers, text and dates as JSON strings (a date as PostgreSQL's ISO text).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from cdc.errors import ConfigError, SchemaMissingError
from cdc.runtime.db import one_row

# The seed's tables: the replicated table, its outbox on the source and its version guard on the
# destination (the outbox and the guard are keyed by the table's primary key column).
SOURCE_TABLE = "employees"
OUTBOX = "emp_records_cdc"
VERSIONS = "emp_versions"

INT2 = (-(2**15), 2**15 - 1)
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)


class Kind(enum.Enum):
    """How a column's values travel in an event, and how they are checked."""

    INTEGER = "integer"  # a JSON number in the type's range
    TEXT = "text"  # a JSON string: at most ``length`` characters, no NUL
    DATE = "date"  # a JSON string: PostgreSQL's ISO date text, parsed by the destination
    OTHER = "other"  # (tables other than employees) PostgreSQL's text output, typed by the destination


# Base type name -> (kind, integer range).
_KINDS: dict[str, tuple[Kind, tuple[int, int] | None]] = {
    "int2": (Kind.INTEGER, INT2),
    "int4": (Kind.INTEGER, INT4),
    "int8": (Kind.INTEGER, INT8),
    "text": (Kind.TEXT, None),
    "varchar": (Kind.TEXT, None),
    "bpchar": (Kind.TEXT, None),
    "date": (Kind.DATE, None),
}

# The shape of PostgreSQL's ISO date output (at most 7 year digits: the type ends in 5874897).
DATE_TEXT = re.compile(r"(?:[0-9]{4}|[1-9][0-9]{4,6})-[0-9]{2}-[0-9]{2}(?: BC)?|-?infinity")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as PostgreSQL writes it: "integer", "character varying(100)", "date"
    kind: Kind
    range: tuple[int, int] | None = None  # the integer range of an INTEGER column
    length: int | None = None  # the character limit of a TEXT column, if it has one
    not_null: bool = False
    generated: bool = False  # GENERATED ALWAYS AS (...) STORED: computed, never written
    identity: bool = False  # GENERATED ... AS IDENTITY
    # The column's own type (a domain, not its base), schema-qualified and quoted, without its
    # modifier: what a value's text is cast to, so the column's modifier applies on assignment
    # (an error for text too long, as on the source) rather than a silent explicit-cast cut.
    cast_type: str = ""
    identity_always: bool = False  # GENERATED ALWAYS AS IDENTITY: written with OVERRIDING SYSTEM VALUE

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name)


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]  # in the table's column order
    primary_key: tuple[str, ...]

    @classmethod
    def load(cls, cur: psycopg2.extensions.cursor, name: str, *, any_type: bool = False) -> Table:
        """The table ``name`` (as written in SQL, schema-qualified or on the search path).

        SchemaMissingError if it does not exist; ConfigError if it has no primary key or (unless
        ``any_type``: a generic table, whose values travel as text) a column of a type employees'
        events cannot carry.
        """
        cur.execute("SELECT to_regclass(%s)::oid", (name,))
        (oid,) = one_row(cur)
        if oid is None:
            raise SchemaMissingError(f"table {name} does not exist in {_dbname(cur)}")
        cur.execute(_COLUMNS, (oid,))
        rows = cur.fetchall()
        schema, table = rows[0][0], rows[0][1]
        columns = []
        for _, _, column, type_, base, typmod, not_null, generated, identity, cast_type in rows:
            if base not in _KINDS and not any_type:
                raise ConfigError(
                    f"{schema}.{table}.{column} is of type {type_}, which change events cannot carry yet"
                )
            kind, range_ = _KINDS.get(base, (Kind.OTHER, None))
            length = typmod - 4 if kind is Kind.TEXT and base != "text" and typmod >= 4 else None
            columns.append(
                Column(
                    column,
                    type_,
                    kind,
                    range_,
                    length,
                    not_null,
                    generated,
                    identity != "",
                    cast_type,
                    identity == "a",
                )
            )
        cur.execute(_PRIMARY_KEY, (oid,))
        key = tuple(r[0] for r in cur.fetchall())
        if not key:
            raise ConfigError(
                f"{schema}.{table} has no primary key: its changes cannot be applied exactly once"
            )
        return cls(schema, table, tuple(columns), key)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def written(self) -> tuple[Column, ...]:
        """The columns an event carries and the sink writes: all but generated ones."""
        return tuple(c for c in self.columns if not c.generated)

    @property
    def key(self) -> Column:
        """The primary key column (the pipeline keys rows by a single column)."""
        if len(self.primary_key) != 1:
            raise ConfigError(
                f"{self.schema}.{self.name} has a primary key of {len(self.primary_key)} columns; "
                "this pipeline keys rows by one column"
            )
        return self.column(self.primary_key[0])

    @property
    def values(self) -> tuple[Column, ...]:
        """The written columns other than the key, in column order."""
        key = self.key.name
        return tuple(c for c in self.written if c.name != key)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def same_shape(self, other: Table) -> bool:
        """Whether ``other`` has the same written columns (names, kinds, limits) and key."""
        return self.primary_key == other.primary_key and [
            (c.name, c.kind, c.range, c.length) for c in self.written
        ] == [(c.name, c.kind, c.range, c.length) for c in other.written]


def _dbname(cur: psycopg2.extensions.cursor) -> str:
    return cur.connection.get_dsn_parameters().get("dbname", "the database")


_COLUMNS = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
       coalesce(bt.typname, t.typname), a.atttypmod, a.attnotnull, a.attgenerated <> '', a.attidentity::text,
       format('%%I.%%I', tn.nspname, t.typname)
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_type t ON t.oid = a.atttypid
  JOIN pg_namespace tn ON tn.oid = t.typnamespace
  LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
 WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""

_PRIMARY_KEY = """
SELECT a.attname
  FROM pg_index i
  JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) ON true
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = %s AND i.indisprimary
 ORDER BY k.pos
"""
