"""``python -m cdc top`` without services: the parsing and percentile math on canned exposition
text, the states of a daemon that does not answer, the command line and the terminal handling. The
real daemons under top are in ``tests/faults/test_top.py``."""

from __future__ import annotations

import http.server
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc.local.paths import PROJECT_DIR
from cdc.ops.top import (
    Metrics,
    Scrape,
    Target,
    Top,
    Window,
    bucket_delta,
    fetch,
    quantile,
    table_lines,
    targets,
)
from cdc.runtime.settings import load_settings
from tests.support import env_without_settings, free_port

INF = float("inf")

PRODUCER_TEXT = """\
# HELP cdc_build_info Version
# TYPE cdc_build_info gauge
cdc_build_info{component="producer",python="3.11.7",version="0.1.0"} 1.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 5.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 52428800.0
# TYPE cdc_producer_events_published_total counter
cdc_producer_events_published_total 12345.0
# TYPE cdc_producer_batches_total counter
cdc_producer_batches_total 40.0
# TYPE cdc_producer_active gauge
cdc_producer_active 1.0
# TYPE cdc_producer_outbox_backlog_rows gauge
cdc_producer_outbox_backlog_rows 250.0
# TYPE cdc_producer_held_back_rows gauge
cdc_producer_held_back_rows 200.0
# TYPE cdc_producer_held_back_seconds gauge
cdc_producer_held_back_seconds 3.0
# TYPE cdc_producer_oldest_transaction_age_seconds gauge
cdc_producer_oldest_transaction_age_seconds 4.5
# TYPE cdc_producer_delivery_errors_total counter
cdc_producer_delivery_errors_total 0.0
# TYPE cdc_producer_retries_total counter
cdc_producer_retries_total 2.0
# TYPE cdc_producer_invalid_rows_total counter
cdc_producer_invalid_rows_total 0.0
# TYPE cdc_producer_capture_to_ack_seconds histogram
cdc_producer_capture_to_ack_seconds_bucket{le="0.01"} 10.0
cdc_producer_capture_to_ack_seconds_bucket{le="0.1"} 30.0
cdc_producer_capture_to_ack_seconds_bucket{le="1.0"} 40.0
cdc_producer_capture_to_ack_seconds_bucket{le="+Inf"} 40.0
cdc_producer_capture_to_ack_seconds_count 40.0
cdc_producer_capture_to_ack_seconds_sum 2.0
"""

CONSUMER_TEXT = """\
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
# TYPE cdc_consumer_messages_consumed_total counter
cdc_consumer_messages_consumed_total 1000.0
# TYPE cdc_consumer_events_total counter
cdc_consumer_events_total{action="insert",outcome="applied"} 600.0
cdc_consumer_events_total{action="update",outcome="applied"} 300.0
cdc_consumer_events_total{action="",outcome="duplicate"} 90.0
cdc_consumer_events_total{action="",outcome="stale"} 0.0
cdc_consumer_events_total{action="",outcome="dlq"} 10.0
# TYPE cdc_consumer_transient_errors_total counter
# TYPE cdc_consumer_retries_total counter
cdc_consumer_retries_total 3.0
# TYPE cdc_consumer_lag_messages gauge
cdc_consumer_lag_messages{partition="10",topic="t"} 7.0
cdc_consumer_lag_messages{partition="2",topic="t"} 5.0
cdc_consumer_lag_messages{partition="0",topic="t"} 0.0
# TYPE cdc_consumer_assigned_partitions gauge
cdc_consumer_assigned_partitions 3.0
# TYPE cdc_consumer_paused gauge
cdc_consumer_paused 1.0
# TYPE cdc_consumer_db_connections_in_use gauge
cdc_consumer_db_connections_in_use 2.0
# TYPE cdc_consumer_db_connections_max gauge
cdc_consumer_db_connections_max 10.0
# TYPE cdc_consumer_end_to_end_seconds histogram
cdc_consumer_end_to_end_seconds_bucket{le="0.01"} 0.0
cdc_consumer_end_to_end_seconds_bucket{le="0.1"} 900.0
cdc_consumer_end_to_end_seconds_bucket{le="+Inf"} 900.0
cdc_consumer_end_to_end_seconds_count 900.0
cdc_consumer_end_to_end_seconds_sum 45.0
"""


