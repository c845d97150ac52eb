"""producer.py under faults: kill -9, a standby taking over, source and broker restarts, a
delivery that fails while the broker is down. Each test sees its fault happen (a new process, the
producer's log lines of the outage) before it checks that nothing was lost.

These tests use the session's private services (``local_services``), which they stop and start.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from cdc.runtime import exits
from tests.support import connect, execute, query, wait_until
from tests.support.producer import (
    cursor_row,
    insert_employees,
    outbox_ids,
    producer_env,
    read_topic,
)

pytestmark = pytest.mark.daemon


def producer_backends_gone(url: str) -> bool:
    """No session of a producer is left on the source (a killed one's backends have exited)."""
    rows = query(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cdc-producer%%'"
        " AND pid <> pg_backend_pid()",
    )
    return rows[0][0] == 0


def caught_up(url: str) -> bool:
    ids = outbox_ids(url)
    return bool(ids) and cursor_row(url)[1] == ids[-1]


def test_kill9_at_random_points_loses_nothing(private, producers):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    print(f"seed={seed}")
    url = private.source_db_url
    batch = 250
    env = producer_env(private, PRODUCER_BATCH_SIZE=batch, POLL_INTERVAL=0.2)
    insert_employees(url, 12_000)

    def writer() -> None:
        # The other 8k changes arrive while the producer is being killed and restarted.
        writer_rnd = random.Random(seed + 1)
        with connect(url) as conn, conn.cursor() as cur:
            for _ in range(32):
                cur.execute(
                    "INSERT INTO employees (first_name, city)"
                    " SELECT 'w' || g, 'Oslo' FROM generate_series(1, 250) AS g"
                )
                conn.commit()
                time.sleep(writer_rnd.uniform(0, 0.2))

    thread = threading.Thread(target=writer)
    thread.start()
    # Kill when the published count passes random points of the stream: mid-stream, not idle.
    kill_points = sorted(rnd.sample(range(1, 20_000), 6))
    cursors_at_kill = []
    try:
        proc = producers.start(env)
        for point in kill_points:
            wait_until(lambda p=point: cursor_row(url)[2] >= p, 60, f"{point} published", step=0.01)
            killed = proc.pid
            proc.kill()
            wait_until(lambda: producer_backends_gone(url), 20, "the killed producer's sessions to end")
            cursors_at_kill.append(cursor_row(url))
            proc = producers.start(env)
            assert proc.pid != killed
    finally:
        thread.join()
    proc.wait_for_log("active: holding the producer lock")
    wait_until(lambda: caught_up(url), 120, "the last producer to catch up")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()

    ids = outbox_ids(url)
    assert len(ids) == 20_000
    records = read_topic(private, want=len(ids), timeout=120, settle=2)
    counts = Counter(r.action_id for r in records)
    assert set(ids) - set(counts) == set(), "action_ids missing from the topic"
    assert set(counts) - set(ids) == set()
    # A duplicate can only come from the batch in flight at a kill: the `batch` rows after the
    # cursor stored at that moment.
    position = {aid: i for i, aid in enumerate(ids)}
    in_flight = set()
    for _txid, action_id, published in cursors_at_kill:
        start = position[action_id] + 1 if published else 0
        in_flight.update(ids[start : start + batch])
    duplicates = {aid: n for aid, n in counts.items() if n > 1}
    print(f"kills={len(cursors_at_kill)} cursors={cursors_at_kill} duplicated={len(duplicates)}")
    assert set(duplicates) <= in_flight
    assert all(n <= 1 + len(cursors_at_kill) for n in duplicates.values())


def test_standby_takes_over_when_the_active_producer_dies(private, producers):
    url = private.source_db_url
    env = producer_env(private, POLL_INTERVAL=0.2)
    first = producers.start(env)
    first.wait_for_log("active: holding the producer lock")
    second = producers.start(env)
    second.wait_for_log("standby: another producer holds the lock")
    insert_employees(url, 100)
    wait_until(lambda: caught_up(url), 30, "the active producer to publish")
    assert "active:" not in second.log()

    first.kill()
    killed_at = time.monotonic()
    second.wait_for_log("active: holding the producer lock", timeout=30)
    print(f"standby took over {time.monotonic() - killed_at:.1f}s after kill -9")
    insert_employees(url, 100)
    wait_until(lambda: caught_up(url), 30, "the new active producer to publish")
    records = read_topic(private, want=200)
    assert sorted(r.action_id for r in records) == list(range(1, 201))
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0


def test_keeps_running_through_a_source_restart(private, producers, local_services):
    url = private.source_db_url
    proc = producers.start(producer_env(private, PRODUCER_BATCH_SIZE=100, RETRY_BACKOFF_MAX=2))
    proc.wait_for_log("active: holding the producer lock")
    execute(url, "INSERT INTO employees (first_name) SELECT 'a' FROM generate_series(1, 3000)")
    wait_until(lambda: cursor_row(url)[2] > 0, 30, "publishing to start")
    old, mark = local_services.source.pid(), len(proc.output())
    local_services.source.stop(mode="immediate")
    # It notices (its session is gone with the lock) and keeps running.
    proc.wait_for_log(r"batch not published|no longer the active producer", start=mark)
    assert proc.running(), proc.log()
    local_services.source.start()
    assert local_services.source.pid() != old
    proc.wait_for_log("active: holding the producer lock", start=mark)
    execute(url, "INSERT INTO employees (first_name) SELECT 'b' FROM generate_series(1, 1000)")
    wait_until(lambda: caught_up(url), 90, "the producer to catch up after the restart")
    assert proc.running()
    # Sequences skip values after a crash restart: compare with the outbox, not with 1..4000.
    ids = outbox_ids(url)
    assert len(ids) == 4000
    records = read_topic(private, want=4000)
    assert {r.action_id for r in records} == set(ids)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()


def test_waits_for_kafka_at_start_and_survives_a_broker_restart(private, producers, local_services):
    url = private.source_db_url
    local_services.kafka.stop(hard=True)
    proc = producers.start(producer_env(private, PRODUCER_BATCH_SIZE=200))
    proc.wait_for_log("waiting for Kafka at ")
    local_services.kafka.start()
    proc.wait_for_log("active: holding the producer lock", timeout=60)

    insert_employees(url, 3000)
    wait_until(lambda: cursor_row(url)[2] > 0, 30, "publishing to start")
    old, mark = local_services.kafka.pid(), len(proc.output())
    local_services.kafka.stop(hard=True)
    insert_employees(url, 1000)
    proc.wait_for_log("waiting for Kafka: all brokers are down", start=mark)
    assert proc.running(), proc.log()
    local_services.kafka.start()
    assert local_services.kafka.pid() != old
    wait_until(lambda: caught_up(url), 120, "the producer to catch up after the broker restart")
    records = read_topic(private, want=4000)
    assert set(r.action_id for r in records) == set(range(1, 4001))
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()


def test_second_signal_exits_at_once(private, producers, local_services):
    url = private.source_db_url
    env = producer_env(private)
    proc = producers.start(env)
    proc.wait_for_log("active: holding the producer lock")
    local_services.kafka.stop(hard=True)
    insert_employees(url, 10)
    # The batch is produced and its flush waits for the broker.
    proc.wait_for_log("waiting for Kafka to acknowledge 10 of 10 messages")
    proc.signal(signal.SIGTERM)
    proc.wait_for_log("SIGTERM received: finishing the current batch")
    with pytest.raises(subprocess.TimeoutExpired):  # it goes on waiting for the batch
        proc.proc.wait(1)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == exits.FORCED
    assert cursor_row(url)[1] == 0  # the unacknowledged batch did not move the cursor

    local_services.kafka.start()
    proc = producers.start(env, "--once")
    assert proc.wait(60) == 0, proc.log()
    assert {r.action_id for r in read_topic(private, want=10)} == set(range(1, 11))


def test_failed_delivery_keeps_the_cursor_and_is_retried(private, producers, local_services):
    url = private.source_db_url
    # Deliveries time out after 2 s while the broker is down: the batch must be reported failed.
    proc = producers.start(producer_env(private, KAFKA_MESSAGE_TIMEOUT_MS=2000, RETRY_BACKOFF_MAX=1))
    proc.wait_for_log("active: holding the producer lock")
    local_services.kafka.stop(hard=True)
    insert_employees(url, 20)
    proc.wait_for_log(r"batch not published: 20 of 20 messages not delivered: .*; retrying", timeout=30)
    assert cursor_row(url)[1:] == (0, 0)
    local_services.kafka.start()
    wait_until(lambda: caught_up(url), 60, "the retried batch to be published")
    assert {r.action_id for r in read_topic(private, want=20)} == set(range(1, 21))
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()
