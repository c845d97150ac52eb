"""Consumer edge cases found in review: re-sent copies of a bad message in one batch, deep JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from consumer_helpers import (
    OURS,
    Running,
    dest_constraint,
    dest_rows,
    dlq_messages,
    event,
    expected_state,
    fast,
    outcomes,
    produce,
)

from cdc.dlq.queue import CircuitBreaker, DeadLetterQueue
from cdc.kafka.client import Received
from cdc.local.paths import PROJECT_DIR
from cdc.local.runner import settings_env
from cdc.runtime.db import Database
from cdc.runtime.stats import Stats
from cdc.sink.batch import BatchApplier
from consumer_final import ProductionCDCConsumer
from employee import ChangeEvent, InvalidEventError

pytestmark = pytest.mark.integration

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_json_is_invalid_not_a_crash():
    with pytest.raises(InvalidEventError, match="nested too deeply"):
        ChangeEvent.from_json(DEEP)


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


def test_bad_rows_anywhere_in_a_large_batch_are_found_and_the_rest_applies(settings, clean_dest):
    # Halves in savepoints down to the bad rows: first, last and one in the middle (each the
    # only event of its emp_id: a bad event superseded in its batch is stale, never written).
    bad = {1, 117, 200}
    events = [
        event(i, "INSERT", 1000 + i, dob="2023-02-30")
        if i in bad
        else event(i, "INSERT" if i <= 50 else "UPDATE", (i - 1) % 50 + 1, salary=i)
        for i in range(1, 201)
    ]
    batch = [Received(settings.cdc_topic, 0, n, ev.key(), ev.to_json(), OURS) for n, ev in enumerate(events)]
    db, queue, stats = Database(clean_dest), DeadLetterQueue(settings), Stats("t")
    applier = BatchApplier(
        db, dlq=queue, breaker=CircuitBreaker(100, 0.9), stats=stats, max_attempts=3, idempotency=True
    )
    try:
        result = applier.apply(batch)
    finally:
        queue.close()
        db.close()
    assert sorted(letter.record.offset + 1 for letter in result.dead) == sorted(bad)
    assert {letter.attempts for letter in result.dead} == {3}
    assert {letter.error_class for letter in result.dead} == {"DatetimeFieldOverflow"}
    assert stats.get("retries") == len(bad) * 2
    assert len(result.applied) + len(result.stale) == len(events) - len(bad)
    assert dest_rows(clean_dest) == expected_state(ev for ev in events if ev.action_id not in bad)
    assert outcomes(clean_dest) == {
        **{i.event.action_id: "applied" for i in result.applied},
        **{i.event.action_id: "stale" for i in result.stale},
        **dict.fromkeys(bad, "dlq"),
    }


@pytest.mark.parametrize(
    ("password", "db", "words"), [("wrong", None, "authentication failed"), (None, "nope", "does not exist")]
)
def test_wrong_password_or_database_stops_at_once_with_one_line(settings, tmp_path, password, db, words):
    url = settings.dest_db_url
    if password:
        url = url.replace(":postgres@", f":{password}@")
    if db:
        url = url.rsplit("/", 1)[0] + f"/{db}"
    env = {**settings_env(settings), "DEST_DB_URL": url}
    out = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "consumer_final.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and words in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "wrong" not in out.stderr
