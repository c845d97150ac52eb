"""consumer_final.py as a real subprocess: signals, kill -9, a destination outage, two consumers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from cdc.local.paths import PROJECT_DIR
from cdc.local.runner import settings_env
from tests.support import end_offsets, wait_until
from tests.support.consumer import (
    committed_offsets,
    consumer_env,
    count_processed,
    dest_rows,
    event,
    expected_state,
    produce,
    workload,
)

pytestmark = pytest.mark.daemon


def test_bad_settings_give_one_line_and_exit_code_2(settings, consumers):
    d = consumers.start(consumer_env(settings, CONSUMER_BATCH_SIZE="lots"))
    assert d.wait() == 2
    out = d.output().strip()
    assert out.count("\n") == 0 and "Traceback" not in out
    assert "CONSUMER_BATCH_SIZE='lots' is not valid" in out


def test_a_destination_without_the_schema_stops_with_exit_code_2(settings, consumers):
    # The source database has employees but none of the sink's tables.
    d = consumers.start(consumer_env(settings, DEST_DB_URL=settings.source_db_url))
    assert d.wait() == 2
    out = d.output()
    assert "Traceback" not in out
    assert "processed_events" in out and "setup_db_with_idempotency.sql" in out
    assert ":postgres@" not in out  # the password is masked


def test_sigterm_finishes_commits_and_reports(settings, clean_dest, consumers):
    events = workload(300, emps=50)
    produce(settings, events)
    d = consumers.start(consumer_env(settings, METRICS_PORT="0"))
    wait_until(lambda: count_processed(clean_dest) == 300, 60, "300 events decided")
    d.wait_for_log(r"stats consumed=300 .*e2e_latency_p99_ms=")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    out = d.output()
    assert "SIGTERM received" in out
    assert re.search(r"final statistics: consumed=300 .*duplicates=0 .*dlq=0 .*rate=", out)
    assert dest_rows(clean_dest) == expected_state(events)
    assert committed_offsets(settings) == end_offsets(settings)


def test_show_and_replay_the_dlq_from_the_command_line(settings, clean_dest, consumers):
    produce(settings, [event(1, "INSERT", 1), (b"2", b"oops")])
    d = consumers.start(consumer_env(settings))
    wait_until(
        lambda: end_offsets(settings, settings.cdc_dlq_topic) != {0: 0, 1: 0, 2: 0}, 60, "a dead letter"
    )
    d.signal(signal.SIGTERM)
    assert d.wait() == 0

    show = subprocess.run(
        [sys.executable, "consumer_final.py", "--show-dlq"], cwd=PROJECT_DIR, env=consumer_env(settings),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    [line] = show.stdout.splitlines()
    record = json.loads(line)
    assert record["value"] == "oops" and record["key"] == "2"
    assert record["headers"]["cdc.error.class"] == "InvalidEventError"
    assert record["headers"]["cdc.original.topic"] == settings.cdc_topic

    replay = subprocess.run(
        [sys.executable, "consumer_final.py", "--replay-dlq"], cwd=PROJECT_DIR, env=consumer_env(settings),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "replayed 1 message(s)" in replay.stderr
    assert sum(end_offsets(settings).values()) == 3  # the dead letter is back in the main topic


@pytest.mark.parametrize(
    ("password", "db", "words"), [("wrong", None, "authentication failed"), (None, "nope", "does not exist")]
)
def test_wrong_password_or_database_stops_at_once_with_one_line(settings, tmp_path, password, db, words):
    url = settings.dest_db_url
    if password:
        url = url.replace(":postgres@", f":{password}@")
    if db:
        url = url.rsplit("/", 1)[0] + f"/{db}"
    env = {**settings_env(settings), "DEST_DB_URL": url}
    out = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "consumer_final.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and words in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "wrong" not in out.stderr
