"""The consumer under ordinary operations that used to trip it: mixed good and bad batches and the
DLQ circuit breaker. Real broker, real destination PostgreSQL."""

from __future__ import annotations

import pytest
from consumer_helpers import Running, count_processed, event, fast, produce

from consumer_final import ProductionCDCConsumer

pytestmark = pytest.mark.integration


def _mixed(first_id: int, n: int, bad_every: int) -> list:
    """``n`` messages in which every ``bad_every``-th is garbage, the rest valid inserts."""
    return [
        (b"x", b"garbage") if i % bad_every == 0 else event(first_id + i, "INSERT", first_id + i)
        for i in range(n)
    ]


def test_breaker_counts_the_ratio_of_a_mixed_batch_not_where_its_failures_sit(settings, clean_dest):
    # Half of each batch fails: far below DLQ_BREAKER_RATIO=0.9 whatever the order in a batch.
    # The breaker once put a batch's failures at the end of its window, so a batch with 90 or
    # more bad messages among 500 tripped with the default window of 100.
    produce(settings, _mixed(1, 500, 2))
    consumer = ProductionCDCConsumer(settings=fast(settings))  # window 100, ratio 0.9, batch 500
    with Running(consumer) as r:
        r.wait_consumed(500)
    assert consumer.stats.get("dlq") == 250
    assert count_processed(clean_dest) == 250

    # A restart begins with an empty window and decides the same kind of data the same way.
    produce(settings, _mixed(1001, 500, 2))
    again = ProductionCDCConsumer(settings=fast(settings))
    with Running(again) as r:
        r.wait_consumed(500)
    assert again.stats.get("dlq") == 250
    assert count_processed(clean_dest) == 500
