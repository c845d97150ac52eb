"""The source database's session defaults do not change what is captured or published.

Each test runs in its own database on the source server whose defaults (``ALTER DATABASE ... SET``)
are the ones under test: ``default_transaction_isolation`` (the snapshot backfill and TRUNCATE
capture take locks, and under REPEATABLE READ / SERIALIZABLE a snapshot can be older than the
lock) and ``DateStyle`` (the text form of dob).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.errors
import pytest

from cdc.runtime.db import Database
from cdc.source.outbox import Cursor, Outbox, ProducerSession
from tests.support import connect, execute, query, scalar, source_database, wait_until

LEVELS = ["repeatable read", "serializable"]
SNAPSHOT_ROWS = "SELECT count(*) FROM emp_records_cdc WHERE action = 'SNAPSHOT'"


@pytest.fixture(params=LEVELS)
def isolated_source(request, service_env) -> Iterator[str]:
    """A source database whose transactions default to ``request.param``."""
    name = "cdc_iso_" + request.param.split()[0]
    with source_database(
        service_env["SOURCE_DB_URL"], name, default_transaction_isolation=request.param
    ) as url:
        assert query(url, "SHOW transaction_isolation") == [(request.param,)]
        yield url


def waiting_for_lock(url: str) -> bool:
    """Some session of this database waits for a lock on employees."""
    rows = query(
        url,
        "SELECT count(*) FROM pg_locks WHERE relation = 'employees'::regclass AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return rows[0][0] > 0


def during_lock_wait(url: str, locked: Callable[[], None], writes: list[str]) -> None:
    """Open one writer transaction per statement of ``writes``, start ``locked`` (which must
    wait for them on the employees lock), commit the writers while it waits, then join it."""
    writers = [psycopg2.connect(url) for _ in writes]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            locked()
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    try:
        for conn, statement in zip(writers, writes, strict=True):
            conn.cursor().execute(statement)
        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: waiting_for_lock(url), 10, "the lock wait")
        for conn in writers:
            conn.commit()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        for conn in writers:
            conn.close()
    if errors:
        raise errors[0]


def newest_event_per_emp_id(url: str) -> dict[int, tuple]:
    """What a version guard (highest action_id wins) leaves per emp_id: (action, image)."""
    rows = query(
        url,
        "SELECT DISTINCT ON (emp_id) emp_id, action, first_name, salary FROM emp_records_cdc"
        " ORDER BY emp_id, action_id DESC",
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_snapshot_copies_the_newest_image_whatever_the_isolation_level(isolated_source):
    url = isolated_source
    execute(url, "INSERT INTO employees (emp_id, first_name, salary) VALUES (1, 'one', 1), (2, 'two', 1)")
    db = Database(url)
    try:
        during_lock_wait(
            url,
            lambda: Outbox(db).snapshot("emp_records_cdc"),
            [
                "UPDATE employees SET salary = 2 WHERE emp_id = 1",
                "INSERT INTO employees (emp_id, first_name, salary) VALUES (3, 'three', 3)",
                "DELETE FROM employees WHERE emp_id = 2",
            ],
        )
    finally:
        db.close()
    snapshot = query(url, "SELECT emp_id, salary FROM emp_records_cdc WHERE action = 'SNAPSHOT' ORDER BY 1")
    assert snapshot == [(1, 2), (3, 3)]
    # The snapshot's action_ids are above the writers', so the newest event per emp_id is the
    # source's current row (or its delete): the sink converges on the source.
    assert newest_event_per_emp_id(url) == {
        1: ("SNAPSHOT", "one", 2),
        2: ("DELETE", "two", 1),
        3: ("SNAPSHOT", "three", 3),
    }


def truncate_with_retries(url: str, attempts: list[str]) -> None:
    """TRUNCATE employees as an RR/serializable client must: retry on serialization failure,
    as the error's hint says (the lock first, so the snapshot is taken after the wait)."""
    with connect(url) as conn, conn.cursor() as cur:
        while True:
            try:
                if attempts:
                    cur.execute("LOCK TABLE employees IN ACCESS EXCLUSIVE MODE")
                cur.execute("TRUNCATE employees")
                conn.commit()
                attempts.append("committed")
                return
            except psycopg2.errors.SerializationFailure as exc:
                conn.rollback()
                attempts.append(str(exc).splitlines()[0])


