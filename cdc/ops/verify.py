"""Reconcile the destination with the source: ``python -m cdc verify``.

Three checks, each streamed so memory stays flat whatever the table size:

- rows: the source table against the destination's (the columns as the source's catalog
  describes them, ``cdc.model.table``). Each database hashes its own rows (md5 of the row's
  values as JSON, which prints dates and NULLs the same way whatever the session settings); the
  (key, hash) pairs come through server-side cursors ordered by the key and are merge-compared,
  so neither table is ever held in Python.
- events (``--events``): every action_id of the outbox ``emp_records_cdc`` has its row in the
  sink's ``processed_events`` (applied, stale or dlq), merged the same way.
- caught up (``--wait``): no outbox row beyond the producer's cursor and, for the consumer group,
  committed offset = high watermark on every partition of CDC_TOPIC.

Comparing while changes are still in flight shows the lag, not a bug: stop the writers and use
``--wait`` first. The events check needs the outbox unpruned (CDC_PRUNE=false).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from confluent_kafka import Consumer, KafkaException, TopicPartition
from psycopg2 import sql

from cdc.errors import CDCError, TransientError
from cdc.kafka.client import consumer_config
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database, one_row
from cdc.runtime.settings import Settings
from cdc.sink import records

log = logging.getLogger(__name__)

# Rows per FETCH from a server-side cursor: big enough to amortise the round trip, small
# enough that memory stays a few MiB.
ITERSIZE = 20_000
DEFAULT_LIMIT = 10
KAFKA_TIMEOUT = 10.0
WAIT_INTERVAL = 0.5
PRODUCER_STATE_NAME = "default"


def row_hashes_sql(table: Table) -> sql.Composed:
    """(key, md5 of the other written columns as a JSON array) of every row, in key order."""
    values = sql.SQL(", ").join(c.ident for c in table.values)
    return sql.SQL("SELECT {key}, md5(json_build_array({values})::text) FROM {table} ORDER BY {key}").format(
        key=table.key.ident, values=values, table=table.ident
    )


OUTBOX_IDS_SQL = "SELECT action_id, NULL FROM emp_records_cdc ORDER BY action_id"
# Outbox rows the producer has not published yet; no cursor row means nothing was published.
PENDING_SQL = """
WITH cursor AS (
    SELECT coalesce((SELECT last_txid FROM cdc_producer_state WHERE name = %(name)s), '0'::xid8) AS txid,
           coalesce((SELECT last_action_id FROM cdc_producer_state WHERE name = %(name)s), 0) AS action_id
)
SELECT count(*)
  FROM emp_records_cdc e, cursor c
 WHERE (e.txid, e.action_id) > (c.txid, c.action_id)
"""

_ABSENT = object()


@dataclass
class IdSample:
    """How many ids fell in one category, and the first ``limit`` of them (in key order)."""

    limit: int = DEFAULT_LIMIT
    total: int = 0
    first: list[int] = field(default_factory=list)

    def add(self, key: int) -> None:
        self.total += 1
        if len(self.first) < self.limit:
            self.first.append(key)

    def describe(self, what: str, key: str) -> str:
        if not self.total:
            return f"{what}: 0"
        shown = ", ".join(map(str, self.first))
        more = f" (first {len(self.first)})" if self.total > len(self.first) else ""
        return f"{what}: {self.total} {key}{more}: {shown}"


@dataclass
class RowsReport:
    """The source table against the destination's."""

    source_rows: int
    dest_rows: int
    missing: IdSample  # in the source, not in the destination
    extra: IdSample  # in the destination, not in the source
    different: IdSample  # in both, with different values
    seconds: float
    key: str = "key"  # the key column's name, for the report

    @property
    def identical(self) -> bool:
        return not (self.missing.total or self.extra.total or self.different.total)

    def lines(self) -> list[str]:
        return [
            f"rows: source {self.source_rows}, destination {self.dest_rows} ({self.seconds:.1f}s)",
            self.missing.describe("missing in destination", self.key),
            self.extra.describe("extra in destination", self.key),
            self.different.describe("different", self.key),
        ]


