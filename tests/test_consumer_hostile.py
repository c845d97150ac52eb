"""Hostile messages and odd sequences on the real broker and destination (issue 8, points 1, 3, 7)."""

from __future__ import annotations

import json
import logging
import os

import pytest
from consumer_helpers import (
    OURS,
    Running,
    consumer_env,
    count_processed,
    dest_constraint,
    dest_rows,
    dlq_messages,
    event,
    fast,
    outcomes,
    produce,
    set_dlq_max_message_bytes,
)
from support import Daemons, dlq_count, wait_until

from cdc.dlq import queue as dlq
from cdc.dlq.replay import replay_pending
from cdc.errors import UnencodableValueError
from cdc.kafka.client import (
    LETTER_HEADROOM,
    MARK_HEADER,
    Publisher,
    Received,
    admin_client,
    ensure_topics,
    producer_config,
    topic_limit,
)
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database
from cdc.sink.statements import Delivered, Statements, apply_events
from consumer_final import ProductionCDCConsumer

pytestmark = pytest.mark.integration


def _replayed(ev) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return ev.key(), ev.to_json(), [*OURS, (dlq.H_REPLAYED_FROM, b"dlq/0/0")]


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


def test_events_superseded_in_a_batch_are_stale_not_applied(settings, clean_dest):
    produce(settings, [event(10, "INSERT", 1, salary=10), event(11, "UPDATE", 1, salary=11),
                     event(12, "UPDATE", 1, salary=12), event(20, "INSERT", 2)])  # fmt: skip
    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as r:
        r.wait(lambda: count_processed(clean_dest) == 4, what="four decisions")
    assert outcomes(clean_dest) == {10: "stale", 11: "stale", 12: "applied", 20: "applied"}
    assert dest_rows(clean_dest)[1][5] == 12
    assert consumer.stats.get("applied_insert") == 1  # only event 20 was written as an INSERT
    assert consumer.stats.get("applied_update") == 1
    assert consumer.stats.get("stale") == 2


def test_a_delete_with_an_odd_old_image_still_deletes(settings, clean_dest):
    odd = {
        "action_id": 9,
        "action": "DELETE",
        "emp_id": 1,
        "first_name": "x" * 101,
        "dob": "1/2/3",
        "salary": "?",
    }
    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as r:
        produce(settings, [event(1, "INSERT", 1)])
        r.wait(lambda: 1 in dest_rows(clean_dest), what="the insert")
        produce(settings, [(b"1", json.dumps(odd).encode(), OURS)])
        r.wait(lambda: count_processed(clean_dest) == 2, what="the delete decided")
    assert outcomes(clean_dest) == {1: "applied", 9: "applied"}
    assert dest_rows(clean_dest) == {}
    assert dlq_count(settings) == 0


@pytest.mark.parametrize(("text", "words"), [("\ud800", "surrogates not allowed"), ("a\x00b", "NUL")])
def test_a_value_psycopg2_cannot_encode_is_a_bad_message(clean_dest, text, words):
    # Built without validation, as a future field or a bug might let one through.
    item = Delivered(event(1, "INSERT", 1, city=text), Received("t", 0, 0, None, None))
    db = Database(clean_dest)
    try:
        with pytest.raises(UnencodableValueError, match=words), db.connection() as conn, conn.cursor() as cur:
            apply_events(
                cur, [item], idempotency=True, statements=Statements.build(cur, Table.load(cur, SOURCE_TABLE))
            )
    finally:
        db.close()


def test_a_message_at_the_topic_size_limit_is_dead_lettered_whole(settings, clean_dest):
    """The letter is the message plus its diagnosis headers, so a message the CDC topic only just
    accepted is bigger than that limit as a letter. Before: the dead-letter topic had the same
    limit, every send was refused as too large, and the consumer retried the batch forever."""
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
    assert topic_limit(admin, settings.cdc_dlq_topic) == limit + LETTER_HEADROOM
    assert any(
        f"raised max.message.bytes of dead-letter topic {settings.cdc_dlq_topic}" in m
        for m in caplog.messages
    )
