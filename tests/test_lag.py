"""The consumer's lag probe (cdc/lag.py) on a real broker, through a broker hard kill.

The probe's own event queue is served (librdkafka queues an error event at every failed
connection attempt for a handle that never consumes; unread, they grew the consumer's RSS with
every broker hard restart), and it measures again after the outage.
"""

from __future__ import annotations

import time

import pytest
from consumer_helpers import produce
from support import wait_until

from cdc.kafka.client import admin_client, ensure_topics
from cdc.kafka.lag import LagWatch
from cdc.runtime.stats import Stats

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def total_lag(stats: Stats) -> int | None:
    lag = stats.get("lag")
    return sum(lag.values()) if lag else None


def test_the_lag_probe_serves_its_errors_through_a_broker_outage_and_measures_again(
    private_settings, local_services
):
    s = private_settings
    ensure_topics(s, admin_client(s))
    owned = {(s.cdc_topic, p) for p in range(s.topic_partitions)}
    produce(s, [(str(i).encode(), b"{}") for i in range(100)])
    stats = Stats("consumer")
    watch = LagWatch(s, stats, lambda: owned)
    watch.start()
    try:
        wait_until(lambda: total_lag(stats) == 100, 30, "the lag of 100 unread messages")
        assert watch.errors == 0

        local_services.kafka.stop(hard=True)
        time.sleep(3)
        local_services.kafka.start()
        wait_until(lambda: watch.errors >= 1, 60, "the probe's queued connection errors to be served")

        produce(s, [(str(i).encode(), b"{}") for i in range(50)])
        wait_until(lambda: total_lag(stats) == 150, 60, "the new probe to measure the 50 more")
    finally:
        watch.stop()
        local_services.up()
    assert watch._probe is None
