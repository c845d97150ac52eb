"""``python -m cdc top`` on the real daemons: real numbers through a held-back transaction, a dead
letter and a destination outage (the consumer shown paused, then caught up)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

from cdc.kafka.client import base_config
from cdc.local.paths import PROJECT_DIR
from tests.support import connect, env_without_settings, free_port, scalar, wait_until
from tests.support.consumer import consumer_env
from tests.support.producer import insert_employees, producer_env

pytestmark = pytest.mark.daemon


def top_command(env_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdc", "--env-file", str(env_file), "top", *args]


def screen(env_file: Path, *args: str) -> tuple[int, str]:
    """One ``top --once`` run: its exit code and output (it must never print a traceback)."""
    done = subprocess.run(
        top_command(env_file, "--once", *args),
        cwd=PROJECT_DIR,
        env=env_without_settings(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stdout + done.stderr, done
    return done.returncode, done.stdout


def blocks(text: str) -> list[str]:
    """The daemons' sections of a screen, in order."""
    return [block for block in text.split("\n\n")[1:] if block.strip()]


def num(block: str, pattern: str) -> float | None:
    """The number matched by ``pattern``'s group in ``block`` (thousands separators allowed)."""
    found = re.search(pattern, block)
    return float(found.group(1).replace(",", "")) if found else None


def figure(block: str, pattern: str) -> float:
    value = num(block, pattern)
    assert value is not None, f"{pattern!r} not in:\n{block}"
    return value


def wait_screen(env_file: Path, check, what: str, timeout: float = 60) -> list[str]:
    """Run ``top --once`` until ``check(producer_block, consumer_block)`` holds; those blocks."""
    last: list[str] = []

    def ok() -> bool:
        nonlocal last
        _, out = screen(env_file)
        last = blocks(out)
        return len(last) == 2 and bool(check(*last))

    try:
        wait_until(ok, timeout, what, step=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last screen:\n" + "\n\n".join(last)) from None
    return last


PUBLISHED = r"published\s+([\d,]+)"
APPLIED = r"applied\s+([\d,]+)"
LAG = r"lag\s+([\d,]+)"
DLQ = r"DLQ\s+([\d,]+)"


def test_top_shows_the_real_daemons(private, local_services, producers, consumers, tmp_path: Path):
    s = private
    source, dest = s.source_db_url, s.dest_db_url
    producer_port, standby_port, consumer_port = free_port(), free_port(), free_port()
    env_file = tmp_path / "top.env"
    env_file.write_text(f"PRODUCER_METRICS_PORT={producer_port}\nCONSUMER_METRICS_PORT={consumer_port}\n")
    live: subprocess.Popen[bytes] | None = None
    producers.start(producer_env(s, PRODUCER_METRICS_PORT=producer_port))
    consumers.start(consumer_env(s, CONSUMER_METRICS_PORT=consumer_port, RETRY_BACKOFF_MAX="2"))
    try:
        wait_screen(
            env_file,
            lambda p, c: re.search(r"^  active ", p, re.M) and re.search(r"3 partitions assigned\s+ready", c),
            "an active producer and a ready consumer",
        )
        # A second producer is a standby; both are watched with --producer twice.
        producers.start(producer_env(s, PRODUCER_METRICS_PORT=standby_port))
        urls = [f"http://127.0.0.1:{port}" for port in (producer_port, standby_port, consumer_port)]
        args = ["--producer", urls[0], "--producer", urls[1], "--consumer", urls[2]]
        wait_until(lambda: re.search(r"standby\s+ready", screen(env_file, *args)[1]), 60, "a standby")

        # Refreshing (not a terminal: screens appended), while 500 changes flow: rates and
        # percentiles of the later screens are over their interval.
        out = tmp_path / "top.out"
        with open(out, "w") as sink:
            live = subprocess.Popen(
                top_command(env_file, "--interval", "1"),
                cwd=PROJECT_DIR,
                env=env_without_settings(),
                stdout=sink,
            )
        wait_until(lambda: "cdc top" in out.read_text(), 30, "the first screen")
        insert_employees(source, 500)
        # Lag is the group's committed offsets against the log end, read every LAG_REFRESH (2 s)
        # beside the consumer: it reaches 0 a moment after the last batch is applied.
        p, c = wait_screen(
            env_file,
            lambda p, c: num(p, PUBLISHED) == 500 and num(c, APPLIED) == 500 and num(c, LAG) == 0,
            "500 published and applied, lag 0",
        )
        wait_until(lambda: out.read_text().count("cdc top") >= 4, 30, "four screens")
        live.send_signal(signal.SIGTERM)
        assert live.wait(30) == 0
        screens = [blocks(text) for text in out.read_text().split("cdc top")[1:]]
        later = [b for b in screens[1:] if "(rates since start)" not in b[0] + b[1]]
        assert any(figure(b[0], r"published\s+[\d,]+\s+([\d.,]+)/s") > 0 for b in later), screens
        assert any(re.search(r"end-to-end\s+p50 [\d.]+ m?s\s+p99 [\d.]+ m?s$", b[1], re.M) for b in later)
        assert re.search(r"^\s+0:0  1:0  2:0$", c, re.M), c
        assert figure(p, r"backlog (\d+) rows") == 0
        assert re.search(r"^  active\s+ready", p, re.M), p

        # An open source transaction holds later commits back; top says how many and for how long.
        with connect(source) as holder, holder.cursor() as cur:
            cur.execute(
                "INSERT INTO employees (first_name, last_name, dob, city, salary)"
                " VALUES ('held', 'back', '1990-01-01', 'Oslo', 1000)"
            )
            insert_employees(source, 100)
            p, _ = wait_screen(
                env_file,
                lambda p, c: (
                    re.search(r"held back 100 rows for [\d.]+ m?s", p)
                    and (num(p, r"oldest open transaction ([\d.]+) s") or 0) >= 1
                ),
                "100 rows held back by the open transaction",
            )
            holder.commit()
        wait_screen(
            env_file,
            lambda p, c: num(p, PUBLISHED) == 601 and "held back 0 rows" in p,
            "the held-back rows published",
        )

        # A poison message: one dead letter.
        poison = Producer(base_config(s))
        poison.produce(s.cdc_topic, key=b"1", value=b"{not json")
        assert poison.flush(30) == 0
        wait_screen(env_file, lambda p, c: num(c, DLQ) == 1, "the dead letter")

        # The destination down: the consumer pauses, is not ready, says why; the lag grows.
        local_services.dest.stop(mode="immediate")
        try:
            insert_employees(source, 300)
            _, c = wait_screen(
                env_file,
                lambda p, c: "paused        YES" in c and num(c, LAG) == 300,
                "the consumer paused with a lag of 300",
            )
            assert re.search(r"partitions assigned\s+NOT READY: \S", c), c
            assert figure(c, r"transient errors (\d+)") >= 1
        finally:
            local_services.dest.start()
        _, c = wait_screen(
            env_file,
            lambda p, c: num(c, APPLIED) == 901 and num(c, LAG) == 0,
            "the consumer caught up after the outage",
        )
        assert figure(c, r"consumed\s+([\d,]+)") == 902 and figure(c, DLQ) == 1, c
        assert re.search(r"partitions assigned\s+ready", c) and "paused        no" in c
        assert scalar(dest, "SELECT count(*) FROM employees") == 601 + 300
    finally:
        if live is not None:
            live.kill()
            live.wait()
