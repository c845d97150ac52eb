"""The batch in flight: one batch applied in a worker thread while the consumer decodes the next.

At most one batch is in flight, so batches still commit in the order they were read. The
database call releases the GIL: decoding the next batch costs no time the database is busy.
A batch that failed stays here until the consumer takes it (to retry it, or to stop).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from cdc.runtime.stats import BATCH_LATENCY, BATCH_MESSAGES, E2E_LATENCY, Stats
from cdc.sink.batch import BatchApplier, BatchResult, Decoded
from cdc.sink.offsets import TP


@dataclass
class Flight:
    """The batch the worker thread is applying, and the assignment its messages were read in."""

    batch: Decoded
    epochs: dict[TP, int]
    done: Future[BatchResult]
    started: float


class InFlight:
    """The worker thread and the one batch it applies (``flight``, None when idle)."""

    def __init__(self, applier: BatchApplier, stats: Stats) -> None:
        self.applier = applier
        self.stats = stats
        self.flight: Flight | None = None
        self._worker: ThreadPoolExecutor | None = None

    def open(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdc-apply")

    def close(self) -> None:
        """Stop the worker thread (after the batch in flight, which the caller has taken)."""
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def start(self, batch: Decoded, epochs: dict[TP, int]) -> None:
        """Hand ``batch``, read in ``epochs``, to the worker thread (nothing is in flight)."""
        assert self._worker is not None and self.flight is None
        started = time.monotonic()
        self.flight = Flight(batch, epochs, self._worker.submit(self.apply, batch, started), started)

    def finished(self) -> bool:
        """Whether a batch is in flight and done (committed or failed)."""
        return self.flight is not None and self.flight.done.done()

    def take_committed(self) -> Flight | None:
        """Wait for the batch in flight; if it committed, take it (None: nothing, or it failed).

        A failed one stays for ``take`` (a rebalance callback cannot wait out a transient error:
        that polls the consumer).
        """
        flight = self.flight
        if flight is None or flight.done.exception() is not None:
            return None
        self.flight = None
        return flight

    def take(self) -> Flight | None:
        """Take the batch in flight, whatever became of it."""
        flight, self.flight = self.flight, None
        return flight

    def apply(self, batch: Decoded, started: float) -> BatchResult:
        """Decide and commit ``batch`` (in the worker thread, or in the loop for a retry).

        ``started``: when its first attempt started, for the batch latency.
        """
        result = self.applier.apply_decoded(batch)
        self.stats.observe(BATCH_LATENCY, time.monotonic() - started)
        self.stats.observe(BATCH_MESSAGES, len(batch.records))
        now = datetime.now(UTC)
        self.stats.observe_many(
            E2E_LATENCY,
            [
                (now - ev.captured_at).total_seconds()
                for ev in result.decided_events()
                if ev.captured_at is not None
            ],
        )
        return result
