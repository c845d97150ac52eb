"""Dead letters, with ProductionCDCConsumer in-process (and once as a subprocess) on the real broker
and destination: what goes to the DLQ and with which headers, a row the database rejects isolated,
retried and replayed, re-sent copies that make one letter, a replayed copy against a plain one,
strangers' messages, the circuit breaker, a DLQ that cannot be written or is too small, and
consumers without a DLQ."""

from __future__ import annotations

import base64
import json
import logging
import os
from datetime import datetime

import pytest
from confluent_kafka import Consumer, TopicPartition

from cdc.dlq import queue as dlq
from cdc.dlq.replay import replay_pending
from cdc.errors import HaltError
from cdc.kafka.client import (
    LETTER_HEADROOM,
    MARK_HEADER,
    Publisher,
    admin_client,
    consumer_config,
    ensure_topics,
    producer_config,
    topic_limit,
)
from consumer_final import ProductionCDCConsumer
from tests.support import Daemons, dlq_count, end_offsets, wait_until
from tests.support.consumer import (
    OURS,
    Running,
    committed_offsets,
    consumer_env,
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
)


def _message_at(settings, partition: int, offset: int):
    c = Consumer(consumer_config(settings, **{"group.id": "peek"}))
    try:
        c.assign([TopicPartition(settings.cdc_topic, partition, offset)])
        msg = c.poll(10)
        assert msg is not None and msg.error() is None
        return msg
    finally:
        c.close()


def _replayed(ev) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return ev.key(), ev.to_json(), [*OURS, (dlq.H_REPLAYED_FROM, b"dlq/0/0")]


def _mixed(first_id: int, n: int, bad_every: int) -> list:
    """``n`` messages in which every ``bad_every``-th is garbage, the rest valid inserts."""
    return [
        (b"x", b"garbage") if i % bad_every == 0 else event(first_id + i, "INSERT", first_id + i)
        for i in range(n)
    ]


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


DEEP = b"[" * 100_000 + b"]" * 100_000


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


def test_hostile_values_are_dead_lettered_and_the_daemon_goes_on(settings, clean_dest, tmp_path):
    hostile = [
        # A lone surrogate: valid JSON, but not text PostgreSQL (or UTF-8) can hold.
        b'{"action_id": 2, "action": "INSERT", "emp_id": 2, "first_name": "\\ud800"}',
        b'{"action_id": 3, "action": "INSERT", "emp_id": 3, "city": "a\\u0000b"}',
        b'{"action_id": 4, "action": "INSERT", "emp_id": 4, "dob": "2023-02-30"}',
        b'{"action_id": 5, "action": "UPDATE", "emp_id": 5, "salary": 1e400}',
    ]
    produce(settings, [event(1, "INSERT", 1), *((b"x", v, OURS) for v in hostile), event(6, "INSERT", 6)])
    daemons = Daemons("consumer_final.py", tmp_path)
    try:
        d = daemons.start(consumer_env(settings))
        wait_until(lambda: count_processed(clean_dest) == 6 or not d.running(), 60, "six decisions")
        assert d.running(), d.output()[-3000:]
        wait_until(lambda: dlq_count(settings) == len(hostile), 30, "the dead letters")
        produce(settings, [event(7, "INSERT", 7)])
        wait_until(lambda: 7 in dest_rows(clean_dest), 30, "a later event")
        assert d.stop() == 0
    finally:
        daemons.kill_all()
    assert set(dest_rows(clean_dest)) == {1, 6, 7}
    assert outcomes(clean_dest) == {
        1: "applied",
        2: "dlq",
        3: "dlq",
        4: "dlq",
        5: "dlq",
        6: "applied",
        7: "applied",
    }
    assert "Traceback" not in d.log()


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


