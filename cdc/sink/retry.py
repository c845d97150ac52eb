"""Waiting out a transient error (database down, deadlock, DLQ unreachable) without leaving the group.

The batch was rolled back. Its partitions are paused and the consumer keeps polling, so the group
keeps this member while it waits with capped exponential backoff; then the same batch (less what
moved to another consumer meanwhile) is applied again, until it commits. Then the partitions resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, TopicPartition

from cdc.errors import DeliveryError, TransientError
from cdc.kafka.client import Received
from cdc.runtime.metrics import Probe
from cdc.runtime.signals import StopSignal, backoff_delay
from cdc.runtime.stats import PAUSED, RETRIES, TRANSIENT, TRANSIENT_DLQ, Stats
from cdc.sink.batch import Decoded
from cdc.sink.offsets import TP

log = logging.getLogger("consumer.retry")

# While waiting on a sick database, poll at least this often to stay in the group.
WAIT_POLL = 0.5


class PausedRetry:
    """Retries a failed batch with the partitions paused. ``paused`` is True from the first wait
    until the partitions resume; ``on_resume`` is called then (the consumer's readiness)."""

    def __init__(
        self,
        *,
        backoff_max: float,
        stats: Stats,
        probe: Probe,
        signal: StopSignal,
        on_resume: Callable[[], None],
        unplaced: Callable[[], set[TP]] = set,
    ) -> None:
        self.backoff_max = backoff_max
        self.stats = stats
        self.probe = probe
        self.signal = signal
        self.on_resume = on_resume
        self.unplaced = unplaced  # partitions that stay paused (``cdc.sink.placement``)
        self.paused = False

    def until_applied(
        self,
        consumer: Consumer,
        batch: Decoded,
        keep: Callable[[Received], bool],
        apply: Callable[[Decoded], object],
        exc: TransientError | DeliveryError,
    ) -> Decoded | None:
        """Apply ``batch`` (its messages that ``keep`` still accepts) again until it commits,
        waiting out transient errors. Returns what committed; None if stopped meanwhile (nothing
        committed: these messages are read again) or if nothing of the batch is left to apply."""
        attempt = 0
        while True:
            attempt += 1
            self.stats.incr(RETRIES)
            self.stats.incr(TRANSIENT + exc.kind if isinstance(exc, TransientError) else TRANSIENT_DLQ)
            self.probe.set_ready(f"paused, waiting out: {exc}")
            delay = backoff_delay(attempt, self.backoff_max)
            log.warning(
                "transient error, batch of %d rolled back, retry %d in %.1fs: %s",
                len(batch.records),
                attempt,
                delay,
                exc,
            )
            self.wait_in_group(consumer, delay)
            batch = batch.only(keep)
            if not self.signal.running:
                return None
            if not batch.records:
                self.resume(consumer)  # every partition of the batch moved to another consumer
                return None
            try:
                apply(batch)
                break
            except (TransientError, DeliveryError) as again:
                exc = again
        self.resume(consumer)
        log.info("destination back after %d retries, partitions resumed", attempt)
        return batch

    def wait_in_group(self, consumer: Consumer, seconds: float) -> None:
        """Sleep with the partitions paused, polling so the group keeps this member."""
        deadline = time.monotonic() + seconds
        while self.signal.running:
            self.probe.beat()
            self.pause_all(consumer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Messages can only come from a partition assigned during the wait, before it was
            # paused: rewind it so they are read again after the wait.
            rewind: dict[TP, int] = {}
            for msg in consumer.consume(100, min(WAIT_POLL, remaining)):
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if msg.error() is None and topic is not None and partition is not None and offset is not None:
                    rewind.setdefault((topic, partition), offset)
            for (topic, partition), offset in rewind.items():
                consumer.seek(TopicPartition(topic, partition, offset))

    def pause_all(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
        if assignment:
            consumer.pause(assignment)
        self.paused = True
        self.stats.set(PAUSED, 1)

    def resume(self, consumer: Consumer) -> None:
        unplaced = self.unplaced()
        placed = [tp for tp in consumer.assignment() if (tp.topic, tp.partition) not in unplaced]
        if placed:
            consumer.resume(placed)
        self.paused = False
        self.stats.set(PAUSED, 0)
        self.on_resume()
