"""Changes of generic tables applied by the sink (``cdc.sink.batch`` with ``cdc.sink.generic``) on a
real destination database and the real DLQ topic: upserts and deletes by a composite key, the
version guard with tombstones (a late or replayed older change never regresses a row),
``processed_events`` one row per action_id with its table and key, a bad value dead-lettered with
its id recorded, identity and generated columns, foreign keys under ``session_replication_role``
and without it, and drift (a missing table, a missing column, another primary key) reported, not
guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import orjson
import pytest
from psycopg2 import sql

from cdc.dlq import letters as dlq_letters
from cdc.dlq import queue as dlq_module
from cdc.dlq import replay
from cdc.dlq.letters import Selection
from cdc.dlq.queue import CircuitBreaker, DeadLetterQueue
from cdc.errors import TransientError
from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Received
from cdc.local.paths import SETUP_DEST_SQL
from cdc.model.topics import topic_for
from cdc.ops import dlq_workbench
from cdc.runtime.db import Database
from cdc.runtime.stats import Stats, table_events_key
from cdc.sink.batch import BatchApplier
from tests.support import connect, query

OURS = [(MARK_HEADER, MARK_VALUE)]

TABLES = """
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (
    pid int REFERENCES parent (id),
    at timestamptz,
    n numeric(10, 2),
    note varchar(5),
    ident int GENERATED ALWAYS AS IDENTITY,
    twice numeric GENERATED ALWAYS AS (n * 2) STORED,
    PRIMARY KEY (pid, at)
);
"""


@contextlib.contextmanager
def database(url: str, name: str, setup: str) -> Iterator[str]:
    server = url.rsplit("/", 1)[0]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with connect(f"{server}/{name}", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(SETUP_DEST_SQL.read_text())
            cur.execute(setup)
        yield f"{server}/{name}"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dest(service_env) -> Iterator[str]:
    with database(service_env["DEST_DB_URL"], "cdc_apply_tables", TABLES) as url:
        yield url


def change(action_id: int, action: str, table: str, row: dict, key: tuple[str, ...], schema: str = "public"):
    """A generic change message as the producer publishes it."""
    value = {
        "action_id": action_id,
        "action": action,
        "schema": schema,
        "table": table,
        "key": {k: row[k] for k in key},
        "row": row,
        "txid": 1000 + action_id,
        "captured_at": "2026-12-07T10:00:00.000001+00:00",
    }
    return value


def received(settings, values: list[dict], offset: int = 0, *, mangle=None) -> list[Received]:
    out = []
    for n, value in enumerate(values):
        topic = topic_for(settings.cdc_topic_prefix, value["schema"], value["table"])
        raw = orjson.dumps(value)
        if mangle is not None:
            raw = mangle(n, raw)
        out.append(Received(topic, 0, offset + n, orjson.dumps(value["key"]), raw, OURS))
    return out


def applier(url: str, settings, **extra) -> tuple[BatchApplier, DeadLetterQueue, Database]:
    db, queue = Database(url), DeadLetterQueue(settings)
    a = BatchApplier(
        db,
        dlq=queue,
        breaker=CircuitBreaker(100, 0.95),
        stats=Stats("t"),
        max_attempts=2,
        idempotency=True,
        topic_prefix=settings.cdc_topic_prefix,
        **extra,
    )
    return a, queue, db


def parent(i: int, name: str | None) -> dict:
    return {"id": str(i), "name": name}


def child(pid: int, at: str, n: str | None, note: str | None = None, ident: str = "1") -> dict:
    return {"pid": str(pid), "at": at, "n": n, "note": note, "ident": ident}


PK = ("pid", "at")


def test_changes_apply_by_key_the_guard_never_regresses_and_every_id_is_recorded(settings, dest):
    a, queue, db = applier(dest, settings)
    t1, t2 = "2024-01-01 00:00:00+00", "2024-01-01 00:00:00.5+00"
    first = [
        change(1, "INSERT", "parent", parent(1, "one"), ("id",)),
        change(2, "INSERT", "child", child(1, t1, "1.50", "a", ident="7"), PK),
        change(3, "INSERT", "child", child(1, t2, "2.00"), PK),
        change(4, "UPDATE", "child", child(1, t1, "3.25", "b", ident="7"), PK),
        change(5, "DELETE", "child", child(1, t2, "2.00"), PK),
    ]
    try:
        result = a.apply(received(settings, first))
        assert not result.dead
        assert {i.event.action_id for i in result.applied} == {1, 4, 5}
        assert {i.event.action_id for i in result.stale} == {2, 3}  # superseded in the batch by 4 and 5
        # The batch again (a producer re-send): duplicates. An older change arriving late: stale.
        again = a.apply(received(settings, first, offset=5))
        assert len(again.duplicates) == len(first) and not again.applied
        late = a.apply(
            received(
                settings,
                [
                    change(3, "INSERT", "child", child(1, t2, "2.00"), PK),  # a duplicate id
                    change(0 + 6, "INSERT", "child", child(1, t2, "9.99"), PK),  # newer than the delete
                ],
                offset=10,
            )
        )
        assert [i.event.action_id for i in late.applied] == [6]
        replayed_old = a.apply(
            received(settings, [change(4, "UPDATE", "child", child(1, t1, "0.01", ident="7"), PK)], offset=12)
        )
        assert replayed_old.duplicates  # id 4 decided before
    finally:
        queue.close()
        db.close()
    rows = query(dest, "SELECT pid, at::text, n::text, note, ident, twice::text FROM child ORDER BY at")
    assert rows == [
        (1, "2024-01-01 00:00:00+00", "3.25", "b", 7, "6.50"),
        (1, "2024-01-01 00:00:00.5+00", "9.99", None, 1, "19.98"),
    ]
    recorded = query(
        dest,
        "SELECT action_id, table_schema, table_name, row_key, outcome FROM processed_events ORDER BY action_id",
    )
    assert [(r[0], r[2], r[4]) for r in recorded] == [
        (1, "parent", "applied"),
        (2, "child", "stale"),
        (3, "child", "stale"),
        (4, "child", "applied"),
        (5, "child", "applied"),
        (6, "child", "applied"),
    ]
    assert recorded[1][3] == {"pid": "1", "at": t1}
    versions = query(dest, "SELECT key, last_action_id, deleted FROM cdc_versions ORDER BY last_action_id")
    # The table's name, each part quoted, then the key's canonical text (members sorted,
    # compact): one text per row.
    assert versions == [
        ('"public"."parent"{"id":"1"}', 1, False),
        (f'"public"."child"{{"at":"{t1}","pid":"1"}}', 4, False),
        (f'"public"."child"{{"at":"{t2}","pid":"1"}}', 6, False),
    ]


def test_a_tombstone_keeps_an_older_change_from_bringing_a_row_back(settings, dest):
    a, queue, db = applier(dest, settings)
    try:
        a.apply(
            received(
                settings,
                [
                    change(10, "INSERT", "parent", parent(5, "x"), ("id",)),
                    change(12, "DELETE", "parent", parent(5, "x"), ("id",)),
                ],
            )
        )
        late = a.apply(received(settings, [change(11, "UPDATE", "parent", parent(5, "late"), ("id",))], 2))
    finally:
        queue.close()
        db.close()
    assert [i.event.action_id for i in late.stale] == [11]
    assert query(dest, "SELECT count(*) FROM parent") == [(0,)]
    assert query(dest, "SELECT deleted, last_action_id FROM cdc_versions") == [(True, 12)]


def test_a_bad_value_is_dead_lettered_with_its_table_and_the_rest_applies(settings, dest):
    a, queue, db = applier(dest, settings)
    batch = [
        change(20, "INSERT", "parent", parent(1, "p"), ("id",)),
        change(21, "INSERT", "child", child(1, "2024-01-01 00:00:00+00", "1", "toolong"), PK),  # varchar(5)
        change(22, "INSERT", "child", child(1, "2024-01-02 00:00:00+00", "not a number"), PK),
        change(23, "INSERT", "child", child(1, "2024-01-03 00:00:00+00", "3"), PK),
    ]
    bad = received(settings, batch)
    bad.append(Received(bad[0].topic, 0, 99, None, b'{"action_id": 24, "action": "INSERT"}', OURS))
    try:
        result = a.apply(bad)
    finally:
        queue.close()
        db.close()
    assert sorted(letter.record.offset for letter in result.dead) == [1, 2, 99]
    assert a.stats.get(table_events_key("dlq", "public.child")) == 2
    assert a.stats.get(table_events_key("applied", "public.parent")) == 1
    letters = list(dlq_module.show(settings))
    assert {r["headers"][dlq_module.H_TABLE] for r in letters} == {"public.child", "public.parent"}
    assert query(dest, "SELECT n::text FROM child") == [("3.00",)]
    dead = query(
        dest, "SELECT action_id, table_name, row_key FROM processed_events WHERE outcome = 'dlq' ORDER BY 1"
    )
    assert dead == [
        (21, "child", {"pid": "1", "at": "2024-01-01 00:00:00+00"}),
        (22, "child", {"pid": "1", "at": "2024-01-02 00:00:00+00"}),
        (24, None, None),
    ]


def test_a_change_on_another_tables_topic_is_a_bad_message(settings, dest):
    a, queue, db = applier(dest, settings)
    [msg] = received(settings, [change(30, "INSERT", "parent", parent(1, "p"), ("id",))])
    wrong = Received(topic_for(settings.cdc_topic_prefix, "public", "child"), 0, 0, msg.key, msg.value, OURS)
    try:
        result = a.apply([wrong])
    finally:
        queue.close()
        db.close()
    assert len(result.dead) == 1 and "not on its own topic" in result.dead[0].error
    assert query(dest, "SELECT count(*) FROM parent") == [(0,)]


def test_foreign_keys_hold_under_the_replica_role_whatever_the_order(settings, dest):
    """Child first, parent later (another topic): applied under session_replication_role = replica,
    which the destination's owner (a superuser here) may set."""
    a, queue, db = applier(dest, settings)
    try:
        a.load_table()
        assert a.generic.replica
        a.apply(
            received(settings, [change(40, "INSERT", "child", child(2, "2024-01-01 00:00:00+00", "1"), PK)])
        )
        a.apply(received(settings, [change(39, "INSERT", "parent", parent(2, "late parent"), ("id",))], 1))
    finally:
        queue.close()
        db.close()
    assert query(dest, "SELECT count(*) FROM child") == [(1,)]
    assert query(dest, "SELECT name FROM parent") == [("late parent",)]


