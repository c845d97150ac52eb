"""ProductionCDCConsumer in-process, against the real broker and the real destination PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import time
from collections import Counter
from datetime import datetime

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from consumer_helpers import (
    OURS,
    Running,
    committed_offsets,
    count_processed,
    dest_constraint,
    dest_rows,
    dlq_messages,
    event,
    expected_state,
    fast,
    outcomes,
    produce,
    set_dlq_max_message_bytes,
    workload,
)
from support import end_offsets, query

from cdc.dlq import queue as dlq
from cdc.dlq.replay import replay_pending
from cdc.errors import HaltError
from cdc.kafka.client import admin_client, consumer_config
from consumer_final import ProductionCDCConsumer

pytestmark = pytest.mark.integration


def _reset_group_to_earliest(settings) -> None:
    admin = admin_client(settings)
    meta = admin.list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
    parts = [TopicPartition(settings.cdc_topic, p, 0) for p in meta.partitions]
    futures = admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(settings.consumer_group_id, parts)]
    )
    for f in futures.values():
        f.result(timeout=30)


def _message_at(settings, partition: int, offset: int):
    c = Consumer(consumer_config(settings, **{"group.id": "peek"}))
    try:
        c.assign([TopicPartition(settings.cdc_topic, partition, offset)])
        msg = c.poll(10)
        assert msg is not None and msg.error() is None
        return msg
    finally:
        c.close()


def test_applies_every_action_and_a_full_replay_changes_nothing(settings, clean_dest):
    events = workload(600, emps=80)
    actions = Counter(ev.action for ev in events)
    assert set(actions) == {"INSERT", "UPDATE", "DELETE", "SNAPSHOT"}
    produce(settings, events)
    s = fast(settings, consumer_batch_size=100)

    first = ProductionCDCConsumer(settings=s)
    with Running(first) as r:
        r.wait(lambda: count_processed(clean_dest) == 600, what="600 events decided")
    assert dest_rows(clean_dest) == expected_state(events)
    # In order per emp_id: an event is stale only when a newer one of its emp_id in the same
    # batch superseded it; what was written counts as applied.
    decided = Counter(outcomes(clean_dest).values())
    assert set(decided) == {"applied", "stale"}
    assert sum(first.stats.get(f"applied_{a.lower()}") for a in actions) == decided["applied"]
    assert first.stats.get("stale") == decided["stale"]
    assert all(first.stats.get(f"applied_{a.lower()}") > 0 for a in actions)
    decided_at = query(clean_dest, "SELECT max(processed_at), count(*) FROM processed_events")[0]

    _reset_group_to_earliest(settings)
    again = ProductionCDCConsumer(settings=s)
    with Running(again) as r:
        r.wait_consumed(600)
    assert again.stats.get("duplicates") == 600
    assert sum(again.stats.get(f"applied_{a.lower()}") for a in actions) == 0
    assert dest_rows(clean_dest) == expected_state(events)
    assert query(clean_dest, "SELECT max(processed_at), count(*) FROM processed_events")[0] == decided_at


POISON = [
    (b"\xff\xfe\x00binary", "not UTF-8", None),
    (b"{not json", "not JSON", None),
    (b"[1, 2, 3]", "JSON object", None),
    (json.dumps({"action": "INSERT", "emp_id": 5}).encode(), "action_id is missing", None),
    (json.dumps({"action_id": 9003, "action": "UPSERT", "emp_id": 5}).encode(), "action=", 9003),
    (json.dumps({"action_id": 9004, "action": "INSERT", "emp_id": "seven"}).encode(), "emp_id must be", 9004),
    (
        json.dumps({"action_id": 9005, "action": "INSERT", "emp_id": 5, "first_name": "x" * 101}).encode(),
        "first_name",
        9005,
    ),
    (
        json.dumps({"action_id": 9006, "action": "INSERT", "emp_id": 5, "salary": 2**31}).encode(),
        "salary",
        9006,
    ),
    (
        json.dumps({"action_id": 9007, "action": "INSERT", "emp_id": 5, "dob": "2020/12/24"}).encode(),
        "dob",
        9007,
    ),
]


def test_poison_messages_go_to_the_dlq_with_headers_and_the_rest_applies(settings, clean_dest):
    good = [event(i, "INSERT", i) for i in range(1, 21)]
    stream: list = []
    for i, (value, _, _) in enumerate(POISON):
        stream += [good[i], (b"5", value, OURS)]  # invalid rows our producer passed on
    stream += good[len(POISON) :]
    produce(settings, stream)

    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as r:
        r.wait_consumed(len(stream))
        # Still running: a later good event applies too.
        produce(settings, [event(100, "UPDATE", 1, salary=4242)])
        r.wait(lambda: dest_rows(clean_dest)[1][5] == 4242, what="the later update")

    expected = expected_state([*good, event(100, "UPDATE", 1, salary=4242)])
    assert dest_rows(clean_dest) == expected
    assert consumer.stats.get("dlq") == len(POISON)

    letters = dlq_messages(settings)
    assert len(letters) == len(POISON)
    by_value = {}
    for letter in letters:
        raw = letter["value"]
        by_value[base64.b64decode(raw[7:]) if raw.startswith("base64:") else raw.encode()] = letter
    for value, reason, _ in POISON:
        h = by_value[value]["headers"]
        assert by_value[value]["key"] == "5"
        assert h[dlq.H_TOPIC] == settings.cdc_topic
        assert h[dlq.H_ERROR_CLASS] == "InvalidEventError"
        assert reason in h[dlq.H_ERROR_MESSAGE]
        assert h[dlq.H_ATTEMPTS] == "1"
        assert h[dlq.H_GROUP] == settings.consumer_group_id
        assert datetime.fromisoformat(h[dlq.H_FAILED_AT]).tzinfo is not None
        original = _message_at(settings, int(h[dlq.H_PARTITION]), int(h[dlq.H_OFFSET]))
        assert original.value() == value

    # Every poison message with a usable action_id is accounted for in processed_events.
    recorded = outcomes(clean_dest)
    for _, _, action_id in POISON:
        if action_id is not None:
            assert recorded[action_id] == "dlq"
    assert sum(1 for o in recorded.values() if o == "dlq") == 5
    assert sum(1 for o in recorded.values() if o == "applied") == len(good) + 1


def test_older_events_delivered_late_are_stale_even_after_a_delete(settings, clean_dest):
    s = fast(settings)
    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        # One batch: an older update right behind a newer one.
        produce(settings, [event(10, "INSERT", 1, salary=100), event(12, "UPDATE", 1, salary=120),
                           event(11, "UPDATE", 1, salary=110)])  # fmt: skip
        r.wait(lambda: count_processed(clean_dest) == 3)
        assert dest_rows(clean_dest)[1][5] == 120
        # Later batches: older than the stored version, then a delete and an older update after it.
        produce(settings, [event(9, "UPDATE", 1, salary=90)])
        r.wait(lambda: count_processed(clean_dest) == 4)
        produce(settings, [event(20, "DELETE", 1)])
        r.wait(lambda: count_processed(clean_dest) == 5)
        produce(settings, [event(15, "UPDATE", 1, salary=150)])
        r.wait(lambda: count_processed(clean_dest) == 6)
        assert 1 not in dest_rows(clean_dest)
        # A newer INSERT after the DELETE brings the row back.
        produce(settings, [event(25, "INSERT", 1, salary=250)])
        # An emp_id whose DELETE arrives before its older INSERT never appears.
        produce(settings, [event(30, "DELETE", 2), event(28, "INSERT", 2, salary=280)])
        r.wait(lambda: count_processed(clean_dest) == 9)

    rows = dest_rows(clean_dest)
    assert rows[1][5] == 250
    assert 2 not in rows
    assert outcomes(clean_dest) == {
        10: "stale",
        12: "applied",
        11: "stale",
        9: "stale",
        20: "applied",
        15: "stale",
        25: "applied",
        30: "applied",
        28: "stale",
    }  # fmt: skip  (10 was superseded by 12 in its batch: never written)
    assert consumer.stats.get("stale") == 5
    assert query(clean_dest, "SELECT emp_id, last_action_id, deleted FROM emp_versions ORDER BY 1") == [
        (1, 25, False),
        (2, 30, True),
    ]


def test_a_row_the_database_rejects_is_isolated_retried_dead_lettered_and_replayable(settings, clean_dest):
    s = fast(settings, max_attempts=3)
    events = [event(i, "INSERT", i, salary=-5 if i == 25 else 100) for i in range(1, 51)]
    with dest_constraint(clean_dest, "test_salary_not_negative", "salary >= 0"):
        produce(settings, events)
        consumer = ProductionCDCConsumer(settings=s)
        with Running(consumer) as r:
            r.wait_consumed(50)
        rows = dest_rows(clean_dest)
        assert set(rows) == set(range(1, 51)) - {25}
        assert outcomes(clean_dest)[25] == "dlq"
        [letter] = dlq_messages(settings)
        assert letter["headers"][dlq.H_ATTEMPTS] == "3"
        assert letter["headers"][dlq.H_ERROR_CLASS] == "CheckViolation"
        assert "test_salary_not_negative" in letter["headers"][dlq.H_ERROR_MESSAGE]
        assert json.loads(letter["value"])["action_id"] == 25
        assert consumer.stats.get("retries") >= 2

    # The constraint is gone (the operator fixed the cause): replay the DLQ and the row applies.
    assert replay_pending(s) == 1
    assert replay_pending(s) == 0  # the replay group remembers where it stopped
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: outcomes(clean_dest)[25] == "applied", what="the replayed event")
    assert dest_rows(clean_dest)[25][5] == -5
    assert count_processed(clean_dest) == 50


def test_without_dlq_a_bad_message_stops_the_consumer_and_its_offset_stays(settings, clean_dest):
    # One key, so one partition: offsets 0-4 good, 5 poison, 6-10 good.
    stream = [event(i, "INSERT", 1, salary=i) for i in range(1, 6)]
    stream += [(b"1", b"{broken")] + [event(i, "UPDATE", 1, salary=i) for i in range(6, 11)]
    produce(settings, stream)
    consumer = ProductionCDCConsumer(settings=fast(settings), enable_dlq=False)
    with pytest.raises(HaltError, match=r"offset=5 .*--no-dlq"):
        consumer.run()
    assert dlq_messages(settings) == []
    assert all(o <= 5 for o in committed_offsets(settings).values())
    assert all(o != 10 for o in outcomes(clean_dest))  # nothing after the bad message applied


def test_without_idempotency_the_version_guard_still_protects_state(settings, clean_dest):
    events = workload(200, emps=30, start=10)
    late = event(5, "UPDATE", events[-1].emp_id, salary=1)  # older than anything applied, delivered last
    produce(settings, [*events, late])
    consumer = ProductionCDCConsumer(settings=fast(settings), enable_idempotency=False)
    with Running(consumer) as r:
        r.wait_consumed(201)
    assert dest_rows(clean_dest) == expected_state(events)
    assert count_processed(clean_dest) == 0
    applied = sum(
        consumer.stats.get(f"applied_{a.lower()}") for a in ("INSERT", "UPDATE", "DELETE", "SNAPSHOT")
    )
    assert applied + consumer.stats.get("stale") == 201


def test_dlq_circuit_breaker_stops_instead_of_dead_lettering_the_stream(settings, clean_dest):
    produce(settings, [(str(i).encode(), b"garbage") for i in range(60)])
    consumer = ProductionCDCConsumer(settings=fast(settings, dlq_breaker_window=20, dlq_breaker_ratio=0.9))
    with pytest.raises(HaltError, match="circuit breaker"):
        consumer.run()
    assert len(dlq_messages(settings)) < 20
    assert sum(max(o, 0) for o in committed_offsets(settings).values()) < 20


def test_when_the_dlq_cannot_be_written_the_offset_stays_until_it_can(settings, clean_dest):
    poison = os.urandom(3000)  # not UTF-8, and incompressible
    consumer = ProductionCDCConsumer(settings=fast(settings, retry_backoff_max=0.5))
    with Running(consumer) as r:
        # After the consumer's start, which sizes the DLQ topic for any letter: from now on the
        # broker refuses dead letters larger than 1000 bytes, and the DLQ cannot take this one.
        r.wait(lambda: consumer._dlq is not None, what="the DLQ producer")
        set_dlq_max_message_bytes(settings, 1000)
        time.sleep(1)
        produce(settings, [event(1, "INSERT", 1), (b"1", poison), event(2, "UPDATE", 1, salary=2)])
        r.wait(lambda: consumer.stats.get("retries") >= 3, what="retries of the DLQ write")
        assert all(o < 1 for o in committed_offsets(settings).values())  # not past offset 1
        assert count_processed(clean_dest) == 0  # the batch was rolled back, not half-applied
        assert dlq_messages(settings) == []

        set_dlq_max_message_bytes(settings, 1_000_000)
        r.wait(lambda: count_processed(clean_dest) == 2, what="the batch after the DLQ recovered")
    [letter] = dlq_messages(settings)
    assert base64.b64decode(letter["value"][len("base64:") :]) == poison
    committed = committed_offsets(settings)
    assert all(committed[p] == end for p, end in end_offsets(settings).items() if end)
    assert consumer.stats.get("dlq") == 1
    assert dest_rows(clean_dest)[1][5] == 2
