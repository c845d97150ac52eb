"""Re-applying the setup SQL while writers run loses no change: with the real ``psql -f`` (which
runs the file statement by statement) and as ``make up`` does (``cdc.services.apply_sql``)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from cdc.local.paths import SETUP_DEST_SQL, SETUP_SOURCE_SQL
from cdc.local.postgres import apply_sql, find_pg_bindir
from tests.support import connect, query, scalar

APPLIES = 15
WRITERS = 4


def psql_file(url: str, path: Path) -> None:
    """``psql -f path``, as USAGE.md says; psql goes on after an error, so stderr must be empty."""
    proc = subprocess.run(
        [str(find_pg_bindir() / "psql"), "-X", "-q", "-d", url, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr


class Writers:
    """Threads committing single-statement changes as fast as they can; counts the rows they changed."""

    def __init__(self, url: str, statements: list[str]) -> None:
        self.url = url
        self.statements = statements
        self.committed = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(WRITERS)]

    def _run(self, n: int) -> None:
        try:
            with connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
                while not self._stop.is_set():
                    for statement in self.statements:
                        cur.execute(statement, {"writer": n})
                        with self._lock:
                            self.committed += cur.rowcount
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        assert not self.errors, self.errors


@pytest.mark.parametrize("apply", [psql_file, apply_sql], ids=["psql", "make-up"])
def test_reapplying_setup_db_under_load_captures_every_change(clean_source, apply):
    statements = [
        "INSERT INTO employees (first_name, city) VALUES ('w' || %(writer)s, 'Oslo')",
        "UPDATE employees SET salary = coalesce(salary, 0) + 1"
        " WHERE emp_id = (SELECT max(emp_id) FROM employees WHERE first_name = 'w' || %(writer)s)",
    ]
    with Writers(clean_source, statements) as writers:
        for _ in range(APPLIES):
            apply(clean_source, SETUP_SOURCE_SQL)
            time.sleep(0.05)
    changes = scalar(clean_source, "SELECT count(*) FROM emp_records_cdc")
    print(f"changes committed={writers.committed} captured={changes}")
    assert writers.committed > APPLIES * 10
    assert changes == writers.committed


def test_reapplying_the_destination_sql_under_load_keeps_every_row(clean_dest):
    statements = [
        "INSERT INTO processed_events (action_id, emp_id, action, outcome)"
        " SELECT coalesce(max(action_id), %(writer)s::bigint * 1000000000) + 1, 1, 'INSERT', 'applied'"
        "   FROM processed_events WHERE action_id / 1000000000 = %(writer)s::bigint",
    ]
    with Writers(clean_dest, statements) as writers:
        for _ in range(APPLIES):
            psql_file(clean_dest, SETUP_DEST_SQL)
    assert scalar(clean_dest, "SELECT count(*) FROM processed_events") == writers.committed > 0


TABLES = "SELECT array_agg(table_name::text ORDER BY table_name) FROM information_schema.tables WHERE table_schema = 'public'"
TRIGGERS = "SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal"


def test_setup_sql_applies_to_an_empty_database_twice(service_env):
    """Applied twice, each file leaves one schema: the same tables, one capture trigger of each
    kind, one cursor row, and a change captured once."""
    expected = {
        "SOURCE_DB_URL": ["cdc_outbox", "cdc_producer_state", "cdc_tables", "emp_records_cdc", "employees"],
        "DEST_DB_URL": [
            "accepted_gaps",
            "applied_offsets",
            "cdc_versions",
            "emp_versions",
            "employees",
            "processed_events",
        ],
    }
    for key, path in (("SOURCE_DB_URL", SETUP_SOURCE_SQL), ("DEST_DB_URL", SETUP_DEST_SQL)):
        url = service_env[key]
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS cdc_setup_fresh")
            cur.execute("CREATE DATABASE cdc_setup_fresh")
        fresh = url.rsplit("/", 1)[0] + "/cdc_setup_fresh"
        try:
            psql_file(fresh, path)
            once = (scalar(fresh, TABLES), scalar(fresh, TRIGGERS))
            psql_file(fresh, path)
            assert (scalar(fresh, TABLES), scalar(fresh, TRIGGERS)) == once
            assert once[0] == expected[key]
            assert scalar(fresh, "SELECT count(*) FROM employees") == 0
            if key == "SOURCE_DB_URL":
                assert once[1] == ["employees_cdc_capture", "employees_cdc_capture_truncate"]
                assert scalar(fresh, "SELECT count(*) FROM cdc_producer_state") == 1
                scalar(fresh, "INSERT INTO employees (first_name) VALUES ('once') RETURNING emp_id")
                assert scalar(fresh, "SELECT count(*) FROM emp_records_cdc") == 1
            else:
                assert once[1] is None  # the destination has no triggers
        finally:
            with connect(url, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute("DROP DATABASE IF EXISTS cdc_setup_fresh")


def test_the_destination_sql_gives_a_guard_of_the_first_shape_its_one_column_key(service_env):
    """A ``cdc_versions`` keyed by (table_schema, table_name, key), as first released on main,
    keeps every row under the one-column key the sink now looks up (names quoted as in SQL)."""
    url = service_env["DEST_DB_URL"]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS cdc_setup_guard")
        cur.execute("CREATE DATABASE cdc_setup_guard")
    old = url.rsplit("/", 1)[0] + "/cdc_setup_guard"
    try:
        with connect(old, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                'CREATE TABLE cdc_versions (table_schema TEXT COLLATE "C" NOT NULL, table_name TEXT COLLATE "C"'
                ' NOT NULL, key TEXT COLLATE "C" NOT NULL, last_action_id BIGINT NOT NULL, deleted BOOLEAN NOT'
                " NULL DEFAULT false, updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
                " PRIMARY KEY (table_schema, table_name, key));"
                "INSERT INTO cdc_versions (table_schema, table_name, key, last_action_id, deleted) VALUES"
                """ ('public', 'orders', '{"id":"1"}', 7, false), ('s.x', 'Order "Items"', '{"n":"2"}', 9, true)"""
            )
        psql_file(old, SETUP_DEST_SQL)
        psql_file(old, SETUP_DEST_SQL)
        assert query(old, "SELECT key, last_action_id, deleted FROM cdc_versions ORDER BY key") == [
            ('"public"."orders"{"id":"1"}', 7, False),
            ('"s.x"."Order ""Items"""{"n":"2"}', 9, True),
        ]
        assert scalar(
            old,
            "SELECT array_agg(a.attname::text) FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = 'cdc_versions'::regclass AND i.indisprimary",
        ) == ["key"]
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS cdc_setup_guard")
