"""The dashboard on the running pipeline: the real daemons under a workload with a dead letter and a
destination outage, scraped every second by a real Prometheus; every PromQL expression of the
dashboard, sent to its HTTP API, returns data, and the alerts that should be pending are."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from confluent_kafka import Producer

from cdc.errors import CDCError
from cdc.kafka.client import base_config
from cdc.local.prometheus import PrometheusServer
from cdc.local.runner import Daemon
from cdc.local.services import LocalServices
from cdc.ops.workload import Workload
from cdc.runtime.settings import Settings
from tests.support import dlq_count, free_ports, wait_until
from tests.support.monitoring import (
    DASHBOARD,
    GRAFANA_VARIABLES,
    alert_states,
    api,
    dashboard_queries,
    instant,
    value,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.daemon]


POISON = [b"not json at all", b'{"action_id": "x"}']


def test_every_dashboard_query_returns_data_from_the_running_pipeline(
    local_services: LocalServices, private: Settings, tmp_path: Path
):
    settings = private
    prometheus_port, producer_port, consumer_port = free_ports(3)
    server = PrometheusServer(
        home=tmp_path,
        port=prometheus_port,
        targets={
            "cdc-producer": [f"127.0.0.1:{producer_port}"],
            "cdc-consumer": [f"127.0.0.1:{consumer_port}"],
        },
        scrape_interval="1s",
    )
    # Each daemon finds its port as `make up`'s .env gives it.
    producer = Daemon("producer.py", settings, tmp_path / "producer", PRODUCER_METRICS_PORT=producer_port)
    consumer = Daemon(
        "consumer_final.py", settings, tmp_path / "consumer", CONSUMER_METRICS_PORT=consumer_port
    )
    workload = Workload(settings.source_db_url, rate=150, writers=2, seed=9)
    try:
        server.start()
        producer.start()
        consumer.start()
        workload.start()
        wait_until(
            lambda: value(server, 'count(up{job=~"cdc-producer|cdc-consumer"} == 1)') == 2,
            60,
            "Prometheus scraping both daemons",
        )
        wait_until(lambda: value(server, "sum(cdc_consumer_events_total)") > 0, 60, "events applied")

        # A dead letter: messages no decoder accepts.
        kafka = Producer(base_config(settings))
        for i, poison in enumerate(POISON):
            kafka.produce(settings.cdc_topic, key=str(i).encode(), value=poison)
        assert kafka.flush(30) == 0
        wait_until(lambda: dlq_count(settings) == len(POISON), 60, "the poison on the DLQ")
        wait_until(
            lambda: value(server, 'sum(cdc_consumer_events_total{outcome="dlq"})') == len(POISON),
            30,
            "the dead letters in Prometheus",
        )
        wait_until(lambda: "CDCDeadLetters" in alert_states(server), 30, "CDCDeadLetters pending")

        # A destination outage: the consumer pauses, retries, counts transient errors.
        local_services.dest.stop("fast")
        try:
            wait_until(lambda: value(server, "max(cdc_consumer_paused)") == 1, 60, "the consumer paused")
            wait_until(lambda: "CDCConsumerPaused" in alert_states(server), 30, "CDCConsumerPaused pending")
        finally:
            local_services.dest.start()
        wait_until(lambda: value(server, "max(cdc_consumer_paused)") == 0, 90, "the consumer resumed")
        wait_until(
            lambda: value(server, "sum(rate(cdc_consumer_events_total[10s]))") > 0, 60, "events applied again"
        )

        # Every query of the dashboard, as Grafana would send it, while the load runs.
        queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
        empty = []
        for title, expr in queries:
            for name, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, replacement)
            assert "$" not in expr, f"{title}: a variable Grafana would not fill: {expr}"
            result = instant(server, expr)
            numbers = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(n) for n in numbers):
                empty.append(f"{title}: {expr} -> {numbers or 'no series'}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The rules run on the real series; nothing is wrong with the producer or the daemons.
        rules = [r for g in api(server, "rules")["groups"] for r in g["rules"]]
        assert {r["health"] for r in rules} == {"ok"}, rules
        states = alert_states(server)
        assert "CDCNoActiveProducer" not in states and "CDCDaemonDown" not in states, states
        workload.stop()
        assert producer.stop() == 0 and consumer.stop() == 0
    finally:
        with contextlib.suppress(CDCError):  # already stopped, or the failure being reported
            workload.stop()
        producer.kill()
        consumer.kill()
        server.stop()
        if not local_services.dest.running():
            local_services.dest.start()
