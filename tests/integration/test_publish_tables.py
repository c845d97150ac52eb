"""producer.py publishing the tables added with ``python -m cdc tables add`` beside employees.

Both outboxes (``emp_records_cdc``, ``cdc_outbox``) are read as one stream in (txid, action_id)
order behind one horizon, under one cursor: each generic change goes to its table's own topic
(created the first time the table is seen, also while the producer runs), with the key object's
text as Kafka key and the event JSON in its fixed shape; employees changes go to CDC_TOPIC as
before. Pruning, --republish-from and --reset-cursor cover both outboxes.

Each test has its own source database (setup_db.sql applied) and its own topic prefix, so the
tables it adds never reach another test's producer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from datetime import UTC

import pytest

from cdc.kafka.client import MARK_HEADER, MARK_VALUE, admin_client
from cdc.model.change import ChangeCodec
from cdc.ops import tables
from cdc.runtime import exits
from cdc.runtime.db import Database
from cdc.runtime.settings import Settings
from cdc.source.outbox import Cursor, Outbox, ProducerSession
from tests.support import connect, execute, fresh_settings, query, source_database, wait_until
from tests.support.producer import Record, cursor_row, producer_env, read_topic

pytestmark = pytest.mark.daemon

MARK = ((MARK_HEADER, MARK_VALUE),)
ORDERS = 'public."Order Items"'
PRICES = 'shop."Prix ü"'
# Both outboxes in the order the producer reads them.
BOTH = """
SELECT action_id, table_schema, table_name FROM (
    SELECT txid, action_id, NULL AS table_schema, NULL AS table_name FROM emp_records_cdc
    UNION ALL
    SELECT txid, action_id, table_schema, table_name FROM cdc_outbox) AS o
 ORDER BY txid, action_id
"""


@pytest.fixture
def source(service_env):
    with source_database(service_env["SOURCE_DB_URL"], "cdc_publish_tables") as url:
        execute(
            url,
            'CREATE TABLE "Order Items" (id int, line int, note text, PRIMARY KEY (id, line));'
            ' CREATE SCHEMA shop; CREATE TABLE shop."Prix ü" (sku text PRIMARY KEY, price numeric, tags text[])',
        )
        yield url


@pytest.fixture
def settings(service_env, source) -> Settings:
    """This test's topics (CDC_TOPIC, its dead-letter topic, and PREFIX.schema.table) on its own source."""
    return fresh_settings(
        {**service_env, "SOURCE_DB_URL": source}, cdc_topic_prefix=f"pt{uuid.uuid4().hex[:8]}"
    )


def env(settings: Settings, **extra) -> dict[str, str]:
    return producer_env(settings, CDC_TOPIC_PREFIX=settings.cdc_topic_prefix, **extra)


def topic(settings: Settings, schema: str, table: str) -> str:
    return ChangeCodec(settings.cdc_topic_prefix).topic(schema, table)


def read(settings: Settings, name: str, want: int, **options) -> list[Record]:
    """Every message of topic ``name``."""
    return read_topic(dataclasses.replace(settings, cdc_topic=name), want, **options)


def both(url: str) -> list[tuple[int, str | None, str | None]]:
    return query(url, BOTH)


def generic_messages(url: str) -> dict[int, tuple[str, bytes, str, str]]:
    """Every cdc_outbox row as the message it must become: action_id -> (key, value, schema, table)."""
    rows = query(
        url,
        "SELECT action_id, action, table_schema, table_name, key::text, row_image::text, txid::text::bigint,"
        " captured_at FROM cdc_outbox",
    )
    out = {}
    for action_id, action, schema, table, key, row, txid, captured_at in rows:
        value = (
            f'{{"action_id":{action_id},"action":{json.dumps(action)},'
            f'"schema":{json.dumps(schema, ensure_ascii=False)},"table":{json.dumps(table, ensure_ascii=False)},'
            f'"key":{key},"row":{row},"txid":{txid},'
            f'"captured_at":{json.dumps(captured_at.astimezone(UTC).isoformat())}}}'
        )
        out[action_id] = (key, value.encode(), schema, table)
    return out


