"""Consumer lag, measured beside the consumer: the group's committed offsets against the log end.

A thread asks the brokers every LAG_REFRESH seconds, for the partitions this consumer owns, so
lag keeps moving while the consumer waits out a destination outage (its partitions paused) and
the consume loop never waits for these requests. It uses a consumer handle of its own that
never subscribes (so never joins the group): ``committed()`` reads the group's offsets and
``get_watermark_offsets()`` the log end. Not the admin API: librdkafka 2.x can abort the process
on a coordinator-bound admin request whose broker disconnects (confluentinc/librdkafka#5397),
which a broker restart does.

Each turn also serves the probe's own event queue (``poll(0)``): the handle never consumes, and
librdkafka queues an error event for it at every failed connection attempt, which nothing else
reads. Unserved, they pile up with every broker outage (the consumer's memory grows); served,
the handle stays flat.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from cdc.kafka.client import base_config
from cdc.runtime.settings import Settings
from cdc.runtime.stats import COMMITTED, LAG, Stats

log = logging.getLogger(__name__)

LAG_REFRESH = 2.0
REQUEST_TIMEOUT = 5.0

TP = tuple[str, int]


class LagWatch:
    """Sets the ``lag`` and ``committed`` gauges ({(topic, partition): n}) of ``stats``."""

    def __init__(self, settings: Settings, stats: Stats, owned: Callable[[], set[TP]]) -> None:
        self.settings = settings
        self.stats = stats
        self.owned = owned
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe: Consumer | None = None
        self.errors = 0  # errors the probe's queue reported (a broker away), served by each turn

    def start(self) -> None:
        self._probe = Consumer(
            {
                **base_config(self.settings),
                "group.id": self.settings.consumer_group_id,
                "client.id": f"cdc-lag-{self.settings.consumer_group_id}",
                "enable.auto.commit": False,
                "error_cb": self._on_error,
            },
            logger=logging.getLogger("consumer.kafka.lag"),
        )
        self._thread = threading.Thread(target=self._run, name="cdc-lag", daemon=True)
        self._thread.start()

    def _on_error(self, err: KafkaError) -> None:
        self.errors += 1
        log.debug("lag probe: %s", err.str())

    def poke(self) -> None:
        """Measure now (the partitions changed), not at the next turn."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # One request in flight at most; a thread still stuck in one keeps the handle.
            thread.join(REQUEST_TIMEOUT + 1)
            if thread.is_alive():
                return
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _run(self) -> None:
        while True:
            self._wake.wait(LAG_REFRESH)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                assert self._probe is not None
                self._probe.poll(0)  # serve its queued events: see the module docstring
                self.refresh()
            except KafkaException as exc:  # a broker is away: keep the last figures
                log.debug("lag not measured: %s", exc)

    def refresh(self) -> None:
        assert self._probe is not None
        owned = sorted(self.owned())
        committed: dict[TP, int] = {}
        if owned:
            asked = self._probe.committed([TopicPartition(t, p) for t, p in owned], timeout=REQUEST_TIMEOUT)
            committed = {(tp.topic, tp.partition): tp.offset for tp in asked if tp.offset >= 0}
        lag = {}
        for topic, partition in owned:
            if self._stop.is_set():
                return
            low, high = self._probe.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=REQUEST_TIMEOUT, cached=False
            )
            # Nothing committed yet: the group starts at the log start (auto.offset.reset=earliest).
            lag[(topic, partition)] = max(0, high - committed.get((topic, partition), low))
        self.stats.set(LAG, lag)
        self.stats.set(COMMITTED, committed)
