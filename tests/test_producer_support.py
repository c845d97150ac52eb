"""Helpers for the producer tests (no tests here): run producer.py, read the topic, query the source."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from cdc.kafka import admin_client, base_config, ensure_topics
from cdc.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def fresh_settings(service_env: dict[str, str], **overrides: Any) -> Settings:
    """Settings for the given services with a new topic pair (created), like conftest's ``settings``."""
    tag = uuid.uuid4().hex[:10]
    s = load_settings(
        env=service_env,
        dotenv_path=None,
        cdc_topic=f"cdc_test_{tag}",
        cdc_dlq_topic=f"cdc_test_{tag}_dlq",
        consumer_group_id=f"cdc_test_group_{tag}",
        topic_partitions=3,
        **overrides,
    )
    ensure_topics(s, admin_client(s))
    return s


def producer_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The environment for a producer.py subprocess pointed at ``settings``' services and topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CDC_"))}
    env.update(
        SOURCE_DB_URL=settings.source_db_url,
        DEST_DB_URL=settings.dest_db_url,
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CDC_TOPIC=settings.cdc_topic,
        CDC_DLQ_TOPIC=settings.cdc_dlq_topic,
        CDC_TOPIC_PARTITIONS=str(settings.topic_partitions),
        POLL_INTERVAL="0.5",
        STATS_INTERVAL="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ProducerProcess:
    """producer.py as a subprocess, its output in a log file."""

    def __init__(self, env: dict[str, str], args: list[str], logfile: Path) -> None:
        self.logfile = logfile
        self._out = open(logfile, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            # No .env: the environment given is the whole configuration.
            [sys.executable, str(ROOT / "producer.py"), "--env-file", os.devnull, *args],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not re.search(pattern, self.log()[start:]):
                raise AssertionError(
                    f"producer exited {self.proc.returncode} before {pattern!r}:\n{self.log()}"
                )
            return re.search(pattern, self.log()[start:])

        return wait_until(found, timeout, f"log line {pattern!r}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()


class Producers:
    """Starts producer.py subprocesses and kills whatever is left at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ProducerProcess] = []

    def start(self, env: dict[str, str], *args: str) -> ProducerProcess:
        proc = ProducerProcess(env, list(args), self.tmp_path / f"producer-{len(self.started)}.log")
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.started:
            proc.kill()


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: str
    value: dict[str, Any]

    @property
    def action_id(self) -> int:
        return self.value["action_id"]


def read_topic(settings: Settings, want: int, timeout: float = 60.0, settle: float = 1.0) -> list[Record]:
    """Every message of the CDC topic from the start: at least ``want`` of them (unless timed out),
    plus whatever arrives within ``settle`` seconds after that (to catch extras)."""
    consumer = Consumer(
        {**base_config(settings), "group.id": f"reader_{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
        consumer.assign([TopicPartition(settings.cdc_topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if len(records) >= want:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
            for msg in consumer.consume(num_messages=5000, timeout=0.2):
                assert msg.error() is None, msg.error()
                records.append(
                    Record(msg.partition(), msg.offset(), msg.key().decode(), json.loads(msg.value()))
                )
        return records
    finally:
        consumer.close()


@contextlib.contextmanager
def connect(url: str, autocommit: bool = False) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(url)
    conn.autocommit = autocommit
    try:
        yield conn
    finally:
        conn.close()


def query(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows


def execute(url: str, statement: str, params: Any = None) -> None:
    query(url, statement, params)


def outbox_ids(url: str) -> list[int]:
    """Every action_id of the outbox, in the order the producer reads them: (txid, action_id)."""
    return [r[0] for r in query(url, "SELECT action_id FROM emp_records_cdc ORDER BY txid, action_id")]


def cursor_row(url: str) -> tuple[int, int, int]:
    (row,) = query(
        url,
        "SELECT last_txid::text::bigint, last_action_id, published_total FROM cdc_producer_state"
        " WHERE name = 'default'",
    )
    return row


def insert_employees(url: str, count: int, city: str = "Paris") -> None:
    """``count`` employees in one set-based statement (the trigger captures each row)."""
    execute(
        url,
        "INSERT INTO employees (first_name, last_name, dob, city, salary)"
        " SELECT 'first' || g, 'last' || g, date '1980-01-01' + g %% 9000, %s, 1000 + g"
        " FROM generate_series(1, %s) AS g",
        (city, count),
    )
