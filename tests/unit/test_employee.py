"""Unit tests of the event model: parsing, validation and serialisation. No services needed."""

import json
from datetime import UTC, date, datetime

import pytest

from employee import INT4_MAX, INT4_MIN, ChangeEvent, Employee, InvalidEventError, _from_json_fast
from tests.support import SAMPLE_EVENT

GOOD = SAMPLE_EVENT


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
    assert ev.emp_id == 7 and ev.action == "UPDATE" and ev.employee.dob == "1985-12-10"
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
    # The producer reads dob::text: a date object is not what the event carries.
    row = {**GOOD, "dob": "1990-01-02", "captured_at": datetime(2026, 1, 1, tzinfo=UTC)}
    assert ChangeEvent.from_mapping(row).captured_at == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidEventError, match="dob must be an ISO date string, got date"):
        ChangeEvent.from_mapping({**row, "dob": date(1990, 1, 2)})


@pytest.mark.parametrize("emp_id", [0, -1, INT4_MIN, INT4_MAX])
@pytest.mark.parametrize(
    "dob",
    ["infinity", "-infinity", "0044-03-15 BC", "4713-11-24 BC", "12345-01-01", "5874897-12-31", "0001-01-01"],
)
def test_every_source_value_is_carried_as_is(emp_id, dob):
    names = {"first_name": "👩🏽‍🔬" + "e\u0301", "last_name": "ש" * 100, "city": 'O\'Brien \\ "q"'}
    ev = ChangeEvent.from_mapping(_with(emp_id=emp_id, dob=dob, **names))
    back = ChangeEvent.from_json(ev.to_json())
    assert back == ev
    assert (back.emp_id, back.employee.dob, back.employee.first_name) == (emp_id, dob, names["first_name"])
    assert back.key() == str(emp_id).encode()


def test_a_date_of_the_right_shape_is_left_to_the_database():
    # PostgreSQL decides whether it exists (it rejects 2023-02-30 and year 0 as a data error).
    assert ChangeEvent.from_mapping(_with(dob="2023-02-30")).employee.dob == "2023-02-30"


def test_a_delete_needs_only_its_ids_and_keeps_what_is_valid_of_its_old_image():
    odd = _with(action="DELETE", first_name="\ud800", last_name="x" * 101, dob="1/2/3", salary="lots")
    ev = ChangeEvent.from_mapping(odd)
    assert ev.is_delete and ev.emp_id == 7
    assert ev.employee == Employee(7, None, None, None, "London", None)
    with pytest.raises(InvalidEventError, match="emp_id"):
        ChangeEvent.from_mapping({**odd, "emp_id": "seven"})
    with pytest.raises(InvalidEventError, match="first_name"):
        ChangeEvent.from_mapping({**odd, "action": "UPDATE"})


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
        (json.dumps(_with(first_name="a\ud800")).encode(), "first_name", "lone surrogate"),
        (json.dumps(_with(city="\udfff")).encode(), "city", "lone surrogate"),
        (json.dumps(_with(salary=10**12)).encode(), "salary", "out of range"),
        (json.dumps(_with(salary=-(2**31) - 1)).encode(), "salary", "out of range"),
        (json.dumps(_with(salary="100")).encode(), "salary", "must be an integer"),
        (json.dumps(_with(dob="10/12/1815")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="20240101")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="02024-01-01")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="12345678-01-01")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="\uff12\uff10\uff12\uff14-01-01")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="2024-01-01 AD")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(dob="Infinity")).encode(), "dob", "not an ISO date"),
        (json.dumps(_with(emp_id=-(2**31) - 1)).encode(), "emp_id", "out of range"),
        (json.dumps(_with(captured_at="9999-12-31T23:00:00-05:00")).encode(), "captured_at", "out of range"),
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


def test_a_well_formed_event_takes_the_fast_path():
    ev = ChangeEvent.from_mapping(GOOD)
    assert _from_json_fast(ev.to_json()) == ev
    # A newer producer's extra field, flat: still fast.
    assert _from_json_fast(json.dumps({**GOOD, "source": "x"}).encode()) == ev


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(_with(action_id=2**64)).encode(),  # orjson: a float; json: an int out of range
        json.dumps(_with(salary=-(2**63) - 1)).encode(),
        json.dumps(_with(extra=float("nan"))).encode(),  # NaN: json only
        json.dumps(_with(first_name="a\ud800")).encode(),  # lone surrogate escape: json only
        json.dumps(_with(action="DELETE", dob="1/2/3")).encode(),  # lenient DELETE
        json.dumps(_with(extra=[1, {"a": 2}])).encode(),  # nested under an unknown key
    ],
)
def test_what_the_fast_path_declines_is_decided_by_the_checks(raw):
    assert _from_json_fast(raw) is None
    try:
        expected = ChangeEvent._from_json_checked(raw)
    except InvalidEventError as exc:
        with pytest.raises(InvalidEventError) as info:
            ChangeEvent.from_json(raw)
        assert (str(info.value), info.value.field) == (str(exc), exc.field)
    else:
        assert ChangeEvent.from_json(raw) == expected


def test_nesting_under_an_unknown_key_deeper_than_json_takes_is_still_invalid():
    # orjson takes 1,000 levels, json's recursion limit does not: the answer stays json's.
    deep = b'{"action_id": 1, "action": "INSERT", "emp_id": 1, "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(InvalidEventError, match="nested too deeply"):
        ChangeEvent.from_json(deep)
