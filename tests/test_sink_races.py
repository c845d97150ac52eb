"""Two transactions deciding the same action_id or emp_id at once (only a second consumer on the
same destination does that). The batch statement decides from its snapshot and then checks that
its writes did what the snapshot said: the one that lost the race raises TransientError and rolls
back, and its retry decides from what the other committed. Nothing is recorded or applied twice."""

from __future__ import annotations

import threading

import pytest
from consumer_helpers import dest_rows, event, outcomes
from support import connect, query, wait_until

from cdc.errors import TransientError
from cdc.kafka.client import Received
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database
from cdc.sink.statements import ApplyResult, Delivered, Statements, apply_events

pytestmark = pytest.mark.integration

APP = "cdc-race-test"


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
