"""Unit tests of producer.py that need no services: row encoding and the command line."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta, timezone

import pytest

from cdc.daemon import EXIT_CONFIG
from employee import ChangeEvent
from producer import build_parser, encode_row, main

ROW = {
    "action_id": 42,
    "action": "UPDATE",
    "emp_id": 7,
    "first_name": "Ada",
    "last_name": "Lovelace",
    "dob": "1815-12-10",
    "city": "London",
    "salary": 120000,
    "txid": 88123,
    "captured_at": datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
}


def test_encode_row_is_the_event_contract_in_utc():
    key, value, ok = encode_row(dict(ROW))
    assert ok and key == b"7"
    assert json.loads(value) == {
        "action_id": 42,
        "action": "UPDATE",
        "emp_id": 7,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "dob": "1815-12-10",
        "city": "London",
        "salary": 120000,
        "txid": 88123,
        "captured_at": "2026-11-24T10:00:00.123456+00:00",
    }
    assert ChangeEvent.from_json(value).action_id == 42


@pytest.mark.parametrize(
    "change", [{"emp_id": 0}, {"emp_id": -(2**31)}, {"dob": "infinity"}, {"dob": "0044-03-15 BC"}]
)
def test_every_value_the_source_holds_is_a_valid_event(change):
    key, value, ok = encode_row({**ROW, **change})
    assert ok and key == str({**ROW, **change}["emp_id"]).encode()
    assert json.loads(value).items() >= change.items()


@pytest.mark.parametrize(
    ("change", "field"),
    # A dob in a non-ISO DateStyle, a name longer than the column.
    [({"dob": "12/10/1815"}, "dob"), ({"first_name": "x" * 101}, "first_name")],
)
def test_invalid_row_is_logged_and_passed_on_as_is(caplog, change, field):
    row = {**ROW, **change}
    with caplog.at_level(logging.WARNING, logger="producer"):
        key, value, ok = encode_row(row)
    assert not ok
    assert key == str(row["emp_id"]).encode()
    raw = json.loads(value)
    assert raw["action_id"] == 42 and raw[field] == change[field]
    assert raw["captured_at"] == "2026-11-24T10:00:00.123456+00:00"
    assert f"invalid source row action_id=42 field={field}" in caplog.text


def test_flags_name_their_settings_and_default_to_not_given():
    parser = build_parser()
    args = vars(parser.parse_args([]))
    assert all(v is None for k, v in args.items() if k not in ("env_file", "snapshot", "once"))
    args = vars(parser.parse_args(["--batch-size", "50", "--no-prune", "--topic", "t", "--snapshot"]))
    assert args["producer_batch_size"] == 50 and args["prune"] is False and args["cdc_topic"] == "t"
    assert args["snapshot"] is True
    help_text = parser.format_help()
    for flag in ("--snapshot", "--once", "--prune", "--partitions", "--poll-interval", "--metrics-port"):
        assert flag in help_text


def test_bad_flag_value_is_one_line_and_exit_config(capsys):
    assert main(["--env-file", os.devnull, "--partitions", "0"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.strip() == "producer: error: CDC_TOPIC_PARTITIONS=0 must be at least 1"
