"""The destination side in SQL: apply a batch of change events in the caller's transaction.

Steps (all set-based, one statement each, whatever the batch size):

1. ``processed_events``: record the new action_ids (``ON CONFLICT DO NOTHING RETURNING``); the
   ids it does not return were decided before and are duplicates. A dead-lettered id comes back
   to life only when the operator replays it from the DLQ.
2. ``emp_versions``: the version guard. The newest event per emp_id wins only if its action_id
   is above the last one applied to that emp_id, deletes included (the row stays as a tombstone).
3. ``employees``: the winners are written, deletes and upserts each in one statement.
4. ``processed_events``: every other event is marked ``stale``: the ones that lost the guard and
   the ones a newer event of the same emp_id superseded within the batch. Only what was written
   counts as applied.

A value psycopg2 cannot put into a statement (it builds statements on the client) raises
``UnencodableValueError``, a bad message like a database data error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg2.extensions

from cdc.errors import ActionIdReusedError, UnencodableValueError
from cdc.kafka import Received
from employee import ACTIONS, INT4_MAX, INT4_MIN, INT8_MAX, ChangeEvent

TABLES = ("employees", "processed_events", "emp_versions")

_RECORD = """
INSERT INTO processed_events AS p
       (action_id, emp_id, action, outcome, topic, "partition", "offset", captured_at)
SELECT t.action_id, t.emp_id, t.action, %(outcome)s, t.topic, t.part, t.off, t.captured_at
  FROM unnest(%(action_id)s::bigint[], %(emp_id)s::int[], %(action)s::text[],
              %(topic)s::text[], %(part)s::int[], %(off)s::bigint[], %(captured_at)s::timestamptz[])
       AS t(action_id, emp_id, action, topic, part, off, captured_at)
ON CONFLICT (action_id) DO UPDATE
   SET emp_id = EXCLUDED.emp_id, action = EXCLUDED.action, outcome = EXCLUDED.outcome,
       topic = EXCLUDED.topic, "partition" = EXCLUDED."partition", "offset" = EXCLUDED."offset",
       captured_at = EXCLUDED.captured_at, processed_at = now()
 WHERE p.outcome = 'dlq' AND p.action_id = ANY(%(replayed)s::bigint[])
RETURNING action_id
"""

# A re-sent copy carries the captured_at the id was recorded with; a different one means the
# source handed the id out again.
_REUSED = """
SELECT p.action_id, p.captured_at, t.captured_at
  FROM unnest(%(action_id)s::bigint[], %(captured_at)s::timestamptz[]) AS t(action_id, captured_at)
  JOIN processed_events p USING (action_id)
 WHERE p.captured_at <> t.captured_at
 ORDER BY p.action_id
 LIMIT 1
"""

_GUARD = """
INSERT INTO emp_versions AS v (emp_id, last_action_id, deleted)
SELECT * FROM unnest(%(emp_id)s::int[], %(action_id)s::bigint[], %(deleted)s::bool[])
ON CONFLICT (emp_id) DO UPDATE
   SET last_action_id = EXCLUDED.last_action_id, deleted = EXCLUDED.deleted, updated_at = now()
 WHERE v.last_action_id < EXCLUDED.last_action_id
RETURNING emp_id
"""

_DELETE = "DELETE FROM employees WHERE emp_id = ANY(%(emp_id)s::int[])"

# dob travels as PostgreSQL's ISO text (BC, infinity, years above 9999): the server parses it.
_UPSERT = """
INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary)
SELECT emp_id, first_name, last_name, dob::date, city, salary
  FROM unnest(%(emp_id)s::int[], %(first_name)s::text[], %(last_name)s::text[],
              %(dob)s::text[], %(city)s::text[], %(salary)s::int[])
       AS t(emp_id, first_name, last_name, dob, city, salary)
ON CONFLICT (emp_id) DO UPDATE
   SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name, dob = EXCLUDED.dob,
       city = EXCLUDED.city, salary = EXCLUDED.salary
