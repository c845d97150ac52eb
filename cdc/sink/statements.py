"""The destination side in SQL: apply a batch of change events in the caller's transaction.

One statement per batch, whatever its size (``apply_events``), built once from the destination
table's catalog description (``Statements.build``). The batch travels as one JSON
parameter (psycopg2 quotes a list element by element, which cost more than the statement); in
the statement, set-based:

1. ``processed_events`` is read for the batch's action_ids: an id decided before is a
   duplicate, skipped. A dead-lettered id comes back to life only when the operator replays it
   from the DLQ. A duplicate whose ``captured_at`` differs from the one recorded means the
   source handed the id out again: ``ActionIdReusedError`` (the transaction rolls back).
2. The version table (``emp_versions``): the guard. The newest new event per key wins only if
   its action_id is above the last one applied to that key, deletes included (the row stays as
   a tombstone).
3. The table: the winners are written, deletes and upserts each in one sub-statement.
4. ``processed_events``: every new action_id is recorded with its outcome, ``applied`` for the
   winners and ``stale`` for the rest (they lost the guard or a newer event of the same key
   superseded them in the batch). Only what was written counts as applied.

Steps 1 and 2 decide from the statement's snapshot; the writes then check that they did what
the snapshot said: a row the snapshot lacks goes in with a plain INSERT (a unique violation if
another transaction added it meanwhile), a row it has is updated only if still older
(``ON CONFLICT ... WHERE``, counted). An id or key that another transaction decided in
between (only a second consumer on the same destination can) makes the batch a
``TransientError``: it rolls back, and its retry sees that decision.

A value that cannot be put into the statement (a lone surrogate, a NUL) raises
``UnencodableValueError``, a bad message like a database data error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from cdc.errors import ActionIdReusedError, TransientError, UnencodableValueError
from cdc.kafka.client import Received
from cdc.model.event import Event
from cdc.model.table import SOURCE_TABLE, VERSIONS, Column, Kind, Table
from cdc.sink import positions

# The sink's own tables beside the replicated one: it is their one owner (``cdc.sink.records``
# reads them for the tools).
BOOKKEEPING = ("processed_events", VERSIONS)
# Generic tables' version guard (``cdc.sink.generic``).
GENERIC_BOOKKEEPING = ("cdc_versions",)
# Where the sink records the offsets it consumed (``cdc.sink.positions``).
POSITION_TABLES = (positions.TABLE, positions.GAPS)
# A unique violation here means another transaction decided the same id or key meanwhile.
_RACE_TABLES = (*BOOKKEEPING, *GENERIC_BOOKKEEPING)
_RACED = (
    "another transaction decided some of this batch's action_ids or keys while it was "
    "applied (a second consumer on this destination?): retrying the batch"
)

# The statements below are templates: {table}, {versions}, {key} (the primary key column, which
# names the key column of processed_events and of the version table too), and the columns. In
# the statement the key travels as ``_key`` and the other columns as ``_c1``, ``_c2``, ...: a
# column of the table can never take the name of one of the statement's own.
#
# The batch: one JSON array of [action_id, action, topic, partition, offset, captured_at, the row's
# columns in column order] per event (see _batch_json), one action_id each.
#
# No step joins two of the statement's own results: their sizes are unknown to the planner (it
# guesses 1 row, and picks a nested loop that is quadratic in the batch size). Each step adds columns
# to the batch instead, and every lookup is a subquery on a primary key, one probe per event.
_INPUT = """
WITH b AS (
    SELECT (x->>0)::bigint AS action_id, x->>1 AS action, x->>2 AS topic, (x->>3)::int AS part,
           (x->>4)::bigint AS off, (x->>5)::timestamptz AS captured_at, (x->>{key_at})::{key_type} AS _key{inputs}
      FROM jsonb_array_elements(%(batch)s::jsonb) AS x
),"""

# Step 1: the row processed_events holds for each id, if any; the rest (and the dead letters the
# operator replayed) are fresh. MATERIALIZED: every use of ``known`` would run the lookup again.
FRESH_RECORDED = """
k AS MATERIALIZED (
    SELECT b.*, (SELECT p FROM processed_events p WHERE p.action_id = b.action_id) AS known FROM b
),
c AS (
    SELECT k.*, (known).captured_at AS known_at, (known).action_id IS NOT NULL AS seen,
           (known).action_id IS NULL
           OR ((known).outcome = 'dlq' AND action_id = ANY(%(replayed)s::bigint[])) AS fresh
      FROM k
),"""

FRESH_UNRECORDED = """
c AS (
    SELECT b.*, NULL::timestamptz AS known_at, false AS seen, true AS fresh FROM b
),"""

# Steps 2 and 3: the newest fresh event per key is its head; a head wins if its action_id is
# above the version row's (``version``, NULL when the key has none yet). OFFSET 0 keeps the
# lookup a probe per head: pulled up into a join, the planner could pick a scan of the versions.
# Rows the snapshot says are new go in with a plain INSERT: ON CONFLICT costs a second index
# probe and a second WAL record per row, and a row another transaction added meanwhile fails the
# statement with a unique violation instead (``_RACE_TABLES``: a TransientError).
# The guard takes version rows in key order, so concurrent batches cannot deadlock on them.
# Values other than integers travel as text (a date as PostgreSQL's ISO text, BC, infinity,
# years above 9999) and the server casts them where they are written.
_APPLY = """
d AS (
    SELECT c.*, fresh AND action_id = max(action_id) FILTER (WHERE fresh) OVER (PARTITION BY _key) AS head
      FROM c
),
e AS (
    SELECT d.*, v.last_action_id AS version, head AND coalesce(v.last_action_id < d.action_id, true) AS wins
      FROM d LEFT JOIN LATERAL (
               SELECT v.last_action_id FROM {versions} v WHERE d.head AND v.{key} = d._key OFFSET 0
           ) AS v ON true
),
guard_new AS (
    INSERT INTO {versions} ({key}, last_action_id, deleted)
    SELECT _key, action_id, action = 'DELETE' FROM e WHERE wins AND version IS NULL ORDER BY _key
),
guard AS (
    INSERT INTO {versions} AS v ({key}, last_action_id, deleted)
    SELECT _key, action_id, action = 'DELETE' FROM e WHERE wins AND version IS NOT NULL ORDER BY _key
    ON CONFLICT ({key}) DO UPDATE
       SET last_action_id = EXCLUDED.last_action_id, deleted = EXCLUDED.deleted, updated_at = now()
     WHERE v.last_action_id < EXCLUDED.last_action_id
    RETURNING 1
),
removed AS (
    DELETE FROM {table} WHERE {key} = ANY(ARRAY(SELECT _key FROM e WHERE wins AND action = 'DELETE'))
),
written AS (
    INSERT INTO {table} ({key}{columns})
    SELECT _key{values} FROM e
     WHERE wins AND action <> 'DELETE' ORDER BY _key
    ON CONFLICT ({key}) {upsert}
)"""

# Step 4: ids never seen go in plainly; a dead letter the operator replayed is updated.
_RECORD_NEW = """,
recorded_new AS (
    INSERT INTO processed_events
           (action_id, {key}, action, outcome, topic, "partition", "offset", captured_at)
    SELECT action_id, _key, action, CASE WHEN wins THEN 'applied' ELSE 'stale' END,
           topic, part, off, captured_at
      FROM e WHERE fresh AND NOT seen ORDER BY action_id
),
recorded AS (
    INSERT INTO processed_events AS p
           (action_id, {key}, action, outcome, topic, "partition", "offset", captured_at)
    SELECT action_id, _key, action, CASE WHEN wins THEN 'applied' ELSE 'stale' END,
           topic, part, off, captured_at
      FROM e WHERE fresh AND seen ORDER BY action_id
    ON CONFLICT (action_id) DO UPDATE
       SET {key} = EXCLUDED.{key}, action = EXCLUDED.action, outcome = EXCLUDED.outcome,
           topic = EXCLUDED.topic, "partition" = EXCLUDED."partition", "offset" = EXCLUDED."offset",
           captured_at = EXCLUDED.captured_at, processed_at = now()
     WHERE p.outcome = 'dlq' AND p.action_id = ANY(%(replayed)s::bigint[])
    RETURNING 1
)"""

# The answer. First row: did the writes do what the snapshot said (the guard took every winner
# and processed_events every fresh id)? Another transaction deciding the same ids in between
# makes it false. Then one row per event not applied (most are applied): action_id, fresh, and
# for an id decided before, the captured_at recorded and the one it came with, if they differ.
REPORT = """
SELECT NULL::bigint,
       (SELECT count(*) FROM guard) = (SELECT count(*) FROM e WHERE wins AND version IS NOT NULL){recorded},
       NULL::timestamptz, NULL::timestamptz