def test_resent_copies_of_an_invalid_event_are_one_dead_letter(settings, clean_dest):
    # The producer re-sends a batch after a failed delivery or a crash, so an invalid source row
    # can reach one consumer batch twice; both copies carry the same action_id.
    bad = json.dumps({"action_id": 50, "action": "UPSERT", "emp_id": 5}).encode()
    good = [event(i, "INSERT", i) for i in range(1, 11)]
    produce(settings, [*good[:5], (b"5", bad, OURS), (b"5", bad, OURS), (b"5", DEEP, OURS), *good[5:]])

    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as r:
        r.wait_consumed(len(good) + 3)
        produce(settings, [event(100, "UPDATE", 1, salary=7)])
        r.wait(lambda: dest_rows(clean_dest)[1][5] == 7, what="a later update")

    assert dest_rows(clean_dest) == expected_state([*good, event(100, "UPDATE", 1, salary=7)])
    assert outcomes(clean_dest)[50] == "dlq"
    values = sorted(m["value"][:40] for m in dlq_messages(settings))
    assert len(values) == 2, values  # one for action_id 50, one for the deep JSON


def test_resent_copies_of_a_rejected_event_are_one_dead_letter(settings, clean_dest):
    good = [event(i, "INSERT", i) for i in range(1, 11)]
    rejected = event(60, "INSERT", 60, salary=-5)
    with dest_constraint(clean_dest, "salary_not_negative", "salary >= 0"):
        produce(settings, [*good[:5], rejected, rejected, *good[5:]])
        consumer = ProductionCDCConsumer(settings=fast(settings))
        with Running(consumer) as r:
            r.wait_consumed(len(good) + 2)
            r.wait(lambda: outcomes(clean_dest).get(60) == "dlq", what="the rejected event's decision")

    assert dest_rows(clean_dest) == expected_state(good)
    assert len(dlq_messages(settings)) == 1


def test_in_isolation_a_replayed_copy_wins_over_a_plain_copy(settings, clean_dest):
    s = fast(settings)
    rejected = event(5, "INSERT", 5, salary=-5)
    with dest_constraint(clean_dest, "no_minus_five", "salary <> -5"):
        produce(settings, [rejected])
        with Running(ProductionCDCConsumer(settings=s)) as r:
            r.wait(lambda: outcomes(clean_dest).get(5) == "dlq", what="the first dead letter")
    # The cause is fixed, the operator replays; a producer re-send of the same event sits in
    # front of the replayed copy, and another bad row sends the batch down the isolation path.
    with dest_constraint(clean_dest, "no_minus_seven", "salary <> -7"):
        produce(settings, [(b"5", rejected.to_json(), OURS), _replayed(rejected),
                         event(6, "INSERT", 6, salary=-7), event(7, "INSERT", 7)])  # fmt: skip
        consumer = ProductionCDCConsumer(settings=s)
        with Running(consumer) as r:
            r.wait(lambda: count_processed(clean_dest) == 3, what="three decisions")
            r.wait_consumed(4)
    assert outcomes(clean_dest) == {5: "applied", 6: "dlq", 7: "applied"}
    assert set(dest_rows(clean_dest)) == {5, 7}
    assert consumer.stats.get("duplicates") == 1


def test_a_foreign_invalid_message_does_not_take_a_real_action_id(settings, clean_dest):
    s = fast(settings)
    foreign = json.dumps({"action_id": 40, "action": "INSERT", "emp_id": "forty"}).encode()
    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        produce(settings, [(b"40", foreign)])
        r.wait(lambda: consumer.stats.get("dlq") == 1, what="the foreign dead letter")
        assert outcomes(clean_dest) == {}
        produce(settings, [event(40, "INSERT", 40)])  # the real event 40, from our producer
        r.wait(lambda: 40 in dest_rows(clean_dest), what="the real event 40")
    assert outcomes(clean_dest) == {40: "applied"}
    [letter] = dlq_messages(settings)
    assert letter["value"].encode() == foreign


def test_a_dead_letter_keeps_our_mark_and_its_replay_is_recorded(settings, clean_dest):
    s = fast(settings)
    ours_invalid = json.dumps({"action_id": 41, "action": "UPSERT", "emp_id": 41}).encode()
    consumer = ProductionCDCConsumer(settings=s)
    with Running(consumer) as r:
        produce(settings, [(b"41", ours_invalid, OURS)])
        r.wait(lambda: outcomes(clean_dest).get(41) == "dlq", what="our invalid event recorded")
    [letter] = dlq_messages(settings)
    assert letter["headers"][MARK_HEADER] == "1"
    assert replay_pending(s) == 1
    # The replayed letter fails again; it is still ours, so it goes back to the DLQ as a
    # reconsidered decision, not as an unknown message.
    with Running(ProductionCDCConsumer(settings=s)) as r:
        r.wait(lambda: dlq_count(settings) == 2, what="the second dead letter")
    letters = dlq_messages(settings)
    assert all(m["headers"].get(MARK_HEADER) == "1" for m in letters)
    assert any(dlq.H_REPLAYED_FROM in m["headers"] for m in letters)
    assert outcomes(clean_dest) == {41: "dlq"}