@dataclass
class EventsReport:
    """Outbox action_ids against the sink's ``processed_events``.

    ``extra`` are action_ids the sink applied (or found stale) that the source never wrote: a
    failure. Ones the sink dead-lettered are only counted (``extra_dlq``): a poison message may
    carry any id, and refusing it was right.
    """

    outbox_rows: int
    processed_rows: int
    outcomes: Counter[str]  # outcome of each outbox action_id found in processed_events
    missing: IdSample  # outbox action_ids with no processed_events row
    extra: IdSample
    extra_dlq: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.missing.total or self.extra.total)

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {self.outcomes.get(k, 0)}" for k in ("applied", "stale", "dlq"))
        lines = [
            f"events: outbox {self.outbox_rows}, processed_events {self.processed_rows}"
            f" ({outcomes}) ({self.seconds:.1f}s)",
            self.missing.describe("events not processed", "action_id"),
            self.extra.describe("processed but not in the outbox", "action_id"),
        ]
        if self.extra_dlq:
            lines.append(f"dead-lettered action_ids not from the outbox (poison messages): {self.extra_dlq}")
        return lines


@dataclass(frozen=True)
class Lag:
    """How far the pipeline is behind: outbox rows not yet published, messages not yet applied."""

    outbox_pending: int
    consumer_lag: dict[int, int]  # partition -> high watermark - committed offset

    @property
    def total_consumer_lag(self) -> int:
        return sum(self.consumer_lag.values())

    @property
    def caught_up(self) -> bool:
        return self.outbox_pending == 0 and self.total_consumer_lag == 0

    def describe(self) -> str:
        return f"outbox pending {self.outbox_pending}, consumer lag {self.total_consumer_lag}"


@dataclass
class VerifyResult:
    """What ``verify`` found. ``ok`` is the exit status: caught up (if waited), identical, events ok."""

    rows: RowsReport | None = None
    events: EventsReport | None = None
    lag: Lag | None = None  # set when --wait was asked
    waited: float = 0.0

    @property
    def caught_up(self) -> bool:
        return self.lag is None or self.lag.caught_up

    @property
    def ok(self) -> bool:
        return (
            self.caught_up
            and self.rows is not None
            and self.rows.identical
            and (self.events is None or self.events.ok)
        )

    def lines(self) -> list[str]:
        out = []
        if self.lag is not None:
            state = "caught up" if self.lag.caught_up else "NOT caught up"
            out.append(f"pipeline {state} after {self.waited:.1f}s: {self.lag.describe()}")
        if self.rows is not None:
            out += self.rows.lines()
        if self.events is not None:
            out += self.events.lines()
        out.append(self.verdict())
        return out

    def verdict(self) -> str:
        if not self.caught_up:
            return "result: not compared, the pipeline did not catch up in time"
        assert self.rows is not None
        problems = []
        if not self.rows.identical:
            r = self.rows
            problems.append(
                f"{r.missing.total} missing, {r.extra.total} extra, {r.different.total} different rows"
            )
        if self.events is not None and not self.events.ok:
            e = self.events
            problems.append(f"{e.missing.total} events not processed, {e.extra.total} unknown events")
        if problems:
            return "result: DIFFERENT: " + "; ".join(problems)
        return f"result: identical ({self.rows.source_rows} rows)"


def _database(url: str, settings: Settings) -> Database:
    return Database(
        url,
        minconn=1,
        maxconn=1,
        statement_timeout_ms=settings.statement_timeout_ms,
        application_name="cdc-verify",
    )


@contextlib.contextmanager
def _databases(settings: Settings) -> Iterator[tuple[Database, Database]]:
    # Pools connect on first use, inside _stream, so a connection error names its database.
    source = _database(settings.source_db_url, settings)
    dest = _database(settings.dest_db_url, settings)
    try:
        yield source, dest
    finally:
        source.close()
        dest.close()


