"""The batch decision (``cdc.sink.batch``, ``cdc.sink.statements``) called directly on the real
destination and the real DLQ topic: bad rows found anywhere in a large batch, values psycopg2
cannot send, two transactions racing for the same action_id or emp_id, and generated batches of
anything at all (hypothesis).

Every message must end applied, stale, duplicate or dead-lettered, exactly once, with
``processed_events`` saying the same; no exception may escape. Races: the batch statement decides
from its snapshot and then checks that its writes did what the snapshot said; the one that lost
the race raises TransientError and rolls back, and its retry decides from what the other
committed. ``CDC_FUZZ_EXAMPLES`` sets the number of generated batches (default 200).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.dlq.queue import CircuitBreaker, DeadLetterQueue
from cdc.errors import TransientError, UnencodableValueError
from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Received
from cdc.model.event import Codec
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database
from cdc.runtime.stats import Stats, table_events_key
from cdc.sink.batch import BatchApplier, BatchResult
from cdc.sink.statements import ApplyResult, Delivered, Statements, apply_events
from employee import EMPLOYEES
from tests.support import connect, dlq_count, query, wait_until
from tests.support.consumer import OURS, dest_rows, event, expected_state, outcomes
from tests.support.hostile import EXAMPLES, FRESH, FUZZ, POOL, batch_values, dump, headers

APP = "cdc-race-test"
salvage_ids = Codec(EMPLOYEES).salvage


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
    assert stats.get(table_events_key("dlq", "employees")) == len(bad)
    assert stats.get(table_events_key("applied", "employees")) == len(result.applied)
    assert len(result.applied) + len(result.stale) == len(events) - len(bad)
    assert dest_rows(clean_dest) == expected_state(ev for ev in events if ev.action_id not in bad)
    assert outcomes(clean_dest) == {
        **{i.event.action_id: "applied" for i in result.applied},
        **{i.event.action_id: "stale" for i in result.stale},
        **dict.fromkeys(bad, "dlq"),
    }


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


def _apply(db: Database, *events) -> ApplyResult:
    items = [Delivered(ev, Received("t", 0, n, None, None)) for n, ev in enumerate(events)]
    with db.connection() as conn, conn.cursor() as cur:
        statements = Statements.build(cur, Table.load(cur, SOURCE_TABLE))
        return apply_events(cur, items, idempotency=True, statements=statements)


def _apply_behind(url: str, statement: str, db: Database, *events) -> BaseException | None:
    """Apply ``events`` while another transaction holds ``statement`` uncommitted; that one
    commits once the batch waits for its lock. Returns what the batch raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            _apply(db, *events)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    with connect(url) as other, other.cursor() as cur:
        cur.execute(statement)
        batch = threading.Thread(target=run)
        batch.start()
        wait_until(
            lambda: query(
                url,
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (APP,),
            ),
            30,
            "the batch to wait for the other transaction",
        )
        other.commit()
    batch.join(30)
    assert not batch.is_alive()
    return raised[0] if raised else None


@pytest.fixture
def db(clean_dest):
    database = Database(clean_dest, application_name=APP)
    yield database
    database.close()


def test_an_action_id_recorded_meanwhile_makes_the_batch_retry_as_a_duplicate(clean_dest, db):
    error = _apply_behind(
        clean_dest,
        "INSERT INTO processed_events (action_id, emp_id, action, outcome) VALUES (5, 1, 'INSERT', 'applied')",
        db,
        event(5, "INSERT", 1),
        event(6, "INSERT", 2),
    )
    assert isinstance(error, TransientError), error
    assert dest_rows(clean_dest) == {}  # rolled back, event 6 included
    retried = _apply(db, event(5, "INSERT", 1), event(6, "INSERT", 2))
    assert [i.event.action_id for i in retried.duplicates] == [5]
    assert [i.event.action_id for i in retried.applied] == [6]
    assert set(dest_rows(clean_dest)) == {2}
    assert outcomes(clean_dest) == {5: "applied", 6: "applied"}


def test_a_newer_version_committed_meanwhile_makes_the_batch_retry_as_stale(clean_dest, db):
    error = _apply_behind(
        clean_dest,
        "INSERT INTO emp_versions (emp_id, last_action_id) VALUES (1, 100)",
        db,
        event(50, "INSERT", 1),
    )
    assert isinstance(error, TransientError), error
    assert outcomes(clean_dest) == {}
    retried = _apply(db, event(50, "INSERT", 1))
    assert [i.event.action_id for i in retried.stale] == [50]
    assert dest_rows(clean_dest) == {}
    assert outcomes(clean_dest) == {50: "stale"}


