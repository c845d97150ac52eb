"""Both daemons' /metrics, /live and /ready, scraped during a run with faults (real services).

The named metrics must move the way the pipeline does: counts and histograms as changes flow,
a held-back row while a source transaction stays open, the consumer paused with lag rising
while the destination is down and falling to zero after, a dead letter counted by outcome.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import connect, free_port, scalar, wait_until
from tests.support.consumer import consumer_env, produce
from tests.support.producer import insert_employees, producer_env

pytestmark = pytest.mark.daemon


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening (yet)
        return 0, str(exc)


class Scrape:
    """One /metrics page, parsed by prometheus_client's own parser (so it must be valid)."""

    def __init__(self, port: int) -> None:
        status, text = get(port, "/metrics")
        assert status == 200
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``; fails if none."""
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert found, f"no sample {name} {labels}"
        return sum(found)

    def samples_of(self, name: str) -> list[float]:
        return [s.value for s in self.samples if s.name == name]


def metric(port: int, name: str, **labels: str) -> float:
    return Scrape(port).value(name, **labels)


def no_lag(port: int, partitions: int) -> bool:
    lag = Scrape(port).samples_of("cdc_consumer_lag_messages")
    return len(lag) == partitions and sum(lag) == 0


def ready(port: int) -> tuple[bool, dict]:
    status, body = get(port, "/ready")
    return status == 200, json.loads(body) if status else {}


def test_metrics_move_with_the_pipeline_through_an_open_transaction_an_outage_and_a_dead_letter(
    private, local_services, producers, consumers
):
    s = private
    src, dst = s.source_db_url, s.dest_db_url
    pp, cp = free_port(), free_port()
    producer = producers.start(producer_env(s, PRODUCER_METRICS_PORT=pp, POLL_INTERVAL="0.2"))
    consumer = consumers.start(consumer_env(s, CONSUMER_METRICS_PORT=cp, RETRY_BACKOFF_MAX="2"))
    wait_until(lambda: get(pp, "/live")[0] == 200 and ready(pp)[0], 60, "the producer ready")
    wait_until(lambda: get(cp, "/live")[0] == 200 and ready(cp)[0], 60, "the consumer ready")
    assert get(cp, "/nowhere")[0] == 404

    # 1. Changes flow: counters, histograms, gauges.
    insert_employees(src, 500)
    wait_until(
        lambda: metric(cp, "cdc_consumer_events_total", outcome="applied", action="insert") == 500,
        60,
        "500 applied",
    )
    wait_until(lambda: no_lag(cp, s.topic_partitions), 30, "no lag, on every partition")
    p, c = Scrape(pp), Scrape(cp)
    assert p.value("cdc_producer_events_published_total") == 500
    assert p.value("cdc_producer_batches_total") >= 1
    assert p.value("cdc_producer_active") == 1
    assert p.value("cdc_producer_capture_to_ack_seconds_count") >= 1
    assert p.value("cdc_producer_batch_duration_seconds_count") == p.value("cdc_producer_batches_total")
    assert p.value("cdc_producer_delivery_errors_total") == 0
    assert p.value("cdc_build_info", component="producer") == 1
    assert p.value("process_resident_memory_bytes") > 10e6
    assert c.value("cdc_consumer_messages_consumed_total") == 500
    assert c.value("cdc_consumer_end_to_end_seconds_count") == 500
    assert c.value("cdc_consumer_end_to_end_seconds_bucket", le="+Inf") == 500
    assert c.value("cdc_consumer_batch_messages_sum") == 500
    assert c.value("cdc_consumer_assigned_partitions") == s.topic_partitions
    assert c.value("cdc_consumer_rebalances_total", event="assigned") >= 1
    assert c.value("cdc_consumer_db_connections_max") == s.db_pool_max
    assert c.value("cdc_consumer_paused") == 0
    assert c.value("cdc_ready", component="consumer") == 1
    wait_until(
        lambda: sum(Scrape(cp).samples_of("cdc_consumer_committed_offset")) == 500, 30, "offsets committed"
    )

    # 2. An open source transaction holds later rows back: the producer says so, then lets go.
    with connect(src) as holder, holder.cursor() as cur:
        cur.execute(
            "INSERT INTO employees (first_name, last_name, dob, city, salary) VALUES ('o', 'p', '1990-01-01', 'X', 1)"
        )
        insert_employees(src, 100)
        wait_until(lambda: metric(pp, "cdc_producer_held_back_rows") == 100, 30, "100 rows held back")
        wait_until(
            lambda: metric(pp, "cdc_producer_oldest_transaction_age_seconds") >= 1,
            30,
            "the open transaction's age",
        )
        assert metric(pp, "cdc_producer_held_back_seconds") > 0
        assert metric(pp, "cdc_producer_outbox_backlog_rows") == 100  # the open one is not visible yet
        holder.commit()
    wait_until(
        lambda: metric(pp, "cdc_producer_events_published_total") == 601, 30, "the held rows published"
    )
    wait_until(lambda: metric(pp, "cdc_producer_held_back_rows") == 0, 30, "nothing held back")
    assert metric(pp, "cdc_producer_oldest_transaction_age_seconds") < 1

    # 3. The destination goes down: the consumer pauses, says why, and its lag rises; then falls.
    wait_until(lambda: no_lag(cp, s.topic_partitions), 30, "no lag")
    old = local_services.dest.pid()
    local_services.dest.stop(mode="immediate")
    try:
        insert_employees(src, 200)
        wait_until(lambda: metric(cp, "cdc_consumer_paused") == 1, 60, "the consumer paused")
        wait_until(lambda: metric(cp, "cdc_consumer_lag_messages") > 0, 30, "lag")
        first = metric(cp, "cdc_consumer_lag_messages")
        insert_employees(src, 300)
        wait_until(lambda: metric(cp, "cdc_consumer_lag_messages") > first, 30, "lag rising")
        is_ready, body = ready(cp)
        assert not is_ready and "paused" in body["reason"], body
        assert metric(cp, "cdc_ready", component="consumer") == 0
        assert metric(cp, "cdc_consumer_transient_errors_total", kind="connection") >= 1
        assert get(cp, "/live")[0] == 200  # waiting out an outage is not being stuck
    finally:
        local_services.dest.start()
    assert local_services.dest.pid() != old
    wait_until(lambda: no_lag(cp, s.topic_partitions), 90, "the lag back to zero")
    wait_until(lambda: ready(cp)[0], 30, "the consumer ready again")
    c = Scrape(cp)
    assert c.value("cdc_consumer_paused") == 0
    assert c.value("cdc_consumer_retries_total") >= 1
    assert c.value("cdc_consumer_events_total", outcome="applied") == 1101
    assert c.value("cdc_consumer_events_total", outcome="dlq") == 0

    # 4. A dead letter is counted by its outcome.
    produce(s, [(b"1", b"not json")])
    wait_until(lambda: metric(cp, "cdc_consumer_events_total", outcome="dlq") == 1, 60, "one dead letter")

    for daemon in (producer, consumer):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert (
        scalar(dst, "SELECT count(*) FROM employees") == scalar(src, "SELECT count(*) FROM employees") == 1101
    )
