"""Where the consumer starts each partition, on the real broker and destination: the destination's
applied offsets, not Kafka's view. Messages deleted while the consumer was stopped hold their
partition until the operator accepts the gap (logged, counted, recorded); a group whose offsets
an operator moved to the end changes nothing; a topic deleted and recreated is read from its
beginning; a retention that overtakes a paused consumer is caught while it runs; several
consumers of one group take their positions from the destination across rebalances;
``--replay-dlq`` refuses a gap in the dead-letter topic."""

from __future__ import annotations

import logging
import re
import time

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import NewTopic

from cdc.dlq.replay import replay_pending
from cdc.errors import HaltError
from cdc.kafka.client import admin_client, ensure_topics
from cdc.local.runner import settings_env
from cdc.ops import offsets
from cdc.runtime.db import Database
from cdc.runtime.stats import ASSIGNED, GAP, HELD, POSITION_GAP, POSITION_GAP_ACCEPTED, POSITION_RECREATED
from cdc.sink.positions import DestinationPositions
from consumer_final import ProductionCDCConsumer
from tests.support import connect, query, run_cdc, wait_until, watermarks
from tests.support.consumer import (
    Running,
    count_processed,
    dest_rows,
    event,
    expected_state,
    fast,
    produce,
    workload,
)

HOLD_LINE = "were removed from the topic before the destination applied them"


def delete_records_to_end(settings, topic: str | None = None) -> dict[int, tuple[int, int]]:
    """What retention does to a stopped consumer's backlog: every message of ``topic`` now in it
    is deleted (the Admin API's delete-records). Returns each partition's deleted (low, high)."""
    topic = topic or settings.cdc_topic
    ends = watermarks(settings, topic)
    admin = admin_client(settings)
    for future in admin.delete_records(
        [TopicPartition(topic, p, hi) for p, (_lo, hi) in ends.items()]
    ).values():
        future.result(timeout=30)
    assert {p: lo for p, (lo, _hi) in watermarks(settings, topic).items()} == {
        p: hi for p, (_, hi) in ends.items()
    }
    return ends


def applied_offsets(url: str, topic: str) -> dict[int, int]:
    rows = query(url, 'SELECT "partition", next_offset FROM applied_offsets WHERE topic = %s', (topic,))
    return dict(rows)


def test_messages_deleted_while_stopped_hold_the_partitions_until_the_gap_is_accepted(
    settings, clean_dest, caplog, tmp_path
):
    caplog.set_level(logging.INFO)
    first, lost, after = workload(300, emps=40), workload(300, emps=40, seed=8, start=301), []
    produce(settings, first)
    s = fast(settings, consumer_batch_size=50)
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: count_processed(clean_dest) == 300, what="the first 300 decided")
    stored = applied_offsets(clean_dest, settings.cdc_topic)
    assert stored == {p: hi for p, (_, hi) in watermarks(settings).items()}

    # While it is stopped, 300 changes are published and removed before it reads them.
    produce(settings, lost)
    deleted = delete_records_to_end(settings)
    after = [event(1000 + i, "INSERT", 500 + i) for i in range(30)]
    produce(settings, after)

    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        r.wait(lambda: consumer.stats.get(HELD) == 3, what="every partition held")
        time.sleep(2)  # the messages after the gap are there to read: none is applied
        assert count_processed(clean_dest) == 300
        gaps = consumer.stats.get(GAP)
        assert sum(gaps.values()) == 300
        assert consumer.stats.get(POSITION_GAP) == 3
        ready, reason = consumer.probe.ready()
        assert not ready and "holding" in reason and "A gap in the topic" in reason
        held_lines = [rec.getMessage() for rec in caplog.records if HOLD_LINE in rec.getMessage()]
        assert len(held_lines) == 3 and all(rec.levelno == logging.ERROR for rec in caplog.records
                                            if HOLD_LINE in rec.getMessage())  # fmt: skip
        for p, (_lo, hi) in deleted.items():
            line = f"{settings.cdc_topic}[{p}]: offsets {stored[p]}..{hi - 1} ({hi - stored[p]} messages)"
            assert any(line in held for held in held_lines), (line, held_lines)

        # What the operator sees: the gap, and where to re-publish the outbox from.
        shown = run_cdc(settings_env(settings), tmp_path, "offsets", "show", "--topic", settings.cdc_topic)
        assert shown.returncode == 1, shown
        assert shown.stdout.count(HOLD_LINE) == 3
        suggested = [int(n) for n in re.findall(r"--republish-from (\d+)", shown.stdout)]
        assert len(suggested) == 3 and set(suggested) <= {e.action_id for e in first}, shown.stdout

        # The operator's override: logged, recorded, counted; the running consumer resumes.
        accepted = offsets.accept_gaps(settings, [settings.cdc_topic])
        assert sorted((g.partition, ok) for g, ok in accepted) == [(0, True), (1, True), (2, True)]
        assert sum(g.missing for g, _ in accepted) == 300
        r.wait(lambda: count_processed(clean_dest) == 330, timeout=30, what="the 30 after the gap applied")
        assert consumer.stats.get(POSITION_GAP_ACCEPTED) == 3
        assert consumer.stats.get(HELD) == 0
        assert consumer.probe.ready()[0]
    recorded = query(clean_dest, "SELECT sum(next_kept - first_lost), count(*) FROM accepted_gaps")
    assert recorded == [(300, 3)]
    assert any("gap accepted by" in rec.getMessage() for rec in caplog.records)
    # Exactly the changes not lost: the first 300 and the 30 after the gap.
    assert dest_rows(clean_dest) == expected_state(first + after)