def test_without_the_replica_role_a_batch_is_ordered_by_foreign_keys_and_a_violation_waits(settings, dest):
    a, queue, db = applier(dest, settings, fk_wait=60.0)
    try:
        a.load_table()
        a.generic.replica = False  # as for a role without the grant
        batch = [
            change(50, "INSERT", "child", child(3, "2024-01-01 00:00:00+00", "1"), PK),
            change(49, "INSERT", "parent", parent(3, "p"), ("id",)),
        ]
        # Child listed first: upserts run parents first, so the batch applies.
        assert len(a.apply(received(settings, batch)).applied) == 2
        # Deletes run children first.
        gone = [
            change(51, "DELETE", "parent", parent(3, "p"), ("id",)),
            change(52, "DELETE", "child", child(3, "2024-01-01 00:00:00+00", "1"), PK),
        ]
        assert len(a.apply(received(settings, gone, 2)).applied) == 2
        # A child whose parent is in no batch yet: transient while the wait lasts, never a dead letter.
        orphan = [change(60, "INSERT", "child", child(4, "2024-01-01 00:00:00+00", "1"), PK)]
        with pytest.raises(TransientError, match="foreign key"):
            a.apply(received(settings, orphan, 4))
    finally:
        queue.close()
        db.close()
    assert query(dest, "SELECT count(*) FROM processed_events WHERE action_id = 60") == [(0,)]