def employee_events(url: str) -> dict[int, dict]:
    """Every emp_records_cdc row as the event CDC_TOPIC gets, by action_id."""
    rows = query(
        url,
        "SELECT action_id, action, emp_id, first_name, last_name, dob::text, city, salary,"
        " txid::text::bigint, captured_at FROM emp_records_cdc",
    )
    keys = ("action_id", "action", "emp_id", "first_name", "last_name", "dob", "city", "salary", "txid")
    return {
        r[0]: {**dict(zip(keys, r[:9], strict=True)), "captured_at": r[9].astimezone(UTC).isoformat()}
        for r in rows
    }


def write_interleaved(url: str) -> None:
    """Employees and both tables' changes, in one transaction and in several."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO employees (first_name, salary) VALUES ('Ada', 1), ('Bob', 2)")
        cur.execute("""INSERT INTO "Order Items" VALUES (1, 1, 'a "quoted" note'), (1, 2, NULL)""")
        cur.execute("UPDATE employees SET salary = 3 WHERE first_name = 'Ada'")
        conn.commit()
        cur.execute("""INSERT INTO shop."Prix ü" VALUES ('é-1', 12.50, '{x,NULL}')""")
        conn.commit()
        cur.execute("""UPDATE "Order Items" SET note = 'ü' WHERE line = 2""")
        conn.commit()
        cur.execute("UPDATE employees SET city = 'Lima'")
        conn.commit()
        cur.execute("""UPDATE "Order Items" SET line = 3 WHERE line = 1""")  # DELETE + INSERT
        cur.execute("DELETE FROM employees WHERE first_name = 'Bob'")
        cur.execute("""DELETE FROM shop."Prix ü\"""")
        conn.commit()


def topic_of(settings: Settings, schema: str | None, table: str | None) -> str:
    return settings.cdc_topic if schema is None or table is None else topic(settings, schema, table)


def topics_of(settings: Settings, url: str) -> dict[str, list[int]]:
    """Each topic the outboxes' rows go to, with their action_ids in cursor order."""
    out: dict[str, list[int]] = {settings.cdc_topic: []}
    for action_id, schema, table in both(url):
        out.setdefault(topic_of(settings, schema, table), []).append(action_id)
    return out


def assert_published(settings: Settings, url: str) -> dict[str, list[Record]]:
    """Every row of both outboxes reached its topic once, as the contract says, each partition in
    cursor order. Returns the records by topic."""
    order = both(url)
    generic, employees = generic_messages(url), employee_events(url)
    wanted = {name: len(ids) for name, ids in topics_of(settings, url).items()}
    records = {name: read(settings, name, want) for name, want in wanted.items()}
    position = {action_id: i for i, (action_id, _, _) in enumerate(order)}
    seen = []
    for name, got in records.items():
        assert len(got) == wanted[name], name
        for r in got:
            assert r.headers == MARK
            seen.append(r.action_id)
            if name == settings.cdc_topic:
                assert r.key == str(r.value["emp_id"])
                assert r.value == employees[r.action_id]
            else:
                key, value, s, t = generic[r.action_id]
                assert (r.key, r.raw) == (key, value)
                assert topic(settings, s, t) == name
        for p in {r.partition for r in got}:
            places = [position[r.action_id] for r in sorted(got, key=lambda r: r.offset) if r.partition == p]
            assert places == sorted(places), f"{name} partition {p} is not in (txid, action_id) order"
    assert sorted(seen) == sorted(a for a, _, _ in order)
    return records


