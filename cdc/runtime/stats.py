"""One stats object per daemon: it feeds the periodic log line, /metrics and the final report."""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Latency samples kept per series for percentiles: recent enough to move, big enough for p99.
LATENCY_WINDOW = 10_000

# -- the daemons' keys ---------------------------------------------------------------------------
# Every counter, gauge and series a daemon keeps is named here once: a typo is a NameError, not a
# new key. The log lines print these names; cdc.runtime.metrics maps them to the Prometheus names.

# Both daemons.
BATCHES = "batches"  # counter: batches done (published; committed to the destination)
RETRIES = "retries"  # counter: retries after a transient error (consumer: also of a bad message)

# The producer (cdc.source.daemon).
PUBLISHED = "published"  # counter: events published and acknowledged
INVALID = "invalid"  # counter: outbox rows that fail validation, published for the consumer to dead-letter
DELIVERY_ERRORS = "delivery_errors"  # counter: batches whose delivery failed
PRUNED = "pruned"  # counter: published outbox rows deleted
ACTIVE = "active"  # gauge: 1 while this producer holds the lock
BACKLOG = "backlog"  # gauge: outbox rows after the cursor
HELD_BACK = "held_back"  # gauge: committed rows behind an open transaction
HELD_BACK_S = "held_back_s"  # gauge: how long the oldest held-back row has waited
OLDEST_XACT_S = "oldest_xact_s"  # gauge: age of the oldest source transaction holding an xid
CURSOR_TXID = "cursor_txid"  # gauge
CURSOR_ACTION_ID = "cursor_action_id"  # gauge
BATCH_DURATION = "batch_duration"  # series: fetch, publish, acknowledge, store the cursor
CAPTURE_TO_ACK = "capture_to_ack"  # series: captured_at to broker acknowledgement, sampled

# The consumer (cdc.sink).
CONSUMED = "consumed"  # counter: messages read and decided
APPLIED = "applied_"  # counters: + the action in lower case, events applied
DUPLICATES = "duplicates"  # counter
STALE = "stale"  # counter
DLQ = "dlq"  # counter: dead letters sent
TRANSIENT = "transient_"  # counters: + the kind of transient error (TransientError.kind, or below)
TRANSIENT_DLQ = TRANSIENT + "dlq"
TRANSIENT_OFFSET_COMMIT = TRANSIENT + "offset_commit"
REBALANCE = "rebalance_"  # counters: + the event
REBALANCE_ASSIGNED = REBALANCE + "assigned"
REBALANCE_REVOKED = REBALANCE + "revoked"
REBALANCE_LOST = REBALANCE + "lost"
ASSIGNED = "assigned"  # gauge: partitions assigned
PAUSED = "paused"  # gauge: 1 while the partitions are paused
DB_IN_USE = "db_in_use"  # gauge: pool connections checked out
DB_MAX = "db_max"  # gauge: pool size limit
LAG = "lag"  # gauge: {(topic, partition): messages behind}
COMMITTED = "committed"  # gauge: {(topic, partition): committed offset}
HELD = "held"  # gauge: partitions held by a gap in the topic (or waiting for their start)
DRIFTED = (
    "drifted"  # gauge: {(table,): 1} of each table held because its destination differs from its changes
)
GAP = "gap"  # gauge: {(topic, partition): messages missing} of each partition held by a gap
POSITION = "position_"  # counters: + how a partition's start was decided (below)
POSITION_GAP = POSITION + "gap"  # a gap found: the partition is held
POSITION_GAP_ACCEPTED = POSITION + "gap_accepted"  # the operator accepted a gap: resumed after it
POSITION_RECREATED = POSITION + "recreated"  # a recreated topic: started from its beginning
POSITION_TRUNCATED = POSITION + "truncated"  # the log ended below the destination's position
BATCH_LATENCY = "batch_latency"  # series: one batch decided and committed
BATCH_MESSAGES = "batch_messages"  # series: messages per batch
E2E_LATENCY = "e2e_latency"  # series: captured_at to destination commit, per event


TABLE_EVENTS = "table_events:"  # counters: + outcome, NUL, table: events decided per table


def table_events_key(outcome: str, table: str) -> str:
    """The counter of ``outcome`` (applied, stale, duplicate, dlq) for ``table``."""
    return f"{TABLE_EVENTS}{outcome}\0{table}"


def p50(key: str) -> str:
    """The ``get_stats`` key of a series' median, in milliseconds."""
    return f"{key}_p50_ms"


def p99(key: str) -> str:
    """The ``get_stats`` key of a series' 99th percentile, in milliseconds."""
    return f"{key}_p99_ms"


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


