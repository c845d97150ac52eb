"""Unit tests of the event model: parsing, validation and serialisation. No services needed."""

import json
from datetime import UTC, date, datetime

import pytest

from employee import ChangeEvent, Employee, InvalidEventError

GOOD = {
    "action_id": 1042,
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


def _with(**changes):
    out = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_round_trip():
    ev = ChangeEvent.from_mapping(_with(dob="1985-12-10"))
    assert ev.emp_id == 7 and ev.action == "UPDATE" and ev.employee.dob == date(1985, 12, 10)
    assert ev.captured_at == datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
    assert ChangeEvent.from_json(ev.to_json()) == ev
    assert ev.key() == b"7"
    assert json.loads(ev.to_json())["dob"] == "1985-12-10"


def test_nulls_and_non_ascii_are_kept():
    ev = ChangeEvent.from_mapping(
        _with(first_name="Zoë", last_name=None, dob=None, city="Kraków", salary=None)
    )
    back = ChangeEvent.from_json(ev.to_json())
    assert back.employee == Employee(7, "Zoë", None, None, "Kraków", None)


def test_from_database_row_types():
    row = {**GOOD, "dob": date(1990, 1, 2), "captured_at": datetime(2026, 1, 1, tzinfo=UTC)}
    ev = ChangeEvent.from_mapping(row)
    assert ev.employee.dob == date(1990, 1, 2)


def test_unknown_keys_are_ignored():
    assert ChangeEvent.from_mapping(_with(extra="x")).action_id == 1042


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b"\xff\xfe\x00", None, "not UTF-8"),
        (b"{not json", None, "not JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'"text"', None, "must be a JSON object"),
        (None, None, "no value"),
        (json.dumps(_with(action_id=...)).encode(), "action_id", "missing"),
        (json.dumps(_with(action_id="12")).encode(), "action_id", "must be an integer"),
        (json.dumps(_with(action_id=0)).encode(), "action_id", "out of range"),
        (json.dumps(_with(action_id=True)).encode(), "action_id", "must be an integer"),
        (json.dumps(_with(action="UPSERT")).encode(), "action", "not one of"),
        (json.dumps(_with(action=...)).encode(), "action", "missing"),
        (json.dumps(_with(emp_id=...)).encode(), "emp_id", "missing"),
        (json.dumps(_with(emp_id=1.5)).encode(), "emp_id", "must be an integer"),
        (json.dumps(_with(emp_id=2**31)).encode(), "emp_id", "out of range"),
        (json.dumps(_with(first_name="x" * 101)).encode(), "first_name", "101 characters"),
        (json.dumps(_with(city=5)).encode(), "city", "must be a string"),
        (json.dumps(_with(last_name="a\x00b")).encode(), "last_name", "NUL"),
        (json.dumps(_with(salary=10**12)).encode(), "salary", "out of range"),
        (json.dumps(_with(salary=-(2**31) - 1)).encode(), "salary", "out of range"),
        (json.dumps(_with(salary="100")).encode(), "salary", "must be an integer"),
        (json.dumps(_with(dob="10/12/1815")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="2024-02-30")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="20240101")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob=19851210)).encode(), "dob", "must be an ISO date string"),
        (json.dumps(_with(captured_at="2026-11-24T10:00:00")).encode(), "captured_at", "no time zone"),
        (json.dumps(_with(txid=-5)).encode(), "txid", "out of range"),
    ],
)
def test_malformed_messages_name_the_field(raw, field, words):
    with pytest.raises(InvalidEventError) as info:
        ChangeEvent.from_json(raw)
    assert info.value.field == field
    assert words in str(info.value)
    assert "\n" not in str(info.value)
