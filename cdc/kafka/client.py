"""Kafka client configuration, topic management and the one way this project produces."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from cdc.errors import ConfigError, DeliveryError, ServiceError
from cdc.runtime.settings import Settings

log = logging.getLogger(__name__)

# Seconds per flush() call while waiting for acknowledgements, and between "still waiting" lines.
# Under 0.2 s: confluent-kafka splits a longer flush() into steps of its own, and on that path the
# exception of a fatal error raised in a callback can get lost (a SystemError without a cause).
FLUSH_STEP = 0.1
WAITING_NOTE_EVERY = 10.0

# What the client raises: a fatal error raised while it serves a delivery report surfaces as a
# SystemError caused by the KafkaException.
CLIENT_ERRORS = (KafkaException, SystemError)

Headers = list[tuple[str, str | bytes | None]]
# The header the producer puts on every message: only such messages may record a dead-lettered
# action_id, so a stranger's message cannot take a real one.
MARK_HEADER = "cdc.producer"
MARK_VALUE = b"1"
_new_tuple = tuple.__new__
# One message to send: topic, key, value, headers.
Outgoing = tuple[str, bytes | str | None, bytes | str | None, Headers | None]


class Received(NamedTuple):
    """One consumed message as plain data: what the sink decides on, without the Kafka client.

    A named tuple, immutable like the frozen dataclass it was, and built in a fifth of the time
    (one per message).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()

    @classmethod
    def of(cls, msg: Message) -> Received:
        return _new_tuple(
            cls, (msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers() or ())
        )

    def has_header(self, name: str, value: bytes | None = None) -> bool:
        for k, v in self.headers:  # noqa: SIM110 - any() over a generator costs more, per message
            if k == name and (value is None or v == value):
                return True
        return False

    def where(self) -> str:
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"


