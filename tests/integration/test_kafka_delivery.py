"""cdc.kafka.Publisher against the real broker, including recovery from a real fatal producer error.

A fatal error cannot be provoked from outside a healthy broker, so these tests use librdkafka's
own hook for it, ``rd_kafka_test_fatal_error()`` ("since there is no practical way to trigger
real fatal errors in the idempotent producer, this method allows an application to trigger
fabricated fatal errors in tests"). confluent-kafka does not wrap it: it is called through ctypes
on the librdkafka bundled with the wheel. It puts the real producer into the real fatal state:
produce() raises _FATAL, queued messages are purged, poll()/flush() raise the error.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from cdc.dlq import queue as dlq
from cdc.errors import DeliveryError
from cdc.kafka.client import Publisher, Received, consumer_config, producer_config
from cdc.runtime.settings import Settings
from cdc.runtime.signals import StopSignal
from cdc.source import daemon as producer_module
from consumer_final import ProductionCDCConsumer
from producer import ChangeProducer
from tests.support.consumer import Running, dest_rows, dlq_messages, event, fast, outcomes, produce
from tests.support.producer import cursor_row, insert_employees, outbox_ids, read_topic

log = logging.getLogger("test.kafka")


def _librdkafka() -> ctypes.CDLL:
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    if not found:
        pytest.fail(
            f"no bundled librdkafka in {libs}: these tests need the confluent-kafka wheel's own build"
        )
    lib = ctypes.CDLL(str(found[0]))
    lib.rd_kafka_name.restype = ctypes.c_char_p
    lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_test_fatal_error.restype = ctypes.c_int
    lib.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    return lib


def make_fatal(producer: Producer, client_id: str) -> None:
    """Put ``producer`` into librdkafka's fatal state (OUT_OF_ORDER_SEQUENCE_NUMBER)."""
    lib = _librdkafka()
    # confluent-kafka's Handle object: PyObject_HEAD, then the rd_kafka_t pointer.
    rk = ctypes.c_void_p.from_address(id(producer) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    name = lib.rd_kafka_name(rk).decode()
    assert name.startswith(client_id), f"not the producer handle: {name!r}"
    err = lib.rd_kafka_test_fatal_error(rk, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, b"provoked by the test")
    assert err == 0, err


def new_publisher(
    settings: Settings, config: dict[str, object] | None = None, **kw: object
) -> tuple[Publisher, str]:
    client_id = f"test-{uuid.uuid4().hex[:8]}"
    full = producer_config(settings, **{"client.id": client_id, **(config or {})})
    return Publisher(full, logger=log, **kw), client_id  # type: ignore[arg-type]


def values_in(settings: Settings, topic: str) -> list[bytes]:
    c = Consumer(consumer_config(settings, **{"group.id": f"reader-{uuid.uuid4().hex[:8]}"}))
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        todo = {p for p, end in ends.items() if end > 0}
        out = []
        while todo:
            msg = c.poll(10)
            assert msg is not None, "topic ended early"
            assert msg.error() is None, msg.error()
            out.append(msg.value())
            if msg.offset() + 1 >= ends[msg.partition()]:
                todo.discard(msg.partition())
        return out
    finally:
        c.close()


def batch(settings: Settings, tag: str, n: int) -> list[tuple[str, bytes, bytes, None]]:
    return [(settings.cdc_topic, str(i).encode(), f"{tag}-{i}".encode(), None) for i in range(n)]


def test_send_confirms_every_message(settings):
    publisher, _ = new_publisher(settings)
    assert publisher.send(batch(settings, "a", 500)) == 500
    headers = [("h", b"v")]
    assert publisher.send([(settings.cdc_dlq_topic, None, b"x", headers)]) == 1
    publisher.close()
    assert sorted(values_in(settings, settings.cdc_topic)) == sorted(f"a-{i}".encode() for i in range(500))
    assert values_in(settings, settings.cdc_dlq_topic) == [b"x"]


def test_a_failed_delivery_is_a_delivery_error_naming_the_count(settings):
    # The client allows 3 MB, the broker 1 MB: the delivery report fails, not produce().
    publisher, _ = new_publisher(settings, {"message.max.bytes": 3_000_000}, flush_timeout=30)
    big = os.urandom(1_200_000)  # random: lz4 cannot shrink it under the limit
    with pytest.raises(DeliveryError, match=r"^topic t: 1 of 2 messages not delivered: .*too large"):
        publisher.send(
            [(settings.cdc_topic, b"k", b"small", None), (settings.cdc_topic, b"k", big, None)],
            what="topic t",
        )
    assert publisher.restarts == 0


def test_an_error_raised_by_produce_is_a_delivery_error(settings):
    # Over the client's own limit produce() raises: one line naming the message, no traceback, no
    # new producer.
    publisher, _ = new_publisher(settings, {"message.max.bytes": 1_000_000})
    with pytest.raises(
        DeliveryError,
        match=r"^topic t: a message of 1200000 bytes to \S+ \(key k\) is larger than producers may send "
        r"\(CDC_MAX_MESSAGE_BYTES plus 65536 for a letter's headers\): not skipped; raise CDC_MAX_MESSAGE_BYTES",
    ):
        publisher.send([(settings.cdc_topic, b"k", b"x" * 1_200_000, None)], what="topic t")
    assert publisher.restarts == 0
    assert publisher.send(batch(settings, "after", 3)) == 3


def test_fatal_error_before_the_batch_starts_a_new_producer_and_the_retry_delivers(settings):
    publisher, client_id = new_publisher(settings)
    assert publisher.send(batch(settings, "first", 10)) == 10
    make_fatal(publisher._producer, client_id)
    # produce() now raises _FATAL: reported as a DeliveryError, not a crash.
    with pytest.raises(
        DeliveryError,
        match=r"kafka producer fatal error OUT_OF_ORDER_SEQUENCE_NUMBER: .*a new producer was started",
    ):
        publisher.send(batch(settings, "second", 10))
    assert publisher.restarts == 1
    assert publisher.send(batch(settings, "second", 10)) == 10
    publisher.close()
    got = values_in(settings, settings.cdc_topic)
    assert sorted(got) == sorted(
        [f"first-{i}".encode() for i in range(10)] + [f"second-{i}".encode() for i in range(10)]
    )


@pytest.mark.parametrize("after", [3, 20], ids=["mid-produce", "before-flush"])
def test_fatal_error_in_the_middle_of_a_batch_fails_it_and_the_retry_delivers_all(settings, after):
    """The producer turns fatal while the batch is in flight: nothing may count as sent."""
    publisher, client_id = new_publisher(settings)

    def messages() -> Iterator[tuple[str, bytes, bytes, None]]:
        for i, item in enumerate(batch(settings, "b", 20)):
            if i == after:
                make_fatal(publisher._producer, client_id)
            yield item
        if after == 20:
            make_fatal(publisher._producer, client_id)

    with pytest.raises(DeliveryError, match="fatal error OUT_OF_ORDER_SEQUENCE_NUMBER"):
        publisher.send(messages())
    assert publisher.restarts == 1
    assert publisher.send(batch(settings, "b", 20)) == 20
    publisher.close()
    got = values_in(settings, settings.cdc_topic)
    # At least once: all 20 arrived; a few of the failed attempt may have been written before.
    assert set(got) == {f"b-{i}".encode() for i in range(20)}


def test_a_fatal_error_reported_to_error_cb_replaces_the_producer(settings):
    """Injected (this client raises fatal errors from poll() instead): the error_cb path."""
    publisher, _ = new_publisher(settings)
    first = publisher._producer
    publisher._on_error(KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "injected", fatal=True))
    with pytest.raises(DeliveryError, match="fatal error INVALID_PRODUCER_EPOCH: injected"):
        publisher.send(batch(settings, "c", 5))
    assert publisher._producer is not first
    assert publisher.send(batch(settings, "c", 5)) == 5


