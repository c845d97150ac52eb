"""What ProductionCDCConsumer, in-process, applies on the real broker and destination: every
action in order and a full replay that changes nothing, older events delivered late (also after
a DELETE) and events superseded within a batch decided stale, a DELETE with an odd old image, and
the version guard without the idempotency record."""

from __future__ import annotations

import json
from collections import Counter

from consumer_final import ProductionCDCConsumer
from tests.support import dlq_count, query, rewind_to_earliest
from tests.support.consumer import (
    OURS,
    Running,
    count_processed,
    dest_rows,
    event,
    expected_state,
    fast,
    outcomes,
    produce,
    workload,
)


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

    rewind_to_earliest(settings)
    again = ProductionCDCConsumer(settings=s)
    with Running(again) as r:
        r.wait_consumed(600)
    assert again.stats.get("duplicates") == 600
    assert sum(again.stats.get(f"applied_{a.lower()}") for a in actions) == 0
    assert dest_rows(clean_dest) == expected_state(events)
    assert query(clean_dest, "SELECT max(processed_at), count(*) FROM processed_events")[0] == decided_at


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