UNION ALL
SELECT action_id, fresh,
       CASE WHEN NOT fresh AND known_at <> captured_at THEN known_at END,
       CASE WHEN NOT fresh AND known_at <> captured_at THEN captured_at END
  FROM e WHERE NOT wins
"""
RECORDED_TOO = " AND (SELECT count(*) FROM recorded) = (SELECT count(*) FROM e WHERE fresh AND seen)"

# Dead letters: recorded as ``dlq`` (see record_dead).
_RECORD = """
INSERT INTO processed_events AS p
       (action_id, {key}, action, outcome, topic, "partition", "offset", captured_at)
SELECT t.action_id, t._key, t.action, %(outcome)s, t.topic, t.part, t.off, t.captured_at
  FROM unnest(%(action_id)s::bigint[], %(key)s::{key_type}[], %(action)s::text[],
              %(topic)s::text[], %(part)s::int[], %(off)s::bigint[], %(captured_at)s::timestamptz[])
       AS t(action_id, _key, action, topic, part, off, captured_at)
ON CONFLICT (action_id) DO UPDATE
   SET {key} = EXCLUDED.{key}, action = EXCLUDED.action, outcome = EXCLUDED.outcome,
       topic = EXCLUDED.topic, "partition" = EXCLUDED."partition", "offset" = EXCLUDED."offset",
       captured_at = EXCLUDED.captured_at, processed_at = now()
 WHERE p.outcome = 'dlq' AND p.action_id = ANY(%(replayed)s::bigint[])
