"""``python -m cdc dlq list|show|replay``: filters, odd values, edit files, dry runs, audited
replays and what the consumer made of them, on the real broker and destination."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from consumer_helpers import OURS, Running, dest_rows, event, fast, outcomes, produce
from support import dlq_count, end_offsets

from cdc.dlq import letters as dlq_letters
from cdc.dlq import queue as dlq
from cdc.dlq.letters import Letter, Selection
from cdc.errors import ConfigError
from cdc.local.paths import PROJECT_DIR
from cdc.local.runner import settings_env
from cdc.model.event import Codec
from cdc.ops import dlq_workbench
from cdc.ops.dlq_workbench import Planned, Sent
from cdc.runtime.settings import Settings, load_settings
from consumer_final import ProductionCDCConsumer
from employee import EMPLOYEES

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


# -- without services ---------------------------------------------------------------------------


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
    a = _letter(0, 1, _ev(42, 7), original=(2, 100), failed_at="2026-11-28T10:00:00+00:00")
    b = _letter(1, 5, _ev(43, -3), error_class="InvalidEventError", original=(2, 150))
    c = _letter(2, 9, b"not json", error_class="InvalidEventError", original=(0, 7),
                failed_at="2026-11-28T12:00:00Z")  # fmt: skip
    letters = [a, b, c]

    def chosen(**filters: object) -> list[Letter]:
        pick = dlq_letters.selection(UNIT_SETTINGS, **filters)
        return [m for m in letters if pick.matches(m)]

    assert chosen() == letters and dlq_letters.selection(UNIT_SETTINGS).is_everything()
    assert chosen(action_ids=["42"]) == [a]
    assert chosen(action_ids=["40..50"]) == [a, b]  # c has no action_id: never matches it
    assert chosen(emp_ids=["-3"]) == [b]
    assert chosen(error_classes=["invalideventerror"]) == [b, c]
    assert chosen(partitions=["2"]) == [a, b]
    assert chosen(partitions=["2"], offsets=["120.."]) == [b]
    assert chosen(offsets=["0..10", "150"]) == [b, c]
    assert chosen(since="2026-11-28T11:00Z") == [c]
    assert chosen(until="2026-11-28T11:00Z") == [a, b]
    assert chosen(positions=["1/5", f"{DLQ}/2/9"]) == [b, c]
    assert chosen(positions=["1/5,2/9"], error_classes=["CheckViolation"]) == []
    assert chosen(action_ids=["42"], emp_ids=["8"]) == []

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
    assert all(m.action_id is None and m.emp_id is None and m.action is None for m in odd)
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
    assert (fixed.action_id, fixed.emp_id, fixed.invalid) == (42, 8, None)


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


def test_a_decision_is_read_at_the_replayed_copy_or_from_the_committed_offset():
    def sent(action_id: int | None, invalid: str | None = None) -> Sent:
        planned = Planned(_letter(), "t", b"1", b"{}", [], action_id=action_id, emp_id=7, invalid=invalid)
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
    planned = Planned(_letter(), "t", b"1", b"{}", [], action_id=42, emp_id=7)
    [expected] = dlq_workbench.expectations(settings, [planned]).values()
    assert expected.startswith("unknown (destination:")
    [decision] = dlq_workbench.wait_for_decisions(settings, [Sent(planned, "t", 0, 5)], 5).values()
    assert decision.outcome == "unknown" and decision.detail.startswith("could not check:")
    assert "secret" not in expected + decision.detail


def _cli(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc", "--env-file", str(tmp_path / "no.env"), "--home", str(tmp_path),
         "dlq", *args],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_and_an_unreachable_kafka_are_one_line_and_exit_2(tmp_path):
    env = settings_env(UNIT_SETTINGS, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", DEST_DB_URL="")
    _one_line_error(_cli(env, tmp_path, "list", "--since", "last week"), "--since 'last week'")
    _one_line_error(_cli(env, tmp_path, "show", "--emp-id", "seven"), "--emp-id 'seven'")
    _one_line_error(_cli(env, tmp_path, "replay"), "replay needs a selection")
    _one_line_error(_cli(env, tmp_path, "replay", "--edit-file", "nope.json"), "cannot read the edit file")
    (tmp_path / "fix.json").write_bytes(b"\xff")
    _one_line_error(_cli(env, tmp_path, "replay", "--edit-file", str(tmp_path / "fix.json")), "not UTF-8")
    _one_line_error(_cli(env, tmp_path, "replay", "--all", "--wait", "5"), "set DEST_DB_URL")
    _one_line_error(_cli(env, tmp_path, "list"), "Kafka 127.0.0.1:1")


# -- on the real broker and destination ---------------------------------------------------------


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


def _dead_lettered(settings: Settings, items: list, count: int) -> None:
    """Produce ``items`` and run the real consumer until ``count`` of them are dead letters."""
    with Running(ProductionCDCConsumer(settings=fast(settings))) as r:
        produce(settings, items)
        r.wait(lambda: dlq_count(settings) >= count, what=f"{count} dead letters")


@pytest.mark.integration
def test_an_impossible_date_corrected_in_an_edit_file_is_replayed_and_applied(
    settings, clean_dest, env, tmp_path
):
    _dead_lettered(settings, [event(1, "INSERT", 1), event(2, "INSERT", 2, dob="1990-02-30")], 1)
    assert outcomes(clean_dest) == {1: "applied", 2: "dlq"}

    fix = tmp_path / "fix.json"
    shown = _cli(env, tmp_path, "show", "--action-id", "2", "--edit-file", str(fix))
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(fix.read_text())
    assert [e["value"]["action_id"] for e in entries] == [2]
    entries[0]["value"]["dob"] = "1990-02-28"
    fix.write_text(json.dumps(entries))

    before = (end_offsets(settings), end_offsets(settings, settings.cdc_dlq_topic))
    dry = _cli(env, tmp_path, "replay", "--edit-file", str(fix), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert 'dob: "1990-02-30" -> "1990-02-28"' in dry.stdout
    assert "expected: applied" in dry.stdout and "nothing was sent" in dry.stdout
    assert (end_offsets(settings), end_offsets(settings, settings.cdc_dlq_topic)) == before
    assert not (tmp_path / "dlq-audit.jsonl").exists()

    with Running(ProductionCDCConsumer(settings=fast(settings))):
        done = _cli(env, tmp_path, "replay", "--edit-file", str(fix), "--wait", "60", "--note", "typo")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"{entries[0]['dlq']} action_id=2: applied" in done.stdout
    assert dest_rows(clean_dest)[2][3] == "1990-02-28"
    assert outcomes(clean_dest) == {1: "applied", 2: "applied"}

    [audit] = [json.loads(line) for line in (tmp_path / "dlq-audit.jsonl").read_text().splitlines()]
    assert audit["dlq"] == entries[0]["dlq"] and audit["to"].startswith(f"{settings.cdc_topic}/")
    assert audit["changed"] == {"dob": ["1990-02-30", "1990-02-28"]} and audit["note"] == "typo"
    assert "replayed dlq=" in done.stderr and "edited=dob" in done.stderr
    secrets = (settings.dest_db_url, ":postgres@")
    assert not any(s in done.stderr + done.stdout + json.dumps(audit) for s in secrets)
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_stale_replay_changes_nothing_and_the_command_says_so(settings, clean_dest, env, tmp_path):
    # Event 10 is dead-lettered; event 12 of the same employee is applied after it (in one batch,
    # 10 would only be superseded).
    _dead_lettered(settings, [event(10, "INSERT", 1, dob="1990-02-30")], 1)
    with Running(ProductionCDCConsumer(settings=fast(settings))) as r:
        produce(settings, [event(12, "UPDATE", 1, salary=12)])
        r.wait(lambda: 1 in dest_rows(clean_dest), what="event 12")
    assert outcomes(clean_dest) == {10: "dlq", 12: "applied"}
    row = dest_rows(clean_dest)[1]

    fix = tmp_path / "fix.json"
    assert _cli(env, tmp_path, "show", "--emp-id", "1", "--edit-file", str(fix)).returncode == 0
    entries = json.loads(fix.read_text())
    entries[0]["value"]["dob"] = "1990-02-28"
    fix.write_text(json.dumps(entries))

    dry = _cli(env, tmp_path, "replay", "--edit-file", str(fix), "--dry-run")
    assert "expected: stale: emp_id 1 is already at action_id 12; nothing changes" in dry.stdout, dry.stdout
    with Running(ProductionCDCConsumer(settings=fast(settings))):
        done = _cli(env, tmp_path, "replay", "--edit-file", str(fix), "--wait", "60")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "action_id=10: stale: emp_id 1 is at action_id 12, newer: nothing changed" in done.stdout
    assert "decided: 0 of 1 applied" in done.stdout
    assert dest_rows(clean_dest)[1] == row
    assert outcomes(clean_dest) == {10: "stale", 12: "applied"}


@pytest.mark.integration
def test_filters_select_exactly_the_right_dead_letters_and_odd_values_list(
    settings, clean_dest, env, tmp_path
):
    first = [
        event(20, "INSERT", 20, dob="2001-02-29"),
        event(21, "INSERT", 21, dob="2001-02-30"),
        (b"22", b"\xff\xfe not utf-8", OURS),
        (b"23", b"not json", OURS),
    ]
    _dead_lettered(settings, [*first, event(24, "INSERT", 24)], 4)
    time.sleep(1.1)
    boundary = datetime.now(UTC)
    time.sleep(0.1)
    second = [event(30, "UPDATE", 20, dob="2001-04-31"), (b"31", b"[31]", OURS), (b"x", b'{"action_id": 32}')]
    _dead_lettered(settings, second, 7)

    def chosen(**filters: object) -> set[object]:
        pick = dlq_letters.selection(settings, **filters)
        return {m.action_id or m.key.decode() for m in dlq_letters.read_letters(settings, pick.matches)}

    assert chosen() == {20, 21, "22", "23", 30, "31", 32}
    assert chosen(action_ids=["20..30"]) == {20, 21, 30}
    assert chosen(action_ids=["21,32"]) == {21, 32}
    assert chosen(emp_ids=["20"]) == {20, 30}
    assert chosen(error_classes=["InvalidEventError"]) == {"22", "23", "31", 32}
    assert chosen(error_classes=["DatetimeFieldOverflow"]) == {20, 21, 30}
    assert chosen(since=boundary.isoformat()) == {30, "31", 32}
    assert chosen(until=boundary.isoformat(), action_ids=["..25"]) == {20, 21}
    letters = dlq_letters.read_letters(settings, Selection().matches)
    by_key = {m.key: m for m in letters}
    m23 = by_key[b"23"]
    assert chosen(partitions=[str(m23.original_partition)], offsets=[str(m23.original_offset)]) == {"23"}
    assert chosen(positions=[f"{m23.partition}/{m23.offset}"]) == {"23"}

    listed = _cli(env, tmp_path, "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 8, listed.stdout + listed.stderr
    assert "[value: binary]" in listed.stdout and "[value: text]" in listed.stdout
    as_json = _cli(env, tmp_path, "list", "--json", "--error-class", "invalideventerror")
    assert {json.loads(line)["value_format"] for line in as_json.stdout.splitlines()} == {
        "binary",
        "text",
        "json",
    }
    shown = _cli(env, tmp_path, "show", "--dlq", f"{m23.partition}/{m23.offset}")
    assert (
        "value (not JSON):\nnot json" in shown.stdout and "cdc.error.class: InvalidEventError" in shown.stdout
    )
    assert "Traceback" not in listed.stderr + as_json.stderr + shown.stderr


@pytest.mark.integration
def test_a_replay_nobody_consumes_is_sent_once_and_reported_undecided(settings, clean_dest, env, tmp_path):
    _dead_lettered(settings, [event(5, "INSERT", 5, dob="1990-02-30"), (b"6", b"oops", OURS)], 2)
    before = sum(end_offsets(settings).values())
    done = _cli(env, tmp_path, "replay", "--action-id", "5", "--wait", "1")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "action_id=5: undecided: not decided within 1s" in done.stdout
    assert "expected: applied" in done.stdout
    assert sum(end_offsets(settings).values()) == before + 1
    [letter] = [m for m in dlq_letters.read_letters(settings, Selection().matches) if m.action_id == 5]
    (audit,) = (tmp_path / "dlq-audit.jsonl").read_text().splitlines()
    assert json.loads(audit)["dlq"] == letter.position and json.loads(audit)["edited"] is False
    # Sent as it was: the original key, value and headers, plus where it came from.
    on_topic = dataclasses.replace(settings, cdc_dlq_topic=settings.cdc_topic)
    [copy] = [m for m in dlq.read(on_topic) if dict(m.headers() or ()).get(dlq.H_REPLAYED_FROM)]
    assert (copy.key(), copy.value()) == (letter.key, letter.value)
    assert copy.headers() == [*OURS, (dlq.H_REPLAYED_FROM, letter.position.encode())]
    assert json.loads(audit)["to"] == f"{copy.topic()}/{copy.partition()}/{copy.offset()}"
