"""``verify``: row reconciliation of employees, the events check and --wait, against the real
databases and broker (the other replicated tables: ``test_verify_tables.py``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg2.extras import execute_values

from cdc.kafka.client import admin_client, consumer_config, ensure_topic, producer_config
from cdc.local.paths import PROJECT_DIR
from cdc.model.topics import topic_for
from cdc.ops.verify import check_events, compare_rows, pipeline_lag, verify
from cdc.ops.workload import Workload
from cdc.runtime.db import Database
from cdc.runtime.settings import Settings
from cdc.sink.positions import DestinationPositions
from tests.support import end_offsets, fresh_settings, query

COLUMNS = "emp_id, first_name, last_name, dob, city, salary"


@pytest.fixture
def settings(service_env) -> Settings:
    """This test's topics, group and CDC_TOPIC_PREFIX: --wait waits for every topic under the
    prefix, so no other test's table topics may be under it."""
    return fresh_settings(service_env, cdc_topic_prefix=f"cdc_verify_{uuid.uuid4().hex[:8]}")


def _fill_source(url: str, changes: int = 300, seed: int = 7) -> None:
    """Realistic rows (NULLs, non-ASCII, quotes, 100-character names) written by the workload."""
    Workload(url, rate=0, writers=1, seed=seed, max_changes=changes).run(60)


def _copy_to_dest(source_url: str, dest_url: str) -> int:
    rows = query(source_url, f"SELECT {COLUMNS} FROM employees")
    with contextlib.closing(psycopg2.connect(dest_url)) as conn, conn.cursor() as cur:
        execute_values(cur, f"INSERT INTO employees ({COLUMNS}) VALUES %s", rows)
        conn.commit()
    return len(rows)


def _cursor_to_end(source_url: str) -> None:
    """Move the producer cursor past the whole outbox, as a producer that published all of it."""
    query(
        source_url,
        "UPDATE cdc_producer_state SET (last_txid, last_action_id) = ("
        " SELECT txid, action_id FROM emp_records_cdc ORDER BY txid DESC, action_id DESC LIMIT 1)"
        " WHERE name = 'default'",
    )