def _stream(db: Database, query: str | sql.Composable, label: str) -> Generator[tuple[Any, Any], None, None]:
    """(key, value) rows of ``query`` through a read-only server-side cursor."""
    try:
        with db.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SET TRANSACTION READ ONLY")
            with conn.cursor(name=f"cdc_verify_{label}") as cur:
                cur.itersize = ITERSIZE
                cur.execute(query)
                yield from cur
    except CDCError as exc:
        raise type(exc)(f"{label} database {db.url}: {exc}") from exc
    except psycopg2.Error as exc:
        first = str(exc).strip().splitlines()[:1]
        raise CDCError(f"{label} database {db.url}: {type(exc).__name__}: {''.join(first)}") from exc


def merge_sorted(
    left: Iterable[tuple[int, Any]], right: Iterable[tuple[int, Any]]
) -> Iterator[tuple[int, Any, Any]]:
    """Merge two streams sorted by unique key into (key, left value, right value).

    A side without the key gives ``_ABSENT``. Only one row of each stream is held at a time.
    """
    lit, rit = iter(left), iter(right)
    lrow = next(lit, None)
    rrow = next(rit, None)
    while lrow is not None or rrow is not None:
        if rrow is None or (lrow is not None and lrow[0] < rrow[0]):
            yield lrow[0], lrow[1], _ABSENT  # type: ignore[index]
            lrow = next(lit, None)
        elif lrow is None or rrow[0] < lrow[0]:
            yield rrow[0], _ABSENT, rrow[1]
            rrow = next(rit, None)
        else:
            yield lrow[0], lrow[1], rrow[1]
            lrow = next(lit, None)
            rrow = next(rit, None)


def source_table(db: Database) -> Table:
    """The replicated table as the source's catalog describes it."""
    try:
        with db.connection() as conn, conn.cursor() as cur:
            return Table.load(cur, SOURCE_TABLE)
    except CDCError as exc:
        raise type(exc)(f"source database {db.url}: {exc}") from exc


def compare_rows(settings: Settings, *, limit: int = DEFAULT_LIMIT) -> RowsReport:
    """Compare the source and destination tables by key and row hash."""
    started = time.monotonic()
    missing, extra, different = IdSample(limit), IdSample(limit), IdSample(limit)
    source_rows = dest_rows = 0
    with _databases(settings) as (source, dest):
        table = source_table(source)
        query = row_hashes_sql(table)
        left = _stream(source, query, "source")
        right = _stream(dest, query, "destination")
        with contextlib.closing(left), contextlib.closing(right):
            for key, src_hash, dst_hash in merge_sorted(left, right):
                if src_hash is _ABSENT:
                    dest_rows += 1
                    extra.add(key)
                    continue
                source_rows += 1
                if dst_hash is _ABSENT:
                    missing.add(key)
                    continue
                dest_rows += 1
                if src_hash != dst_hash:
                    different.add(key)
    return RowsReport(
        source_rows, dest_rows, missing, extra, different, time.monotonic() - started, table.key.name
    )


def check_events(settings: Settings, *, limit: int = DEFAULT_LIMIT) -> EventsReport:
    """Check that every outbox action_id has exactly one ``processed_events`` row.

    ``processed_events.action_id`` is its primary key, so "at most once" holds by construction;
    this finds the ones never decided on, and decisions about ids the source never wrote.
    """
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    missing, extra = IdSample(limit), IdSample(limit)
    outbox_rows = processed_rows = extra_dlq = 0
    with _databases(settings) as (source, dest):
        left = _stream(source, OUTBOX_IDS_SQL, "source")
        right = _stream(dest, records.DECIDED_IDS, "destination")
        with contextlib.closing(left), contextlib.closing(right):
            for action_id, in_outbox, outcome in merge_sorted(left, right):
                if outcome is not _ABSENT:
                    processed_rows += 1
                if in_outbox is _ABSENT:
                    if outcome == "dlq":
                        extra_dlq += 1
                    else:
                        extra.add(action_id)
                    continue
                outbox_rows += 1
                if outcome is _ABSENT:
                    missing.add(action_id)
                else:
                    outcomes[outcome] += 1
    return EventsReport(
        outbox_rows, processed_rows, outcomes, missing, extra, extra_dlq, time.monotonic() - started
    )