def test_group_offsets_moved_to_the_end_by_an_operator_skip_nothing(settings, clean_dest, caplog):
    caplog.set_level(logging.INFO)
    first, second = workload(200, emps=30), workload(300, emps=30, seed=9, start=201)
    produce(settings, first)
    s = fast(settings, consumer_batch_size=50)
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: count_processed(clean_dest) == 200, what="the first 200 decided")
    produce(settings, second)
    # What `kafka-consumer-groups --reset-offsets --to-latest --execute` does to the stopped group.
    ends = watermarks(settings)
    request = ConsumerGroupTopicPartitions(
        settings.consumer_group_id, [TopicPartition(settings.cdc_topic, p, hi) for p, (_, hi) in ends.items()]
    )
    admin = admin_client(settings)  # kept alive until the futures resolve
    for future in admin.alter_consumer_group_offsets([request]).values():
        future.result(timeout=30)

    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: count_processed(clean_dest) == 500, what="all 500 decided")
    assert dest_rows(clean_dest) == expected_state(first + second)
    ahead = [
        rec.getMessage() for rec in caplog.records if "is ahead of the destination's" in rec.getMessage()
    ]
    assert len(ahead) == 3, ahead
    assert all(rec.levelno == logging.WARNING for rec in caplog.records if "is ahead of" in rec.getMessage())


def test_a_recreated_topic_is_read_from_its_beginning(settings, clean_dest, caplog):
    caplog.set_level(logging.INFO)
    first = workload(150, emps=30)
    produce(settings, first)
    s = fast(settings, consumer_batch_size=50)
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: count_processed(clean_dest) == 150, what="the first 150 decided")
    old = applied_offsets(clean_dest, settings.cdc_topic)

    admin = admin_client(settings)
    admin.delete_topics([settings.cdc_topic])[settings.cdc_topic].result(timeout=30)

    def recreated() -> bool:
        try:
            admin.create_topics([NewTopic(settings.cdc_topic, 3, 1)])[settings.cdc_topic].result(timeout=30)
            return True
        except Exception:  # noqa: BLE001 - still being deleted
            return False

    wait_until(recreated, 60, "the topic recreated")
    ensure_topics(settings, admin)
    # Filled past the old offsets before the consumer resumes: new changes, newer action_ids.
    second = workload(600, emps=30, seed=10, start=1001)
    produce(settings, second)
    assert all(hi > old[p] for p, (_, hi) in watermarks(settings).items())

    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        r.wait(lambda: count_processed(clean_dest) == 750, what="all 600 of the new topic decided")
    assert consumer.stats.get(POSITION_RECREATED) == 3
    assert dest_rows(clean_dest) == expected_state(first + second)
    lines = [rec.getMessage() for rec in caplog.records if "deleted and recreated" in rec.getMessage()]
    assert len(lines) == 3, lines
    assert applied_offsets(clean_dest, settings.cdc_topic) == {
        p: hi for p, (_, hi) in watermarks(settings).items()
    }


