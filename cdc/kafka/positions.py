"""Where a reader starts a partition: from the position the destination stored, checked against
the topic as it is now.

The destination keeps, per partition, the offset after the last message it decided, with the
topic's identity (Kafka's topic id); see ``cdc.sink.positions``. Kafka's own view (the group's
committed offset, ``auto.offset.reset``) is not trusted alone: a group reset by an operator, a
retention or delete-records that removed messages nobody applied, or a topic deleted and
recreated would each skip changes without a word. ``decide`` takes the stored position, the
topic's id and log range now, and the group's offset, and says where to start, or that
messages are missing (a ``Gap``: the partition is held, never skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from confluent_kafka import Consumer, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient

from cdc.errors import DeliveryError

TP = tuple[str, int]

# Seconds per Kafka request of a placement.
REQUEST_TIMEOUT = 10.0


class Stored(NamedTuple):
    """A position the destination stored: the next offset to read and the topic id it belongs to
    (None: not known, a destination set up before topic ids were kept)."""

    next_offset: int
    topic_id: str | None


class PositionStore(Protocol):
    """Where positions are kept (the destination's ``applied_offsets``)."""

    def read(self, topics: Iterable[str]) -> dict[TP, Stored]: ...

    def write(self, next_offsets: Mapping[TP, int], topic_ids: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class Gap:
    """Offsets ``first_lost`` up to ``next_kept`` (exclusive) of a partition are gone from the
    topic, and the destination never applied them."""

    topic: str
    partition: int
    first_lost: int
    next_kept: int

    @property
    def missing(self) -> int:
        return self.next_kept - self.first_lost

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]"

    def line(self) -> str:
        return (
            f"{self.where}: offsets {self.first_lost}..{self.next_kept - 1} ({self.missing} messages) "
            f"were removed from the topic before the destination applied them (log start "
            f"{self.next_kept}); holding the partition, nothing after the gap is applied. Recover: "
            "re-publish or re-snapshot, then `python -m cdc offsets accept-gap` (USAGE.md, 'A gap in the topic')"
        )


@dataclass(frozen=True)
class Start:
    """Where to start a partition (``offset``), or the gap that holds it (``gap``, offset None),
    and the lines that explain the choice: (logging level, text)."""

    offset: int | None
    gap: Gap | None = None
    notes: tuple[tuple[int, str], ...] = ()
    recreated: bool = False
    truncated: bool = False


def decide(
    topic: str,
    partition: int,
    *,
    stored: Stored | None,
    topic_id: str,
    low: int,
    high: int,
    group: int | None,
) -> Start:
    """Where to start ``topic[partition]``, whose log now runs from ``low`` to ``high`` (the next
    offset to be written), given the destination's ``stored`` position, the topic's id now and
    the group's committed offset (None: none).

    - No stored position: the destination applied nothing of this partition, so it needs it
      from offset 0; if the log no longer starts there, that is a gap.
    - A stored position of another topic id: the topic was deleted and recreated; the new one is
      new (from its beginning, duplicates are absorbed by the sink); the old offsets mean nothing.
    - Stored below the log start: a gap (retention or delete-records removed what was not applied).
    - Stored above the log end: the log was truncated (an unclean leader election) after the
      destination applied up to there; anything written from the log end on is new or a
      duplicate, so start at the log end.
    """
    where = f"{topic}[{partition}]"
    notes: list[tuple[int, str]] = []
    recreated = stored is not None and stored.topic_id is not None and stored.topic_id != topic_id
    if recreated:
        assert stored is not None
        notes.append(
            (
                logging.WARNING,
                f"{where}: the topic was deleted and recreated (topic id {topic_id}, the destination's "
                f"offsets are of {stored.topic_id}): starting the new topic from its beginning",
            )
        )
        stored = None
    position = stored.next_offset if stored is not None else 0
    if position < low:
        return Start(None, Gap(topic, partition, position, low), tuple(notes), recreated)
    truncated = position > high
    if truncated:
        notes.append(
            (
                logging.WARNING,
                f"{where}: the destination applied up to offset {position - 1} but the log ends at "
                f"{high} (truncated, e.g. an unclean leader election): starting at {high}",
            )
        )
        position = high
    if group is not None and group != position:
        ahead = group > position
        notes.append(
            (
                logging.WARNING if ahead else logging.INFO,
                f"{where}: the group's offset {group} is {'ahead of' if ahead else 'behind'} the "
                f"destination's {position}: starting at {position}"
                + (" (Kafka's view would skip what the destination never applied)" if ahead else ""),
            )
        )
    return Start(position, None, tuple(notes), recreated, truncated)


def topic_ids(admin: AdminClient, topics: Iterable[str]) -> dict[str, str]:
    """Kafka's id of each topic (metadata, not a coordinator request). DeliveryError if unknown."""
    names = sorted(set(topics))
    if not names:
        return {}
    try:
        futures = admin.describe_topics(TopicCollection(names), request_timeout=REQUEST_TIMEOUT)
        return {name: str(futures[name].result().topic_id) for name in names}
    except KafkaException as exc:
        raise DeliveryError(f"cannot describe topics {', '.join(names)}: {exc.args[0].str()}") from exc


def log_range(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """The partition's log start offset and log end (next offset to be written), from the broker."""
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=REQUEST_TIMEOUT, cached=False
        )
    except KafkaException as exc:
        raise DeliveryError(f"cannot read the offsets of {topic}[{partition}]: {exc.args[0].str()}") from exc
    return low, high


def group_offsets(consumer: Consumer, partitions: Iterable[TP]) -> dict[TP, int]:
    """The group's committed offsets of ``partitions`` (those it has)."""
    asked = [TopicPartition(t, p) for t, p in partitions]
    if not asked:
        return {}
    try:
        got = consumer.committed(asked, timeout=REQUEST_TIMEOUT)
    except KafkaException as exc:
        raise DeliveryError(f"cannot read the group's offsets: {exc.args[0].str()}") from exc
    return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}


def starts(
    consumer: Consumer, admin: AdminClient, store: PositionStore, partitions: Iterable[TP]
) -> tuple[dict[TP, Start], dict[str, str]]:
    """Where each of ``partitions`` starts (see ``decide``), and the ids of their topics.

    Raises DeliveryError (Kafka) or the store's TransientError (the destination) when a fact
    cannot be read: nothing is decided then.
    """
    todo = sorted(set(partitions))
    ids = topic_ids(admin, {t for t, _ in todo})
    stored = store.read(ids)
    group = group_offsets(consumer, todo)
    out = {}
    for topic, partition in todo:
        low, high = log_range(consumer, topic, partition)
        out[(topic, partition)] = decide(
            topic,
            partition,
            stored=stored.get((topic, partition)),
            topic_id=ids[topic],
            low=low,
            high=high,
            group=group.get((topic, partition)),
        )
    return out, ids