class LagProbe:
    """Measures the pipeline's lag; holds a source connection and a Kafka consumer between calls.

    The consumer joins no group (it never subscribes): it only reads the group's committed
    offsets, so the running consumers are not rebalanced.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._source = _database(settings.source_db_url, settings)
        # log_level 0: librdkafka's own connection errors reach the caller as exceptions instead.
        self._consumer = Consumer(consumer_config(settings, **{"client.id": "cdc-verify", "log_level": 0}))

    def close(self) -> None:
        self._source.close()
        self._consumer.close()

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outbox_pending(self) -> int:
        try:
            with self._source.connection() as conn, conn.cursor() as cur:
                cur.execute(PENDING_SQL, {"name": PRODUCER_STATE_NAME})
                return one_row(cur)[0]
        except CDCError as exc:
            raise type(exc)(f"source database {self._source.url}: {exc}") from exc

    def consumer_lag(self) -> dict[int, int]:
        topic = self.settings.cdc_topic
        where = f"Kafka {self.settings.kafka_bootstrap_servers}"
        try:
            meta = self._consumer.list_topics(topic, timeout=KAFKA_TIMEOUT).topics.get(topic)
            if meta is None or meta.error is not None:
                raise CDCError(f"{where}: topic {topic} does not exist")
            wanted = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
            committed = self._consumer.committed(wanted, timeout=KAFKA_TIMEOUT)
            lag = {}
            for tp in committed:
                if tp.error is not None:
                    raise TransientError(f"{where}: committed offset of {topic}[{tp.partition}]: {tp.error}")
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=KAFKA_TIMEOUT, cached=False
                )
                # No commit yet, or one behind the retention: the group would start at the low mark.
                start = max(tp.offset, low)
                lag[tp.partition] = max(0, high - start)
            return lag
        except KafkaException as exc:
            raise TransientError(f"{where}: {exc.args[0].str()}") from exc

    def measure(self) -> Lag:
        return Lag(self.outbox_pending(), self.consumer_lag())


def pipeline_lag(settings: Settings) -> Lag:
    """One measurement of the pipeline's lag."""
    with LagProbe(settings) as probe:
        return probe.measure()


def wait_caught_up(settings: Settings, timeout: float, *, interval: float = WAIT_INTERVAL) -> Lag:
    """Measure the lag until it is zero or ``timeout`` seconds have passed; return the last one.

    A setup problem (unreachable, no schema, no topic) raises at the first measurement. Later
    transient errors (a service restarting) are retried until the deadline.
    """
    deadline = time.monotonic() + timeout
    with LagProbe(settings) as probe:
        lag = probe.measure()
        last_logged = None
        while not lag.caught_up and time.monotonic() < deadline:
            if lag != last_logged:
                log.info("waiting for the pipeline: %s", lag.describe())
                last_logged = lag
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            try:
                lag = probe.measure()
            except TransientError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("waiting for the pipeline: %s", exc)
        return lag


def verify(
    settings: Settings, *, wait: float | None = None, events: bool = False, limit: int = DEFAULT_LIMIT
) -> VerifyResult:
    """Wait for the pipeline (if ``wait``), then compare the rows (and the events if asked)."""
    result = VerifyResult()
    if wait is not None:
        started = time.monotonic()
        result.lag = wait_caught_up(settings, wait)
        result.waited = time.monotonic() - started
        if not result.lag.caught_up:
            return result
    result.rows = compare_rows(settings, limit=limit)
    if events:
        result.events = check_events(settings, limit=limit)
    return result