def _value(generated: bytes | tuple | None, base: int) -> bytes | None:
    if not isinstance(generated, tuple):
        return generated
    event, ascii_only = generated
    if event["action_id"] > POOL:
        event = {**event, "action_id": event["action_id"] + base}
    return dump(event, ascii_only)


def _processed(url: str) -> dict[int, tuple]:
    rows = query(
        url, 'SELECT action_id, outcome, topic, "partition", "offset", processed_at FROM processed_events'
    )
    return {r[0]: r[1:] for r in rows}


def _ours(record: Received) -> bool:
    return record.has_header(MARK_HEADER, MARK_VALUE)


def _check_accounting(batch: list[Received], result: BatchResult, before: dict, after: dict) -> None:
    where = lambda r: (r.topic, r.partition, r.offset)  # noqa: E731
    decided = (
        [where(i.record) for i in result.applied + result.stale]
        + [where(r) for r in result.duplicates]
        + [where(letter.record) for letter in result.dead]
    )
    assert Counter(decided) == Counter(where(r) for r in batch), "a message decided twice or never"

    expected: dict[int, tuple] = {}
    for outcome, items in (("applied", result.applied), ("stale", result.stale)):
        for i in items:
            expected[i.event.action_id] = (outcome, *where(i.record))
    for letter in result.dead:
        ids = salvage_ids(letter.record.value) if _ours(letter.record) else None
        if ids is not None:
            expected[ids[0]] = ("dlq", *where(letter.record))
    recorded = len(result.applied) + len(result.stale) + sum(1 for v in expected.values() if v[0] == "dlq")
    assert len(expected) == recorded, "one action_id decided twice in a batch"
    changed = {a: row[:4] for a, row in after.items() if before.get(a) != row}
    assert changed == expected, "processed_events disagrees with the batch's decisions"


# About 0.1 s per batch: a large CDC_FUZZ_EXAMPLES run outlasts the suite's 600 s per test.
@pytest.mark.timeout(600 + EXAMPLES // 5)
@pytest.mark.parametrize("path", ["as_generated", "one_by_one"])
def test_any_batch_is_decided_exactly_once_on_the_real_destination(settings, clean_dest, path):
    db = Database(clean_dest)
    queue = DeadLetterQueue(settings)
    # Breaker off: a stream of garbage is exactly what this test sends on purpose.
    applier = BatchApplier(
        db, dlq=queue, breaker=CircuitBreaker(0, 0.9), stats=Stats("fuzz"), max_attempts=2, idempotency=True
    )
    offsets = itertools.count()
    totals: Counter[str] = Counter()

    @FUZZ
    @given(parts=st.lists(st.tuples(st.integers(0, 2), st.none() | st.binary(max_size=8), batch_values, headers),
                          min_size=5, max_size=50))  # fmt: skip
    def decide(parts):
        base = next(offsets) * FRESH
        batch = [
            Received(settings.cdc_topic, p, next(offsets), k, _value(v, base), h) for p, k, v, h in parts
        ]
        if path == "one_by_one":
            # An event the database rejects (no 30 February) sends the batch down the isolation path.
            n = next(offsets)
            bad = {"action_id": 10**12 + n, "action": "INSERT", "emp_id": -999_999, "dob": "2023-02-30"}
            batch.append(Received(settings.cdc_topic, 0, n, None, json.dumps(bad).encode(), OURS))
        before = _processed(clean_dest)
        result = applier.apply(batch)
        _check_accounting(batch, result, before, _processed(clean_dest))
        if path == "one_by_one":
            assert result.dead[-1].record is batch[-1] and result.dead[-1].attempts == 2
        totals.update(
            applied=len(result.applied), stale=len(result.stale), duplicates=len(result.duplicates),
            dead=len(result.dead), messages=len(batch),
        )  # fmt: skip

    try:
        decide()
    finally:
        queue.close()
        db.close()
    print(f"fuzz {path}: {dict(totals)}")
    assert dlq_count(settings) == totals["dead"]  # every dead letter reached the real DLQ
    assert totals["applied"] and totals["stale"] and totals["duplicates"] and totals["dead"]