def _cli(settings, *args: str, tmp_path, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SOURCE_DB_URL": settings.source_db_url,
        "DEST_DB_URL": settings.dest_db_url,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CDC_TOPIC": settings.cdc_topic,
        "CDC_DLQ_TOPIC": settings.cdc_dlq_topic,
        "CONSUMER_GROUP_ID": settings.consumer_group_id,
        "CDC_TOPIC_PREFIX": settings.cdc_topic_prefix,
        **env_overrides,
    }
    return subprocess.run(
        [sys.executable, "-m", "cdc", "--env-file", str(tmp_path / "no.env"), "verify", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "postgres:postgres@" not in proc.stderr  # the password is masked


def test_identical_tables_exit_0(settings, clean_source, clean_dest, tmp_path):
    _fill_source(clean_source)
    rows = _copy_to_dest(clean_source, clean_dest)
    # The workload's data has the awkward values the hash must treat alike in both databases.
    (awkward,) = query(
        clean_source,
        "SELECT count(*) FILTER (WHERE first_name IS NULL), count(*) FILTER (WHERE city = ''),"
        " count(*) FILTER (WHERE octet_length(last_name) > char_length(last_name)),"
        " count(*) FILTER (WHERE char_length(first_name) = 100 OR char_length(last_name) = 100"
        "                   OR char_length(city) = 100)"
        " FROM employees",
    )
    assert all(n > 0 for n in awkward), awkward

    proc = _cli(settings, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"result: identical (1 table, {rows} rows)" in proc.stdout
    assert (
        f"rows employees: source {rows}, destination {rows}, missing 0, extra 0, different 0" in proc.stdout
    )


def test_planted_differences_are_reported_by_emp_id_and_exit_1(settings, clean_source, clean_dest, tmp_path):
    _fill_source(clean_source)
    _copy_to_dest(clean_source, clean_dest)
    ids = [r[0] for r in query(clean_dest, "SELECT emp_id FROM employees ORDER BY emp_id")]
    changed, to_null, removed = ids[3], ids[10], ids[20]
    extra = ids[-1] + 1000
    # A row changed by hand, a NULL that became an empty string, a row lost, a row never in the source.
    query(clean_dest, "UPDATE employees SET salary = coalesce(salary, 0) + 1 WHERE emp_id = %s", (changed,))
    query(clean_source, "UPDATE employees SET city = NULL WHERE emp_id = %s", (to_null,))
    query(clean_dest, "UPDATE employees SET city = '' WHERE emp_id = %s", (to_null,))
    query(clean_dest, "DELETE FROM employees WHERE emp_id = %s", (removed,))
    query(clean_dest, "INSERT INTO employees (emp_id, first_name) VALUES (%s, 'Ghost')", (extra,))

    report = compare_rows(settings)
    assert not report.identical
    assert report.different.first == sorted([changed, to_null])
    assert report.missing.first == [removed]
    assert report.extra.first == [extra]
    assert (report.source_rows, report.dest_rows) == (len(ids), len(ids))

    proc = _cli(settings, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"missing in destination: 1 emp_id: {removed}" in out
    assert f"extra in destination: 1 emp_id: {extra}" in out
    assert f"different: 2 emp_id: {', '.join(map(str, sorted([changed, to_null])))}" in out
    assert (
        f"rows employees: source {len(ids)}, destination {len(ids)}, missing 1, extra 1, different 2" in out
    )
    assert "result: DIFFERENT: employees: 1 missing, 1 extra, 2 different rows" in out


def test_lists_the_first_n_ids_and_the_total(settings, clean_source, clean_dest, tmp_path):
    query(clean_source, "INSERT INTO employees (first_name) SELECT 'n' || i FROM generate_series(1, 40) i")
    query(
        clean_dest,
        "INSERT INTO employees (emp_id, first_name) SELECT i, 'n' || i FROM generate_series(26, 40) i",
    )
    proc = _cli(settings, "--limit", "5", tmp_path=tmp_path)
    assert proc.returncode == 1
    assert "rows employees: source 40, destination 15" in proc.stdout
    assert "missing in destination: 25 emp_id (first 5): 1, 2, 3, 4, 5" in proc.stdout


def test_errors_are_one_line_and_exit_2(settings, clean_source, clean_dest, tmp_path):
    dest_port = settings.dest_db_url.rsplit(":", 1)[1].split("/")[0]
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]  # bound, not listening: connections are refused
        unreachable = settings.dest_db_url.replace(f":{dest_port}/", f":{free_port}/")
        _assert_one_line_error(
            _cli(settings, tmp_path=tmp_path, DEST_DB_URL=unreachable), "destination database"
        )
    no_schema = settings.dest_db_url.rsplit("/", 1)[0] + "/postgres"
    _assert_one_line_error(_cli(settings, tmp_path=tmp_path, DEST_DB_URL=no_schema), "setup SQL")
    _assert_one_line_error(
        _cli(settings, tmp_path=tmp_path, SOURCE_DB_URL="mysql://x@127.0.0.1/db"), "SOURCE_DB_URL"
    )
    _assert_one_line_error(
        _cli(settings, "--wait", "5", tmp_path=tmp_path, CDC_TOPIC="cdc_test_no_such_topic"), "does not exist"
    )


def test_wait_reports_unpublished_outbox_rows_and_exit_1(settings, clean_source, clean_dest, tmp_path):
    query(clean_source, "INSERT INTO employees (first_name) SELECT 'w' || i FROM generate_series(1, 12) i")
    _copy_to_dest(clean_source, clean_dest)  # identical, yet the producer has published nothing

    started = time.monotonic()
    result = verify(settings, wait=1.0)
    assert time.monotonic() - started < 15
    assert result.lag is not None and result.lag.outbox_pending == 12
    assert not result.ok and result.rows is None

    proc = _cli(settings, "--wait", "1", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pipeline NOT caught up" in proc.stdout and "outbox pending 12" in proc.stdout
    assert "did not catch up in time" in proc.stdout

    _cursor_to_end(clean_source)
    assert pipeline_lag(settings).outbox_pending == 0


def _store_positions(
    settings: Settings, ends: dict[tuple[str, int], int], topic_id: str | None = None
) -> None:
    """What the consumer writes with each batch: the destination's next offset per partition."""
    with Database(settings.dest_db_url) as db:
        DestinationPositions(db).write(ends, {t: topic_id for t, _ in ends} if topic_id else {})


def test_wait_returns_once_the_destination_has_applied_every_topic(settings, clean_source, clean_dest):
    query(clean_source, "INSERT INTO employees (first_name) SELECT 'k' || i FROM generate_series(1, 7) i")
    _copy_to_dest(clean_source, clean_dest)
    _cursor_to_end(clean_source)
    # A table's topic under CDC_TOPIC_PREFIX, which the consumer subscribes to beside CDC_TOPIC.
    table_topic = topic_for(settings.cdc_topic_prefix, "public", "Order Items")
    ensure_topic(settings, admin_client(settings), table_topic)
    producer = Producer(producer_config(settings))
    for i in range(1, 8):
        producer.produce(settings.cdc_topic, key=str(i).encode(), value=b"{}")
    for i in range(1, 5):
        producer.produce(table_topic, key=str(i).encode(), value=b"{}")
    assert producer.flush(30) == 0
    ends = {
        (t, p): end for t in (settings.cdc_topic, table_topic) for p, end in end_offsets(settings, t).items()
    }

    lag = pipeline_lag(settings)
    assert lag.outbox_pending == 0 and lag.total_consumer_lag == 11 and not lag.caught_up
    assert f"consumer lag 11 ({settings.cdc_topic} 7, {table_topic} 4)" in lag.describe()

    # The group's committed offsets are not where the consumer starts: they do not count.
    group = Consumer(consumer_config(settings))
    try:
        group.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
    finally:
        group.close()
    assert pipeline_lag(settings).total_consumer_lag == 11
    # Nor does a position stored for a topic of the same name deleted since (another topic id).
    _store_positions(
        settings, {k: o for k, o in ends.items() if k[0] == table_topic}, "AAAAAAAAAAAAAAAAAAAAAA"
    )
    assert pipeline_lag(settings).consumer_lag == {
        **{(settings.cdc_topic, p): end for (t, p), end in ends.items() if t == settings.cdc_topic},
        **{(table_topic, p): end for (t, p), end in ends.items() if t == table_topic},
    }

    def apply_later() -> None:
        time.sleep(1)
        _store_positions(settings, {k: o for k, o in ends.items() if k[0] == settings.cdc_topic})
        time.sleep(1)
        query(clean_dest, "UPDATE applied_offsets SET topic_id = NULL WHERE topic = %s", (table_topic,))

    applier = threading.Thread(target=apply_later)
    applier.start()
    result = verify(settings, wait=60)
    applier.join()
    assert result.lag is not None and result.lag.caught_up
    assert result.waited >= 1.5
    assert result.ok and result.rows is not None and result.rows.identical
    assert "pipeline caught up" in result.lines()[0]


def test_events_check_finds_unprocessed_and_unknown_action_ids(settings, clean_source, clean_dest, tmp_path):
    query(clean_source, "INSERT INTO employees (first_name) SELECT 'e' || i FROM generate_series(1, 10) i")
    _copy_to_dest(clean_source, clean_dest)
    action_ids = [
        r[0] for r in query(clean_source, "SELECT action_id FROM emp_records_cdc ORDER BY action_id")
    ]
    decided = action_ids[:4] + action_ids[6:]
    outcomes = ["applied", "applied", "stale", "dlq", "applied", "applied", "applied", "stale"]
    rows = [*zip(decided, outcomes, strict=True), (10**12, "dlq")]  # a poison message's made-up id
    with contextlib.closing(psycopg2.connect(clean_dest)) as conn, conn.cursor() as cur:
        execute_values(cur, "INSERT INTO processed_events (action_id, outcome) VALUES %s", rows)
        conn.commit()

    report = check_events(settings)
    assert report.missing.first == action_ids[4:6] and report.missing.total == 2
    assert dict(report.outcomes) == {"applied": 5, "stale": 2, "dlq": 1}
    assert (report.outbox_rows, report.processed_rows, report.extra_dlq) == (10, 9, 1)
    assert report.extra.total == 0 and not report.ok

    proc = _cli(settings, "--events", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"events not processed: 2 action_id: {action_ids[4]}, {action_ids[5]}" in proc.stdout
    assert "result: DIFFERENT: 2 events not processed, 0 unknown events" in proc.stdout
    assert "dead-lettered action_ids not from the outbox (poison messages): 1" in proc.stdout

    query(
        clean_dest,
        "INSERT INTO processed_events (action_id, outcome) SELECT unnest(%s::bigint[]), 'applied'",
        (action_ids[4:6],),
    )
    assert check_events(settings).ok
    assert _cli(settings, "--events", tmp_path=tmp_path).returncode == 0

    # Applied, yet the source never wrote it: a change from nowhere.
    query(
        clean_dest, "INSERT INTO processed_events (action_id, outcome) VALUES (%s, 'applied')", (10**12 + 1,)
    )
    report = check_events(settings)
    assert report.extra.first == [10**12 + 1] and not report.ok