def base_config(settings: Settings) -> dict[str, str]:
    """bootstrap.servers plus every KAFKA_* property (security, SASL, ...)."""
    return {"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.kafka_extra}


def producer_config(settings: Settings, **extra: object) -> dict[str, object]:
    """An idempotent producer: no duplicates or reordering from its own retries."""
    return {
        **base_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Up to CDC_MAX_MESSAGE_BYTES for other tables' rows, plus a dead letter's headers.
        "message.max.bytes": settings.max_message_bytes + LETTER_HEADROOM,
        **extra,
    }


def consumer_config(settings: Settings, **extra: object) -> dict[str, object]:
    """Offsets are committed by hand after the destination commit, never automatically."""
    return {
        # Prefetch bounded to 8 MiB queued and 4 MiB per fetch (librdkafka: 64 MiB and 50 MiB):
        # still many batches ahead, and the daemon's memory on a backlog stays bounded.
        # KAFKA_* variables override both.
        "queued.max.messages.kbytes": 8192,
        "fetch.max.bytes": 4 * 1024 * 1024,
        **base_config(settings),
        "group.id": settings.consumer_group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        **extra,
    }


# Errors no waiting fixes: the cluster refuses our credentials or we refuse its certificate.
REFUSED = (KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED)


class _Refusals:
    """An ``error_cb`` keeping the first refusal (wrong password, untrusted certificate)."""

    def __init__(self) -> None:
        self.first: KafkaError | None = None

    def __call__(self, err: KafkaError) -> None:
        if self.first is None and err.code() in REFUSED:
            self.first = err


def admin_client(settings: Settings, **extra: object) -> AdminClient:
    """An admin client whose refused connections ``wait_for_broker`` reports at once."""
    refusals = _Refusals()
    config: dict[str, Any] = {**base_config(settings), "error_cb": refusals, **extra}
    admin = AdminClient(config)
    admin.cdc_refusals = refusals  # type: ignore[attr-defined]
    return admin


def _raise_if_refused(admin: AdminClient, what: str) -> None:
    refusals = getattr(admin, "cdc_refusals", None)
    if refusals is None:
        return
    admin.poll(0)  # serves the error callbacks
    err = refusals.first
    if err is not None:
        hint = (
            "check KAFKA_SSL_CA_LOCATION (the CA that signed the brokers' certificate)"
            if err.code() == KafkaError._SSL
            else "check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISMS"
        )
        raise ConfigError(f"{what} refused the connection: {err.str()}; {hint}")


def wait_for_broker(admin: AdminClient, *, timeout: float, what: str = "Kafka") -> None:
    """Block until the cluster answers a metadata request, logging a 'waiting' line meanwhile."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except KafkaException as exc:
            _raise_if_refused(admin, what)
            if not announced:
                log.warning("waiting for %s: %s", what, exc.args[0].str())
                announced = True
            if time.monotonic() > deadline:
                raise ServiceError(f"{what} unreachable after {timeout:.0f}s: {exc.args[0].str()}") from exc
            time.sleep(1)


# Bytes a dead letter may exceed the message it carries by: the diagnosis headers (the error
# message is cut to 1,000 characters, at most 4,000 bytes; the rest well under 1 KiB) with room.
LETTER_HEADROOM = 64 * 1024
MAX_MESSAGE_BYTES = "max.message.bytes"


def ensure_topics(settings: Settings, admin: AdminClient | None = None, *, timeout: float = 30.0) -> set[str]:
    """Create the CDC topic and its dead-letter topic if they do not exist yet, and see that the
    dead-letter topic takes a letter of any message the CDC topic accepts (its size limit is
    LETTER_HEADROOM more; an older, smaller one is raised). Returns the cluster's topics, these
    two included."""
    admin = admin or admin_client(settings)
    wait_for_broker(admin, timeout=timeout)
    existing = set(admin.list_topics(timeout=10).topics)
    if settings.cdc_topic not in existing:
        _create(admin, settings, settings.cdc_topic, {}, timeout)
    # A letter of any message: of CDC_TOPIC's or of another table's topic.
    wanted = max(topic_limit(admin, settings.cdc_topic), settings.max_message_bytes) + LETTER_HEADROOM
    if settings.cdc_dlq_topic not in existing:
        _create(admin, settings, settings.cdc_dlq_topic, {MAX_MESSAGE_BYTES: str(wanted)}, timeout)
    elif (has := topic_limit(admin, settings.cdc_dlq_topic)) < wanted:
        _raise_limit(admin, settings.cdc_dlq_topic, has, wanted)
    return existing | {settings.cdc_topic, settings.cdc_dlq_topic}


def ensure_topic(settings: Settings, admin: AdminClient, topic: str, *, timeout: float = 30.0) -> bool:
    """Create ``topic`` as the CDC topic is created (CDC_TOPIC_PARTITIONS, the replication factor,
    min.insync.replicas=2 when replicated), taking messages up to CDC_MAX_MESSAGE_BYTES, unless it
    exists. True if this call created it; ServiceError if it could not."""
    return _create(admin, settings, topic, {MAX_MESSAGE_BYTES: str(settings.max_message_bytes)}, timeout)


def _create(
    admin: AdminClient, settings: Settings, topic: str, config: dict[str, str], timeout: float
) -> bool:
    rf = settings.topic_replication_factor
    if rf >= 3:
        # Replicated: an acknowledged write (acks=all) is on two brokers before the producer moves on.
        config = {"min.insync.replicas": "2", **config}
    new = NewTopic(topic, num_partitions=settings.topic_partitions, replication_factor=rf, config=config)
    try:
        admin.create_topics([new], operation_timeout=timeout)[topic].result()
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise ServiceError(f"could not create topic {topic}: {exc.args[0].str()}") from exc
        return False
    log.info("created topic=%s partitions=%d replication=%d", topic, settings.topic_partitions, rf)
    return True


def topic_limit(admin: AdminClient, topic: str) -> int:
    """The topic's effective max.message.bytes (its own setting or the broker's default)."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    for attempt in range(10):
        try:
            configs = admin.describe_configs([resource], request_timeout=10)[resource].result(timeout=15)
            return int(configs[MAX_MESSAGE_BYTES].value)
        except KafkaException as exc:
            # A topic just created may not be known yet to the broker asked.
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or attempt == 9:
                raise ServiceError(
                    f"could not read the configuration of topic {topic}: {exc.args[0].str()}"
                ) from exc
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _raise_limit(admin: AdminClient, topic: str, has: int, wanted: int) -> None:
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(MAX_MESSAGE_BYTES, str(wanted), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    try:
        admin.incremental_alter_configs([resource])[resource].result(timeout=15)
        log.info(
            "raised %s of dead-letter topic %s from %d to %d: a letter is its message plus headers",
            MAX_MESSAGE_BYTES,
            topic,
            has,
            wanted,
        )
    except KafkaException as exc:
        log.warning(
            "dead-letter topic %s takes messages up to %d bytes, less than the CDC topic's limit plus "
            "%d for a letter's headers; a letter of a message near that limit would be refused: set "
            "its %s to %d (%s)",
            topic,
            has,
            LETTER_HEADROOM,
            MAX_MESSAGE_BYTES,
            wanted,
            exc.args[0].str(),
        )


class _Batch:
    """Failed deliveries of one send(): a late report of an earlier batch never counts here.

    Only failures are reported (``delivery.report.only.error``): a success costs no Python call
    and no message object. That every message was acknowledged is seen from the producer's queue
    running empty (librdkafka counts a message there until its delivery report was served).
    """

    def __init__(self, on_delivered: Callable[[int, Message], None] | None = None) -> None:
        self.failed = 0
        self.first_error: KafkaError | None = None
        self.on_delivered = on_delivered

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = err

    def numbered(self, index: int, err: KafkaError | None, msg: Message) -> None:
        self(err, msg)
        if err is None and self.on_delivered is not None:
            self.on_delivered(index, msg)


def _short(key: str | bytes | None) -> str:
    text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
    return text if len(text) <= 100 else text[:100] + "..."


def _is_fatal(err: KafkaError) -> bool:
    # produce() on a failed producer raises _FATAL, which itself is not flagged fatal().
    return err.fatal() or err.code() == KafkaError._FATAL


def _kafka_error(exc: BaseException) -> KafkaError | None:
    """The KafkaError behind ``exc`` (see CLIENT_ERRORS), following its chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__ or seen.__context__
    return None


class Publisher:
    """A producer that sends a batch and confirms every delivery report, or raises DeliveryError.

    ``poll(0)`` after each produce, a full local queue waited out by polling, then ``flush()``
    until the queue is empty (or ``flush_timeout`` passes): every message of the batch has been
    acknowledged, unless a failed delivery was reported. A fatal error (an idempotent producer
    that lost its sequence state refuses everything from then on) replaces the producer at once,
    so sending the batch again goes through a fresh one.
    """

    def __init__(
        self,
        config: dict[str, object],
        *,
        logger: logging.Logger,
        flush_timeout: float | None = None,
        report_successes: bool = False,
    ) -> None:
        """``report_successes``: deliver success reports to Python too, which ``send``'s
        ``on_delivered`` needs (the DLQ workbench); the daemons leave it off (it costs a Python
        call per message)."""
        self.flush_timeout = flush_timeout
        self.report_successes = report_successes
        self.restarts = 0
        self._log = logger
        self._config = {
            **config,
            "delivery.report.only.error": not report_successes,
            "error_cb": self._on_error,
            "logger": logger,
        }
        self._fatal: KafkaError | None = None
        self._producer = Producer(self._config)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._log.warning("waiting for Kafka: all brokers are down")
        else:
            # Transport errors are retried by librdkafka and already in its own log lines.
            self._log.debug("kafka: %s", err.str())

    def send(
        self,
        messages: Iterable[Outgoing],
        *,
        what: str = "",
        on_delivered: Callable[[int, Message], None] | None = None,
    ) -> int:
        """Produce and flush; return the count once Kafka acknowledged all, else raise DeliveryError.

        ``what`` prefixes the error message (e.g. ``dead-letter topic x``). ``on_delivered(i, msg)``
        is called for each acknowledged message (``i`` its place in ``messages``), also when
        others fail: where each one landed (delivery reports carry no headers to tell them apart).
        """
        prefix = f"{what}: " if what else ""
        if on_delivered is not None and not self.report_successes:
            raise ValueError("send(on_delivered=...) needs a Publisher made with report_successes=True")
        batch = _Batch(on_delivered)
        count = 0
        unacknowledged = 0
        produce, poll = self._producer.produce, self._producer.poll
        try:
            for topic, key, value, headers in messages:
                report = batch if on_delivered is None else partial(batch.numbered, count)
                try:
                    produce(topic, value, key, on_delivery=report, headers=headers)
                except BufferError:
                    self._produce_when_room(report, topic, key, value, headers)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                        raise
                    raise DeliveryError(
                        f"{prefix}a message of {len(value or b'')} bytes to {topic} (key "
                        f"{_short(key)}) is larger than producers may send (CDC_MAX_MESSAGE_BYTES plus "
                        f"{LETTER_HEADROOM} for a letter's headers): not skipped; raise "
                        "CDC_MAX_MESSAGE_BYTES and restart"
                    ) from exc
                poll(0)
                count += 1
            unacknowledged = self._flush(count)
        except CLIENT_ERRORS as exc:
            err = _kafka_error(exc)
            if err is None:
                raise
            if not _is_fatal(err):
                raise DeliveryError(f"{prefix}{err.str()}") from exc
            self._fatal = self._fatal or self._fatal_cause(err)
        if self._fatal is not None:
            fatal = self._restart()
            raise DeliveryError(
                f"{prefix}kafka producer fatal error {fatal.name()}: {fatal.str()}; "
                f"a new producer was started for the retry"
            )
        if batch.failed:
            assert batch.first_error is not None
            raise DeliveryError(
                f"{prefix}{batch.failed} of {count} messages not delivered: {batch.first_error.str()}"
            )
        if unacknowledged:
            raise DeliveryError(
                f"{prefix}{unacknowledged} message(s) not acknowledged in {self.flush_timeout:.0f}s"
            )
        return count

    def serve(self) -> None:
        """Serve queued events (errors, reports) without waiting. A publisher that sends rarely
        needs it: librdkafka queues an event at every failed connection attempt, and only a
        poll reads them, so an idle one would hold every outage's events. Not while ``send``
        runs in another thread (it polls itself, and its reports must reach it).

        A fatal error found here (this client raises it from poll()) replaces the producer at
        once, as ``send`` would: nothing is queued between sends, so nothing is dropped."""
        try:
            self._producer.poll(0)
        except CLIENT_ERRORS as exc:
            err = _kafka_error(exc)
            if err is None or not _is_fatal(err):
                raise
            self._fatal = self._fatal or self._fatal_cause(err)
        if self._fatal is not None:
            fatal = self._restart()
            self._log.warning(
                "kafka producer fatal error %s: %s; a new producer was started", fatal.name(), fatal.str()
            )

    def _produce_when_room(
        self,
        report: Callable[[KafkaError | None, Message], None],
        topic: str,
        key: bytes | str | None,
        value: bytes | str | None,
        headers: Headers | None,
    ) -> None:
        while True:
            # The local queue is full: serve delivery reports to make room, then retry.
            self._producer.poll(0.1)
            try:
                self._producer.produce(topic, value, key, on_delivery=report, headers=headers)
                return
            except BufferError:
                continue

    def _flush(self, count: int) -> int:
        """Flush until the queue is empty; returns what is still queued (after ``flush_timeout``)."""
        started = time.monotonic()
        next_note = started + WAITING_NOTE_EVERY
        queued = len(self._producer)
        while queued and self._fatal is None:
            queued = self._producer.flush(FLUSH_STEP)
            now = time.monotonic()
            if self.flush_timeout is not None and now - started >= self.flush_timeout:
                break
            if queued and now >= next_note:
                next_note += WAITING_NOTE_EVERY
                log.warning(
                    "waiting for Kafka to acknowledge %d of %d messages (%.0fs so far)",
                    min(queued, count),
                    count,
                    now - started,
                )
        return queued

    def _fatal_cause(self, err: KafkaError) -> KafkaError:
        """The error that made the producer fatal, not produce()'s bare _FATAL.

        confluent-kafka hands it out once, from the next poll(), unless that already happened.
        """
        if err.code() != KafkaError._FATAL:
            return err
        try:
            self._producer.poll(0)
        except CLIENT_ERRORS as exc:
            cause = _kafka_error(exc)
            if cause is not None and cause.fatal():
                return cause
        return err

    def _restart(self) -> KafkaError:
        """Drop the failed producer (its queue is already purged) and start a new one."""
        fatal, self._fatal = self._fatal, None
        assert fatal is not None
        self._producer = Producer(self._config)
        self.restarts += 1
        return fatal

    def close(self, timeout: float = 1.0) -> None:
        """Wait up to ``timeout`` for anything still queued (send() normally leaves nothing)."""
        deadline = time.monotonic() + timeout
        try:
            while len(self._producer) and time.monotonic() < deadline:
                self._producer.flush(FLUSH_STEP)
        except CLIENT_ERRORS as exc:
            if _kafka_error(exc) is None:
                raise
