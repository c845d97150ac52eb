"""What the producer says and does while an open or prepared transaction holds the xid horizon."""

from __future__ import annotations

import time

import pytest

from tests.support import connect, execute, query
from tests.support.producer import cursor_row, outbox_ids, producer_env, read_topic

pytestmark = pytest.mark.daemon


def test_horizon_warning_names_a_stuck_prepared_transaction(settings, clean_source, producers):
    gid = f"stuck-{settings.cdc_topic}"
    with connect(clean_source) as prepared:
        # An xid and nothing else (a trigger's NOTIFY could not be prepared).
        prepared.cursor().execute("SELECT pg_current_xact_id()")
        prepared.cursor().execute("PREPARE TRANSACTION %s", (gid,))
    try:
        execute(clean_source, "INSERT INTO employees (first_name) VALUES ('held back')")
        proc = producers.start(producer_env(settings, HORIZON_WARN_SECONDS=1, STATS_INTERVAL=0.5))
        line = proc.wait_for_log(
            r"delivery held back \d+s rows=1 by a prepared transaction: gid='([^']+)' xid=\d+"
            r" prepared=\S+ age=\d+s owner=(\w+) database=(\w+); .*ROLLBACK PREPARED"
        )
        assert line.groups() == (gid, "postgres", clean_source.rsplit("/", 1)[1])
        assert cursor_row(clean_source)[1] == 0
    finally:
        with connect(clean_source, autocommit=True) as conn:
            conn.cursor().execute("ROLLBACK PREPARED %s", (gid,))
    records = read_topic(settings, want=1)
    assert [r.value["first_name"] for r in records] == ["held back"]


def test_once_waits_for_rows_held_back_then_stops(settings, clean_source, producers):
    with connect(clean_source) as open_tx:
        open_tx.cursor().execute("INSERT INTO employees (first_name) VALUES ('late')")
        execute(clean_source, "INSERT INTO employees (first_name) VALUES ('early')")
        proc = producers.start(producer_env(settings, HORIZON_WARN_SECONDS=1, STATS_INTERVAL=0.5), "--once")
        proc.wait_for_log(r"--once: 1 rows? committed .*held back by an open transaction; waiting")
        proc.wait_for_log(
            rf"delivery held back \d+s rows=1 by an open transaction: pid={open_tx.get_backend_pid()}"
        )
        time.sleep(1)
        assert proc.running(), proc.output()
        assert "caught up" not in proc.output()
        open_tx.commit()
    assert proc.wait(30) == 0, proc.output()
    assert "caught up (--once): stopping" in proc.output()
    assert sorted(r.action_id for r in read_topic(settings, want=2)) == sorted(outbox_ids(clean_source))
    assert query(clean_source, "SELECT count(*) FROM emp_records_cdc") == [(2,)]