def test_serving_an_idle_publisher_replaces_a_fatal_producer(settings, caplog):
    """serve() between sends meets the fatal error first: it replaces the producer, not raises."""
    publisher, client_id = new_publisher(settings)
    first = publisher._producer
    make_fatal(first, client_id)
    with caplog.at_level(logging.WARNING, logger=log.name):
        deadline = time.monotonic() + 10
        while publisher.restarts == 0 and time.monotonic() < deadline:
            publisher.serve()
            time.sleep(0.05)
    assert publisher.restarts == 1
    assert publisher._producer is not first
    assert any("OUT_OF_ORDER_SEQUENCE_NUMBER" in m and "new producer" in m for m in caplog.messages)
    assert publisher.send(batch(settings, "after-serve", 5)) == 5
    publisher.close()
    assert sorted(values_in(settings, settings.cdc_topic)) == sorted(
        f"after-serve-{i}".encode() for i in range(5)
    )


def test_dead_letter_queue_recovers_from_a_fatal_producer_error(settings):
    produce(settings, [(b"1", b"not json")])
    c = Consumer(consumer_config(settings, **{"group.id": f"peek-{uuid.uuid4().hex[:8]}"}))
    try:
        meta = c.list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
        c.assign([TopicPartition(settings.cdc_topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        msg = None
        while msg is None or msg.error() is not None:
            msg = c.poll(10)
    finally:
        c.close()
    queue = dlq.DeadLetterQueue(settings)
    letter = dlq.DeadLetter(Received.of(msg), "InvalidEventError", "not JSON", attempts=1)
    make_fatal(queue._publisher._producer, f"{settings.consumer_group_id}-dlq")
    with pytest.raises(
        DeliveryError, match=f"dead-letter topic {settings.cdc_dlq_topic}: kafka producer fatal"
    ):
        queue.send([letter])
    queue.send([letter])
    queue.close()
    [shown] = dlq_messages(settings)
    assert shown["value"] == "not json"
    assert shown["headers"][dlq.H_ERROR_CLASS] == "InvalidEventError"


def test_consumer_makes_progress_after_its_dlq_producer_turns_fatal(settings, clean_dest):
    """The DLQ publisher is replaced after its fatal error: later letters are sent, the batch is
    not retried forever."""
    consumer = ProductionCDCConsumer(settings=fast(settings, retry_backoff_max=0.5))
    with Running(consumer) as r:
        r.wait(lambda: consumer._dlq is not None, what="the DLQ producer")
        publisher = consumer._dlq._publisher
        make_fatal(publisher._producer, f"{settings.consumer_group_id}-dlq")
        produce(settings, [event(1, "INSERT", 1), (b"2", b"not json"), event(3, "INSERT", 3)])
        r.wait(lambda: consumer.stats.get("dlq") == 1 and len(dest_rows(clean_dest)) == 2, 60)
    assert consumer._dlq is None  # closed
    # Replaced either by the main loop's serve() between batches or by the failed send (which
    # then retried the batch): once, and the consumer kept running.
    assert publisher.restarts == 1
    assert set(dest_rows(clean_dest)) == {1, 3}
    assert set(outcomes(clean_dest).values()) == {"applied"}
    [letter] = dlq_messages(settings)
    assert letter["value"] == "not json"


def test_producer_daemon_recovers_from_a_fatal_producer_error(settings, clean_source, monkeypatch, caplog):
    """The daemon's producer turns fatal before its first batch: one clear line, a new producer,
    the batch re-sent, the cursor moved only after it was acknowledged; no crash."""
    made: list[Publisher] = []

    def fatal_publisher(config: dict[str, object], **kw: object) -> Publisher:
        client_id = f"test-{uuid.uuid4().hex[:8]}"
        publisher = Publisher({**config, "client.id": client_id}, **kw)  # type: ignore[arg-type]
        make_fatal(publisher._producer, client_id)
        made.append(publisher)
        return publisher

    monkeypatch.setattr(producer_module, "Publisher", fatal_publisher)
    insert_employees(clean_source, 30)
    s = dataclasses.replace(settings, retry_backoff_max=0.5)
    daemon = ChangeProducer(s, stop=StopSignal(), once=True)
    # run() installs its signal handlers and wakeup fd in this (pytest's) process: put them back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level(logging.WARNING, logger="producer"):
            assert daemon.run() == 0
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    [publisher] = made
    assert publisher.restarts == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "producer"]
    assert any(
        line.startswith("batch not published: kafka producer fatal error OUT_OF_ORDER_SEQUENCE_NUMBER")
        and "a new producer was started" in line
        for line in lines
    ), lines
    assert daemon.stats.get("retries") == 1
    ids = outbox_ids(clean_source)
    assert cursor_row(clean_source)[1:] == (ids[-1], 30)
    assert {r.action_id for r in read_topic(s, want=30)} == set(ids)