def test_breaker_counts_the_ratio_of_a_mixed_batch_not_where_its_failures_sit(settings, clean_dest):
    # Half of each batch fails: far below DLQ_BREAKER_RATIO=0.9 whatever the order in a batch. A
    # window that counted a batch's failures as its last messages would trip here (250 bad among
    # 500, window 100).
    produce(settings, _mixed(1, 500, 2))
    consumer = ProductionCDCConsumer(settings=fast(settings))  # window 100, ratio 0.9, batch 500
    with Running(consumer) as r:
        r.wait_consumed(500)
    assert consumer.stats.get("dlq") == 250
    assert count_processed(clean_dest) == 250

    # A restart begins with an empty window and decides the same kind of data the same way.
    produce(settings, _mixed(1001, 500, 2))
    again = ProductionCDCConsumer(settings=fast(settings))
    with Running(again) as r:
        r.wait_consumed(500)
    assert again.stats.get("dlq") == 250
    assert count_processed(clean_dest) == 500


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
        admin = admin_client(settings)
        wait_until(lambda: topic_limit(admin, settings.cdc_dlq_topic) == 1000, 15, "the smaller limit")
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


def test_a_message_at_the_topic_size_limit_is_dead_lettered_whole(settings, clean_dest):
    """The letter is the message plus its diagnosis headers, so a message the CDC topic only just
    accepted is bigger than that limit as a letter: the dead-letter topic takes more (a topic with
    the same limit would refuse every send as too large, and the batch would be retried forever)."""
    admin = admin_client(settings)
    limit = topic_limit(admin, settings.cdc_topic)
    assert topic_limit(admin, settings.cdc_dlq_topic) >= limit + LETTER_HEADROOM
    # A stranger's producer allowed to send up to the broker's limit, one message per batch.
    big = Publisher(
        producer_config(settings, **{"message.max.bytes": limit, "compression.type": "none"}),
        logger=logging.getLogger("test.kafka"),
        flush_timeout=60,
    )
    value = os.urandom(limit - 200)  # incompressible; fits one record batch of the limit
    assert len(value) + 500 > limit  # as a letter it would not
    produce(settings, [event(1, "INSERT", 1), (b"big", value), event(3, "INSERT", 3)], big)
    consumer = ProductionCDCConsumer(settings=fast(settings, retry_backoff_max=0.5))
    with Running(consumer) as r:
        r.wait(lambda: consumer.stats.get("dlq") == 1 and len(dest_rows(clean_dest)) == 2, 60)
    assert consumer.stats.get("retries") == 0
    [letter] = dlq_messages(settings)
    assert letter["value"] == dlq.text_of(value)
    assert set(dest_rows(clean_dest)) == {1, 3}


def test_an_older_smaller_dead_letter_topic_is_raised_to_take_any_letter(settings, caplog):
    admin = admin_client(settings)
    limit = topic_limit(admin, settings.cdc_topic)
    set_dlq_max_message_bytes(settings, limit)
    wait_until(lambda: topic_limit(admin, settings.cdc_dlq_topic) == limit, 15, "the smaller limit")
    with caplog.at_level(logging.INFO, logger="cdc.kafka"):
        ensure_topics(settings, admin)
    # A letter of any message: of CDC_TOPIC's, or of another table's topic (CDC_MAX_MESSAGE_BYTES).
    assert (
        topic_limit(admin, settings.cdc_dlq_topic) == max(limit, settings.max_message_bytes) + LETTER_HEADROOM
    )
    assert any(
        f"raised max.message.bytes of dead-letter topic {settings.cdc_dlq_topic}" in m
        for m in caplog.messages
    )


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
