"""Helpers for the producer tests (no tests here): producer.py's environment, the topic, the source.

Generic helpers (wait_until, query, fresh settings, ...) are in ``tests.support``; the ``producers``
fixture that runs producer.py is in ``conftest.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from cdc.kafka.client import base_config
from cdc.local.runner import Daemon, settings_env
from cdc.runtime.settings import Settings
from tests.support import execute, query


def producer_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The environment for a producer.py subprocess pointed at ``settings``' services and topics."""
    return settings_env(settings, **{"POLL_INTERVAL": "0.5", "STATS_INTERVAL": "1", **extra})


def run_producer(
    settings: Settings, workdir: Path, *args: str, **env: Any
) -> subprocess.CompletedProcess[str]:
    """producer.py run to its end in ``workdir`` (no stray .env) with ``settings``' environment: its
    exit code, and its stdout and stderr apart (the ``producers`` fixture merges them into one log)."""
    environment = producer_env(settings, **env)
    command = Daemon("producer.py", environment, workdir, *args).command()
    return subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=120)


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: str
    value: dict[str, Any]
    headers: tuple[tuple[str, bytes], ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)  # the value as sent, byte for byte

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
                    Record(
                        msg.partition(),
                        msg.offset(),
                        msg.key().decode(),
                        json.loads(msg.value()),
                        tuple(msg.headers() or ()),
                        msg.value(),
                    )
                )
        return records
    finally:
        consumer.close()


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
