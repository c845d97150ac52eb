"""``python -m cdc dlq list|show|replay`` without services: filters, odd values, edit files, the
reading of decisions, and the command's one-line errors. On the real broker and destination:
``tests/integration/test_dlq_workbench.py``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cdc.dlq import letters as dlq_letters
from cdc.dlq import queue as dlq
from cdc.dlq.letters import Letter
from cdc.errors import ConfigError
from cdc.local.runner import settings_env
from cdc.model.event import Codec
from cdc.ops import dlq_workbench
from cdc.ops.dlq_workbench import Planned, Sent
from cdc.runtime.settings import load_settings
from employee import EMPLOYEES
from tests.support import run_cdc
from tests.support.consumer import OURS

DLQ = "t_dlq"


def _letter(
    partition: int = 0,
    offset: int = 0,
    value: bytes | None = b"{}",
    *,
    error_class: str = "CheckViolation",
    original: tuple[int, int] = (0, 0),
    failed_at: str = "2026-11-28T10:00:00+00:00",
    key: bytes | None = b"1",
) -> Letter:
    headers = [
        *OURS,
        (dlq.H_TOPIC, b"t"),
        (dlq.H_PARTITION, str(original[0]).encode()),
        (dlq.H_OFFSET, str(original[1]).encode()),
        (dlq.H_ERROR_CLASS, error_class.encode()),
        (dlq.H_ERROR_MESSAGE, b"boom"),
        (dlq.H_FAILED_AT, failed_at.encode()),
    ]
    return Letter.parse((DLQ, partition, offset), key, value, headers)


def _ev(action_id: int, emp_id: int, **extra: object) -> bytes:
    return json.dumps({"action_id": action_id, "action": "UPDATE", "emp_id": emp_id, **extra}).encode()


CODEC = Codec(EMPLOYEES)
UNIT_SETTINGS = load_settings(env={"CDC_TOPIC": "t", "CDC_DLQ_TOPIC": DLQ}, dotenv_path=None)


def test_filter_values_parse_or_fail_with_one_line_naming_the_option():
    assert dlq_letters.parse_ranges("--action-id", ["42", "40..50,60..", "..3"]) == (
        (42, 42),
        (40, 50),
        (60, None),
        (None, 3),
    )
    assert dlq_letters.parse_ranges("--emp-id", ["-3", "-10..-5"], signed=True) == ((-3, -3), (-10, -5))
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert dlq_letters.parse_time("--since", "2h", now) == now - timedelta(hours=2)
    assert dlq_letters.parse_time("--since", "2026-11-28T09:00", now) == datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert dlq_letters.parse_position(f"{DLQ}/2/17", DLQ) == (2, 17)
    assert dlq_letters.parse_position("2/17", DLQ) == (2, 17)
    for call, words in [
        (lambda: dlq_letters.parse_ranges("--action-id", ["4x"]), "--action-id '4x' is not a number"),
        (lambda: dlq_letters.parse_ranges("--offset", ["9..3"]), "--offset '9..3' is an empty range"),
        (lambda: dlq_letters.parse_ranges("--action-id", ["-1"]), "--action-id '-1' is negative"),
        (lambda: dlq_letters.parse_ranges("--offset", [".."]), "--offset '..' is not a number"),
        (lambda: dlq_letters.parse_time("--until", "yesterday"), "--until 'yesterday' is neither"),
        (lambda: dlq_letters.parse_time("--since", "99999999d"), "--since '99999999d' is neither"),
        (lambda: dlq_letters.parse_position("other/0/1", DLQ), "is not on the dead-letter topic"),
        (lambda: dlq_letters.parse_position("0-1", DLQ), "is not a DLQ position"),
        (lambda: dlq_letters.selection(UNIT_SETTINGS, partitions=["1.."]), "--partition takes"),
        (lambda: dlq_letters.selection(UNIT_SETTINGS, since="1h", until="2h"), "is not before --until"),
    ]:
        with pytest.raises(ConfigError, match=words):
            call()


def test_a_selection_matches_on_every_filter_and_needs_all_of_them():
    a = _letter(0, 1, _ev(42, 7), original=(2, 100), failed_at="2026-11-28T10:00:00+00:00", key=b"7")
    b = _letter(1, 5, _ev(43, -3), error_class="InvalidEventError", original=(2, 150), key=b"-3")
    c = _letter(2, 9, b"not json", error_class="InvalidEventError", original=(0, 7),
                failed_at="2026-11-28T12:00:00Z")  # fmt: skip
    letters = [a, b, c]

    def chosen(**filters: object) -> list[Letter]:
        pick = dlq_letters.selection(UNIT_SETTINGS, **filters)
        return [m for m in letters if pick.matches(m)]

    assert chosen() == letters and dlq_letters.selection(UNIT_SETTINGS).is_everything()
    assert chosen(action_ids=["42"]) == [a]
    assert chosen(action_ids=["40..50"]) == [a, b]  # c has no action_id: never matches it
    assert chosen(keys=["-3"]) == [b]  # the message key: c's is 1, not in -3
    assert chosen(error_classes=["invalideventerror"]) == [b, c]
    assert chosen(partitions=["2"]) == [a, b]
    assert chosen(partitions=["2"], offsets=["120.."]) == [b]
    assert chosen(offsets=["0..10", "150"]) == [b, c]
    assert chosen(since="2026-11-28T11:00Z") == [c]
    assert chosen(until="2026-11-28T11:00Z") == [a, b]
    assert chosen(positions=["1/5", f"{DLQ}/2/9"]) == [b, c]
    assert chosen(positions=["1/5,2/9"], error_classes=["CheckViolation"]) == []
    assert chosen(action_ids=["42"], keys=["8"]) == []

    # A stranger's message without cdc.failed.at is timed by its Kafka timestamp.
    untimed = Letter.parse((DLQ, 0, 7), None, b"x", [], datetime(2026, 11, 28, 12, 30, tzinfo=UTC))
    assert dlq_letters.selection(UNIT_SETTINGS, since="2026-11-28T12:00Z").matches(untimed)
    assert not dlq_letters.selection(UNIT_SETTINGS, until="2026-11-28T12:00Z").matches(untimed)


def test_odd_values_list_and_show_with_what_can_be_shown():
    odd = [
        _letter(0, 0, b"\xff\xfe\x00not utf-8"),
        _letter(0, 1, b"not json {"),
        _letter(0, 2, b"[1, 2]"),
        _letter(0, 3, None, key=None),
        _letter(0, 4, b'{"action_id": "42", "emp_id": true, "action": 5}'),
    ]
    assert [m.value_format for m in odd] == ["binary", "text", "json", "none", "json"]
    assert all(m.action_id is None and m.action is None for m in odd)
    assert [m.row_key for m in odd] == [1, 1, 1, None, 1]
    lines = dlq_letters.list_lines(odd)
    assert len(lines) == 6 and "[value: binary]" in lines[1] and "[value: text]" in lines[2]
    assert "base64:" in "\n".join(dlq_letters.show_lines(odd[0]))
    assert json.loads(json.dumps(odd[0].full()))["value"].startswith("base64:")
    assert odd[2].full()["value"] == [1, 2]
    assert [json.loads(json.dumps(m.summary()))["dlq"] for m in odd] == [f"{DLQ}/0/{i}" for i in range(5)]


def test_the_edit_file_round_trips_and_a_corrected_value_is_diffed_field_by_field(tmp_path):
    bad_date = _letter(0, 3, _ev(42, 7, dob="1990-02-30", captured_at="2026-11-28T10:00:00+00:00"), key=b"7")
    not_json = _letter(1, 4, b"oops", key=b"x")
    path = tmp_path / "fix.json"
    dlq_workbench.write_edit_file(path, [bad_date, not_json], force=False)
    with pytest.raises(ConfigError, match="exists: remove it or pass --force"):
        dlq_workbench.write_edit_file(path, [bad_date], force=False)
    entries = json.loads(path.read_text())
    assert [e["dlq"] for e in entries] == [f"{DLQ}/0/3", f"{DLQ}/1/4"]
    assert entries[0]["value"]["dob"] == "1990-02-30" and entries[0]["original"] == "t/0/0"
    assert entries[1]["value"] is None and entries[1]["original_value"] == "oops"

    # Untouched entries replay the original bytes as they were.
    edits = dlq_workbench.read_edit_file(path, DLQ)
    same = dlq_workbench.plan(UNIT_SETTINGS, [bad_date, not_json], edits, CODEC)
    assert [(p.value, p.edited) for p in same] == [(bad_date.value, False), (b"oops", False)]
    assert same[1].invalid.startswith("value is not JSON")
    assert dict(same[0].headers)[dlq.H_REPLAYED_FROM] == f"{DLQ}/0/3".encode()
    assert dlq.H_ERROR_CLASS not in dict(same[0].headers) and same[0].topic == "t"

    entries[0]["value"].update(dob="1990-02-28", emp_id=8, city="Lima")
    path.write_text(json.dumps(entries))
    [fixed] = dlq_workbench.plan(UNIT_SETTINGS, [bad_date], dlq_workbench.read_edit_file(path, DLQ), CODEC)
    assert [c.line() for c in fixed.changes] == [
        "emp_id: 7 -> 8",
        'dob: "1990-02-30" -> "1990-02-28"',
        'city: (absent) -> "Lima"',
        '(key): "7" -> "8"',
    ]
    assert fixed.key == b"8" and json.loads(fixed.value)["dob"] == "1990-02-28"
    assert (fixed.action_id, fixed.row_key, fixed.key_name, fixed.invalid) == (42, 8, "emp_id", None)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([1], "must be a change event"),
        ({"action_id": 42, "action": "UPDATE", "emp_id": 7, "dob": "28/02/1990"}, "not an ISO date"),
        ({"action_id": 43, "action": "UPDATE", "emp_id": 7}, "action_id 42 must stay"),
        ({"action_id": 42, "action": "UPDATE", "emp_id": 7, "captured_at": "2026-11-29T00:00:00+00:00"},
         "captured_at must stay"),
    ],
)  # fmt: skip
def test_an_edit_the_consumer_would_refuse_or_misread_is_refused(value, words):
    letter = _letter(0, 3, _ev(42, 7, dob="1990-02-30", captured_at="2026-11-28T10:00:00+00:00"))
    with pytest.raises(ConfigError, match=words):
        dlq_workbench.plan(UNIT_SETTINGS, [letter], {(0, 3): value}, CODEC)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "must be a non-empty JSON list"),
        ('[{"value": {}}]', 'entry 1 needs "dlq"'),
        (f'[{{"dlq": "{DLQ}/0/1", "value": 1}}, {{"dlq": "0/1", "value": 2}}]', "entry 2 repeats 0/1"),
        ('[{"dlq": "elsewhere/0/1", "value": 1}]', "is not on the dead-letter topic"),
    ],
)
def test_an_unreadable_edit_file_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "fix.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        dlq_workbench.read_edit_file(path, DLQ)
    with pytest.raises(ConfigError, match="cannot read the edit file"):
        dlq_workbench.read_edit_file(tmp_path / "missing.json", DLQ)


def test_a_decision_is_read_at_the_replayed_copy_or_from_the_destination_position():
    def sent(action_id: int | None, invalid: str | None = None) -> Sent:
        planned = Planned(_letter(), "t", b"1", b"{}", [], action_id=action_id, row_key=7, invalid=invalid)
        return Sent(planned, "t", 1, 10)

    rows = {42: ("stale", "t", 1, 10), 43: ("applied", "t", 0, 3)}
    passed, behind = {("t", 1): 11}, {("t", 1): 10}
    decide = dlq_workbench.decide
    assert decide(sent(42), rows, {7: 50}, behind).outcome == "stale"
    assert "action_id 50" in decide(sent(42), rows, {7: 50}, behind).detail
    assert decide(sent(43), rows, {}, behind) is None  # not reached yet
    assert decide(sent(43), rows, {}, passed).outcome == "duplicate"
    assert decide(sent(None, "value is not JSON"), rows, {}, passed).outcome == "dlq"
    assert decide(sent(44), rows, {}, passed).outcome == "unrecorded"


def test_a_destination_that_does_not_answer_is_reported_not_guessed():
    settings = dataclasses.replace(
        UNIT_SETTINGS,
        dest_db_url="postgresql://u:secret@127.0.0.1:1/d",
        kafka_bootstrap_servers="127.0.0.1:1",
    )
    planned = Planned(_letter(), "t", b"1", b"{}", [], action_id=42, row_key=7)
    [expected] = dlq_workbench.expectations(settings, [planned]).values()
    assert expected.startswith("unknown (destination:")
    [decision] = dlq_workbench.wait_for_decisions(settings, [Sent(planned, "t", 0, 5)], 5).values()
    assert decision.outcome == "unknown" and decision.detail.startswith("could not check:")
    assert "secret" not in expected + decision.detail


def _cli(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cdc(env, tmp_path, "dlq", *args)


def _one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_and_an_unreachable_kafka_are_one_line_and_exit_2(tmp_path):
    env = settings_env(UNIT_SETTINGS, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", DEST_DB_URL="")
    _one_line_error(_cli(env, tmp_path, "list", "--since", "last week"), "--since 'last week'")
    _one_line_error(
        _cli(env, tmp_path, "show", "--emp-id", "seven"), "--key 'seven'"
    )  # --emp-id: the old name of --key
    _one_line_error(_cli(env, tmp_path, "replay"), "replay needs a selection")
    _one_line_error(_cli(env, tmp_path, "replay", "--edit-file", "nope.json"), "cannot read the edit file")
    (tmp_path / "fix.json").write_bytes(b"\xff")
    _one_line_error(_cli(env, tmp_path, "replay", "--edit-file", str(tmp_path / "fix.json")), "not UTF-8")
    _one_line_error(_cli(env, tmp_path, "replay", "--all", "--wait", "5"), "set DEST_DB_URL")
    _one_line_error(_cli(env, tmp_path, "list"), "Kafka 127.0.0.1:1")


def test_table_filter_reads_the_header_else_the_changes_own_table():
    employees = Letter.parse((DLQ, 0, 1), b"1", _ev(1, 1), [*OURS, (dlq.H_TABLE, b"employees")])
    orders = Letter.parse(
        (DLQ, 0, 2),
        b'{"id": "3"}',
        json.dumps({"action_id": 2, "action": "INSERT", "schema": "shop", "table": "Order Items"}).encode(),
        list(OURS),
    )
    stranger = _letter(0, 3)
    assert (employees.table, orders.table, stranger.table) == ("employees", "shop.Order Items", None)
    pick = dlq_letters.selection(UNIT_SETTINGS, tables=["public.employees"])
    assert [pick.matches(x) for x in (employees, orders, stranger)] == [True, False, False]
    pick = dlq_letters.selection(UNIT_SETTINGS, tables=["shop.Order Items,employees"])
    assert [pick.matches(x) for x in (employees, orders, stranger)] == [True, True, False]
    assert orders.summary()["table"] == "shop.Order Items"
    assert dlq_letters.list_lines([orders])[0].split()[4] == "TABLE"


def test_a_change_of_another_table_is_planned_and_checked_as_one():
    topic = "cdc.shop.Order-20Items"
    event = {
        "action_id": 9,
        "action": "UPDATE",
        "schema": "shop",
        "table": "Order Items",
        "key": {"id": "3"},
        "row": {"id": "3", "qty": "x"},
        "txid": 5,
        "captured_at": "2026-12-07T10:00:00+00:00",
    }
    headers = [*OURS, (dlq.H_TOPIC, topic.encode()), (dlq.H_TABLE, b"shop.Order Items")]
    letter = Letter.parse((DLQ, 0, 4), b'{"id": "3"}', json.dumps(event).encode(), headers)
    [as_is] = dlq_workbench.plan(UNIT_SETTINGS, [letter], {}, CODEC)
    assert (as_is.topic, as_is.action_id, as_is.invalid, as_is.key) == (topic, 9, None, b'{"id": "3"}')
    fixed = {**event, "row": {"id": "3", "qty": "4"}}
    [edited] = dlq_workbench.plan(UNIT_SETTINGS, [letter], {(0, 4): fixed}, CODEC)
    assert edited.key == b'{"id": "3"}' and [c.name for c in edited.changes] == ["row"]
    moved = {**event, "key": {"id": "4"}, "row": {"id": "4", "qty": "4"}}
    with pytest.raises(ConfigError, match="the key of a change of another table must stay"):
        dlq_workbench.plan(UNIT_SETTINGS, [letter], {(0, 4): moved}, CODEC)
    elsewhere = {**event, "table": "other"}
    with pytest.raises(ConfigError, match="not on its own topic"):
        dlq_workbench.plan(UNIT_SETTINGS, [letter], {(0, 4): elsewhere}, CODEC)
