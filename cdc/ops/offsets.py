"""``python -m cdc offsets``: the destination's applied offsets against the topics, and the
operator's two ways to move them.

- ``show``: per partition, the destination's position, the group's offset and the log's range,
  and what a consumer would do there (start, or hold on a gap).
- ``accept-gap``: a partition held by a gap moves past it; the acceptance is recorded in
  ``accepted_gaps`` (who, when, which offsets) and logged. The running consumer resumes it.
- ``rewind``: set the position back (to the log start or an offset) to apply the topic again;
  only with the consumers stopped (a running one keeps writing its own position).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException

from cdc.dlq.replay import CURSOR_GROUP_SUFFIX, operator
from cdc.errors import ConfigError, DeliveryError, ServiceError
from cdc.kafka.client import admin_client, base_config
from cdc.kafka.positions import (
    REQUEST_TIMEOUT,
    Gap,
    Start,
    Stored,
    decide,
    group_offsets,
    log_range,
    topic_ids,
)
from cdc.runtime.db import Database
from cdc.runtime.settings import Settings
from cdc.sink import positions

log = logging.getLogger("cdc.offsets")


@dataclass(frozen=True)
class PartitionState:
    """One partition as a consumer would find it now."""

    topic: str
    partition: int
    topic_id: str
    low: int
    high: int
    stored: Stored | None
    group: int | None
    start: Start
    # For a gap: the last change decided from the partition before it (action_id, captured_at),
    # where the outbox could be re-published from (processed_events, if it still has it).
    before_gap: tuple[int, Any] | None = None

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]"

    @property
    def state(self) -> str:
        if self.start.gap is not None:
            return f"GAP {self.start.gap.missing} lost"
        if self.start.recreated:
            return "recreated: from the beginning"
        if self.start.truncated:
            return "log truncated"
        return "ok"

    def as_dict(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "topic_id": self.topic_id,
            "log_start": self.low,
            "log_end": self.high,
            "destination": self.stored.next_offset if self.stored else None,
            "destination_topic_id": self.stored.topic_id if self.stored else None,
            "group": self.group,
            "start": self.start.offset,
            "gap": [self.start.gap.first_lost, self.start.gap.next_kept] if self.start.gap else None,
            "state": self.state,
            "last_action_id_before_gap": self.before_gap[0] if self.before_gap else None,
        }

    def advice(self) -> str | None:
        """For a gap: how to put the lost changes back before accepting it."""
        if self.start.gap is None:
            return None
        if self.before_gap is None:
            return (
                f"{self.where}: no change decided before the gap is recorded: re-snapshot "
                "(producer.py --snapshot), then accept the gap"
            )
        action_id, at = self.before_gap
        return (
            f"{self.where}: the last change applied before the gap is action_id {action_id} "
            f"(captured {at}): re-publish from it (producer.py --republish-from {action_id}) if the "
            "outbox still has it, else re-snapshot (producer.py --snapshot); then accept the gap"
        )


def default_topics(settings: Settings) -> list[str]:
    """CDC_TOPIC, CDC_DLQ_TOPIC and every table's topic the cluster has (under CDC_TOPIC_PREFIX)."""
    with _kafka(settings, settings.consumer_group_id) as consumer:
        try:
            names = consumer.list_topics(timeout=REQUEST_TIMEOUT).topics
        except KafkaException as exc:
            raise ServiceError(f"Kafka at {settings.kafka_bootstrap_servers}: {exc.args[0].str()}") from exc
    tables = sorted(t for t in names if t.startswith(settings.cdc_topic_prefix + "."))
    return [settings.cdc_topic, settings.cdc_dlq_topic, *tables]


def group_of(settings: Settings, topic: str) -> str:
    """The consumer group that reads ``topic``: the consumer's, or --replay-dlq's for the DLQ."""
    if topic == settings.cdc_dlq_topic:
        return settings.consumer_group_id + CURSOR_GROUP_SUFFIX
    return settings.consumer_group_id


@contextmanager
def _kafka(settings: Settings, group: str) -> Iterator[Consumer]:
    consumer = Consumer(
        {**base_config(settings), "group.id": group, "client.id": f"cdc-offsets-{uuid.uuid4().hex[:8]}"}
    )
    try:
        yield consumer
    finally:
        consumer.close()


