"""Helpers of the tests and of bench/ (no tests here).

This module: polling, SQL, fresh settings, empty tables, topic offsets and consumer groups, free
ports, and a set of daemon subprocesses that is killed at the end of a test. Beside it:
``producer`` (producer.py's environment, the topic as records, the source's outbox and cursor),
``consumer`` (events straight into Kafka, the destination's state, an in-process consumer),
``pipeline`` (the one pipeline harness: both daemons, for the fault suite and bench/) and
``monitoring`` (Prometheus, promtool and the dashboard).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from psycopg2 import sql

from cdc.kafka.client import admin_client, base_config, ensure_topics
from cdc.local.paths import PROJECT_DIR, SETUP_SOURCE_SQL
from cdc.local.runner import Daemon
from cdc.ops.offsets import rewind
from cdc.runtime.settings import Settings, load_settings

CLEAN_SOURCE = (
    "TRUNCATE employees, emp_records_cdc, cdc_outbox RESTART IDENTITY;"
    " UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0;"
)
CLEAN_DEST = (
    "TRUNCATE employees, processed_events, emp_versions, cdc_versions, applied_offsets, accepted_gaps;"
)
# One valid employees change event, as a decoded JSON object.
SAMPLE_EVENT = {
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


@contextlib.contextmanager
def connect(url: str, autocommit: bool = False) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(url)
    conn.autocommit = autocommit
    try:
        yield conn
    finally:
        conn.close()


def query(url: str, statement: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in its own committed transaction; its rows (none for a command)."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows


def execute(url: str, statement: Any, params: Any = None) -> None:
    query(url, statement, params)


def scalar(url: str, statement: str, params: Any = None) -> Any:
    """The first column of the first row."""
    return query(url, statement, params)[0][0]


def clean_source(url: str) -> str:
    """Empty the source (employees, outbox) and reset the producer's cursor. Returns ``url``."""
    execute(url, CLEAN_SOURCE)
    return url


def clean_dest(url: str) -> str:
    """Empty the destination. Returns ``url``."""
    execute(url, CLEAN_DEST)
    return url


@contextlib.contextmanager
def source_database(url: str, name: str, **defaults: str) -> Iterator[str]:
    """A new database ``name`` on the source server, with setup_db.sql applied and ``defaults``
    as its session defaults (``ALTER DATABASE ... SET``); dropped afterwards. Yields its URL."""
    server = url.rsplit("/", 1)[0]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        for setting, value in defaults.items():
            cur.execute(
                sql.SQL("ALTER DATABASE {} SET {} = %s").format(
                    sql.Identifier(name), sql.Identifier(setting)
                ),
                (value,),
            )
    try:
        with connect(f"{server}/{name}", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(SETUP_SOURCE_SQL.read_text())
        yield f"{server}/{name}"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def fresh_settings(service_env: Mapping[str, str], prefix: str = "cdc_test", **overrides: Any) -> Settings:
    """Settings for the given services with a new topic pair (created) and consumer group."""
    tag = uuid.uuid4().hex[:10]
    s = load_settings(
        env={**service_env, "LOG_LEVEL": "INFO"},
        dotenv_path=None,
        cdc_topic=f"{prefix}_{tag}",
        cdc_dlq_topic=f"{prefix}_{tag}_dlq",
        consumer_group_id=f"{prefix}_group_{tag}",
        # Other tables' topics (PREFIX.schema.table): this test's own too.
        **{"topic_partitions": 3, "cdc_topic_prefix": f"{prefix}_{tag}_t", **overrides},
    )
    ensure_topics(s, admin_client(s))
    return s


def watermarks(settings: Settings, topic: str | None = None) -> dict[int, tuple[int, int]]:
    """(low, high) offsets of every partition of ``topic`` (default: the CDC topic)."""
    topic = topic or settings.cdc_topic
    c = Consumer({**base_config(settings), "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
    finally:
        c.close()


def end_offsets(settings: Settings, topic: str | None = None) -> dict[int, int]:
    """The end offset of every partition of ``topic`` (default: the CDC topic)."""
    return {p: high for p, (_low, high) in watermarks(settings, topic).items()}


def reset_group_to_earliest(settings: Settings) -> None:
    """What `kafka-consumer-groups --reset-offsets --to-earliest` does, for a stopped group."""
    earliest = [TopicPartition(settings.cdc_topic, p, lo) for p, (lo, _hi) in watermarks(settings).items()]
    request = ConsumerGroupTopicPartitions(settings.consumer_group_id, earliest)
    admin = admin_client(settings)  # kept alive until the futures resolve
    for future in admin.alter_consumer_group_offsets([request]).values():
        future.result(timeout=30)


def rewind_to_earliest(settings: Settings) -> None:
    """What an operator does to apply the whole topic again (consumers stopped): the destination's
    positions back to the log start (`python -m cdc offsets rewind`), and the group's too, for
    lag tools."""
    rewind(settings, [settings.cdc_topic])
    reset_group_to_earliest(settings)


def dlq_count(settings: Settings) -> int:
    """How many messages the dead-letter topic holds."""
    return sum(high - low for low, high in watermarks(settings, settings.cdc_dlq_topic).values())


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on (at the moment of asking)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def env_without_settings() -> dict[str, str]:
    """This process's environment without any of the pipeline's settings: a command run with it
    reads only its env file and flags."""
    prefixes = ("KAFKA_", "CDC_", "CONSUMER_", "PRODUCER_", "METRICS_", "SOURCE_", "DEST_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def run_cdc(env: Mapping[str, str], home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m cdc *args`` with exactly ``env``, its home and an env file that does not exist
    under ``home``: its output and exit code."""
    command = [sys.executable, "-m", "cdc", "--env-file", str(home / "no.env"), "--home", str(home), *args]
    return subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120)


class Daemons:
    """Starts one daemon script (``cdc.runner.Daemon``), each start in its own folder under
    ``workdir``, and kills whatever is left at the end of the test (``kill_all``)."""

    def __init__(self, script: str, workdir: Path, **options: Any) -> None:
        self.script = script
        self.workdir = workdir
        self.options = options
        self.started: list[Daemon] = []

    def add(self, daemon: Daemon) -> Daemon:
        self.started.append(daemon)
        return daemon

    def create(self, env: Mapping[str, str], *args: str, kind: type[Daemon] = Daemon) -> Daemon:
        """A daemon (a ``kind``) with the environment ``env`` (from ``settings_env``), not started yet."""
        name = f"{Path(self.script).stem}-{len(self.started)}"
        return self.add(kind(self.script, env, self.workdir / name, *args, **self.options))

    def start(self, env: Mapping[str, str], *args: str, kind: type[Daemon] = Daemon) -> Daemon:
        return self.create(env, *args, kind=kind).start()

    def kill_all(self) -> None:
        for daemon in self.started:
            daemon.kill()