"""

_MARK_STALE = "UPDATE processed_events SET outcome = 'stale' WHERE action_id = ANY(%(action_id)s::bigint[])"


@dataclass(frozen=True, slots=True)
class Delivered:
    """A decoded event and the message it came in."""

    event: ChangeEvent
    record: Received
    replayed: bool = False  # republished from the DLQ by the operator


@dataclass(frozen=True, slots=True)
class EventRecord:
    """What ``processed_events`` keeps about one message (emp_id and action may be unknown)."""

    action_id: int
    emp_id: int | None
    action: str | None
    topic: str
    partition: int
    offset: int
    replayed: bool = False
    captured_at: datetime | None = None


@dataclass
class ApplyResult:
    """The decision on every item given to ``apply_events``: each is in exactly one list."""

    applied: list[Delivered] = field(default_factory=list)  # written to employees
    stale: list[Delivered] = field(default_factory=list)
    duplicates: list[Delivered] = field(default_factory=list)

    def add(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.duplicates += other.duplicates

    def applied_by_action(self) -> Counter[str]:
        return Counter(i.event.action for i in self.applied)


def missing_tables(cur: psycopg2.extensions.cursor) -> list[str]:
    """Tables (and columns added since, as ``table.column``) the destination lacks."""
    cur.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", (list(TABLES),))
    missing = [row[0] for row in cur.fetchall()]
    if "processed_events" not in missing:
        cur.execute(
            "SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'processed_events'"
            " AND column_name = 'captured_at'"
        )
        if cur.fetchone() is None:
            missing.append("processed_events.captured_at")
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
    cur: psycopg2.extensions.cursor, items: Sequence[Delivered], *, idempotency: bool
) -> ApplyResult:
    """Apply ``items`` in the open transaction of ``cur``. Errors are left to the caller."""
    fresh, copies = dedupe(items)
    result = ApplyResult(duplicates=copies)
    if idempotency and fresh:
        records = _record_params(
            [_record_of(i) for i in fresh.values()], outcome="applied", replayed=_replayed(fresh.values())
        )
        _execute(cur, _RECORD, records)
        new_ids = {row[0] for row in cur.fetchall()}
        seen_before = [i for a, i in fresh.items() if a not in new_ids]
        _check_not_reused(cur, seen_before)
        result.duplicates += seen_before
        fresh = {a: i for a, i in fresh.items() if a in new_ids}
    if not fresh:
        return result

    newest: dict[int, ChangeEvent] = {}
    for item in fresh.values():
        ev = item.event
        if ev.emp_id not in newest or ev.action_id > newest[ev.emp_id].action_id:
            newest[ev.emp_id] = ev
    # Sorted by emp_id so concurrent batches lock version rows in the same order.
    heads = [newest[e] for e in sorted(newest)]
    _execute(
        cur,
        _GUARD,
        {
            "emp_id": [ev.emp_id for ev in heads],
            "action_id": [ev.action_id for ev in heads],
            "deleted": [ev.is_delete for ev in heads],
        },
    )
    won = {row[0] for row in cur.fetchall()}

    winners = [ev for ev in heads if ev.emp_id in won]
    deletes = [ev.emp_id for ev in winners if ev.is_delete]
    rows = [ev.employee for ev in winners if not ev.is_delete]
    if deletes:
        _execute(cur, _DELETE, {"emp_id": deletes})
    if rows:
        _execute(
            cur,
            _UPSERT,
            {
                "emp_id": [r.emp_id for r in rows],
                "first_name": [r.first_name for r in rows],
                "last_name": [r.last_name for r in rows],
                "dob": [r.dob for r in rows],
                "city": [r.city for r in rows],
                "salary": [r.salary for r in rows],
            },
        )

    written = {ev.action_id for ev in winners}
    for item in fresh.values():
        (result.applied if item.event.action_id in written else result.stale).append(item)
    if idempotency and result.stale:
        _execute(cur, _MARK_STALE, {"action_id": [i.event.action_id for i in result.stale]})
    return result


def record_dead(cur: psycopg2.extensions.cursor, records: Sequence[EventRecord]) -> set[int]:
    """Record dead-lettered ids as ``dlq``. Returns the ids not recorded before (or replayed)."""
    if not records:
        return set()
    _execute(
        cur,
        _RECORD,
        _record_params(records, outcome="dlq", replayed=[r.action_id for r in records if r.replayed]),
    )
    return {row[0] for row in cur.fetchall()}


def salvage_ids(value: bytes | None) -> tuple[int, int | None, str | None] | None:
    """(action_id, emp_id, action) from an invalid message, when its action_id is usable."""
    try:
        data = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    action_id = data.get("action_id")
    if not _is_int(action_id, 1, INT8_MAX):
        return None
    emp_id = data.get("emp_id")
    action = data.get("action")
    return (
        action_id,
        emp_id if _is_int(emp_id, INT4_MIN, INT4_MAX) else None,
        action if isinstance(action, str) and action in ACTIONS else None,
    )


def _check_not_reused(cur: psycopg2.extensions.cursor, seen_before: Sequence[Delivered]) -> None:
    """Raise ActionIdReusedError if an id decided before now names a different change."""
    timed = [i.event for i in seen_before if i.event.captured_at is not None]
    if not timed:
        return
    _execute(
        cur,
        _REUSED,
        {"action_id": [e.action_id for e in timed], "captured_at": [e.captured_at for e in timed]},
    )
    row = cur.fetchone()
    if row is not None:
        action_id, recorded, incoming = row
        raise ActionIdReusedError(
            f"action_id={action_id} came again as another change (captured_at {incoming.isoformat()}, "
            f"recorded with {recorded.isoformat()}): the source's action_id sequence went back (a "
            "point-in-time recovery or a sequence reset), and its new changes would be dropped as "
            "duplicates; stopping without committing. See USAGE.md, 'A source that went back in time'"
        )


def _execute(cur: psycopg2.extensions.cursor, statement: str, params: dict[str, Any]) -> None:
    try:
        cur.execute(statement, params)
    except (UnicodeEncodeError, ValueError, OverflowError) as exc:
        # Raised while psycopg2 builds the statement: the server never saw it, the data is bad.
        raise UnencodableValueError(f"{type(exc).__name__}: {exc}") from exc


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _record_of(item: Delivered) -> EventRecord:
    ev, m = item.event, item.record
    return EventRecord(
        ev.action_id, ev.emp_id, ev.action, m.topic, m.partition, m.offset, item.replayed, ev.captured_at
    )


def _replayed(items: Iterable[Delivered]) -> list[int]:
    return [i.event.action_id for i in items if i.replayed]


def _record_params(records: Sequence[EventRecord], *, outcome: str, replayed: list[int]) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "action_id": [r.action_id for r in records],
        "emp_id": [r.emp_id for r in records],
        "action": [r.action for r in records],
        "topic": [r.topic for r in records],
        "part": [r.partition for r in records],
        "off": [r.offset for r in records],
        "captured_at": [r.captured_at for r in records],
        "replayed": replayed,
    }
