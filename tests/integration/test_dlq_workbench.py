"""``python -m cdc dlq list|show|replay`` on the real broker and destination: edit files, dry runs,
audited replays, filters, and what the consumer made of the replayed letters."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdc.dlq import letters as dlq_letters
from cdc.dlq import queue as dlq
from cdc.dlq.letters import Selection
from cdc.local.runner import settings_env
from cdc.runtime.settings import Settings
from consumer_final import ProductionCDCConsumer
from tests.support import dlq_count, end_offsets, run_cdc
from tests.support.consumer import OURS, Running, dest_rows, event, fast, outcomes, produce


def _cli(env: dict[str, str], tmp_path: Path, *args: str):
    return run_cdc(env, tmp_path, "dlq", *args)


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


def _dead_lettered(settings: Settings, items: list, count: int) -> None:
    """Produce ``items`` and run the real consumer until ``count`` of them are dead letters."""
    with Running(ProductionCDCConsumer(settings=fast(settings))) as r:
        produce(settings, items)
        r.wait(lambda: dlq_count(settings) >= count, what=f"{count} dead letters")


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
    assert chosen(keys=["20"]) == {20, 30}
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