RETURNING action_id
"""


# Where an event's row starts in its JSON array (after action_id, action, topic, partition,
# offset, captured_at).
_ROW_AT = 6


def _input(i: int, column: Column, at: int) -> sql.Composable:
    """Column ``i`` (1-based among the non-key columns) read from position ``at`` of the batch's
    JSON array."""
    position, name = sql.SQL(str(at)), sql.SQL(f"_c{i}")
    if column.kind is Kind.INTEGER:
        return sql.SQL(", (x->>{})::{} AS {}").format(position, sql.SQL(column.type), name)
    return sql.SQL(", x->>{} AS {}").format(position, name)


def _value(i: int, column: Column) -> sql.Composable:
    """Column ``i`` as written: text as it is, integers cast on input, anything else cast here."""
    if column.kind in (Kind.INTEGER, Kind.TEXT):
        return sql.SQL(", _c{}").format(sql.SQL(str(i)))
    return sql.SQL(", _c{}::{}").format(sql.SQL(str(i)), sql.SQL(column.type))


def _upsert(values: tuple[Column, ...]) -> sql.Composable:
    if not values:  # a table of its key alone: the row is there or not
        return sql.SQL("DO NOTHING")
    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(c.ident) for c in values)
    return sql.SQL("DO UPDATE\n       SET {}").format(updates)


@dataclass(frozen=True)
class Statements:
    """The sink's statements for one destination table, built from its catalog description."""

    table: Table
    apply_recorded: str
    apply_unrecorded: str
    record: str

    @classmethod
    def build(cls, cur: psycopg2.extensions.cursor, table: Table) -> Statements:
        key = table.key
        values = table.values
        written = list(table.written)

        def text(template: str, **extra: str) -> str:
            parts = {
                "table": table.ident,
                "versions": sql.Identifier(VERSIONS),
                "key": key.ident,
                "key_type": sql.SQL(key.type),
                "key_at": sql.SQL(str(_ROW_AT + written.index(key))),
                "inputs": sql.Composed(
                    [_input(i, c, _ROW_AT + written.index(c)) for i, c in enumerate(values, 1)]
                ),
                "columns": sql.Composed([sql.SQL(", {}").format(c.ident) for c in values]),
                "values": sql.Composed([_value(i, c) for i, c in enumerate(values, 1)]),
                "upsert": _upsert(values),
                **{name: sql.SQL(value) for name, value in extra.items()},
            }
            return sql.SQL(template).format(**parts).as_string(cur)

        return cls(
            table,
            apply_recorded=text(
                _INPUT + FRESH_RECORDED + _APPLY + _RECORD_NEW + REPORT, recorded=RECORDED_TOO
            ),
            apply_unrecorded=text(_INPUT + FRESH_UNRECORDED + _APPLY + REPORT, recorded=""),
            record=text(_RECORD),
        )


class Delivered(NamedTuple):
    """A decoded event and the message it came in (a named tuple: one is built per message)."""

    event: Event
    record: Received
    replayed: bool = False  # republished from the DLQ by the operator


