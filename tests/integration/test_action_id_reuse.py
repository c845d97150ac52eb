"""A source whose action_id sequence went back (a point-in-time recovery of the same cluster, a
sequence reset) sends new changes under action_ids the destination already decided. Taken for
duplicates they would be dropped without a word; the consumer must stop instead, loudly."""

from __future__ import annotations

import pytest

from cdc.errors import ActionIdReusedError, SchemaMissingError
from cdc.runtime import exits
from consumer_final import ProductionCDCConsumer
from tests.support import execute
from tests.support.consumer import Running, count_processed, dest_rows, fast
from tests.support.producer import insert_employees, producer_env

pytestmark = pytest.mark.daemon


def test_new_changes_under_reused_action_ids_stop_the_consumer(settings, clean_source, clean_dest, producers):
    env = producer_env(settings)
    insert_employees(clean_source, 3)
    assert producers.start(env, "--once").wait(60) == exits.OK
    consumer = ProductionCDCConsumer(settings=fast(settings))
    with Running(consumer) as r:
        r.wait(lambda: count_processed(clean_dest) == 3, what="the first three changes applied")
        re_sent = consumer.stats.get("duplicates")

        # The source goes back to a moment after change 1 (as a point-in-time recovery would):
        # changes 2 and 3 are gone from it, and the next two changes take their action_ids.
        execute(
            clean_source,
            "ALTER TABLE employees DISABLE TRIGGER USER;"
            " DELETE FROM employees WHERE emp_id > 1;"
            " ALTER TABLE employees ENABLE TRIGGER USER;"
            " DELETE FROM emp_records_cdc WHERE action_id > 1;"
            " SELECT setval('emp_records_cdc_action_id_seq', 1);",
        )
        insert_employees(clean_source, 2, city="Rewound")
        assert producers.start(env, "--once").wait(60) == exits.OK
        r.thread.join(60)

    assert isinstance(r.error, ActionIdReusedError), r.error
    text = str(r.error)
    assert "action_id=2" in text and "went back" in text and "USAGE.md" in text
    assert consumer.stats.get("duplicates") == re_sent  # not taken for duplicates
    assert len(dest_rows(clean_dest)) == 3  # nothing of the rewound batch was committed


def test_a_destination_set_up_before_captured_at_was_recorded_is_told_to_apply_the_setup_sql(
    settings, clean_dest
):
    execute(clean_dest, "ALTER TABLE processed_events DROP COLUMN captured_at")
    try:
        with pytest.raises(SchemaMissingError, match=r"lacks processed_events\.captured_at: apply setup_db"):
            ProductionCDCConsumer(settings=fast(settings)).run()
    finally:
        execute(clean_dest, "ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS captured_at timestamptz")


def test_a_destination_with_the_first_shape_of_the_guard_is_told_to_apply_the_setup_sql(settings, clean_dest):
    execute(clean_dest, "ALTER TABLE cdc_versions ADD COLUMN table_schema text")
    try:
        with pytest.raises(
            SchemaMissingError, match=r"lacks cdc_versions keyed by one column: apply setup_db"
        ):
            ProductionCDCConsumer(settings=fast(settings)).run()
    finally:
        execute(clean_dest, "ALTER TABLE cdc_versions DROP COLUMN IF EXISTS table_schema")
