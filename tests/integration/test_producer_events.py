"""The events PostgreSQL builds in the producer's fetch are the events employee.py would build.

The fetch (``cdc.capture``) builds each message's key and JSON value in SQL. Here every kind of
value the source can hold goes through it, in databases whose session defaults try to change the
text (DateStyle, TimeZone, encoding), and each message is compared byte for byte with
``ChangeEvent.from_mapping(row).to_json()`` of the same row read the plain way. Rows the fetch
does not vouch for (``checked`` false) are exactly the rows employee.py refuses.
"""

from __future__ import annotations

from datetime import UTC

import pytest
from psycopg2 import sql

from cdc.errors import BadMessageError, LeadershipLost
from cdc.local.paths import SETUP_SOURCE_SQL
from cdc.runtime.db import Database
from cdc.source.outbox import Cursor, Outbox, ProducerSession
from employee import ChangeEvent, InvalidEventError
from tests.support import connect, execute, query, source_database

CONTROL = "".join(chr(i) for i in range(1, 32)) + '"\\/\x7f'
TEXTS = [
    CONTROL,
    'Zoë O\'Brien "Q" back\\slash',
    "美咲 Αλέξανδρος محمد אברהם Ewa 🌻 \U0001f600\U0010ffff",
    "\u2028\u2029\ufeff\u00a0\u200b",
    "é" * 100,  # at the column's limit, two bytes each
    "🌻" * 100,  # four bytes each
    "",
    None,
]
EMP_IDS = [0, -(2**31), 2**31 - 1]
DATES = [
    "1815-12-10",
    "12345-06-07",
    "0044-03-15 BC",
    "4713-01-01 BC",
    "5874897-12-31",
    "infinity",
    "-infinity",
]
SALARIES = [0, -(2**31), 2**31 - 1, None]
# Fractions isoformat() writes with trailing zeros, or not at all; the first and last UTC years.
CAPTURED = [
    "2026-11-24 10:00:00+00",
    "2026-11-24 10:00:00.1+00",
    "2026-11-24 10:00:00.120000+02",
    "2026-11-24 10:00:00.000001-05:30",
    "0001-01-01 00:00:00+00",
    "9999-12-31 23:59:59.999999+00",
]


def fill(url: str) -> None:
    """Changes through the trigger (INSERT, UPDATE, emp_id change, DELETE, snapshot), and outbox rows
    with captured_at values a trigger writes only at the ends of time."""
    with connect(url) as conn, conn.cursor() as cur:
        for i, text in enumerate(TEXTS):
            cur.execute(
                "INSERT INTO employees (first_name, last_name, city, dob, salary) VALUES (%s, %s, %s, %s, %s)",
                (text, TEXTS[-1 - i], text, DATES[i % len(DATES)], SALARIES[i % len(SALARIES)]),
            )
        for emp_id, dob in zip(EMP_IDS, DATES, strict=False):
            cur.execute(
                "INSERT INTO employees (emp_id, first_name, dob) VALUES (%s, 'edge', %s)", (emp_id, dob)
            )
        conn.commit()
        cur.execute("UPDATE employees SET salary = 1, city = %s WHERE emp_id = 1", (CONTROL,))
        cur.execute("UPDATE employees SET emp_id = 1000 WHERE emp_id = 2")
        cur.execute("DELETE FROM employees WHERE emp_id IN (0, 3)")
        for i, captured in enumerate(CAPTURED):
            cur.execute(
                "INSERT INTO emp_records_cdc (emp_id, first_name, dob, action, captured_at)"
                " VALUES (%s, %s, %s, 'INSERT', %s)",
                (100 + i, TEXTS[i], DATES[i % len(DATES)], captured),
            )
        conn.commit()
    db = Database(url, maxconn=1)
    try:
        Outbox(db).snapshot("emp_records_cdc")
    finally:
        db.close()


