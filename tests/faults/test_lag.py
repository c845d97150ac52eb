"""The consumer's lag probe (cdc.kafka.lag) on a real broker, through a broker hard kill.

The probe's own event queue is served (librdkafka queues an error event at every failed
connection attempt for a handle that never consumes; unread, they would grow the consumer's memory
with every broker outage), and it measures again after the outage.
"""

from __future__ import annotations

from cdc.kafka.client import admin_client, ensure_topics
from cdc.kafka.lag import LagWatch
from cdc.runtime.stats import Stats
from tests.support import wait_until
from tests.support.consumer import produce


def total_lag(stats: Stats) -> int | None:
    lag = stats.get("lag")
    return sum(lag.values()) if lag else None


def test_the_lag_probe_serves_its_errors_through_a_broker_outage_and_measures_again(private, local_services):
    s = private
    ensure_topics(s, admin_client(s))
    owned = {(s.cdc_topic, p) for p in range(s.topic_partitions)}
    produce(s, [(str(i).encode(), b"{}") for i in range(100)])
    stats = Stats("consumer")
    watch = LagWatch(s, stats, lambda: owned)
    watch.start()
    try:
        wait_until(lambda: total_lag(stats) == 100, 30, "the lag of 100 unread messages")
        assert watch.errors == 0

        old = local_services.kafka.pid()
        local_services.kafka.stop(hard=True)
        wait_until(lambda: watch.errors >= 1, 60, "the probe's queued connection errors to be served")
        local_services.kafka.start()
        assert local_services.kafka.pid() != old

        produce(s, [(str(i).encode(), b"{}") for i in range(50)])
        wait_until(lambda: total_lag(stats) == 150, 60, "the new probe to measure the 50 more")
    finally:
        watch.stop()
    assert watch._probe is None