def test_retention_that_overtakes_a_paused_consumer_is_caught_while_it_runs(settings, clean_dest, caplog):
    """The destination locked: the batch times out (transient) and the partitions are paused;
    meanwhile messages behind the consumer's fetch position are deleted. On resume the fetch is
    out of the log: the partition is placed again from the destination, which finds the gap."""
    caplog.set_level(logging.INFO)
    s = fast(settings, consumer_batch_size=50, statement_timeout_ms=500, retry_backoff_max=1.0)
    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        produce(settings, workload(60, emps=20))
        r.wait(lambda: count_processed(clean_dest) == 60, what="the first 60 decided")
        with connect(clean_dest) as lock:
            with lock.cursor() as cur:
                cur.execute("LOCK TABLE employees IN ACCESS EXCLUSIVE MODE")
                produce(settings, [event(100, "INSERT", 100)])
                r.wait(lambda: consumer.retry.paused, what="the partitions paused by the timeout")
                produce(settings, workload(90, emps=20, seed=3, start=200))
                delete_records_to_end(settings)
            lock.rollback()
        r.wait(lambda: consumer.stats.get(HELD) >= 1, timeout=60, what="a partition held")
    assert any(HOLD_LINE in rec.getMessage() for rec in caplog.records)
    assert any("placing it again from the destination" in rec.getMessage() for rec in caplog.records)


def test_consumers_of_one_group_take_their_positions_from_the_destination(settings, clean_dest):
    events = workload(900, emps=60)
    s = fast(settings, consumer_batch_size=20)
    one, two = ProductionCDCConsumer(settings=s), ProductionCDCConsumer(settings=s)
    with Running(one) as r1:
        produce(settings, events[:300])
        r1.wait(lambda: count_processed(clean_dest) >= 100, what="some decided")
        with Running(two) as r2:  # a rebalance moves partitions to the second
            r2.wait(lambda: two.stats.get(ASSIGNED) > 0, what="partitions moved to the second consumer")
            produce(settings, events[300:600])
            r2.wait(lambda: two.stats.get("consumed") > 0, what="the second consumer applying")
        produce(settings, events[600:])  # and back to the first
        r1.wait(lambda: count_processed(clean_dest) == 900, what="all 900 decided")
    assert dest_rows(clean_dest) == expected_state(events)
    assert applied_offsets(clean_dest, settings.cdc_topic) == {
        p: hi for p, (_, hi) in watermarks(settings).items()
    }


def test_replay_dlq_refuses_a_gap_in_the_dead_letter_topic(settings, clean_dest):
    produce(settings, [(b"1", b"not json")] * 3)
    s = fast(settings)
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: sum(hi for _, hi in watermarks(settings, settings.cdc_dlq_topic).values()) == 3,
               what="3 dead letters")  # fmt: skip
    with Database(settings.dest_db_url) as db:
        store = DestinationPositions(db)
        assert replay_pending(settings, store=store) == 3
        replayed = applied_offsets(clean_dest, settings.cdc_dlq_topic)
        assert sum(replayed.values()) == 3
        assert replay_pending(settings, store=store) == 0  # the cursor moved past them
        with Running(ProductionCDCConsumer(settings=s)) as r:
            produce(settings, [(b"2", b"still not json")] * 2)
            r.wait(lambda: sum(hi for _, hi in watermarks(settings, settings.cdc_dlq_topic).values()) >= 6,
                   what="the replayed letters and 2 new ones dead-lettered")  # fmt: skip
        delete_records_to_end(settings, settings.cdc_dlq_topic)
        with pytest.raises(HaltError, match="lost dead letters before they were replayed"):
            replay_pending(settings, store=store)
        assert applied_offsets(clean_dest, settings.cdc_dlq_topic) == replayed
        accepted = offsets.accept_gaps(settings, [settings.cdc_dlq_topic])
        assert accepted and all(ok for _, ok in accepted)
        assert replay_pending(settings, store=store) == 0