def inspect(settings: Settings, topics: Sequence[str], only: Sequence[int] = ()) -> list[PartitionState]:
    """The state of every partition of ``topics`` (of ``only``'s partitions, if given)."""
    if not settings.dest_db_url:
        raise ConfigError("DEST_DB_URL is not set: the applied offsets live in the destination")
    admin = admin_client(settings)
    ids = topic_ids(admin, topics)
    with (
        Database(settings.dest_db_url, application_name="cdc-offsets") as db,
        db.connection() as conn,
        conn.cursor() as cur,
    ):
        stored = positions.read(cur, topics)
    out = []
    for topic in topics:
        with _kafka(settings, group_of(settings, topic)) as consumer:
            try:
                meta = consumer.list_topics(topic, timeout=REQUEST_TIMEOUT).topics[topic]
            except KafkaException as exc:
                raise DeliveryError(f"topic {topic}: {exc.args[0].str()}") from exc
            parts = sorted(p for p in meta.partitions if not only or p in only)
            group = group_offsets(consumer, [(topic, p) for p in parts])
            for p in parts:
                low, high = log_range(consumer, topic, p)
                mine = stored.get((topic, p))
                start = decide(
                    topic,
                    p,
                    stored=mine,
                    topic_id=ids[topic],
                    low=low,
                    high=high,
                    group=group.get((topic, p)),
                )
                out.append(
                    PartitionState(topic, p, ids[topic], low, high, mine, group.get((topic, p)), start)
                )
    gaps = [i for i, s in enumerate(out) if s.start.gap is not None and s.topic != settings.cdc_dlq_topic]
    if gaps:
        with (
            Database(settings.dest_db_url, application_name="cdc-offsets") as db,
            db.connection() as conn,
            conn.cursor() as cur,
        ):
            for i in gaps:
                gap = out[i].start.gap
                assert gap is not None
                out[i] = dataclasses.replace(out[i], before_gap=positions.last_applied_before(cur, gap))
    return out


def accept_gaps(
    settings: Settings, topics: Sequence[str], only: Sequence[int] = ()
) -> list[tuple[Gap, bool]]:
    """Accept every gap found in ``topics`` (``only``'s partitions): each partition's position
    moves to its log start, recorded in ``accepted_gaps``. Returns each gap and whether this
    call accepted it (False: the position moved meanwhile; run it again)."""
    found = [s for s in inspect(settings, topics, only) if s.start.gap is not None]
    done = []
    who = operator()
    with Database(settings.dest_db_url, application_name="cdc-offsets") as db:
        for s in found:
            gap = s.start.gap
            assert gap is not None
            with db.connection() as conn, conn.cursor() as cur:
                ok = positions.accept_gap(cur, gap, s.topic_id, who)
            if ok:
                log.warning(
                    "gap accepted by %s: %s offsets %d..%d (%d messages) are skipped; the position is now %d",
                    who,
                    gap.where,
                    gap.first_lost,
                    gap.next_kept - 1,
                    gap.missing,
                    gap.next_kept,
                )
            done.append((gap, ok))
    return done


def rewind(
    settings: Settings, topics: Sequence[str], only: Sequence[int] = (), *, to: int | None = None
) -> list[tuple[str, int, int | None, int]]:
    """Set the destination's position of ``topics`` (``only``'s partitions) to offset ``to``
    (None: the log start), never below the log start. Returns (topic, partition, was, now)."""
    states = inspect(settings, topics, only)
    moved = []
    with Database(settings.dest_db_url, application_name="cdc-offsets") as db:
        for s in states:
            target = s.low if to is None else min(max(to, s.low), s.high)
            with db.connection() as conn, conn.cursor() as cur:
                positions.set_position(cur, s.topic, s.partition, target, s.topic_id)
            was = s.stored.next_offset if s.stored else None
            log.warning(
                "rewound by %s: %s position %s -> %d (the consumer applies from there; duplicates are skipped)",
                operator(),
                s.where,
                "none" if was is None else was,
                target,
            )
            moved.append((s.topic, s.partition, was, target))
    return moved