def scrape(text: str, at: float, **state: object) -> Scrape:
    return Scrape(url="http://127.0.0.1:1", at=at, metrics=Metrics.parse(text), **state)  # type: ignore[arg-type]


# --- percentiles --------------------------------------------------------------------------------


def test_quantile_interpolates_inside_the_bucket_holding_the_rank():
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (INF, 40.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: 10 below 0.1, 20 in (0.1, 0.5]
    assert quantile(0.99, buckets) == pytest.approx(0.98)  # rank 39.6 in (0.5, 1.0]
    assert quantile(0.1, buckets) == pytest.approx(0.04)  # the first bucket starts at 0


def test_quantile_skips_empty_buckets_and_stops_at_the_highest_finite_bound():
    assert quantile(0.5, [(0.1, 0.0), (0.5, 0.0), (1.0, 4.0), (INF, 4.0)]) == pytest.approx(0.75)
    assert quantile(0.5, [(0.1, 1.0), (1.0, 1.0), (INF, 10.0)]) == 1.0  # rank in +Inf: "at least 1 s"


def test_quantile_of_nothing_is_none():
    assert quantile(0.5, []) is None
    assert quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket: not a histogram


def test_bucket_delta_is_what_was_observed_in_between():
    before = [(0.1, 10.0), (1.0, 20.0), (INF, 20.0)]
    now = [(0.1, 10.0), (1.0, 25.0), (INF, 30.0)]
    assert bucket_delta(now, before) == [(0.1, 0.0), (1.0, 5.0), (INF, 10.0)]
    assert bucket_delta(before, now) is None  # counts went down: the process restarted
    assert bucket_delta(now, before[1:]) is None


# --- parsing and windows ------------------------------------------------------------------------


def test_parse_reads_counters_gauges_labels_and_histograms():
    m = Metrics.parse(CONSUMER_TEXT)
    assert m.value("cdc_consumer_messages_consumed_total") == 1000
    assert m.value("cdc_consumer_events_total", outcome="applied") == 900
    assert m.value("cdc_consumer_events_total", outcome="dlq") == 10
    assert m.value("cdc_consumer_lag_messages") == 12
    assert m.buckets("cdc_consumer_end_to_end_seconds") == [(0.01, 0.0), (0.1, 900.0), (INF, 900.0)]
    # Declared without samples yet: zero. Not served at all: unknown.
    assert m.value("cdc_consumer_transient_errors_total") == 0
    assert m.value("cdc_consumer_rebalances_total") is None


def test_window_rates_and_percentiles_over_the_interval_else_since_start():
    first = scrape(PRODUCER_TEXT, at=100.0)
    w = Window(first, None, wall=1100.0)  # up 100 s
    assert w.rate("cdc_producer_events_published_total") == pytest.approx(123.45)
    (p50, _), recent = w.quantiles("cdc_producer_capture_to_ack_seconds")
    assert not recent and p50 == pytest.approx(0.055)

    later = PRODUCER_TEXT.replace("published_total 12345.0", "published_total 13345.0").replace(
        'ack_seconds_bucket{le="1.0"} 40.0', 'ack_seconds_bucket{le="1.0"} 50.0'
    )
    later = later.replace('{le="+Inf"} 40.0', '{le="+Inf"} 50.0')
    w = Window(scrape(later, at=102.0), first, wall=1102.0)
    assert w.rate("cdc_producer_events_published_total") == pytest.approx(500.0)
    (p50, p99), recent = w.quantiles("cdc_producer_capture_to_ack_seconds")
    assert recent and p50 == pytest.approx(0.55) and p99 == pytest.approx(0.991)

    # Nothing observed in the interval: since start again, and said so.
    w = Window(scrape(PRODUCER_TEXT, at=104.0), first, wall=1104.0)
    assert w.quantiles("cdc_producer_capture_to_ack_seconds")[1] is False


def test_a_restarted_daemon_is_not_compared_with_its_previous_life():
    before = scrape(PRODUCER_TEXT, at=100.0)
    restarted = PRODUCER_TEXT.replace(
        "process_start_time_seconds 1000.0", "process_start_time_seconds 1090.0"
    )
    restarted = restarted.replace("published_total 12345.0", "published_total 100.0")
    w = Window(scrape(restarted, at=102.0), before, wall=1100.0)
    assert w.before is None
    assert w.rate("cdc_producer_events_published_total") == pytest.approx(10.0)  # 100 in its 10 s


def test_screen_shows_every_figure_of_both_daemons():
    top = Top([], interval=2)
    p = scrape(PRODUCER_TEXT, at=1.0, ready=True)
    c = scrape(CONSUMER_TEXT, at=1.0, ready=False, ready_reason="paused for an outage", live=True)
    lines = top.render(Target("producer", p.url), p, 1100.0) + top.render(
        Target("consumer", c.url), c, 1100.0
    )
    text = "\n".join(lines)
    assert "producer  http://127.0.0.1:1   v0.1.0   up 1m40s   cpu 5%   rss 50 MiB" in text
    assert re.search(r"active\s+ready", text)
    assert re.search(r"published\s+12,345\s+123/s\s+batches 40", text)
    assert "backlog 250 rows   held back 200 rows for 3.0 s   oldest open transaction 4.5 s" in text
    assert "capture->ack  p50 55 ms   p99 964 ms   (since start)" in text
    assert re.search(r"errors\s+delivery 0\s+retries 2\s+invalid rows 0", text)
    assert "3 partitions assigned   NOT READY: paused for an outage" in text
    assert re.search(r"consumed\s+1,000\s+10/s", text)
    assert re.search(r"applied\s+900\s+9.0/s\s+duplicate 90\s+stale 0", text)
    assert re.search(r"lag\s+12\n\s+0:0  2:5  10:7\n", text)  # partitions in number order
    assert "end-to-end    p50 55 ms   p99 99 ms   (since start)" in text
    assert re.search(r"DLQ\s+10\s+0.1/s\s+retries 3\s+transient errors 0", text)
    assert "paused        YES   db pool 2/10 in use" in text

    errors = CONSUMER_TEXT.replace(
        "# TYPE cdc_consumer_transient_errors_total counter\n",
        "# TYPE cdc_consumer_transient_errors_total counter\n"
        'cdc_consumer_transient_errors_total{kind="kafka"} 1.0\n'
        'cdc_consumer_transient_errors_total{kind="database"} 3.0\n',
    )
    c = scrape(errors, at=1.0)
    assert "transient errors 4 (database 3, kafka 1)" in "\n".join(
        top.render(Target("consumer", c.url), c, 1100.0)
    )


# --- daemons that do not answer -----------------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    """A real HTTP server on loopback answering each path with what the test puts in its dict."""
    answers: dict[str, tuple[int, bytes]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, body = answers.get(self.path, (404, b"not found"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", answers
    server.shutdown()
    server.server_close()


def test_a_daemon_that_is_down_is_one_line(http_server):
    assert fetch(f"http://127.0.0.1:{free_port()}").error == "down: connection refused"

    url, answers = http_server
    assert fetch(url).error == "no metrics: /metrics answered HTTP 404"
    answers["/metrics"] = (200, b"<html>a web page</html>\n")
    assert fetch(url).error.startswith("unreadable: /metrics is not Prometheus text")
    # /ready's 503 is an answer: not ready, and why.
    answers["/metrics"] = (200, CONSUMER_TEXT.encode())
    answers["/ready"] = (503, b'{"ready": false, "reason": "no partitions assigned"}')
    got = fetch(url)
    assert got.error is None and got.ready is False and got.ready_reason == "no partitions assigned"


def test_a_daemon_that_does_not_answer_in_time_is_one_line():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections, never answers
        got = fetch(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    assert got.error == "down: no answer within 0.5 s"


def test_urls_default_to_each_daemons_metrics_port(tmp_path: Path):
    env = {"PRODUCER_METRICS_PORT": "9101", "METRICS_PORT": "9200", "METRICS_HOST": "0.0.0.0"}
    found = targets(load_settings(env=env, dotenv_path=None))
    assert [(t.kind, t.url) for t in found] == [
        ("producer", "http://127.0.0.1:9101"),
        ("consumer", "http://127.0.0.1:9200"),
    ]
    found = targets(load_settings(env={}, dotenv_path=None), consumers=["127.0.0.1:7", "http://h:8"])
    assert found[0].url is None and "PRODUCER_METRICS_PORT" in found[0].off_reason
    assert [t.url for t in found[1:]] == ["http://127.0.0.1:7", "http://h:8"]


# --- the command ----------------------------------------------------------------------------------


def top_command(env_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", "--env-file", str(env_file), "top", *args]


def test_once_exits_1_with_one_line_per_daemon_that_is_down_or_off(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"PRODUCER_METRICS_PORT={free_port()}\n")
    done = subprocess.run(
        top_command(env_file, "--once"),
        cwd=PROJECT_DIR,
        env=env_without_settings(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert done.stderr == ""
    assert re.search(r"^producer\s+http://127.0.0.1:\d+\s+down: connection refused$", done.stdout, re.M)
    assert re.search(r"^consumer\s+off: metrics off \(CONSUMER_METRICS_PORT", done.stdout, re.M)
    assert "\x1b" not in done.stdout

    usage = subprocess.run(top_command(env_file, "--help"), cwd=PROJECT_DIR, capture_output=True, text=True)
    assert "exit codes with --once: 0 every daemon answered, 1 one is down" in " ".join(usage.stdout.split())


def test_on_a_terminal_it_redraws_in_place_and_ctrl_c_exits_cleanly(tmp_path: Path, http_server):
    url, answers = http_server
    answers["/metrics"] = (200, CONSUMER_TEXT.encode())
    env_file = tmp_path / ".env"
    env_file.write_text("")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        top_command(env_file, "--interval", "0.2", "--consumer", url, "--producer", url),
        cwd=PROJECT_DIR,
        env=env_without_settings(),
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H") < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.count("\x1b[H") >= 3, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert re.search(r"lag\s+12", text)


def test_a_line_per_table_with_its_rate_and_whether_it_is_held():
    text = """\
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
# TYPE cdc_consumer_table_events_total counter
cdc_consumer_table_events_total{outcome="applied",table="employees"} %d
cdc_consumer_table_events_total{outcome="applied",table="public.orders"} 40
cdc_consumer_table_events_total{outcome="dlq",table="public.orders"} 2
# TYPE cdc_consumer_drifted_tables gauge
cdc_consumer_drifted_tables{table="shop.lines"} 1
"""
    before = scrape(text % 100, at=100.0)
    w = Window(scrape(text % 300, at=102.0), before, wall=1102.0)
    lines = table_lines(w)
    assert lines[0].split() == ["per", "table", "applied", "rate", "stale", "dlq"]
    assert lines[1].split() == ["employees", "300", "100/s", "0", "0"]
    assert lines[2].split() == ["public.orders", "40", "0.0/s", "0", "2"]
    assert lines[3].split()[:2] == ["shop.lines", "0"] and "HELD" in lines[3]