def test_each_table_to_its_topic_and_employees_as_before_in_one_stream(settings, source, producers):
    assert [a.topic for a in tables.add(settings, [ORDERS, PRICES])] == [
        topic(settings, "public", "Order Items"),
        topic(settings, "shop", "Prix ü"),
    ]
    write_interleaved(source)
    order = both(source)
    assert {s for _, s, _ in order} == {None, "public", "shop"}
    # One stream: the fetch merges the outboxes in (txid, action_id) order.
    session = ProducerSession(source, settings.notify_channel)
    try:
        assert session.try_acquire()
        fetched = session.fetch(Cursor(), 1000).rows
    finally:
        session.close()
    assert [(json.loads(r[1])["action_id"], r[4], r[5]) for r in fetched] == order
    assert [json.loads(r[1])["action_id"] for r in fetched if r[3]] == [a for a, _, _ in order]  # all checked

    # Batches of 3 cross from one outbox to the other within a batch and between batches.
    proc = producers.start(env(settings, PRODUCER_BATCH_SIZE=3), "--once")
    assert proc.wait(60) == exits.OK, proc.output()
    assert_published(settings, source)
    assert cursor_row(source)[1:] == (order[-1][0], len(order))
    out = proc.output()
    for schema, table in (("public", "Order Items"), ("shop", "Prix ü")):
        name = topic(settings, schema, table)
        assert out.count(f"publishing table {schema}.{table} to topic {name}") == 1, out
        assert f"created topic={name} partitions=3 " in out
    assert "invalid=0" in out and "batch not published" not in out


@pytest.mark.parametrize("early", ["generic", "employees"])
def test_a_transaction_that_starts_first_and_commits_last_is_not_missed(settings, source, producers, early):
    tables.add(settings, [ORDERS])
    writes = {
        "generic": """INSERT INTO "Order Items" VALUES (7, 7, 'early or late')""",
        "employees": "INSERT INTO employees (first_name) VALUES ('early or late')",
    }
    late = "employees" if early == "generic" else "generic"
    proc = producers.start(env(settings))
    proc.wait_for_log("active: holding the producer lock")
    with connect(source) as t1:
        # T1 takes the lower txid and action_id and stays open; T2 commits a higher one meanwhile.
        t1.cursor().execute(writes[early])
        execute(source, writes[late])
        db = Database(source)
        try:
            wait_until(lambda: Outbox(db).backlog(Cursor()).held_back == 1, 10, "T2's row held back")
        finally:
            db.close()
        time.sleep(1.5)  # several polls: T2's row stays behind the horizon
        assert cursor_row(source)[1] == 0
        assert read(settings, settings.cdc_topic, want=1, timeout=1, settle=0) == []
        t1.commit()
    wait_until(lambda: cursor_row(source)[2] == 2, 30, "both rows published")
    [(first, *_), (second, *_)] = both(source)
    assert first < second  # T1's row first in cursor order
    assert cursor_row(source)[1] == second
    assert_published(settings, source)


def test_pruning_deletes_the_published_rows_of_both_outboxes(settings, source, producers):
    tables.add(settings, [ORDERS, PRICES])
    write_interleaved(source)
    total = len(both(source))
    proc = producers.start(env(settings, PRODUCER_BATCH_SIZE=4), "--once", "--prune")
    assert proc.wait(60) == exits.OK, proc.output()
    assert both(source) == []
    assert re.search(rf"final published={total} .*pruned={total}", proc.output()), proc.output()
    execute(source, """INSERT INTO "Order Items" VALUES (9, 9, 'after')""")  # kept until published
    assert query(source, "SELECT count(*) FROM cdc_outbox") == [(1,)]
    assert producers.start(env(settings), "--once", "--prune").wait(60) == exits.OK
    assert query(source, "SELECT count(*) FROM cdc_outbox") == [(0,)]
    name = topic(settings, "public", "Order Items")
    assert "after" in [r.value["row"]["note"] for r in read(settings, name, want=6)]


def test_a_table_added_while_the_producer_runs_is_published_without_a_restart(settings, source, producers):
    proc = producers.start(env(settings))
    proc.wait_for_log("active: holding the producer lock")
    execute(source, "INSERT INTO employees (first_name) VALUES ('before')")
    assert len(read(settings, settings.cdc_topic, want=1)) == 1
    name = topic(settings, "shop", "Prix ü")
    assert name not in admin_client(settings).list_topics(timeout=10).topics

    tables.add(settings, [PRICES])
    execute(source, """INSERT INTO shop."Prix ü" VALUES ('a', 1, NULL), ('b', NULL, '{}')""")
    proc.wait_for_log(re.escape(f"publishing table shop.Prix ü to topic {name}"))
    [line] = [ln for ln in proc.output().splitlines() if f"created topic={name}" in ln]
    assert "partitions=3 replication=1" in line
    records = read(settings, name, want=2)
    assert sorted(r.key for r in records) == ['{"sku": "a"}', '{"sku": "b"}']
    assert len(admin_client(settings).list_topics(timeout=10).topics[name].partitions) == 3
    execute(source, """UPDATE shop."Prix ü" SET price = 2""")
    wait_until(lambda: cursor_row(source)[2] == 5, 30, "the updates published")
    assert_published(settings, source)
    assert proc.output().count("publishing table shop.Prix ü") == 1