def reference(url: str) -> list[tuple[bytes, bytes | None]]:
    """Key and value of every outbox row as the producer built them in Python before: the row read
    plainly, then ``ChangeEvent.from_mapping(row).to_json()`` (None for a row it refuses)."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET DateStyle = ISO; SET TimeZone = 'UTC'")
        cur.execute(
            "SELECT action_id, action, emp_id, first_name, last_name, dob::text, city, salary,"
            " txid::text::bigint, captured_at FROM emp_records_cdc ORDER BY txid, action_id"
        )
        names = [d.name for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    out = []
    for row in rows:
        row["captured_at"] = row["captured_at"].astimezone(UTC)
        try:
            value = ChangeEvent.from_mapping(row).to_json()
        except InvalidEventError:
            value = None
        out.append((str(row["emp_id"]).encode(), value))
    return out


def fetch_all(url: str) -> list[tuple[str, str, float | None, bool, str | None, str | None]]:
    session = ProducerSession(url, "emp_records_cdc")
    try:
        assert session.try_acquire()
        return session.fetch(Cursor(), 10_000).rows
    finally:
        session.close()


def assert_same_events(url: str) -> int:
    """Every fetched message equals the reference; returns how many were compared."""
    fetched, expected = fetch_all(url), reference(url)
    assert len(fetched) == len(expected)
    for (key, value, _, checked, *_), (want_key, want_value) in zip(fetched, expected, strict=True):
        assert key.encode() == want_key
        assert checked == (want_value is not None), value
        if want_value is not None:
            assert value.encode() == want_value
    return len(fetched)


@pytest.mark.parametrize(
    "defaults",
    [
        {},
        {"DateStyle": "SQL, DMY", "TimeZone": "America/New_York", "extra_float_digits": "-15"},
        {"DateStyle": "German", "TimeZone": "Asia/Kolkata", "IntervalStyle": "sql_standard"},
    ],
    ids=["defaults", "sql-dmy-new-york", "german-kolkata"],
)
def test_every_value_is_sent_as_employee_py_would_send_it(service_env, defaults):
    with source_database(service_env["SOURCE_DB_URL"], "cdc_events", **defaults) as url:
        fill(url)
        assert assert_same_events(url) == 31


def test_a_database_in_another_encoding_sends_the_same_utf8_events(service_env):
    url = service_env["SOURCE_DB_URL"]
    server = url.rsplit("/", 1)[0]
    name = "cdc_events_latin1"
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    try:
        latin1 = f"{server}/{name}"
        execute(latin1, SETUP_SOURCE_SQL.read_text())
        execute(
            latin1,
            "INSERT INTO employees (first_name, last_name, city) VALUES (%s, %s, %s)",
            ("Zoë Ødegaard", 'Þórsdóttir "q" \\', "é" * 100),
        )
        assert assert_same_events(latin1) == 1
        [(_, value, *_)] = fetch_all(latin1)
        assert ChangeEvent.from_json(value.encode()).employee.first_name == "Zoë Ødegaard"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_rows_the_contract_refuses_are_not_vouched_for(service_env):
    """What the schema allows but the contract refuses, and a name column someone widened."""
    with source_database(service_env["SOURCE_DB_URL"], "cdc_events_bad") as url:
        execute(url, "ALTER TABLE emp_records_cdc ALTER COLUMN first_name TYPE varchar(200)")
        bad = [
            ("action_id", "INSERT INTO emp_records_cdc (action_id, emp_id, action) VALUES (0, 1, 'INSERT')"),
            (
                "captured_at",
                "INSERT INTO emp_records_cdc (emp_id, action, captured_at) VALUES (2, 'UPDATE', 'infinity')",
            ),
            (
                "captured_at",
                "INSERT INTO emp_records_cdc (emp_id, action, captured_at) VALUES (3, 'UPDATE', '10000-01-01 00:00+00')",
            ),
            (
                "captured_at",
                "INSERT INTO emp_records_cdc (emp_id, action, captured_at) VALUES (4, 'UPDATE', '0001-12-31 23:00 BC')",
            ),
            (
                "first_name",
                "INSERT INTO emp_records_cdc (emp_id, action, first_name) VALUES (5, 'INSERT', repeat('x', 101))",
            ),
        ]
        for _, statement in bad:
            execute(url, statement)
        # A DELETE's old image is carried where valid: a long name does not refuse it.
        execute(
            url,
            "INSERT INTO emp_records_cdc (emp_id, action, first_name) VALUES (6, 'DELETE', repeat('x', 101))",
        )
        rows = fetch_all(url)
        assert [checked for _, _, _, checked, *_ in rows] == [False] * len(bad) + [True]
        for (field, _), (_, value, *_) in zip(bad, rows, strict=False):
            with pytest.raises(InvalidEventError) as info:
                ChangeEvent.from_json(value)
            assert info.value.field == field
        assert ChangeEvent.from_json(rows[-1][1]).action == "DELETE"
        assert query(url, "SELECT count(*) FROM emp_records_cdc") == [(len(bad) + 1,)]


def test_a_failed_statement_keeps_the_session_and_a_lost_session_is_lost_leadership(service_env):
    with source_database(service_env["SOURCE_DB_URL"], "cdc_events_session") as url:
        execute(url, "INSERT INTO employees (first_name) VALUES ('x')")
        session = ProducerSession(url, "emp_records_cdc")
        try:
            assert session.try_acquire()
            with pytest.raises(BadMessageError, match="LIMIT must not be negative"):  # classified
                session.fetch(Cursor(), -1)
            assert session.held
            assert len(session.fetch(Cursor(), 10).rows) == 1
            execute(url, "SELECT pg_terminate_backend(%s)", (session.pid,))
            with pytest.raises(LeadershipLost, match="the lock connection failed"):
                session.fetch(Cursor(), 10)
            assert not session.held
        finally:
            session.close()
