"""The dead-letter topic: writing failed messages with their story, and reading them (replaying
them is ``cdc.dlq.replay``).

A dead letter keeps the original key, value and headers untouched; the why travels in more headers:

=========================  ==========================================================
``cdc.original.topic``     topic the message was consumed from
``cdc.original.partition`` its partition (decimal text)
``cdc.original.offset``    its offset (decimal text)
``cdc.error.class``        exception class, e.g. ``InvalidEventError``, ``CheckViolation``
``cdc.error.message``      the error, one line
``cdc.attempts``           how many times the sink tried it (1 for an invalid message)
``cdc.failed.at``          UTC time of the decision, ISO 8601
``cdc.consumer.group``     the consumer group that gave up
=========================  ==========================================================

A replayed message gets its original headers back (so ``cdc.producer`` still says it is ours)
plus ``cdc.replayed.from`` (``<dlq topic>/<partition>/<offset>``), which lets the sink
reconsider an action_id it had recorded as ``dlq``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from cdc.errors import DeliveryError, HaltError, ServiceError
from cdc.kafka.client import Headers, Publisher, Received, consumer_config, producer_config
from cdc.runtime.logs import quiet_repeats
from cdc.runtime.settings import Settings

log = logging.getLogger(__name__)
KAFKA_LOG = logging.getLogger("dlq.kafka")
quiet_repeats(KAFKA_LOG)

H_TOPIC = "cdc.original.topic"
H_PARTITION = "cdc.original.partition"
H_OFFSET = "cdc.original.offset"
H_ERROR_CLASS = "cdc.error.class"
H_ERROR_MESSAGE = "cdc.error.message"
H_ATTEMPTS = "cdc.attempts"
H_FAILED_AT = "cdc.failed.at"
H_GROUP = "cdc.consumer.group"
H_REPLAYED_FROM = "cdc.replayed.from"
H_TABLE = "cdc.table"  # the replicated table: employees, or schema.table
# The headers a dead letter adds: a replay takes them off again (and sets its own H_REPLAYED_FROM).
_DIAGNOSTIC = {
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_ATTEMPTS,
    H_FAILED_AT,
    H_GROUP,
    H_TABLE,
}

FLUSH_TIMEOUT = 30.0
ERROR_MESSAGE_MAX = 1000  # characters kept of an error message in a header
READ_IDLE_TIMEOUT = 30.0  # a partition read to its end offset should never stall this long


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Received
    error_class: str
    error: str
    attempts: int

    def where(self) -> str:
        return self.record.where()


def is_replayed(record: Received) -> bool:
    return record.has_header(H_REPLAYED_FROM)


def headers_of(letter: DeadLetter, group: str, table: str | None = None) -> Headers:
    m = letter.record
    named = [(H_TABLE, table.encode())] if table else []
    return [
        *((k, v) for k, v in m.headers if k not in _DIAGNOSTIC),
        (H_TOPIC, m.topic.encode()),
        (H_PARTITION, str(m.partition).encode()),
        (H_OFFSET, str(m.offset).encode()),
        (H_ERROR_CLASS, letter.error_class.encode()),
        (H_ERROR_MESSAGE, letter.error[:ERROR_MESSAGE_MAX].encode("utf-8", "replace")),
        (H_ATTEMPTS, str(letter.attempts).encode()),
        (H_FAILED_AT, datetime.now(UTC).isoformat().encode()),
        (H_GROUP, group.encode()),
        *named,
    ]


class DeadLetterQueue:
    """Writes dead letters and waits for every acknowledgement before the caller commits."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.cdc_dlq_topic
        self.group = settings.consumer_group_id
        self._publisher = Publisher(
            # The broker judges a letter's size against the topic (ensure_topics sized it for
            # any message of the CDC topic); the client's own 1,000,000-byte check would refuse
            # a letter of a message the CDC topic took.
            producer_config(
                settings, **{"client.id": f"{self.group}-dlq", "message.max.bytes": 1_000_000_000}
            ),
            logger=KAFKA_LOG,
            flush_timeout=FLUSH_TIMEOUT,
        )
        self._sending = threading.Lock()

    def send(self, letters: Sequence[DeadLetter], table_of: Callable[[str], str] | None = None) -> None:
        """Produce and flush; raises DeliveryError unless Kafka acknowledged every letter.
        ``table_of(topic)`` names the table of a letter's topic (the ``cdc.table`` header).

        After a fatal producer error the publisher has already started a new producer, so the
        consumer's retry of the batch can succeed.
        """
        with self._sending:
            self._publisher.send(
                (
                    (
                        self.topic,
                        letter.record.key,
                        letter.record.value,
                        headers_of(
                            letter,
                            self.group,
                            table_of(letter.record.topic) if table_of is not None else None,
                        ),
                    )
                    for letter in letters
                ),
                what=f"dead-letter topic {self.topic}",
            )

    def serve(self) -> None:
        """Serve the publisher's queued events between sends (see ``Publisher.serve``); skipped
        while a send runs (in the apply thread), which serves them itself."""
        if self._sending.acquire(blocking=False):
            try:
                self._publisher.serve()
            finally:
                self._sending.release()

    def close(self) -> None:
        self._publisher.close(FLUSH_TIMEOUT)