@pytest.mark.parametrize(
    ("ddl", "words"),
    [
        ("DROP TABLE child", "public.child does not exist on the destination"),
        ("ALTER TABLE child DROP COLUMN note", "public.child lacks column note on the destination"),
        (
            "ALTER TABLE child DROP CONSTRAINT child_pkey, ADD PRIMARY KEY (pid)",
            "public.child has primary key (pid) on the destination, (at, pid) on the source",
        ),
        (
            "ALTER TABLE child DROP COLUMN note, ADD COLUMN note text GENERATED ALWAYS AS ('x') STORED",
            "column note is generated on the destination",
        ),
    ],
)
def test_drift_is_named_and_nothing_is_applied(settings, dest, ddl, words):
    query(dest, ddl)
    a, queue, db = applier(dest, settings)
    batch = received(
        settings,
        [
            change(70, "INSERT", "parent", parent(1, "p"), ("id",)),
            change(71, "INSERT", "child", child(1, "2024-01-01 00:00:00+00", "1"), PK),
        ],
    )
    try:
        held = a.drifted(a.decode(batch))
        assert list(held) == [("public", "child")]
        why, shape, topics = held[("public", "child")]
        assert words in why
        assert topics == {batch[1].topic}
        # Fixed: read afresh, nothing held.
        query(dest, "DROP TABLE IF EXISTS child")
        query(dest, TABLES.split(";")[1])
        assert a.recheck(("public", "child"), shape) is None
    finally:
        queue.close()
        db.close()


