"""The daemons' HTTP endpoint (METRICS_HOST:PORT): /metrics for Prometheus, /live, /ready, /health.

Each daemon counts into its ``Stats`` (which also feeds the log lines); at scrape time a
collector turns one snapshot of it into Prometheus metric families named after the spec below
(``cdc_`` prefix, base units, ``_total`` counters, labels rather than name variants), next to
prometheus_client's process, platform and GC collectors. Nothing on the hot path knows about
Prometheus: a batch costs one lock per series, as before.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from cdc import __version__
from cdc.errors import ConfigError
from cdc.runtime import stats as k
from cdc.runtime.stats import Buckets, Snapshot, Stats

log = logging.getLogger(__name__)

# Seconds: from 1 ms (a quiet pipeline) to a minute (an outage being waited out).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)

# /live fails when the daemon's loop has not turned for this long (it turns at least every few
# seconds, waits and backoffs included).
LIVE_AFTER = 60.0


@dataclass(frozen=True)
class Counter:
    """``cdc_<component>_<name>_total`` from the Stats counters: one key, or (key, labels) pairs."""

    name: str
    help: str
    keys: Sequence[str | tuple[str, dict[str, str]]]
    labels: Sequence[str] = ()
    # Every counter key starting with this prefix: the rest of the key is the value of labels[0]
    # (of several labels: their values joined by NUL).
    prefix: str | None = None
    # With a prefix: the label values served (at 0) before they first happen, so that rate() and
    # increase() count the first one too.
    known: Sequence[str] = ()


@dataclass(frozen=True)
class Gauge:
    """A Stats gauge. A dict value {(topic, partition): n} becomes one sample per partition."""

    name: str
    help: str
    key: str
    labels: Sequence[str] = ()


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    key: str
    buckets: Sequence[float] = LATENCY_BUCKETS


Spec = Sequence[Counter | Gauge | Histogram]


def histograms(spec: Spec) -> dict[str, Sequence[float]]:
    """The ``histograms`` argument of ``Stats`` for a spec."""
    return {m.key: m.buckets for m in spec if isinstance(m, Histogram)}


PRODUCER: Spec = (
    Counter("events_published", "Events published to the CDC topic and acknowledged", [k.PUBLISHED]),
    Counter("batches", "Batches published (fetch, publish, acknowledge, store the cursor)", [k.BATCHES]),
    Counter(
        "invalid_rows",
        "Outbox rows that fail validation, published for the consumer to dead-letter",
        [k.INVALID],
    ),
    Counter(
        "delivery_errors",
        "Batches whose delivery to Kafka failed (retried; the cursor did not move)",
        [k.DELIVERY_ERRORS],
    ),
    Counter("retries", "Batch retries after a transient error (source or Kafka)", [k.RETRIES]),
    Counter("rows_pruned", "Published outbox rows deleted (CDC_PRUNE)", [k.PRUNED]),
    Gauge("active", "1 while this producer holds the lock and publishes, 0 as a standby", k.ACTIVE),
    Gauge("outbox_backlog_rows", "Outbox rows after the cursor, readable or not", k.BACKLOG),
    Gauge(
        "held_back_rows", "Committed outbox rows behind an open transaction (the xid horizon)", k.HELD_BACK
    ),
    Gauge("held_back_seconds", "How long the oldest held-back row has waited (0 when none)", k.HELD_BACK_S),
    Gauge(
        "oldest_transaction_age_seconds",
        "Age of the oldest source transaction holding an xid, open or prepared (0 when none)",
        k.OLDEST_XACT_S,
    ),
    Gauge("cursor_txid", "txid of the last published row", k.CURSOR_TXID),
    Gauge("cursor_action_id", "action_id of the last published row", k.CURSOR_ACTION_ID),
    Histogram(
        "batch_duration_seconds", "One batch: fetch, publish, acknowledged, cursor stored", k.BATCH_DURATION
    ),
    Histogram(
        "capture_to_ack_seconds",
        "Source capture (captured_at) to broker acknowledgement, sampled",
        k.CAPTURE_TO_ACK,
    ),
)

_EVENTS = [
    *(
        (k.APPLIED + a, {"outcome": "applied", "action": a})
        for a in ("insert", "update", "delete", "snapshot")
    ),
    *(
        (key, {"outcome": outcome, "action": ""})
        for key, outcome in ((k.DUPLICATES, "duplicate"), (k.STALE, "stale"), (k.DLQ, "dlq"))
    ),
]
CONSUMER: Spec = (
    Counter("messages_consumed", "Messages read from the CDC topic and decided", [k.CONSUMED]),
    Counter(
        "events",
        "Events decided, by outcome (and action, when applied)",
        _EVENTS,
        labels=("outcome", "action"),
    ),
    Counter(
        "table_events",
        "Events decided per replicated table, by outcome (applied, stale, duplicate, dlq)",
        (),
        labels=("outcome", "table"),
        prefix=k.TABLE_EVENTS,
    ),
    Counter("batches", "Batches committed to the destination", [k.BATCHES]),
    Counter("retries", "Batch retries after a transient error", [k.RETRIES]),
    Counter(
        "transient_errors",
        "Transient errors by kind (each rolls back and retries, or retries a commit)",
        (),
        labels=("kind",),
        prefix=k.TRANSIENT,
        known=("connection", "conflict", "failover", "server", "dlq", "offset_commit", "other"),
    ),
    Counter(
        "rebalances",
        "Group rebalance events seen by this consumer",
        (),
        labels=("event",),
        prefix=k.REBALANCE,
        known=("assigned", "revoked", "lost"),
    ),
    Gauge(
        "lag_messages",
        "High watermark minus the group's committed offset, per owned partition",
        k.LAG,
        ("topic", "partition"),
    ),
    Gauge(
        "committed_offset",
        "The group's committed offset, per owned partition",
        k.COMMITTED,
        ("topic", "partition"),
    ),
    Gauge("assigned_partitions", "Partitions assigned to this consumer", k.ASSIGNED),
    Gauge(
        "held_partitions",
        "Partitions not consumed: held by a gap in the topic, or waiting until their start can be read",
        k.HELD,
    ),
    Gauge(
        "drifted_tables",
        "Tables whose changes are held because the destination table differs from them (missing, a "
        "column missing or generated, another primary key, no grant); 1 per held table",
        k.DRIFTED,
        ("table",),
    ),
    Gauge(
        "gap_messages",
        "Messages removed from the topic before the destination applied them, per held partition",
        k.GAP,
        ("topic", "partition"),
    ),
    Counter(
        "position_events",
        "Partition starts decided from the destination's applied offsets, by what was found",
        (),
        labels=("event",),
        prefix=k.POSITION,
        known=("gap", "gap_accepted", "recreated", "truncated"),
    ),
    Gauge("paused", "1 while the partitions are paused, waiting out an outage", k.PAUSED),
    Gauge("db_connections_in_use", "Destination pool connections checked out", k.DB_IN_USE),
    Gauge("db_connections_max", "Destination pool size limit (DB_POOL_MAX)", k.DB_MAX),
    Histogram(
        "batch_duration_seconds", "One batch decided and committed (retries included)", k.BATCH_LATENCY
    ),
    Histogram("batch_messages", "Messages per batch", k.BATCH_MESSAGES, BATCH_SIZE_BUCKETS),
    Histogram(
        "end_to_end_seconds", "Source capture (captured_at) to destination commit, per event", k.E2E_LATENCY
    ),
)


class StatsCollector:
    """Builds the metric families of ``spec`` from a Stats snapshot at each scrape."""

    def __init__(
        self, component: str, stats: Stats, spec: Spec, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        self.component = component
        self.stats = stats
        self.spec = spec
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        snap = self.stats.snapshot()
        prefix = f"cdc_{self.component}_"
        info = GaugeMetricFamily(
            "cdc_build_info",
            "Version of the pipeline and of Python",
            labels=["component", "version", "python"],
        )
        info.add_metric([self.component, __version__, platform.python_version()], 1)
        yield info
        ready = GaugeMetricFamily(
            "cdc_ready", "1 when the daemon is ready (see /ready)", labels=["component"]
        )
        ready.add_metric([self.component], 1 if self.ready()[0] else 0)
        yield ready
        for metric in self.spec:
            if isinstance(metric, Counter):
                yield _counter(prefix + metric.name, metric, snap)
            elif isinstance(metric, Gauge):
                yield _gauge(prefix + metric.name, metric, snap)
            else:
                yield _histogram(prefix + metric.name, metric, snap.histograms[metric.key])


def _counter(name: str, metric: Counter, snap: Snapshot) -> Metric:
    family = CounterMetricFamily(name, metric.help, labels=list(metric.labels))
    if metric.prefix is not None:
        values = dict.fromkeys(metric.known, 0)
        for key, value in snap.counters.items():
            if key.startswith(metric.prefix):
                values[key[len(metric.prefix) :]] = value
        for label, value in sorted(values.items()):
            family.add_metric(label.split("\0") if len(metric.labels) > 1 else [label], value)
        return family
    for entry in metric.keys:
        key, labels = (entry, {}) if isinstance(entry, str) else entry
        family.add_metric([labels[label] for label in metric.labels], snap.counters.get(key, 0))
    return family


def _gauge(name: str, metric: Gauge, snap: Snapshot) -> Metric:
    family = GaugeMetricFamily(name, metric.help, labels=list(metric.labels))
    value = snap.gauges.get(metric.key, {} if metric.labels else 0)
    if isinstance(value, dict):
        for labels, v in sorted(value.items()):
            family.add_metric([str(part) for part in labels], v)
    else:
        family.add_metric([], float(value))
    return family


def _histogram(name: str, metric: Histogram, buckets: Buckets) -> Metric:
    family = HistogramMetricFamily(name, metric.help)
    cumulative, running = [], 0
    for bound, count in zip([*map(_le, buckets.bounds), "+Inf"], buckets.counts, strict=True):
        running += count
        cumulative.append((bound, running))
    family.add_metric([], cumulative, sum_value=buckets.total)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Probe:
    """What /live and /ready report: the loop's last turn, and why the daemon is not ready."""

    not_ready: str | None = "starting"
    _beat: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        """The daemon's loop turned (call it from every loop and wait, not from other threads)."""
        self._beat = time.monotonic()

    def set_ready(self, reason_not: str | None) -> None:
        """None: ready. Else the reason it is not, in a few words."""
        self.not_ready = reason_not

    def ready(self) -> tuple[bool, str]:
        reason = self.not_ready
        return (reason is None, reason or "ready")

    def live(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._beat
        if idle > LIVE_AFTER:
            return False, f"the main loop has not turned for {idle:.0f}s"
        return True, "live"


class MetricsServer:
    """Serves the endpoints in a background thread; ``start()`` raises ConfigError if the port is taken."""

    def __init__(
        self,
        component: str,
        stats: Stats,
        spec: Spec,
        *,
        port: int,
        host: str = "127.0.0.1",
        probe: Probe | None = None,
    ) -> None:
        self.component = component
        self.stats = stats
        self.port = port
        self.host = host
        self.probe = probe or Probe(not_ready=None)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(StatsCollector(component, stats, spec, self.probe.ready))
        self._server: _Server | None = None

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
            names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
            registry = self.registry.restricted_registry(names) if names else self.registry
            return _reply(start_response, 200, encoder(registry), content_type)
        if path in ("/live", "/ready"):
            ok, reason = self.probe.live() if path == "/live" else self.probe.ready()
            key = path[1:]
            answer = {key: ok} if ok else {key: False, "reason": reason}
            return _reply(start_response, 200 if ok else 503, json.dumps(answer).encode(), "application/json")
        if path == "/health":  # the stats as JSON, with both probes (200 while live)
            live, ready = self.probe.live(), self.probe.ready()
            state = {"ok": live[0], "ready": ready[0], "reason": live[1] if not live[0] else ready[1]}
            body = json.dumps({**state, **self.stats.get_stats()}, default=str).encode()
            return _reply(start_response, 200 if live[0] else 503, body, "application/json")
        return _reply(
            start_response, 404, b"not found: try /metrics, /live, /ready or /health\n", "text/plain"
        )

    def start(self) -> None:
        try:
            self._server = make_server(self.host, self.port, self.app, _Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(
                f"metrics endpoint {self.host}:{self.port} cannot be used: {exc.strerror or exc}"
            ) from None
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics (also /live, /ready, /health)", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _reply(start_response: Callable[..., Any], code: int, body: bytes, content_type: str) -> list[bytes]:
    status = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}[code]
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