@dataclass
class Buckets:
    """A histogram's state: observations per bucket (not cumulative; the last is +Inf), and their sum."""

    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    @classmethod
    def of(cls, bounds: Sequence[float]) -> Buckets:
        return cls(tuple(bounds), [0] * (len(bounds) + 1))

    def add(self, values: Iterable[float]) -> None:
        """Count a batch of values: one sort and a bisection per bound, no Python loop per value."""
        ordered = sorted(values)
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(ordered, bound)  # values <= bound: Prometheus' "le"
            self.counts[i] += upto - below
            below = upto
        self.counts[-1] += len(ordered) - below
        self.total += sum(ordered)

    def copy(self) -> Buckets:
        return Buckets(self.bounds, list(self.counts), self.total)


@dataclass(frozen=True)
class Snapshot:
    """Everything a Stats holds, copied at one instant (for /metrics)."""

    counters: dict[str, int]
    gauges: dict[str, Any]
    histograms: dict[str, Buckets]


def _read(gauges: dict[str, Any]) -> dict[str, Any]:
    """Gauge values, functions called (outside the lock: they may take their own)."""
    return {key: value() if callable(value) else value for key, value in gauges.items()}


class Stats:
    """Counters (only go up), gauges (current values) and latency series, thread-safe.

    ``histograms`` names the series (``observe`` keys) that also keep Prometheus buckets, with
    their upper bounds; every series keeps a window of recent values for the log line's p50/p99.
    """

    def __init__(self, name: str, histograms: Mapping[str, Sequence[float]] | None = None) -> None:
        self.name = name
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._gauges: dict[str, Any] = {}
        self._latency: dict[str, deque[float]] = {}
        self._buckets = {key: Buckets.of(bounds) for key, bounds in (histograms or {}).items()}
        self._last_line: str | None = None
        self._last_log = time.monotonic()
        self._last_count = 0
        self._last_count_at = time.monotonic()

    def incr(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def set(self, key: str, value: Any) -> None:
        """A gauge: a number, a dict of them ({(topic, partition): n}), or a function read when reported."""
        with self._lock:
            self._gauges[key] = value

    def observe(self, key: str, seconds: float) -> None:
        self.observe_many(key, (seconds,))

    def observe_many(self, key: str, seconds: Sequence[float]) -> None:
        """Record a batch of observations at once (one lock, not one per event)."""
        with self._lock:
            self._latency.setdefault(key, deque(maxlen=LATENCY_WINDOW)).extend(seconds)
            buckets = self._buckets.get(key)
            if buckets is not None:
                buckets.add(seconds)

    def snapshot(self) -> Snapshot:
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
            buckets = {key: b.copy() for key, b in self._buckets.items()}
        return Snapshot(counters, _read(gauges), buckets)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._counters[key] if key in self._counters else self._gauges.get(key, 0)

    def get_stats(self) -> dict[str, Any]:
        """Counters, gauges, and p50/p99 (milliseconds) of every latency series."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            gauges = dict(self._gauges)
            latency = {key: list(values) for key, values in self._latency.items()}
        for key, value in _read(gauges).items():
            if isinstance(value, dict):  # per partition: {(topic, partition): n}, JSON-friendly keys
                value = {
                    "/".join(map(str, k)) if isinstance(k, tuple) else str(k): v for k, v in value.items()
                }
            out[key] = value
        for key, values in latency.items():
            values.sort()
            out[p50(key)] = round(_percentile(values, 0.50) * 1000, 1)
            out[p99(key)] = round(_percentile(values, 0.99) * 1000, 1)
        out["uptime_s"] = round(time.monotonic() - self.started, 1)
        return out

    def rate(self, key: str) -> float:
        """Per-second rate of counter ``key`` since the previous call."""
        now = time.monotonic()
        with self._lock:
            count = self._counters[key]
            elapsed = now - self._last_count_at
            value = (count - self._last_count) / elapsed if elapsed > 0 else 0.0
            self._last_count, self._last_count_at = count, now
        return value

    def line(self, keys: list[str], extra: dict[str, Any] | None = None) -> str:
        stats = self.get_stats()
        parts = [f"{k}={stats.get(k, 0)}" for k in keys]
        parts += [f"{k}={v}" for k, v in (extra or {}).items()]
        return " ".join(parts)

    def log_if_due(self, logger: logging.Logger, interval: float, keys: list[str], rate_key: str) -> None:
        """Log one stats line every ``interval`` seconds, only when something changed (arq style)."""
        now = time.monotonic()
        if now - self._last_log < interval:
            return
        self._last_log = now
        text = self.line(keys)
        if text == self._last_line:
            return
        self._last_line = text
        logger.info("stats %s rate=%.1f/s", text, self.rate(rate_key))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
