"""Unit tests of producer.py that need no services: fetched batches and the command line."""

from __future__ import annotations

import json
import logging
import os

import pytest

from cdc.model.event import Codec
from cdc.runtime import exits
from cdc.source.outbox import Batch, Cursor
from employee import EMPLOYEES
from producer import build_parser, check_rows, main
from tests.support import SAMPLE_EVENT

CODEC = Codec(EMPLOYEES)

EVENT = {**SAMPLE_EVENT, "action_id": 42}


def row(checked: bool, **change: object) -> tuple[str, str, float, bool]:
    """A fetched row as cdc.capture builds it: key, value, captured_at epoch, checked."""
    event = {**EVENT, **change}
    return str(event["emp_id"]), json.dumps(event, ensure_ascii=False, separators=(",", ":")), 0.0, checked


def test_the_cursor_after_a_batch_is_the_position_of_its_last_event():
    batch = Batch([row(True), row(True, action_id=43, txid=2**63 + 5)])
    assert batch.last == Cursor(2**63 + 5, 43)


def test_rows_the_fetch_vouched_for_are_not_parsed_again(caplog):
    # Not a valid event, but marked checked: the SQL's guarantee stands, nothing is re-checked.
    with caplog.at_level(logging.WARNING, logger="producer"):
        assert check_rows(Batch([row(True, dob="12/10/1815")]), CODEC) == 0
    assert caplog.text == ""


def test_unchecked_valid_rows_pass():
    assert check_rows(Batch([row(False), row(False, captured_at=None, first_name=None)]), CODEC) == 0


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
        assert check_rows(batch, CODEC) == 1
    action_id = {**EVENT, **change}["action_id"]
    assert f"invalid source row action_id={action_id} field={field}" in caplog.text
    assert json.loads(batch.rows[1][1])[field] == change[field]  # the value itself is untouched


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
