"""Unit tests of producer.py that need no services: fetched batches, where each row goes, and the
command line."""

from __future__ import annotations

import json
import logging
import os

import pytest

from cdc.kafka.client import MARK_HEADER, MARK_VALUE
from cdc.model.change import ChangeCodec
from cdc.model.event import Codec
from cdc.runtime import exits
from cdc.runtime.settings import load_settings
from cdc.source.outbox import Batch, Cursor, Routes
from employee import EMPLOYEES
from producer import build_parser, check_rows, main
from tests.support import SAMPLE_EVENT

CODEC = Codec(EMPLOYEES)
CHANGES = ChangeCodec("cdc")

EVENT = {**SAMPLE_EVENT, "action_id": 42}
# A change of another captured table, as the fetch builds it (key and row as jsonb's text).
CHANGE = {
    "action_id": 43,
    "action": "UPDATE",
    "schema": "public",
    "table": "Order Items",
    "key": {"id": "7"},
    "row": {"id": "7", "note": None},
    "txid": 88124,
    "captured_at": "2026-11-24T10:00:00.5+00:00",
}


def row(checked: bool, **change: object) -> tuple[str, str, float, bool, None, None]:
    """A fetched employees row as the fetch builds it: key, value, captured_at epoch, checked, and
    no table (its topic is CDC_TOPIC)."""
    event = {**EVENT, **change}
    value = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return str(event["emp_id"]), value, 0.0, checked, None, None


def generic(checked: bool, **change: object) -> tuple[str, str, float, bool, str, str]:
    """A fetched row of another table: its schema and name say which topic it goes to."""
    event = {**CHANGE, **change}
    key = json.dumps(event["key"]) if isinstance(event["key"], dict) else str(event["key"])
    return key, json.dumps(event), 0.0, checked, str(event["schema"]), str(event["table"])


def test_the_cursor_after_a_batch_is_the_position_of_its_last_event():
    batch = Batch([row(True), row(True, action_id=43, txid=2**63 + 5)])
    assert batch.last == Cursor(2**63 + 5, 43)


def test_rows_the_fetch_vouched_for_are_not_parsed_again(caplog):
    # Not a valid event, but marked checked: the SQL's guarantee stands, nothing is re-checked.
    with caplog.at_level(logging.WARNING, logger="producer"):
        assert check_rows(Batch([row(True, dob="12/10/1815"), generic(True, key=[])]), CODEC, CHANGES) == 0
    assert caplog.text == ""


def test_unchecked_valid_rows_pass():
    rows = [row(False), row(False, captured_at=None, first_name=None), generic(False)]
    assert check_rows(Batch(rows), CODEC, CHANGES) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    # What the schema allows but the contract refuses, and a name longer than the column.
    [
        ({"action_id": 0}, "action_id"),
        ({"captured_at": "12345-01-01T00:00:00+00:00"}, "captured_at"),
        ({"first_name": "x" * 101}, "first_name"),
    ],
)
def test_invalid_row_is_logged_and_counted_and_passed_on_as_is(caplog, change, field):
    batch = Batch([row(True), row(False, **change)])
    with caplog.at_level(logging.WARNING, logger="producer"):
        assert check_rows(batch, CODEC, CHANGES) == 1
    action_id = {**EVENT, **change}["action_id"]
    assert f"invalid source row action_id={action_id} field={field}" in caplog.text
    assert json.loads(batch.rows[1][1])[field] == change[field]  # the value itself is untouched


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action_id": 0}, "action_id"),
        ({"captured_at": "12345-01-01T00:00:00+00:00"}, "captured_at"),
        ({"key": {"id": "8"}}, "key"),
    ],
)
def test_an_invalid_row_of_another_table_is_checked_by_the_change_model(caplog, change, field):
    # An employees event would not pass ChangeCodec, nor this one Codec: each row meets its own.
    batch = Batch([row(False), generic(False, **change)])
    with caplog.at_level(logging.WARNING, logger="producer"):
        assert check_rows(batch, CODEC, CHANGES) == 1
    action_id = {**CHANGE, **change}["action_id"]
    assert f"invalid source row action_id={action_id} table=public.Order Items field={field}" in caplog.text


def test_a_batch_of_both_outboxes_ends_at_its_last_event_whichever_table():
    batch = Batch([row(True, action_id=44, txid=9), generic(True, action_id=45, txid=2**63 + 1)])
    assert (batch.first, batch.last) == (Cursor(9, 44), Cursor(2**63 + 1, 45))


def test_each_row_goes_to_its_tables_topic_and_employees_to_the_cdc_topic(caplog):
    settings = load_settings(env={"CDC_TOPIC": "emps", "CDC_TOPIC_PREFIX": "pre"}, dotenv_path=None)
    existing = {"pre.public.Order-20Items", "pre.s.t"}
    # Every topic exists already: nothing is asked of the cluster.
    routes = Routes(settings, existing)
    rows = [
        row(True),
        generic(True),
        generic(True, schema="s", table="t", key={"k": "1"}, row={"k": "1"}),
        generic(True, action_id=50),
        row(False, action_id=51),
    ]
    mark = [(MARK_HEADER, MARK_VALUE)]
    with caplog.at_level(logging.INFO, logger="cdc.source.outbox"):
        routes.prepare(rows)
        routes.prepare(rows)  # a table already seen is not announced again
    assert [m[0] for m in routes.messages(rows, mark)] == [
        "emps",
        "pre.public.Order-20Items",
        "pre.s.t",
        "pre.public.Order-20Items",
        "emps",
    ]
    assert [(m[1], m[2], m[3]) for m in routes.messages(rows, mark)] == [(r[0], r[1], mark) for r in rows]
    assert caplog.messages == [
        "publishing table public.Order Items to topic pre.public.Order-20Items",
        "publishing table s.t to topic pre.s.t",
    ]


def test_flags_name_their_settings_and_default_to_not_given():
    parser = build_parser()
    args = vars(parser.parse_args([]))
    assert all(v is None for k, v in args.items() if k not in ("env_file", "snapshot", "once"))
    args = vars(
        parser.parse_args(
            ["--batch-size", "50", "--batch-interval-ms", "0", "--no-prune", "--topic", "t", "--snapshot"]
        )
    )
    assert args["producer_batch_size"] == 50 and args["prune"] is False and args["cdc_topic"] == "t"
    assert args["producer_batch_interval_ms"] == 0
    assert args["snapshot"] is True
    help_text = parser.format_help()
    for flag in ("--snapshot", "--once", "--prune", "--partitions", "--poll-interval", "--metrics-port"):
        assert flag in help_text


def test_bad_flag_value_is_one_line_and_exit_config(capsys):
    assert main(["--env-file", os.devnull, "--partitions", "0"]) == exits.CONFIG
    err = capsys.readouterr().err
    assert err.strip() == "producer: error: CDC_TOPIC_PARTITIONS=0 must be at least 1"


@pytest.mark.parametrize("value", ["-1", "1001"])
def test_batch_interval_is_checked(capsys, value):
    assert main(["--env-file", os.devnull, "--batch-interval-ms", value]) == exits.CONFIG
    assert "PRODUCER_BATCH_INTERVAL_MS" in capsys.readouterr().err
