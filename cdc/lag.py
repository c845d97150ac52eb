"""Consumer lag, measured beside the consumer: the group's committed offsets against the log end.

A thread with an admin client of its own asks the brokers every LAG_REFRESH seconds, for the
partitions this consumer owns: lag keeps moving while the consumer waits out a destination
outage (its partitions paused), and the consume loop never waits for these requests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from cdc.kafka import admin_client
from cdc.settings import Settings
from cdc.stats import Stats

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
        self._admin = None

    def start(self) -> None:
        self._admin = admin_client(self.settings, logger=logging.getLogger("consumer.kafka.lag"))
        self._thread = threading.Thread(target=self._run, name="cdc-lag", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Measure now (the partitions changed), not at the next turn."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT + 1)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait(LAG_REFRESH)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except KafkaException as exc:  # the broker is away: keep the last figures
                log.debug("lag not measured: %s", exc)

    def refresh(self) -> None:
        owned = sorted(self.owned())
        if not owned:
            self.stats.set("lag", {})
            self.stats.set("committed", {})
            return
        tps = [TopicPartition(t, p) for t, p in owned]
        group = self.settings.consumer_group_id
        committed_f = self._admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, tps)], request_timeout=REQUEST_TIMEOUT
        )[group]
        ends = self._offsets(tps, OffsetSpec.latest())
        committed = {(tp.topic, tp.partition): tp.offset for tp in committed_f.result().topic_partitions}
        committed = {key: o for key, o in committed.items() if o >= 0}  # negative: none yet
        start = dict(committed)
        if len(committed) < len(ends):
            # Nothing committed yet: the group starts at the log start (auto.offset.reset=earliest).
            start = {**self._offsets(tps, OffsetSpec.earliest()), **committed}
        self.stats.set("lag", {key: max(0, end - start.get(key, end)) for key, end in ends.items()})
        self.stats.set("committed", committed)

    def _offsets(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[TP, int]:
        futures = self._admin.list_offsets({tp: spec for tp in tps}, request_timeout=REQUEST_TIMEOUT)
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
