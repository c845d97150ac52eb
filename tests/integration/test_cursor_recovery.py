"""A cursor (or outbox rows) from another cluster: refused with one line, recovered with --reset-cursor.

A restore into another cluster (pg_dump/restore, logical cutover, PITR) copies cdc_producer_state
and emp_records_cdc with the old cluster's txids, which can lie above every txid the new server
assigns. The tests simulate that by moving the stored values far above the server's next xid.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from cdc.errors import ConfigError
from cdc.local.runner import Daemon
from cdc.ops.verify import verify
from cdc.runtime import exits
from cdc.runtime.signals import StopSignal
from cdc.source.outbox import Cursor
from producer import ChangeProducer
from tests.support import connect, execute, scalar
from tests.support.producer import cursor_row, insert_employees, outbox_ids, producer_env, read_topic

pytestmark = pytest.mark.daemon

AHEAD = 1_000_000_000  # far above any txid a test server reaches


def next_xid(url: str) -> int:
    return scalar(url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")


def restore_cursor_from_another_cluster(url: str, action_id: int = 77) -> int:
    """Store a cursor whose txid this server never assigned. Returns that txid."""
    txid = next_xid(url) + AHEAD
    execute(
        url,
        "UPDATE cdc_producer_state SET last_txid = %s::text::xid8, last_action_id = %s WHERE name = 'default'",
        (txid, action_id),
    )
    return txid


def restore_rows_from_another_cluster(url: str, action_ids: list[int]) -> None:
    """Give outbox rows txids from the future, as a dump of a busier cluster would."""
    execute(
        url,
        "UPDATE emp_records_cdc SET txid = (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + %s"
        " + action_id)::text::xid8 WHERE action_id = ANY(%s)",
        (AHEAD, action_ids),
    )


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def test_a_cursor_from_another_cluster_is_refused_at_takeover(settings, clean_source, producers):
    insert_employees(clean_source, 3)
    txid = restore_cursor_from_another_cluster(clean_source)
    # Today: it takes over, reports backlog=0 and skips every change for ever.
    proc = producers.start(producer_env(settings))
    assert proc.wait(30) == exits.CONFIG, proc.output()
    [line] = error_lines(proc.output())
    assert re.search(
        rf"cursor txid={txid} action_id=77 is beyond this server's transaction ids \(next xid \d+\)", line
    ), line
    assert "--reset-cursor beginning" in line and "--reset-cursor end" in line
    assert "Traceback" not in proc.output()
    assert read_topic(settings, want=1, timeout=2, settle=0) == []
    assert cursor_row(clean_source)[:2] == (txid, 77)


def test_outbox_rows_from_another_cluster_are_refused(settings, clean_source, producers):
    insert_employees(clean_source, 3)
    restore_rows_from_another_cluster(clean_source, [2, 3])
    proc = producers.start(producer_env(settings))
    assert proc.wait(30) == exits.CONFIG, proc.output()
    [line] = error_lines(proc.output())
    assert "2 outbox rows carry txids beyond this server's transaction ids" in line, line
    assert "--reset-cursor" in line


def test_the_periodic_check_refuses_a_cursor_beyond_the_horizon(settings, clean_source):
    producer = ChangeProducer(settings, stop=StopSignal())
    try:
        producer._tick()  # a cursor this server assigned: fine
        producer.cursor = Cursor(next_xid(clean_source) + AHEAD, 5)
        producer._next_tick = 0.0
        with pytest.raises(ConfigError, match=r"cursor txid=\d+ action_id=5 is beyond this server's"):
            producer._tick()
    finally:
        producer.db.close()


def test_reset_cursor_beginning_republishes_the_outbox(settings, clean_source, producers):
    env = producer_env(settings)
    insert_employees(clean_source, 5)
    assert producers.start(env, "--once").wait(60) == exits.OK
    restore_cursor_from_another_cluster(clean_source)
    restore_rows_from_another_cluster(clean_source, [4, 5])
    insert_employees(clean_source, 2)  # new changes, with txids below the restored cursor

    reset = producers.start(env, "--reset-cursor", "beginning")
    assert reset.wait(30) == exits.OK, reset.output()
    assert re.search(
        r"cursor reset to the beginning: was txid=\d+ action_id=77, now txid=0 action_id=0;"
        r" 2 outbox rows with txids from another cluster moved to txid=\d+; 7 outbox rows to publish",
        reset.output(),
    ), reset.output()
    assert cursor_row(clean_source)[:2] == (0, 0)

    assert producers.start(env, "--once").wait(60) == exits.OK
    counts = Counter(r.action_id for r in read_topic(settings, want=12))
    assert counts == Counter({1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 1, 7: 1})
    assert cursor_row(clean_source)[1] == outbox_ids(clean_source)[-1]


def test_reset_cursor_end_skips_the_outbox_but_not_running_transactions(settings, clean_source, producers):
    env = producer_env(settings)
    insert_employees(clean_source, 5)
    restore_cursor_from_another_cluster(clean_source)
    restore_rows_from_another_cluster(clean_source, [5])
    with connect(clean_source) as running:
        running.cursor().execute("INSERT INTO employees (first_name) VALUES ('in flight')")
        reset = producers.start(env, "--reset-cursor", "end")
        assert reset.wait(30) == exits.OK, reset.output()
        running.commit()
    out = reset.output()
    assert re.search(r"cursor reset to the end: was txid=\d+ action_id=77, now txid=\d+ action_id=5;", out), (
        out
    )
    assert "1 outbox rows with txids from another cluster moved to" in out
    assert "run `python -m cdc verify`" in out and "--snapshot" in out
    insert_employees(clean_source, 2)

    assert producers.start(env, "--once").wait(60) == exits.OK
    records = read_topic(settings, want=3)
    assert sorted(r.action_id for r in records) == [6, 7, 8]
    assert [r.value["first_name"] for r in records if r.action_id == 6] == ["in flight"]


def test_reset_cursor_refuses_while_a_producer_is_active(settings, clean_source, producers):
    env = producer_env(settings)
    active = producers.start(env)
    active.wait_for_log("active: holding the producer lock")
    before = cursor_row(clean_source)
    reset = producers.start(env, "--reset-cursor", "beginning")
    assert reset.wait(30) == exits.FAILED, reset.output()
    [line] = error_lines(reset.output())
    assert "another producer is active" in line
    assert cursor_row(clean_source) == before


def test_the_recovery_procedure_through_the_pipeline(settings, clean_source, clean_dest, producers, tmp_path):
    """USAGE.md's procedure, with the real consumer: `beginning` loses nothing and the sink absorbs
    what it had; after `end`, verify shows what was skipped and --snapshot repairs it."""
    env = producer_env(settings)
    consumer = Daemon("consumer_final.py", settings, tmp_path / "consumer").start()
    try:
        insert_employees(clean_source, 20)
        assert producers.start(env, "--once").wait(60) == exits.OK
        assert verify(settings, wait=60, events=True).ok

        # A restore into another cluster, then new changes there.
        restore_cursor_from_another_cluster(clean_source)
        restore_rows_from_another_cluster(clean_source, list(range(16, 21)))
        execute(
            clean_source,
            "UPDATE employees SET salary = -1 WHERE emp_id <= 5; DELETE FROM employees WHERE emp_id = 20",
        )
        insert_employees(clean_source, 3)
        assert producers.start(env).wait(30) == exits.CONFIG
        assert producers.start(env, "--reset-cursor", "beginning").wait(30) == exits.OK
        assert producers.start(env, "--once").wait(60) == exits.OK
        result = verify(settings, wait=60, events=True)
        assert result.ok, "\n".join(result.lines())

        # Again, recovered with `end`: the changes made meanwhile are skipped...
        restore_cursor_from_another_cluster(clean_source)
        execute(
            clean_source,
            "UPDATE employees SET salary = -2 WHERE emp_id <= 3; DELETE FROM employees WHERE emp_id = 19",
        )
        assert producers.start(env, "--reset-cursor", "end").wait(30) == exits.OK
        assert producers.start(env, "--once").wait(60) == exits.OK
        result = verify(settings, wait=60)
        assert result.rows is not None
        assert (result.rows.different.first, result.rows.extra.first) == ([1, 2, 3], [19])
        # ...and a snapshot brings back every row the source has; the delete stays for the operator.
        assert producers.start(env, "--snapshot", "--once").wait(60) == exits.OK
        result = verify(settings, wait=60)
        assert result.rows is not None
        assert (result.rows.missing.total, result.rows.different.total, result.rows.extra.first) == (
            0,
            0,
            [19],
        )
    finally:
        assert consumer.stop() == 0, consumer.log()