def test_republish_sends_a_generic_row_again_byte_for_byte_to_its_topic(settings, source, producers):
    tables.add(settings, [ORDERS, PRICES])
    write_interleaved(source)
    assert producers.start(env(settings), "--once").wait(60) == exits.OK
    originals = assert_published(settings, source)
    cursor = cursor_row(source)
    order = both(source)
    # From the first change of shop."Prix ü": it and every later row of any outbox again.
    start = next(i for i, (_, s, _) in enumerate(order) if s == "shop")
    again = producers.start(env(settings, PRODUCER_BATCH_SIZE=2), "--republish-from", str(order[start][0]))
    assert again.wait(60) == exits.OK, again.output()
    assert f"re-published {len(order) - start} rows" in again.output()
    assert cursor_row(source) == cursor

    expected = {a for a, _, _ in order[start:]}
    first = {r.action_id: r for records in originals.values() for r in records}
    copied = set()
    for name, records in originals.items():
        extra = sum(1 for _, s, t in order[start:] if topic_of(settings, s, t) == name)
        now = read(settings, name, want=len(records) + extra)
        seen = {(r.partition, r.offset) for r in records}
        for copy in (r for r in now if (r.partition, r.offset) not in seen):
            original = first[copy.action_id]
            assert (copy.partition, copy.key, copy.raw, copy.headers) == (
                original.partition,
                original.key,
                original.raw,
                original.headers,
            )
            copied.add(copy.action_id)
    assert copied == expected


def test_reset_cursor_counts_and_restamps_both_outboxes(settings, source, producers):
    tables.add(settings, [ORDERS])
    execute(source, "INSERT INTO employees (first_name) VALUES ('a'), ('b')")
    execute(source, """INSERT INTO "Order Items" VALUES (1, 1, 'x'), (1, 2, 'y')""")
    assert producers.start(env(settings), "--once").wait(60) == exits.OK
    # A generic row with a txid from another cluster (a restore) is refused as an employees one.
    execute(
        source,
        "UPDATE cdc_outbox SET txid = (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000000)"
        "::text::xid8 WHERE action_id = (SELECT max(action_id) FROM cdc_outbox)",
    )
    refused = producers.start(env(settings))
    assert refused.wait(30) == exits.CONFIG, refused.output()
    assert "1 outbox rows carry txids beyond this server's transaction ids" in refused.output()

    end = producers.start(env(settings), "--reset-cursor", "end")
    assert end.wait(30) == exits.OK, end.output()
    last = max(a for a, _, _ in both(source))  # a cdc_outbox row's
    assert re.search(
        rf"now txid=\d+ action_id={last}; 1 outbox rows with txids from another cluster moved to txid=\d+;"
        r" 0 outbox rows to publish, 4 at or behind the cursor",
        end.output(),
    ), end.output()
    assert cursor_row(source)[1] == last

    beginning = producers.start(env(settings), "--reset-cursor", "beginning")
    assert beginning.wait(30) == exits.OK, beginning.output()
    assert re.search(
        r"now txid=0 action_id=0; 0 outbox rows with txids from another cluster moved to txid=\d+;"
        r" 4 outbox rows to publish, 0 at or behind the cursor",
        beginning.output(),
    ), beginning.output()
    assert producers.start(env(settings), "--once").wait(60) == exits.OK
    for name, ids in topics_of(settings, source).items():
        assert sorted(r.action_id for r in read(settings, name, want=2 * len(ids))) == sorted(ids * 2)
    assert cursor_row(source)[1] == both(source)[-1][0]