class CircuitBreaker:
    """Trips when at least ``ratio`` of the recent messages were dead-lettered.

    A stream where nearly everything fails means a bug, a schema change or a wrong topic, not
    bad messages: dead-lettering it all would empty the topic into the DLQ.

    The recent messages are the batch being decided, whole, plus the newest messages of earlier
    batches until ``window`` messages are counted (the oldest batch counted in part, its failures
    pro rata). A batch is one decision: where its failures sit inside it does not matter (its
    partitions interleave anyway), only how many there are. Nothing trips before ``window``
    messages were seen since the start, and a batch of ``window`` or more is judged on its own ratio.
    """

    def __init__(self, window: int, ratio: float) -> None:
        self.window = window
        self.ratio = ratio
        self._batches: deque[tuple[int, int]] = deque()  # (failed, total), newest last
        self._kept = 0  # messages in _batches

    def failures_with(self, failed: int, total: int) -> tuple[float, int]:
        """(failures, messages) of the recent messages if this batch were recorded now."""
        failures, seen = float(failed), total
        for old_failed, old_total in reversed(self._batches):
            if seen >= self.window:
                break
            part = min(old_total, self.window - seen)
            failures += old_failed * part / old_total
            seen += part
        return failures, seen

    def check(self, failed: int, total: int) -> None:
        """Raise HaltError if recording this batch (``failed`` of ``total``) would trip."""
        if not self.window or not failed:
            return
        failures, seen = self.failures_with(failed, total)
        # A hair of tolerance: pro-rata failures are fractions.
        if seen >= self.window and failures >= self.ratio * seen - 1e-9:
            raise HaltError(
                f"DLQ circuit breaker open: {failures:.0f} of the last {seen} messages failed "
                f"(DLQ_BREAKER_RATIO={self.ratio}); stopping instead of dead-lettering the stream. "
                "Check the errors above, fix the cause, restart"
            )

    def record(self, failed: int, total: int) -> None:
        if not self.window or not total:
            return
        self._batches.append((failed, total))
        self._kept += total
        # Keep just enough batches to fill a window behind any new batch.
        while self._kept - self._batches[0][1] >= self.window:
            self._kept -= self._batches.popleft()[1]


def position(msg: Message) -> tuple[str, int, int]:
    """A consumed message's topic, partition and offset (one without an error has all three)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def message_headers(msg: Message) -> Headers:
    """A consumed message's headers (a list; None when it has none)."""
    headers = msg.headers()
    return list(headers) if isinstance(headers, list) else []


def header_text(value: str | bytes | None) -> str:
    """A header value as text (bytes decoded as UTF-8, replacing what is not)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def _headers_dict(message: Message) -> dict[str, str]:
    return {k: header_text(v) for k, v in message_headers(message)}


def assign_topic(consumer: Consumer, topic: str, *, from_committed: bool) -> dict[int, int]:
    """Assign every partition of ``topic`` (from the group's committed offsets, or from the
    beginning). Returns the end offset of each partition that has something left to read."""
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    if meta.error is not None:
        raise DeliveryError(f"topic {topic}: {meta.error.str()}")
    parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
    if from_committed:
        parts = consumer.committed(parts, timeout=10)
    todo = {}
    for tp in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
        start = tp.offset if tp.offset >= 0 else low
        if tp.offset < 0:
            tp.offset = OFFSET_BEGINNING
        if start < high:
            todo[tp.partition] = high
    consumer.assign(parts)
    return todo


def read_until(consumer: Consumer, ends: dict[int, int], limit: int | None) -> Iterator[Message]:
    """Messages up to the end offsets taken at start (later arrivals wait for the next run)."""
    todo = dict(ends)
    count = 0
    idle_deadline = time.monotonic() + READ_IDLE_TIMEOUT
    while todo and (limit is None or count < limit):
        msg = consumer.poll(0.5)
        if msg is None:
            if time.monotonic() > idle_deadline:
                log.warning("dlq: nothing more arrived for %.0fs, stopping early", READ_IDLE_TIMEOUT)
                return
            continue
        err = msg.error()
        if err is not None:
            log.warning("dlq read error: %s", err.str())
            continue
        idle_deadline = time.monotonic() + READ_IDLE_TIMEOUT
        _, partition, offset = position(msg)
        end = todo.get(partition)
        if end is None or offset >= end:
            continue
        if offset + 1 >= end:
            del todo[partition]
        count += 1
        yield msg


def replay_headers(headers: Headers, source: str) -> Headers:
    """A dead letter's headers for its replay: the original ones back, plus ``cdc.replayed.from``."""
    original = [(k, v) for k, v in headers if k not in _DIAGNOSTIC | {H_REPLAYED_FROM}]
    return [*original, (H_REPLAYED_FROM, source.encode())]


def target_topic(headers: Headers, default: str) -> str:
    """Where a dead letter is replayed to: the topic it was consumed from (``default`` if unknown)."""
    for k, v in headers:
        if k == H_TOPIC and v:
            return header_text(v)
    return default


def read(settings: Settings, *, limit: int | None = None, **config: object) -> Generator[Message, None, None]:
    """Every DLQ message from the beginning up to its end now, without moving any group's offsets.

    ``config`` adds consumer properties. Raises ServiceError if Kafka does not answer, and
    DeliveryError if the DLQ topic does not exist.
    """
    group = f"{settings.consumer_group_id}.dlq-show"
    consumer = Consumer(consumer_config(settings, **{"group.id": group, **config}))
    try:
        try:
            ends = assign_topic(consumer, settings.cdc_dlq_topic, from_committed=False)
        except KafkaException as exc:
            raise ServiceError(f"Kafka {settings.kafka_bootstrap_servers}: {exc.args[0].str()}") from exc
        yield from read_until(consumer, ends, limit)
    finally:
        consumer.close()


def show(settings: Settings, *, limit: int | None = None) -> Iterator[dict[str, object]]:
    """Every DLQ message from the beginning as a dict (key/value as text, or base64 if binary)."""
    for msg in read(settings, limit=limit):
        yield {
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": text_of(msg.key()),
            "value": text_of(msg.value()),
            "headers": _headers_dict(msg),
        }


def text_of(raw: str | bytes | None) -> str | None:
    """Bytes as text: UTF-8, else ``base64:...``."""
    if raw is None or isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()
