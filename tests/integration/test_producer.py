"""producer.py against the real broker and source PostgreSQL, run as a subprocess."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
import urllib.request
from datetime import UTC
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql

from cdc.errors import LeadershipLost
from cdc.kafka.client import admin_client
from cdc.runtime.db import Database
from cdc.runtime.stats import process_cpu_seconds
from cdc.source.outbox import LOCK_CLASS, LOCK_ID, Cursor, Outbox, ProducerSession
from employee import ChangeEvent
from tests.support import connect, execute, query, wait_until
from tests.support.producer import (
    cursor_row,
    insert_employees,
    outbox_ids,
    producer_env,
    read_topic,
)

pytestmark = pytest.mark.daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_events(url: str) -> list[dict]:
    """The outbox as the event contract says it must reach Kafka, in (txid, action_id) order."""
    rows = query(
        url,
        "SELECT action_id, action, emp_id, first_name, last_name, dob::text, city, salary,"
        " txid::text::bigint, captured_at FROM emp_records_cdc ORDER BY txid, action_id",
    )
    keys = ("action_id", "action", "emp_id", "first_name", "last_name", "dob", "city", "salary", "txid")
    return [
        {**dict(zip(keys, r[:9], strict=True)), "captured_at": r[9].astimezone(UTC).isoformat()} for r in rows
    ]


def caught_up(url: str) -> bool:
    ids = outbox_ids(url)
    return bool(ids) and cursor_row(url)[1] == ids[-1]


def assert_partition_order(records, url: str) -> None:
    """All events of one emp_id share a partition; each partition follows (txid, action_id) order."""
    position = {aid: i for i, aid in enumerate(outbox_ids(url))}
    partition_of: dict[str, int] = {}
    for r in records:
        assert partition_of.setdefault(r.key, r.partition) == r.partition, f"emp_id {r.key} in two partitions"
    for p in {r.partition for r in records}:
        in_partition = sorted((r for r in records if r.partition == p), key=lambda r: r.offset)
        order = [position[r.action_id] for r in in_partition]
        assert order == sorted(order), f"partition {p} is not in (txid, action_id) order"


def test_publishes_every_change_as_the_contract_says(settings, clean_source, producers):
    port = free_port()
    proc = producers.start(producer_env(settings, METRICS_PORT=port))
    proc.wait_for_log("active: holding the producer lock")
    with connect(clean_source) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO employees (first_name, last_name, dob, city, salary)"
            " VALUES ('Ada', 'Lovelace', '1815-12-10', 'London', 120000), ('Zoë', NULL, NULL, NULL, NULL)"
            " RETURNING emp_id"
        )
        ada, zoe = (r[0] for r in cur.fetchall())
        conn.commit()
        cur.execute("UPDATE employees SET salary = salary + 1 WHERE emp_id = %s", (ada,))
        cur.execute("UPDATE employees SET emp_id = %s WHERE emp_id = %s", (zoe + 100, zoe))
        cur.execute("DELETE FROM employees WHERE emp_id = %s", (ada,))
        conn.commit()
    expected = expected_events(clean_source)
    assert [e["action"] for e in expected] == ["INSERT", "INSERT", "UPDATE", "DELETE", "INSERT", "DELETE"]

    records = read_topic(settings, want=len(expected))
    assert sorted((r.value for r in records), key=lambda v: v["action_id"]) == sorted(
        expected, key=lambda v: v["action_id"]
    )
    for r in records:
        assert r.key == str(r.value["emp_id"])
        assert ChangeEvent.from_mapping(r.value).action_id == r.action_id
    assert_partition_order(records, clean_source)
    wait_until(lambda: caught_up(clean_source), 10, "the cursor to reach the last row")
    assert cursor_row(clean_source)[1:] == (expected[-1]["action_id"], len(expected))

    proc.wait_for_log(r"stats published=6 batches=\d+ invalid=0")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "cdc_producer_events_published_total 6.0" in metrics
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "final published=6" in proc.log()
    assert "postgres:postgres@" not in proc.log()  # the password is masked


def test_idle_is_quiet_and_notify_wakes_it_at_once(settings, clean_source, producers):
    # A 30 s poll interval: delivery within seconds can only come from LISTEN/NOTIFY.
    proc = producers.start(producer_env(settings, POLL_INTERVAL=30, STATS_INTERVAL=10))
    proc.wait_for_log("active: holding the producer lock")
    time.sleep(1)
    cpu_before, t0 = process_cpu_seconds(proc.pid), time.monotonic()
    time.sleep(5)
    idle_cpu = (process_cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - t0)
    print(f"idle CPU: {idle_cpu * 100:.2f}% of one core")
    assert idle_cpu < 0.03

    started = time.monotonic()
    insert_employees(clean_source, 1)
    records = read_topic(settings, want=1, timeout=10, settle=0)
    latency = time.monotonic() - started
    print(f"insert-to-topic latency via NOTIFY: {latency * 1000:.0f} ms")
    assert len(records) == 1 and latency < 5


def test_out_of_order_commit_is_held_back_then_published(settings, clean_source, producers):
    with connect(clean_source) as t1, connect(clean_source) as t2:
        t1_cur, t2_cur = t1.cursor(), t2.cursor()
        t1_cur.execute("INSERT INTO employees (first_name) VALUES ('t1') RETURNING emp_id")
        t2_cur.execute("INSERT INTO employees (first_name) VALUES ('t2') RETURNING emp_id")
        t2.commit()
        [(t2_action,)] = query(clean_source, "SELECT action_id FROM emp_records_cdc")
        # T1 took the lower action_id and is still open; T2's higher one is committed. A naive
        # `action_id > last` poll would publish T2 now and skip T1 for ever.
        proc = producers.start(producer_env(settings, HORIZON_WARN_SECONDS=1, STATS_INTERVAL=0.5))
        proc.wait_for_log("active: holding the producer lock")
        warning = proc.wait_for_log(r"delivery held back \d+s rows=1 by an open transaction: pid=(\d+)")
        assert int(warning.group(1)) == t1.get_backend_pid()
        assert read_topic(settings, want=1, timeout=1, settle=0) == []
        assert cursor_row(clean_source)[1] == 0
        t1.commit()

    t1_action, later = outbox_ids(clean_source)
    assert later == t2_action and t1_action < t2_action
    records = read_topic(settings, want=2)
    assert sorted(r.action_id for r in records) == [t1_action, t2_action]
    wait_until(lambda: cursor_row(clean_source)[1] == t2_action, 10, "the cursor to pass both")


def test_concurrent_writers_every_action_id_reaches_the_topic(settings, clean_source, producers):
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    insert_employees(clean_source, 200)
    proc = producers.start(producer_env(settings, PRODUCER_BATCH_SIZE=50, POLL_INTERVAL=0.2))
    proc.wait_for_log("active: holding the producer lock")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        rnd = random.Random(seed + n)
        try:
            with connect(clean_source) as conn, conn.cursor() as cur:
                for _ in range(25):
                    for _ in range(rnd.randint(1, 4)):
                        op = rnd.random()
                        if op < 0.4:
                            cur.execute(
                                "INSERT INTO employees (first_name, city) VALUES (%s, 'W')", (f"w{n}",)
                            )
                        elif op < 0.8:
                            cur.execute(
                                "UPDATE employees SET salary = %s WHERE emp_id = %s",
                                (rnd.randint(1, 10**6), rnd.randint(1, 200)),
                            )
                        else:
                            cur.execute("DELETE FROM employees WHERE emp_id = %s", (rnd.randint(201, 400),))
                        time.sleep(rnd.uniform(0, 0.03))
                    if rnd.random() < 0.1:
                        conn.rollback()  # rolled-back changes must never be published
                    else:
                        conn.commit()
        except psycopg2.errors.DeadlockDetected:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wait_until(lambda: caught_up(clean_source), 60, "the producer to catch up")
    ids = outbox_ids(clean_source)
    records = read_topic(settings, want=len(ids))
    got = [r.action_id for r in records]
    assert sorted(got) == sorted(ids), "missing or extra action_ids"
    assert len(got) == len(set(got)), "duplicates without any fault"
    assert_partition_order(records, clean_source)


def test_interleaved_transactions_reorder_one_emp_id_on_the_topic(settings, clean_source, producers):
    """Documents the ordering: the topic follows (txid, action_id), not action_id, for one emp_id."""
    execute(clean_source, "INSERT INTO employees (emp_id, first_name, salary) VALUES (1, 'one', 1)")
    with connect(clean_source) as t_early, connect(clean_source) as t_late:
        early, late = t_early.cursor(), t_late.cursor()
        # t_early gets its xid first (by writing another row), then changes emp 1 only after t_late.
        early.execute("INSERT INTO employees (emp_id, first_name) VALUES (2, 'two')")
        late.execute("UPDATE employees SET salary = 2 WHERE emp_id = 1")
        t_late.commit()
        early.execute("UPDATE employees SET salary = 3 WHERE emp_id = 1")
        t_early.commit()
    (final_salary,) = query(clean_source, "SELECT salary FROM employees WHERE emp_id = 1")[0]
    assert final_salary == 3

    producers.start(producer_env(settings), "--once")
    records = read_topic(settings, want=4)
    emp1 = [r.value for r in sorted(records, key=lambda r: r.offset) if r.key == "1"]
    salaries = [v["salary"] for v in emp1]
    action_ids = [v["action_id"] for v in emp1]
    # On the topic: INSERT(1), then the later-committed update 3 (lower txid), then update 2.
    assert salaries == [1, 3, 2]
    assert action_ids != sorted(action_ids)  # not action_id order...
    assert [v["txid"] for v in emp1] == sorted(v["txid"] for v in emp1)  # ...but txid order
    # The newest action_id carries the source's final state: a version guard converges.
    assert max(emp1, key=lambda v: v["action_id"])["salary"] == final_salary


def test_snapshot_backfills_current_rows(settings, clean_source, producers):
    insert_employees(clean_source, 50)
    execute(clean_source, "DELETE FROM employees WHERE emp_id > 40; TRUNCATE emp_records_cdc")
    proc = producers.start(producer_env(settings), "--snapshot", "--once")
    assert proc.wait(60) == 0, proc.log()
    assert "snapshot queued rows=40" in proc.log()
    records = read_topic(settings, want=40)
    assert {r.value["action"] for r in records} == {"SNAPSHOT"}
    assert sorted(r.value["emp_id"] for r in records) == list(range(1, 41))
    assert sorted(r.action_id for r in records) == sorted(outbox_ids(clean_source))
    for r in records:
        ChangeEvent.from_mapping(r.value)


def test_prune_deletes_what_is_published(settings, clean_source, producers):
    insert_employees(clean_source, 300)
    last = outbox_ids(clean_source)[-1]
    proc = producers.start(producer_env(settings), "--prune", "--once", "--batch-size", "100")
    assert proc.wait(60) == 0, proc.log()
    assert outbox_ids(clean_source) == []
    assert cursor_row(clean_source)[1:] == (last, 300)
    assert "pruned=300" in proc.log()
    insert_employees(clean_source, 10)
    proc = producers.start(producer_env(settings, CDC_PRUNE="true"), "--once")
    assert proc.wait(60) == 0, proc.log()
    assert outbox_ids(clean_source) == []
    records = read_topic(settings, want=310)
    assert sorted(r.action_id for r in records) == list(range(1, 311))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_batch_and_stores_the_cursor(settings, clean_source, producers, sig):
    insert_employees(clean_source, 20_000)
    proc = producers.start(producer_env(settings, PRODUCER_BATCH_SIZE=500))
    wait_until(lambda: cursor_row(clean_source)[2] >= 2000, 60, "some batches")
    proc.signal(sig)
    assert proc.wait(30) == 0, proc.log()
    published = cursor_row(clean_source)[2]
    assert f"final published={published} " in proc.log()
    # Everything up to the cursor is on the topic, nothing beyond it, each once.
    ids = outbox_ids(clean_source)
    records = read_topic(settings, want=published)
    assert sorted(r.action_id for r in records) == sorted(ids[:published])
    # The restart continues exactly at the cursor: no duplicates after a clean stop.
    proc = producers.start(producer_env(settings, PRODUCER_BATCH_SIZE=500), "--once")
    assert proc.wait(60) == 0, proc.log()
    records = read_topic(settings, want=20_000)
    assert sorted(r.action_id for r in records) == sorted(ids)


def test_every_value_the_source_holds_is_published_as_a_valid_event(settings, clean_source, producers):
    # emp_id 0 (an explicit insert into the SERIAL column) and a date beyond year 9999.
    execute(
        clean_source,
        "INSERT INTO employees (emp_id, first_name) VALUES (0, 'zero');"
        " INSERT INTO employees (first_name, dob) VALUES ('far', '10000-01-01'), ('ok', '2000-01-01')",
    )
    proc = producers.start(producer_env(settings), "--once")
    assert proc.wait(60) == 0, proc.log()
    records = {r.action_id: r for r in read_topic(settings, want=3)}
    events = {a: ChangeEvent.from_json(json.dumps(r.value)) for a, r in records.items()}
    assert (events[1].emp_id, events[2].employee.dob, events[3].employee.dob) == (
        0,
        "10000-01-01",
        "2000-01-01",
    )
    assert "invalid source row" not in proc.log()
    assert "final published=3 batches=1 invalid=0" in proc.log()


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


@pytest.fixture
def schemaless_db(service_env):
    """An empty database on the source server (no setup_db.sql applied)."""
    url = service_env["SOURCE_DB_URL"]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS cdc_no_schema")
        cur.execute("CREATE DATABASE cdc_no_schema")
    yield urlunsplit(urlsplit(url)._replace(path="/cdc_no_schema"))
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier("cdc_no_schema")))


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"PRODUCER_BATCH_SIZE": "0"}, [], "PRODUCER_BATCH_SIZE=0 must be at least 1"),
        ({}, ["--batch-size", "0"], "PRODUCER_BATCH_SIZE=0 must be at least 1"),
        ({"POLL_INTERVAL": "soon"}, [], "POLL_INTERVAL='soon' is not valid"),
        ({"SOURCE_DB_URL": "mysql://u:pw@127.0.0.1/x"}, [], "is not a libpq URI"),
        ({"SOURCE_DB_URL": ""}, [], "database URL is empty"),
        ({"wrong_password": True}, [], "password authentication failed"),
        ({"schemaless": True}, [], "apply setup_db.sql (psql -f setup_db.sql) or run `make up`"),
    ],
)
def test_configuration_mistakes_are_one_clear_line(settings, schemaless_db, producers, env, args, message):
    env = dict(env)
    if env.pop("wrong_password", False):
        env["SOURCE_DB_URL"] = _with_password(settings.source_db_url, "Wr0ngSecret")
    if env.pop("schemaless", False):
        env["SOURCE_DB_URL"] = schemaless_db
    proc = producers.start(producer_env(settings, **env), *args)
    assert proc.wait(30) == 2, proc.log()
    out = proc.log()
    assert message in out
    assert "Traceback" not in out
    assert "Wr0ngSecret" not in out
    assert len([line for line in out.splitlines() if "error" in line.lower()]) == 1


@pytest.mark.parametrize("service", ["source", "kafka"])
def test_unreachable_service_at_start_is_a_waiting_line(settings, producers, service):
    port = free_port()
    if service == "source":
        env = {"SOURCE_DB_URL": f"postgresql://postgres:pw@127.0.0.1:{port}/cdc_source"}
        line = rf"waiting for source PostgreSQL at postgresql://postgres:\*\*\*@127.0.0.1:{port}/cdc_source"
    else:
        env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
        line = f"waiting for Kafka at 127.0.0.1:{port}"
    proc = producers.start(producer_env(settings, **env))
    proc.wait_for_log(line, timeout=30)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()
    assert "final published=0" in proc.log()


def test_full_local_queue_is_waited_out_not_dropped(settings, clean_source, producers):
    # A 50-message local queue against 1000-message batches: produce() hits BufferError often.
    insert_employees(clean_source, 3000)
    env = producer_env(settings, KAFKA_QUEUE_BUFFERING_MAX_MESSAGES=50, PRODUCER_BATCH_SIZE=1000)
    proc = producers.start(env, "--once")
    assert proc.wait(60) == 0, proc.log()
    records = read_topic(settings, want=3000)
    assert sorted(r.action_id for r in records) == list(range(1, 3001))


def test_creates_missing_topics_with_the_configured_partitions(settings, clean_source, producers):
    topic, dlq = f"{settings.cdc_topic}_new", f"{settings.cdc_topic}_new_dlq"
    env = producer_env(settings, CDC_TOPIC=topic, CDC_DLQ_TOPIC=dlq, CDC_TOPIC_PARTITIONS=4)
    proc = producers.start(env, "--once")
    assert proc.wait(60) == 0, proc.log()
    topics = admin_client(settings).list_topics(timeout=10).topics
    assert len(topics[topic].partitions) == 4 and len(topics[dlq].partitions) == 4


def test_a_producer_that_loses_its_lock_session_stands_by(settings, clean_source, producers):
    env = producer_env(settings, POLL_INTERVAL=0.2)
    first = producers.start(env)
    first.wait_for_log("active: holding the producer lock")
    second = producers.start(env)
    second.wait_for_log("standby: another producer holds the lock")
    # Cut the first one's lock session (as a network failure or an admin would): the lock is free.
    execute(
        clean_source,
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
        " AND objid = %s AND granted",
        (LOCK_CLASS, LOCK_ID),
    )
    first.wait_for_log("no longer the active producer", timeout=30)
    # Exactly one of them is active again, and the stream goes on without a gap.
    wait_until(
        lambda: "active: holding" in second.log() or first.log().count("active: holding") == 2,
        30,
        "a new active producer",
    )
    insert_employees(clean_source, 500)
    wait_until(lambda: caught_up(clean_source), 30, "the new active producer to publish")
    records = read_topic(settings, want=500)
    assert sorted(r.action_id for r in records) == list(range(1, 501))
    holders = query(
        clean_source,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND granted",
        (LOCK_CLASS, LOCK_ID),
    )
    assert holders == [(1,)]


def test_cursor_update_is_fenced_by_the_lock(clean_source):
    """The cursor is written on the session that holds the lock: a producer whose session is gone
    (and so its lock, now another's) cannot move it, nor can anyone move it backwards."""
    insert_employees(clean_source, 3)
    first = ProducerSession(clean_source, "emp_records_cdc")
    second = ProducerSession(clean_source, "emp_records_cdc")
    try:
        assert first.try_acquire()
        last = first.fetch(Cursor(), 10).last
        assert not second.try_acquire()
        execute(clean_source, "SELECT pg_terminate_backend(%s)", (first.pid,))
        assert second.try_acquire()
        with pytest.raises(LeadershipLost):
            first.advance(last, 3, prune=False)
        assert not first.try_acquire()  # its new session does not get the lock either
        second.advance(last, 3, prune=False)
        assert Outbox(Database(clean_source)).load_cursor() == last
        with pytest.raises(LeadershipLost):
            second.advance(Cursor(last.txid, last.action_id - 1), 1, prune=False)
        assert cursor_row(clean_source) == (last.txid, last.action_id, 3)
    finally:
        first.close()
        second.close()


def test_snapshot_gives_up_clearly_behind_a_long_writer(settings, clean_source, producers):
    insert_employees(clean_source, 5)
    with connect(clean_source) as writer, writer.cursor() as cur:
        cur.execute("UPDATE employees SET salary = 1 WHERE emp_id = 1")  # open, holding a row lock
        proc = producers.start(producer_env(settings), "--snapshot", "--once")
        assert proc.wait(60) == 1, proc.log()
        writer.rollback()
    assert "snapshot: employees could not be locked within 10s" in proc.log()
    assert query(clean_source, "SELECT count(*) FROM emp_records_cdc WHERE action = 'SNAPSHOT'") == [(0,)]
