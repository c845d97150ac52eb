"""The sink's bookkeeping as the tools read it: ``processed_events`` (one row per action_id
decided, with its outcome) and the version table (the newest action_id applied per key).

The sink writes them in ``cdc.sink.statements``; verify, the DLQ workbench and the demo read
them only through this module, and the rule by which the sink decides a change is stated here
once for them (``expect``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from cdc.model.table import VERSIONS, Table
from cdc.runtime.db import one_row
from cdc.sink import generic

APPLIED, STALE, DLQ = "applied", "stale", "dlq"

# Every decided action_id with its outcome, in action_id order (verify streams it).
DECIDED_IDS = "SELECT action_id, outcome FROM processed_events ORDER BY action_id"


def counts(cur: psycopg2.extensions.cursor) -> tuple[int, int]:
    """How many action_ids are decided, and how many of them were dead-lettered."""
    cur.execute("SELECT count(*), count(*) FILTER (WHERE outcome = 'dlq') FROM processed_events")
    decided, dead = one_row(cur)
    return decided, dead


def decisions(
    cur: psycopg2.extensions.cursor, action_ids: Sequence[int]
) -> dict[int, tuple[str, str, int, int]]:
    """The decision on each of ``action_ids`` that has one: outcome, topic, partition, offset."""
    cur.execute(
        'SELECT action_id, outcome, topic, "partition", "offset" FROM processed_events WHERE action_id = ANY(%s)',
        (list(action_ids),),
    )
    return {r[0]: r[1:] for r in cur.fetchall()}


def versions(cur: psycopg2.extensions.cursor, table: Table, keys: Sequence[Any]) -> dict[Any, int]:
    """The newest action_id applied (or deleted) per key, for those of ``keys`` that have one."""
    key = table.key
    if key.range is not None:  # an integer key: a letter's key may be any text
        lo, hi = key.range
        keys = [k for k in keys if type(k) is int and lo <= k <= hi]
    cur.execute(
        sql.SQL("SELECT {key}, last_action_id FROM {versions} WHERE {key} = ANY(%s::{type}[])").format(
            key=key.ident, versions=sql.Identifier(VERSIONS), type=sql.SQL(key.type)
        ),
        (list(keys),),
    )
    return dict(cur.fetchall())


def generic_versions(cur: psycopg2.extensions.cursor, keys: Sequence[str]) -> dict[str, int]:
    """The newest action_id applied (or deleted) per row of another table, by its key in the
    version guard ``cdc_versions`` (``cdc.model.change.guard_key``), for those that have one."""
    if not keys:
        return {}
    cur.execute(
        sql.SQL("SELECT key, last_action_id FROM {} WHERE key = ANY(%s::text[])").format(
            sql.Identifier(generic.VERSIONS)
        ),
        (list(keys),),
    )
    return dict(cur.fetchall())


def expect(action_id: int, decided: str | None, version: int | None) -> str:
    """What the sink will make of a change arriving now: ``duplicate`` (its action_id was decided
    before, other than as a dead letter), ``stale`` (its key already holds a newer change) or
    ``applied`` (unless the destination rejects the row)."""
    if decided in (APPLIED, STALE):
        return "duplicate"
    if version is not None and version >= action_id:
        return STALE
    return APPLIED
