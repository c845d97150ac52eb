"""producer.py --republish-from: the outbox published again from one row up to the cursor, byte for
byte, with the cursor left where it is; the sink takes the copies for duplicates; a row that is not
in the outbox any more is refused with one line."""

from __future__ import annotations

import pytest

from cdc.kafka.client import MARK_HEADER, MARK_VALUE
from cdc.runtime import exits
from cdc.runtime.stats import DUPLICATES
from consumer_final import ProductionCDCConsumer
from tests.support import execute
from tests.support.consumer import Running, count_processed, dest_rows, fast, outcomes
from tests.support.producer import (
    cursor_row,
    insert_employees,
    outbox_ids,
    producer_env,
    read_topic,
    run_producer,
)

pytestmark = pytest.mark.daemon

MARK = ((MARK_HEADER, MARK_VALUE),)


def write_changes(url: str) -> None:
    """31 changes: 20 inserts in one transaction, 10 updates in one transaction each, a delete."""
    insert_employees(url, 20)
    for emp_id in range(1, 11):
        execute(url, "UPDATE employees SET salary = salary + 1 WHERE emp_id = %s", (emp_id,))
    execute(url, "DELETE FROM employees WHERE emp_id = 20")


def test_sends_the_row_and_every_later_one_up_to_the_cursor_again(settings, clean_source, producers):
    write_changes(clean_source)
    first = producers.start(producer_env(settings), "--once")
    assert first.wait(60) == exits.OK, first.output()
    published = outbox_ids(clean_source)
    originals = read_topic(settings, want=len(published))
    assert sorted(r.action_id for r in originals) == sorted(published)
    cursor = cursor_row(clean_source)
    insert_employees(clean_source, 5, city="Lima")  # after the cursor: the daemon's, not re-published

    # From the middle of the 20-row transaction: its earlier rows are not sent again.
    start = published[13]
    again = producers.start(producer_env(settings, PRODUCER_BATCH_SIZE=5), "--republish-from", str(start))
    assert again.wait(60) == exits.OK, again.output()

    expected = published[13:]
    records = read_topic(settings, want=len(published) + len(expected))
    seen = {(r.partition, r.offset) for r in originals}
    copies = [r for r in records if (r.partition, r.offset) not in seen]
    assert sorted(r.action_id for r in copies) == sorted(expected)
    first_copy = {r.action_id: r for r in originals}
    for copy in copies:
        original = first_copy[copy.action_id]
        assert (copy.partition, copy.key, copy.raw) == (original.partition, original.key, original.raw)
        assert copy.headers == original.headers == MARK
    # Each partition gets its copies in cursor order, as it got the originals.
    place = {action_id: i for i, action_id in enumerate(published)}
    for partition in {c.partition for c in copies}:
        order = [
            place[c.action_id] for c in sorted(copies, key=lambda c: c.offset) if c.partition == partition
        ]
        assert order == sorted(order)

    assert cursor_row(clean_source) == cursor  # neither moved nor counted
    assert len(outbox_ids(clean_source)) == len(published) + 5  # nothing pruned
    out = again.output()
    assert f"re-publishing rows={len(expected)} from action_id={start} " in out
    # 18 rows in batches of 5; the last read also finds the 5 rows after the cursor, and leaves them.
    assert f"re-published {len(expected)} rows action_ids {start}..{published[-1]} batches=4 invalid=0" in out
    assert "WARNING" not in out


def test_the_sink_takes_the_copies_for_duplicates(settings, clean_source, clean_dest, producers):
    write_changes(clean_source)
    assert producers.start(producer_env(settings), "--once").wait(60) == exits.OK
    published = outbox_ids(clean_source)
    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as running:
        running.wait(lambda: count_processed(clean_dest) == len(published), what="every change decided")
        decided, rows = outcomes(clean_dest), dest_rows(clean_dest)
        again = producers.start(producer_env(settings), "--republish-from", "0")
        assert again.wait(60) == exits.OK, again.output()
        assert f"re-published {len(published)} rows" in again.output()
        running.wait(
            lambda: consumer.stats.get(DUPLICATES) == len(published), what="every copy decided as a duplicate"
        )
    assert outcomes(clean_dest) == decided
    assert dest_rows(clean_dest) == rows


@pytest.mark.parametrize("which", ["pruned", "never written"])
def test_a_row_not_in_the_outbox_is_refused_with_one_line(settings, clean_source, producers, tmp_path, which):
    insert_employees(clean_source, 10)
    pruning = producers.start(producer_env(settings), "--once", "--prune")
    assert pruning.wait(60) == exits.OK, pruning.output()
    assert outbox_ids(clean_source) == []
    action_id = 5 if which == "pruned" else 10_000

    refused = run_producer(settings, tmp_path, "--republish-from", str(action_id))
    assert refused.returncode == exits.CONFIG, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"action_id={action_id} is not in emp_records_cdc: it was pruned" in lines[0]
    assert "run `producer.py --snapshot`" in lines[0]
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    assert len(read_topic(settings, want=10)) == 10  # nothing sent again


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--republish-from", "3", "--once"], "--republish-from runs alone, then exits"),
        (["--republish-from", "3", "--reset-cursor", "end"], "--republish-from runs alone, then exits"),
        (["--republish-from", "-1"], "'-1' is not an action_id"),
        (["--republish-from", "x"], "'x' is not an action_id"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(settings, tmp_path, args, message):
    refused = run_producer(settings, tmp_path, *args)
    assert refused.returncode == 2, refused.stderr
    assert message in refused.stderr
    assert "Traceback" not in refused.stderr
