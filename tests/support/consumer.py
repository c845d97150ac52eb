"""Helpers of the consumer tests: events straight into Kafka, the destination's state, a consumer
run in a thread, consumer_final.py's environment. Generic helpers (wait_until, query, end_offsets,
...) are in ``tests.support``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
from psycopg2 import sql

from cdc.dlq import queue as dlq
from cdc.kafka.client import (
    MARK_HEADER,
    MARK_VALUE,
    Headers,
    Outgoing,
    Publisher,
    admin_client,
    consumer_config,
    producer_config,
)
from cdc.local.runner import settings_env
from cdc.runtime.settings import Settings
from consumer_final import ProductionCDCConsumer
from employee import ChangeEvent, Employee
from tests.support import execute, query, wait_until


def event(action_id: int, action: str, emp_id: int, **fields: object) -> ChangeEvent:
    values = {"first_name": f"First{emp_id}", "last_name": f"Last{action_id}", "city": "Oslo", "salary": 1000}
    values.update(fields)
    return ChangeEvent(
        action_id=action_id,
        action=action,
        employee=Employee(emp_id=emp_id, **values),  # type: ignore[arg-type]
        txid=action_id,
        captured_at=datetime.now(UTC),
    )


# The headers producer.py puts on every message it publishes.
OURS = [(MARK_HEADER, MARK_VALUE)]


def produce(
    settings: Settings,
    items: Iterable[
        ChangeEvent | tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, Headers]
    ],
    publisher: Publisher | None = None,
) -> int:
    """Produce in order; fail unless every one is acknowledged. An event is sent as producer.py
    sends it (with its mark); a raw (key, value) pair without headers, as a stranger would."""

    def outgoing(item: ChangeEvent | tuple) -> Outgoing:
        if isinstance(item, ChangeEvent):
            return settings.cdc_topic, item.key(), item.to_json(), OURS
        key, value, *headers = item
        return settings.cdc_topic, key, value, headers[0] if headers else None

    return (publisher or new_publisher(settings)).send(outgoing(i) for i in items)


def new_publisher(settings: Settings) -> Publisher:
    return Publisher(producer_config(settings), logger=logging.getLogger("test.kafka"), flush_timeout=60)


def workload(n: int, *, emps: int, seed: int = 7, start: int = 1) -> list[ChangeEvent]:
    """A realistic stream: per emp_id INSERT, then UPDATEs, DELETEs and re-INSERTs, ids increasing."""
    rnd = random.Random(seed)
    alive: set[int] = set()
    out = []
    for action_id in range(start, start + n):
        emp_id = rnd.randint(1, emps)
        if emp_id not in alive:
            action = rnd.choice(("INSERT", "SNAPSHOT")) if rnd.random() < 0.2 else "INSERT"
            alive.add(emp_id)
        elif rnd.random() < 0.1:
            action = "DELETE"
            alive.discard(emp_id)
        else:
            action = "UPDATE"
        out.append(
            event(
                action_id,
                action,
                emp_id,
                salary=rnd.randint(0, 500_000),
                city=rnd.choice(("Oslo", "Lima", "Kyiv", None)),
                dob=date(1950 + rnd.randint(0, 50), rnd.randint(1, 12), rnd.randint(1, 28)).isoformat(),
            )
        )
    return out


def expected_state(events: Iterable[ChangeEvent]) -> dict[int, tuple]:
    state: dict[int, tuple] = {}
    for ev in sorted(events, key=lambda e: e.action_id):
        if ev.is_delete:
            state.pop(ev.emp_id, None)
        else:
            state[ev.emp_id] = ev.employee.as_tuple()
    return state


def dest_rows(url: str) -> dict[int, tuple]:
    # dob as text, as events carry it (psycopg2 cannot hold BC, infinity or years above 9999).
    rows = query(url, "SELECT emp_id, first_name, last_name, dob::text, city, salary FROM employees")
    return {r[0]: tuple(r) for r in rows}


def outcomes(url: str) -> dict[int, str]:
    return dict(query(url, "SELECT action_id, outcome FROM processed_events"))


def count_processed(url: str) -> int:
    return query(url, "SELECT count(*) FROM processed_events")[0][0]


def consumer_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment for a consumer_final.py subprocess pointed at ``settings``."""
    return settings_env(
        settings,
        **{
            "CONSUME_TIMEOUT": "0.2",
            "STATS_INTERVAL": "0.5",
            # A killed member leaves the group in seconds, not the default 45 s.
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            **extra,
        },
    )


def fast(settings: Settings, **changes: object) -> Settings:
    """Test settings: short consume timeout so stop() is quick."""
    return dataclasses.replace(settings, consume_timeout=0.2, **changes)


class Running:
    """A ProductionCDCConsumer running in a thread; stopped and joined on exit."""

    def __init__(self, consumer: ProductionCDCConsumer) -> None:
        self.consumer = consumer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.consumer.run()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "consumer did not stop"

    def wait(self, cond: Callable[[], bool], timeout: float = 60, what: str = "the consumer") -> None:
        def check() -> bool:
            if self.error is not None:
                raise AssertionError(f"consumer failed: {self.error!r}") from self.error
            return cond()

        wait_until(check, timeout, what)

    def wait_consumed(self, n: int, timeout: float = 60) -> None:
        self.wait(lambda: self.consumer.stats.get("consumed") >= n, timeout, f"{n} messages consumed")


def dlq_messages(settings: Settings) -> list[dict]:
    return list(dlq.show(settings))


def committed_offsets(settings: Settings, group: str | None = None) -> dict[int, int]:
    c = Consumer(consumer_config(settings, **({"group.id": group} if group else {})))
    try:
        meta = c.list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
        parts = [TopicPartition(settings.cdc_topic, p) for p in meta.partitions]
        return {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
    finally:
        c.close()


@contextlib.contextmanager
def dest_constraint(url: str, name: str, check: str) -> Iterator[None]:
    """A CHECK on the destination employees that the event validator does not know about."""
    add = sql.SQL("ALTER TABLE employees ADD CONSTRAINT {} CHECK ({}) NOT VALID").format(
        sql.Identifier(name), sql.SQL(check)
    )
    execute(url, add)
    try:
        yield
    finally:
        execute(
            url, sql.SQL("ALTER TABLE employees DROP CONSTRAINT IF EXISTS {}").format(sql.Identifier(name))
        )


def set_dlq_max_message_bytes(settings: Settings, value: int) -> None:
    """Set the dead-letter topic's max.message.bytes on the broker."""
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        settings.cdc_dlq_topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(value), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    admin = admin_client(settings)  # kept alive until the futures resolve
    for f in admin.incremental_alter_configs([resource]).values():
        f.result(timeout=30)