@dataclass(frozen=True, slots=True)
class EventRecord:
    """What ``processed_events`` keeps about one message (key and action may be unknown)."""

    action_id: int
    key: Any
    action: str | None
    topic: str
    partition: int
    offset: int
    replayed: bool = False
    captured_at: datetime | None = None


@dataclass
class ApplyResult:
    """The decision on every item given to ``apply_events``: each is in exactly one list."""

    applied: list[Delivered] = field(default_factory=list)  # written to the table
    stale: list[Delivered] = field(default_factory=list)
    duplicates: list[Delivered] = field(default_factory=list)

    def add(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.duplicates += other.duplicates

    def applied_by_action(self) -> Counter[str]:
        return Counter(i.event.action for i in self.applied)


# Columns of processed_events added since its first version (setup_db_with_idempotency.sql adds them).
_ADDED_COLUMNS = ("captured_at", "table_schema", "table_name", "row_key")


def missing_tables(cur: psycopg2.extensions.cursor) -> list[str]:
    """Tables (and columns added since, as ``table.column``) the destination lacks."""
    cur.execute(
        "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL",
        ([SOURCE_TABLE, *BOOKKEEPING, *GENERIC_BOOKKEEPING, *POSITION_TABLES],),
    )
    missing = [row[0] for row in cur.fetchall()]
    if "processed_events" not in missing:
        cur.execute(
            "SELECT c FROM unnest(%s::text[]) AS c WHERE NOT EXISTS (SELECT FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'processed_events' AND column_name = c)",
            (list(_ADDED_COLUMNS),),
        )
        missing += [f"processed_events.{row[0]}" for row in cur.fetchall()]
    if "cdc_versions" not in missing:
        # Its first shape, keyed by (table_schema, table_name, key): the setup script converts it.
        cur.execute(
            "SELECT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = 'cdc_versions' AND column_name = 'table_schema')"
        )
        row = cur.fetchone()
        if row and row[0]:
            missing.append("cdc_versions keyed by one column")
    return missing


def dedupe(items: Iterable[Delivered]) -> tuple[dict[int, Delivered], list[Delivered]]:
    """One item per action_id, and the other copies (a producer re-send in the same batch).

    The operator's replayed copy wins over a plain one: it must not be lost as a duplicate.
    """
    fresh: dict[int, Delivered] = {}
    copies: list[Delivered] = []
    for item in items:
        seen = fresh.get(item.event.action_id)
        if seen is None:
            fresh[item.event.action_id] = item
        elif item.replayed and not seen.replayed:
            fresh[item.event.action_id] = item
            copies.append(seen)
        else:
            copies.append(item)
    return fresh, copies


def apply_events(
    cur: psycopg2.extensions.cursor, items: Sequence[Delivered], *, idempotency: bool, statements: Statements
) -> ApplyResult:
    """Apply ``items`` in the open transaction of ``cur`` (one statement). Errors are left to the caller."""
    fresh, copies = dedupe(items)
    result = ApplyResult(duplicates=copies)
    if not fresh:
        return result
    statement = statements.apply_recorded if idempotency else statements.apply_unrecorded
    run_apply(cur, statement, _batch_json(fresh.values()), fresh, result)
    return result


def run_apply(
    cur: psycopg2.extensions.cursor,
    statement: str,
    batch: Json,
    fresh: dict[int, Delivered],
    result: ApplyResult,
) -> None:
    """Run an apply statement (``Statements``, or a generic table's) on ``batch``, the JSON of
    ``fresh``, and sort each of ``fresh`` into ``result``."""
    try:
        _execute(cur, statement, {"batch": batch, "replayed": _replayed(fresh.values())})
    except psycopg2.errors.UniqueViolation as exc:
        if exc.diag.table_name in _RACE_TABLES:
            raise TransientError(_RACED, "conflict") from exc
        raise
    # One row without an action_id says whether the writes did what the snapshot said; the
    # others are the events not applied: (action_id, fresh, reused id's captured_at pair).
    not_applied: dict[int, bool] = {}
    reused: list[tuple[int, datetime, datetime]] = []
    consistent = False
    for action_id, is_fresh, recorded_at, incoming_at in cur.fetchall():
        if action_id is None:
            consistent = is_fresh
            continue
        not_applied[action_id] = is_fresh
        if recorded_at is not None:
            reused.append((action_id, recorded_at, incoming_at))
    if reused:
        _reused(min(reused))
    if not consistent:
        raise TransientError(_RACED, "conflict")
    for action_id, item in fresh.items():
        is_fresh = not_applied.get(action_id)
        if is_fresh is None:
            result.applied.append(item)
        elif is_fresh:
            result.stale.append(item)
        else:
            result.duplicates.append(item)


def record_dead(
    cur: psycopg2.extensions.cursor, records: Sequence[EventRecord], *, statements: Statements
) -> set[int]:
    """Record dead-lettered ids as ``dlq``. Returns the ids not recorded before (or replayed)."""
    if not records:
        return set()
    _execute(
        cur,
        statements.record,
        _record_params(records, outcome="dlq", replayed=[r.action_id for r in records if r.replayed]),
    )
    return {row[0] for row in cur.fetchall()}


def _reused(found: tuple[int, datetime, datetime]) -> None:
    action_id, recorded, incoming = found
    raise ActionIdReusedError(
        f"action_id={action_id} came again as another change (captured_at {incoming.isoformat()}, "
        f"recorded with {recorded.isoformat()}): the source's action_id sequence went back (a "
        "point-in-time recovery or a sequence reset), and its new changes would be dropped as "
        "duplicates; stopping without committing. See USAGE.md, 'A source that went back in time'"
    )


def timestamp(at: datetime | None) -> datetime | str | None:
    """``at`` for orjson: as psycopg2 sends a datetime, the server parses what isoformat() prints.
    orjson prints a UTC datetime the same, much faster; another offset may have seconds, which
    orjson would drop."""
    return at if at is None or at.tzinfo is UTC else at.isoformat()


def first_line(exc: BaseException) -> str:
    """The error's message without SQLSTATE, DETAIL or context."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _batch_json(items: Iterable[Delivered]) -> Json:
    """The batch as the JSON the statement reads (see _INPUT)."""
    rows = []
    for event, record, _ in items:
        action_id, action, row, _, at = event
        rows.append(
            (
                action_id,
                action,
                record.topic,
                record.partition,
                record.offset,
                timestamp(at),
                *row,
            )
        )
    try:
        text = orjson.dumps(rows)
    except orjson.JSONEncodeError as exc:  # a lone surrogate, an integer above 64 bits
        raise UnencodableValueError(f"{type(exc).__name__}: {exc}") from exc
    # JSON can carry a NUL (\u0000), text in PostgreSQL cannot: refuse it here, like psycopg2.
    if b"\\u0000" in text and any("\x00" in v for row in rows for v in row if isinstance(v, str)):
        raise UnencodableValueError("ValueError: A string literal cannot contain NUL (0x00) characters.")
    return Json(text)


class Json:
    """UTF-8 JSON text as a query parameter, quoted as bytes where the connection speaks UTF-8:
    psycopg2 would decode, encode and escape the whole batch character by character, a large
    share of the consumer's time. orjson's output holds no raw control character, so doubling quotes
    and backslashes in an E'' literal is all it needs. Another client encoding gets psycopg2's
    own quoting (which refuses what that encoding cannot hold)."""

    __slots__ = ("_conn", "text")

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._conn: psycopg2.extensions.connection | None = None

    def __conform__(self, protocol: object) -> Json:
        return self

    def prepare(self, conn: psycopg2.extensions.connection) -> None:
        self._conn = conn

    def getquoted(self) -> bytes:
        if self._conn is not None and self._conn.encoding == "UTF8":
            return b"E'" + self.text.replace(b"\\", b"\\\\").replace(b"'", b"''") + b"'"
        quoted = psycopg2.extensions.QuotedString(self.text.decode())
        if self._conn is not None:
            quoted.prepare(self._conn)
        return quoted.getquoted()


def _execute(cur: psycopg2.extensions.cursor, statement: str, params: dict[str, Any]) -> None:
    try:
        cur.execute(statement, params)
    except (UnicodeEncodeError, ValueError, OverflowError) as exc:
        # Raised while psycopg2 builds the statement: the server never saw it, the data is bad.
        raise UnencodableValueError(f"{type(exc).__name__}: {exc}") from exc


def _replayed(items: Iterable[Delivered]) -> list[int]:
    return [i.event.action_id for i in items if i.replayed]


def _record_params(records: Sequence[EventRecord], *, outcome: str, replayed: list[int]) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "action_id": [r.action_id for r in records],
        "key": [r.key for r in records],
        "action": [r.action for r in records],
        "topic": [r.topic for r in records],
        "part": [r.partition for r in records],
        "off": [r.offset for r in records],
        "captured_at": [r.captured_at for r in records],
        "replayed": replayed,
    }
