"""Consumer pieces that need no services: the circuit breaker, id salvage, the command line."""

from __future__ import annotations

import json

import pytest

from cdc.dlq import CircuitBreaker
from cdc.errors import ConfigError, HaltError
from cdc.settings import load_settings
from cdc.sink import salvage_ids
from consumer_final import parse_args


def test_breaker_trips_only_on_a_full_window_of_mostly_failures():
    breaker = CircuitBreaker(window=10, ratio=0.9)
    breaker.check(failed=9, total=9)  # not a full window yet
    breaker.record(failed=1, total=10)
    breaker.check(failed=5, total=5)  # 1 + 5 of the last 10 failed: below 90 %
    breaker.record(failed=0, total=1)
    with pytest.raises(HaltError, match="circuit breaker open: 9 of the last 10"):
        breaker.check(failed=9, total=9)


def test_breaker_window_zero_never_trips():
    CircuitBreaker(window=0, ratio=0.9).check(failed=1000, total=1000)


def test_breaker_settings_are_validated():
    with pytest.raises(ConfigError, match="DLQ_BREAKER_RATIO"):
        load_settings(env={"DLQ_BREAKER_RATIO": "1.5"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="DLQ_BREAKER_WINDOW"):
        load_settings(env={"DLQ_BREAKER_WINDOW": "-1"}, dotenv_path=None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (json.dumps({"action_id": 7, "emp_id": 3, "action": "INSERT", "dob": "bad"}), (7, 3, "INSERT")),
        (json.dumps({"action_id": 7, "emp_id": "x", "action": "UPSERT"}), (7, None, None)),
        (json.dumps({"action_id": 7, "emp_id": -(2**31), "action": "DELETE"}), (7, -(2**31), "DELETE")),
        (json.dumps({"action_id": 7, "emp_id": 0, "action": ["INSERT"]}), (7, 0, None)),
        (json.dumps({"action_id": 7, "emp_id": 2**31}), (7, None, None)),
        (json.dumps({"action_id": True, "emp_id": 3}), None),
        (json.dumps({"action_id": 0}), None),
        (json.dumps([1, 2]), None),
        ("{not json", None),
    ],
)
def test_salvage_ids_takes_only_usable_ids(value, expected):
    assert salvage_ids(value.encode()) == expected


def test_salvage_ids_of_binary_or_empty_values():
    assert salvage_ids(b"\xff\xfe") is None
    assert salvage_ids(None) is None


def test_cli_flags():
    args = parse_args(["--group-id", "g", "--no-dlq", "--no-idempotency", "--batch-size", "50"])
    assert (args.group_id, args.no_dlq, args.no_idempotency, args.batch_size) == ("g", True, True, 50)
    with pytest.raises(SystemExit):
        parse_args(["--replay-dlq", "--show-dlq"])