def test_truncate_captures_rows_committed_during_its_lock_wait(isolated_source):
    url = isolated_source
    execute(url, "INSERT INTO employees (emp_id, first_name, salary) VALUES (1, 'one', 1), (2, 'two', 1)")
    attempts: list[str] = []
    during_lock_wait(
        url,
        lambda: truncate_with_retries(url, attempts),
        [
            "INSERT INTO employees (emp_id, first_name, salary) VALUES (3, 'three', 3)",
            "UPDATE employees SET salary = 2 WHERE emp_id = 1",
        ],
    )
    print(f"truncate attempts: {attempts}")
    assert attempts[-1] == "committed"
    assert query(url, "SELECT count(*) FROM employees") == [(0,)]
    # Every row the TRUNCATE removed has its DELETE, with the last committed image.
    assert newest_event_per_emp_id(url) == {
        1: ("DELETE", "one", 2),
        2: ("DELETE", "two", 1),
        3: ("DELETE", "three", 3),
    }


def test_truncate_at_read_committed_needs_no_retry(isolated_source):
    url = isolated_source
    execute(url, "INSERT INTO employees (emp_id, first_name) VALUES (1, 'one')")
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        cur.execute("TRUNCATE employees")
        conn.commit()
    assert newest_event_per_emp_id(url) == {1: ("DELETE", "one", None)}


def test_snapshots_and_truncates_under_concurrent_writers_converge(isolated_source):
    """Random writers at the database's level while snapshots and TRUNCATEs run: for every
    emp_id, the newest event (what the sink's version guard keeps) is the source's final state."""
    url = isolated_source
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with connect(url) as conn, conn.cursor() as cur:
                while not stop.is_set():
                    try:
                        for _ in range(rnd.randint(1, 3)):
                            emp_id, op = rnd.randint(1, 40), rnd.random()
                            if op < 0.4:
                                cur.execute(
                                    "INSERT INTO employees (emp_id, first_name, salary) VALUES (%s, %s, %s)"
                                    " ON CONFLICT DO NOTHING",
                                    (emp_id, f"w{seed}", rnd.randint(1, 1000)),
                                )
                            elif op < 0.8:
                                cur.execute(
                                    "UPDATE employees SET salary = %s WHERE emp_id = %s",
                                    (rnd.randint(1, 1000), emp_id),
                                )
                            else:
                                cur.execute("DELETE FROM employees WHERE emp_id = %s", (emp_id,))
                            # Open a while, so snapshots and TRUNCATEs wait for it and it commits then.
                            time.sleep(rnd.uniform(0, 0.02))
                        conn.commit()
                    except (psycopg2.errors.SerializationFailure, psycopg2.errors.DeadlockDetected):
                        conn.rollback()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    threads = [threading.Thread(target=writer, args=(seed + n,)) for n in range(4)]
    for t in threads:
        t.start()
    db = Database(url)
    attempts: list[str] = []
    retries = 0
    try:
        for _ in range(3):
            time.sleep(0.3)
            Outbox(db).snapshot("emp_records_cdc")
            time.sleep(0.3)
            attempts.clear()
            truncate_with_retries(url, attempts)
            retries += len(attempts) - 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        db.close()
    assert not errors, errors
    print(f"truncate retries: {retries}, snapshot rows: {scalar(url, SNAPSHOT_ROWS)}")
    current = {
        r[0]: ("row", r[1], r[2]) for r in query(url, "SELECT emp_id, first_name, salary FROM employees")
    }
    newest = {
        emp_id: ("row", first, salary) if action != "DELETE" else ("deleted",)
        for emp_id, (action, first, salary) in newest_event_per_emp_id(url).items()
    }
    assert newest == {**{emp_id: ("deleted",) for emp_id in newest}, **current}


DATES = ["1815-12-10", "12345-06-07", "0044-03-15 BC", "infinity", "-infinity", None]


def test_fetched_dob_is_iso_text_whatever_the_datestyle(service_env):
    with source_database(service_env["SOURCE_DB_URL"], "cdc_datestyle", DateStyle="SQL, DMY") as url:
        assert query(url, "SELECT reset_val FROM pg_settings WHERE name = 'DateStyle'") == [("SQL, DMY",)]
        execute(
            url,
            "INSERT INTO employees (first_name, dob) SELECT 'x', d::date FROM unnest(%s::text[]) AS d",
            (DATES,),
        )
        session = ProducerSession(url, "emp_records_cdc")
        try:
            assert session.try_acquire()
            assert [json.loads(value)["dob"] for _, value, *_ in session.fetch(Cursor(), 10).rows] == DATES
            # After something set the session's DateStyle: still ISO.
            session._conn.cursor().execute("SET DateStyle = 'SQL, DMY'")
            assert [json.loads(value)["dob"] for _, value, *_ in session.fetch(Cursor(), 10).rows] == DATES
        finally:
            session.close()