def test_a_key_is_one_row_whatever_the_order_of_its_members(settings, dest):
    a, queue, db = applier(dest, settings)
    row = child(1, "2024-01-01 00:00:00+00", "1")
    newer = change(81, "INSERT", "child", row, PK)
    older = change(80, "UPDATE", "child", {**row, "n": "9.00"}, PK)
    older["key"] = dict(reversed(list(older["key"].items())))  # {"at": ..., "pid": ...}
    try:
        a.apply(received(settings, [change(79, "INSERT", "parent", parent(1, "p"), ("id",)), newer]))
        late = a.apply(received(settings, [older], 2))
    finally:
        queue.close()
        db.close()
    assert [i.event.action_id for i in late.stale] == [80]
    assert query(dest, "SELECT n::text FROM child") == [("1.00",)]
    assert query(dest, """SELECT count(*) FROM cdc_versions WHERE key LIKE '"public"."child"%'""") == [(1,)]


def test_the_replay_forecast_of_a_change_of_another_table_reads_that_tables_guard(settings, dest):
    """``dlq replay``'s forecast for dead letters of a generic table: stale where a newer change of
    the row was applied since (the guard in ``cdc_versions``), applied where none was."""
    a, queue, db = applier(dest, settings)
    first, second = "2024-01-01 00:00:00+00", "2024-01-02 00:00:00+00"
    try:
        a.apply(
            received(
                settings,
                [
                    change(30, "INSERT", "parent", parent(1, "p"), ("id",)),
                    change(31, "INSERT", "child", child(1, first, "1", "toolong"), PK),  # varchar(5)
                    change(32, "INSERT", "child", child(1, second, "1", "toolong"), PK),
                ],
            )
        )
        a.apply(received(settings, [change(33, "INSERT", "child", child(1, first, "2", "fixed"), PK)], 3))
    finally:
        queue.close()
        db.close()
    letters = dlq_letters.read_letters(settings, Selection().matches)
    plans = replay.plan(settings, letters, {}, None)
    expected = dlq_workbench.expectations(dataclasses.replace(settings, dest_db_url=dest), plans)
    by_id = {p.action_id: expected[p.letter.position] for p in plans}
    assert by_id == {
        31: f'stale: key {{"at":"{first}","pid":"1"}} is already at action_id 33; nothing changes',
        32: "applied, unless the destination rejects the row",
    }
