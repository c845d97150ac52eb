"""The workload generator, against a real source PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psycopg2

from cdc.local.paths import PROJECT_DIR
from cdc.ops.workload import Mix, Workload
from tests.support import clean_source as clean_source_db
from tests.support import query, scalar

OUTBOX = "SELECT action_id, emp_id, action, first_name, last_name, dob, city, salary FROM emp_records_cdc"


def test_realistic_mix_with_late_commits(clean_source):
    """Every kind of change shows up, the counts match the outbox, and commits land out of order."""
    workload = Workload(clean_source, rate=500, writers=4, seed=11)
    seen: set[int] = set()
    late = 0  # action_ids that became visible after a higher one: a naive poll would skip them
    with contextlib.closing(psycopg2.connect(clean_source)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            workload.start()
            try:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    cur.execute("SELECT action_id FROM emp_records_cdc")
                    visible = {r[0] for r in cur.fetchall()}
                    high = max(seen, default=0)
                    late += sum(1 for a in visible - seen if a < high)
                    seen |= visible
                    time.sleep(0.05)
            finally:
                stats = workload.stop()

    assert late > 0
    assert stats.get("commit_unknown", 0) == 0
    assert stats["events"] == scalar(clean_source, "SELECT count(*) FROM emp_records_cdc")
    for kind in ("insert", "update", "delete", "reuse", "id_change", "long_transactions"):
        assert stats.get(kind, 0) > 0, (kind, stats)
    assert "seed=11 writers=4" in workload.summary()

    checks = {
        "multi-row transaction": "SELECT count(*) FROM (SELECT txid FROM emp_records_cdc GROUP BY txid"
        " HAVING count(*) > 1) t",
        "emp_id re-used after delete": "SELECT count(*) FROM emp_records_cdc d JOIN emp_records_cdc i"
        " ON i.emp_id = d.emp_id AND i.action_id > d.action_id WHERE d.action = 'DELETE' AND i.action = 'INSERT'",
        # The trigger writes DELETE old + INSERT new, in one transaction, with the same values.
        "emp_id change": "SELECT count(*) FROM emp_records_cdc d JOIN emp_records_cdc i"
        " ON i.txid = d.txid AND i.action_id > d.action_id AND i.emp_id > d.emp_id"
        " WHERE d.action = 'DELETE' AND i.action = 'INSERT'"
        " AND (i.first_name, i.last_name, i.dob, i.city, i.salary)"
        "     IS NOT DISTINCT FROM (d.first_name, d.last_name, d.dob, d.city, d.salary)",
        "NULL in every nullable column": "SELECT least(count(*) FILTER (WHERE first_name IS NULL),"
        " count(*) FILTER (WHERE last_name IS NULL), count(*) FILTER (WHERE dob IS NULL),"
        " count(*) FILTER (WHERE city IS NULL), count(*) FILTER (WHERE salary IS NULL)) FROM emp_records_cdc",
        "non-ASCII text": "SELECT count(*) FROM emp_records_cdc WHERE octet_length(first_name) > char_length(first_name)",
        "100-character name": "SELECT count(*) FROM emp_records_cdc WHERE char_length(first_name) = 100"
        " OR char_length(last_name) = 100",
        "empty string": "SELECT count(*) FROM emp_records_cdc WHERE first_name = '' OR city = ''",
    }
    for what, statement in checks.items():
        assert scalar(clean_source, statement) > 0, what
    actions = {r[0] for r in query(clean_source, "SELECT DISTINCT action FROM emp_records_cdc")}
    assert actions == {"INSERT", "UPDATE", "DELETE"}


def test_deadlocks_and_unique_violations_are_rolled_back_and_counted(clean_source):
    """Hot rows, transfers in random order and racing re-inserts: the database refuses some."""
    query(clean_source, "INSERT INTO employees (first_name) SELECT 'hot' || i FROM generate_series(1, 6) i")
    initial_events = 6
    # No long transactions: on six rows their locks would turn most waits into lock timeouts.
    mix = Mix(
        insert=0, bulk_insert=0, update=0, update_range=0, transfer=10, delete=3, reuse=6, id_change=0,
        long_every=0,
    )  # fmt: skip
    workload = Workload(clean_source, rate=0, writers=4, seed=3, mix=mix)
    workload.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            workload.stats.get("rolled_back_deadlock") and workload.stats.get("rolled_back_unique_violation")
        ):
            time.sleep(0.2)
    finally:
        stats = workload.stop()
    assert stats.get("rolled_back_deadlock", 0) > 0, stats
    assert stats.get("rolled_back_unique_violation", 0) > 0, stats
    assert stats["transactions"] > 0
    # Rolled-back transactions wrote nothing to the outbox and were not counted.
    assert stats["events"] + initial_events == scalar(clean_source, "SELECT count(*) FROM emp_records_cdc")


def test_same_seed_writes_the_same_changes(clean_source):
    def run(seed: int) -> list[tuple]:
        clean_source_db(clean_source)
        Workload(clean_source, rate=0, writers=1, seed=seed, max_changes=300).run(60)
        return query(clean_source, OUTBOX + " ORDER BY action_id")

    first = run(5)
    assert len(first) > 250
    assert run(5) == first
    assert run(6) != first


def test_stops_by_itself_on_time_and_on_count(clean_source):
    workload = Workload(clean_source, rate=200, writers=2, seed=1)
    started = time.monotonic()
    stats = workload.run(3)
    elapsed = time.monotonic() - started
    # Stopping waits at most for a lock timeout (3 s) in a writer's current statement.
    assert 3 <= elapsed < 8
    # The pace holds: 600 planned, a writer may reserve one transaction (at most 150 rows) ahead.
    assert 300 < stats["changes"] <= 600 + 2 * 150, stats

    clean_source_db(clean_source)
    workload = Workload(clean_source, rate=0, writers=3, seed=2, max_changes=250)
    started = time.monotonic()
    stats = workload.run(60)
    assert time.monotonic() - started < 20
    assert 0 < stats["changes"] <= 250


def _workload_cli(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc", "--env-file", str(tmp_path / "no.env"), "workload", *args],
        cwd=PROJECT_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_runs_and_prints_a_one_line_summary(clean_source, tmp_path):
    proc = _workload_cli(
        tmp_path,
        "--rate",
        "300",
        "--duration",
        "2",
        "--writers",
        "2",
        "--seed",
        "9",
        SOURCE_DB_URL=clean_source,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workload seed=9 writers=2 "), proc.stdout
    events = int(lines[0].split(" outbox events")[0].rsplit(" ", 1)[1])
    assert events > 0
    assert events == scalar(clean_source, "SELECT count(*) FROM emp_records_cdc")


def test_cli_errors_are_one_line_and_exit_2(clean_source, tmp_path):
    remote = _workload_cli(tmp_path, "--duration", "1", SOURCE_DB_URL="postgresql://u:secret@192.0.2.10/db")
    assert remote.returncode == 2
    assert remote.stderr.strip().splitlines() == [
        "error: SOURCE_DB_URL host 192.0.2.10 is not this machine; the workload writes random rows into"
        " employees, so it only runs against local databases (--allow-remote to override)"
    ]
    down = _workload_cli(tmp_path, "--duration", "1", SOURCE_DB_URL="postgresql://u:secret@127.0.0.1:1/db")
    assert down.returncode == 2
    lines = down.stderr.strip().splitlines()
    assert len(lines) == 1 and "u:***@127.0.0.1:1/db" in lines[0] and "secret" not in down.stderr
