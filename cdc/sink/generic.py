"""Rows of any table written from their row images: the typing part of applying generic changes.

A generic change carries its row as ``{column: text or null}``: each value as PostgreSQL's own
text output on the source (``cdc_capture`` in setup_db.sql). The destination types each value
from that text with the column's input function, by a cast to the column's own type without its
modifier (``Column.cast_type``): an explicit cast to ``varchar(3)`` or ``bit(4)`` would cut or
pad silently, while assignment to the column then applies the modifier as the source did (an
error for a value too long, numeric rounded to the column's scale). Nothing passes through a JSON
number, a Python value or a re-parsed document, so every type the source can print comes back
exactly.

The statement is built from the **destination's** catalog (``Table.load(..., any_type=True)``):
identifiers quoted, generated columns never written, identity columns written with ``OVERRIDING
SYSTEM VALUE``. Columns the event lacks or the table lacks are not guessed here: the caller
compares the two first (drift is held, never written as NULL).

Not yet wired into the consumer: the version guard, ``processed_events`` and the batch
transaction for generic tables are the next step.
"""

from __future__ import annotations

from psycopg2 import sql

from cdc.model.table import Column, Table


def typed(column: Column, image: sql.Composable) -> sql.Composed:
    """``column``'s value read from the row image ``image`` (a jsonb expression), typed."""
    return sql.SQL("({} ->> {})::{}").format(image, sql.Literal(column.name), sql.SQL(column.cast_type))


def insert_rows(table: Table) -> sql.Composed:
    """INSERT of the row images in ``%(rows)s`` (a JSON array of objects) into ``table``."""
    columns = table.written
    image = sql.SQL("r")
    overriding = (
        sql.SQL(" OVERRIDING SYSTEM VALUE") if any(c.identity_always for c in columns) else sql.SQL("")
    )
    return sql.SQL(
        "INSERT INTO {table} ({columns}){overriding} SELECT {values} FROM jsonb_array_elements(%(rows)s::jsonb) AS r"
    ).format(
        table=table.ident,
        columns=sql.SQL(", ").join(c.ident for c in columns),
        overriding=overriding,
        values=sql.SQL(", ").join(typed(c, image) for c in columns),
    )
