"""The exposition of a Stats object (no services): names, labels, histogram buckets, parsing."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cdc.runtime.metrics import CONSUMER, PRODUCER, Histogram, MetricsServer, histograms
from cdc.runtime.stats import Stats


def exposition(component: str, stats: Stats, spec) -> dict[tuple[str, tuple], float]:
    server = MetricsServer(component, stats, spec, port=0)
    status = []
    text = b"".join(server.app({"PATH_INFO": "/metrics"}, lambda code, headers: status.append(code))).decode()
    assert status == ["200 OK"]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_consumer_counters_by_outcome_and_kind_and_lag_per_partition():
    stats = Stats("consumer", histograms(CONSUMER))
    stats.incr("consumed", 7)
    stats.incr("applied_insert", 3)
    stats.incr("stale", 2)
    stats.incr("transient_connection", 4)
    stats.set("lag", {("t", 0): 5, ("t", 1): 0})
    stats.observe_many("e2e_latency", [0.001, 0.004, 0.2, 100.0])
    m = exposition("consumer", stats, CONSUMER)
    assert m[("cdc_consumer_messages_consumed_total", ())] == 7
    assert m[("cdc_consumer_events_total", (("action", "insert"), ("outcome", "applied")))] == 3
    assert m[("cdc_consumer_events_total", (("action", ""), ("outcome", "stale")))] == 2
    assert m[("cdc_consumer_events_total", (("action", ""), ("outcome", "dlq")))] == 0
    assert m[("cdc_consumer_transient_errors_total", (("kind", "connection"),))] == 4
    # Kinds not seen yet are served at 0 (else rate() would miss the first one).
    assert m[("cdc_consumer_transient_errors_total", (("kind", "conflict"),))] == 0
    assert m[("cdc_consumer_rebalances_total", (("event", "lost"),))] == 0
    assert m[("cdc_consumer_lag_messages", (("partition", "0"), ("topic", "t")))] == 5
    # Buckets are cumulative and "le" is inclusive: 0.001 falls in le=0.001.
    assert m[("cdc_consumer_end_to_end_seconds_bucket", (("le", "0.001"),))] == 1
    assert m[("cdc_consumer_end_to_end_seconds_bucket", (("le", "0.005"),))] == 2
    assert m[("cdc_consumer_end_to_end_seconds_bucket", (("le", "60.0"),))] == 3
    assert m[("cdc_consumer_end_to_end_seconds_bucket", (("le", "+Inf"),))] == 4
    assert m[("cdc_consumer_end_to_end_seconds_count", ())] == 4
    assert abs(m[("cdc_consumer_end_to_end_seconds_sum", ())] - 100.205) < 1e-9
    assert m[("cdc_ready", (("component", "consumer"),))] == 1
    assert ("process_resident_memory_bytes", ()) in m


def test_every_producer_metric_is_served_before_anything_happened():
    stats = Stats("producer", histograms(PRODUCER))
    m = exposition("producer", stats, PRODUCER)
    names = {name for name, _ in m}
    for spec in PRODUCER:
        base = f"cdc_producer_{spec.name}"
        want = f"{base}_count" if isinstance(spec, Histogram) else base
        assert want in names or f"{base}_total" in names, base


def test_gauges_may_be_read_when_scraped():
    stats = Stats("consumer", histograms(CONSUMER))
    in_use = [0]
    stats.set("db_in_use", lambda: in_use[0])
    in_use[0] = 3
    assert exposition("consumer", stats, CONSUMER)[("cdc_consumer_db_connections_in_use", ())] == 3
