"""Reconcile the destination with the source: ``python -m cdc verify``.

Three checks, each streamed so memory stays flat whatever the table size:

- rows, per replicated table: ``employees`` and every table of the source's ``cdc_tables``
  (``--table`` picks some). Each database hashes its own rows; the (key, hash) pairs come through
  server-side cursors ordered by the key and are merge-compared, so no table is ever held in
  Python.

  - employees: the columns as the source's catalog describes them (``cdc.model.table``), md5 of
    the row's values as JSON (which prints dates and NULLs the same way whatever the session
    settings), in emp_id order.
  - any other table: the columns both tables have (generated ones on either side left out), md5
    of their text output as a JSON array in the source's column order, under the settings the
    capture pins (``PINNED``, set on both sessions), in the order of the primary key columns'
    text ``COLLATE "C"`` (byte order: the same in two databases of different collations, and
    Python's order of the same strings). A table missing on the destination is one difference.

- events (``--events``): every action_id of both outboxes, ``emp_records_cdc`` and
  ``cdc_outbox`` (one sequence, read as one stream in action_id order), has its row in the
  sink's ``processed_events`` (applied, stale or dlq), merged the same way.
- caught up (``--wait``): no row of either outbox beyond the producer's cursor and, for every
  partition of CDC_TOPIC and of every topic under CDC_TOPIC_PREFIX (what the consumer subscribes
  to), the destination's stored position (``applied_offsets``) at the log end. The position, not
  the group's committed offset: it commits in the batch's own transaction, so once it reaches the
  log end the rows are there to compare; and it is where the consumer starts a partition
  (``cdc.kafka.positions.decide``, applied here the same way: a recreated topic starts from its
  beginning, a gap is lag), while the group's commit comes after, for lag tools only.

Comparing while changes are still in flight shows the lag, not a bug: stop the writers and use
``--wait`` first. The events check needs the outboxes unpruned (CDC_PRUNE=false).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions
from confluent_kafka import Consumer, KafkaException, TopicCollection, TopicPartition
from psycopg2 import sql

from cdc.errors import CDCError, ConfigError, SchemaMissingError, TransientError
from cdc.kafka.client import admin_client, consumer_config
from cdc.kafka.positions import decide
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database, one_row
from cdc.runtime.settings import Settings
from cdc.sink import positions, records

log = logging.getLogger(__name__)

# Rows per FETCH from a server-side cursor: big enough to amortise the round trip, small
# enough that memory stays a few MiB.
ITERSIZE = 20_000
DEFAULT_LIMIT = 10
KAFKA_TIMEOUT = 10.0
WAIT_INTERVAL = 0.5
PRODUCER_STATE_NAME = "default"
REGISTRY = "cdc_tables"

# The settings under which the capture prints a generic table's values (cdc_capture in
# setup_db.sql), set on both verify sessions so that each database prints its rows the same way
# whatever its own defaults. lc_monetary too: money's text output depends on it.
PINNED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
}
PIN_SQL = sql.SQL("; ").join(
    sql.SQL("SET {} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in PINNED.items()
)


def row_hashes_sql(table: Table) -> sql.Composed:
    """(key, md5 of the other written columns as a JSON array) of every row, in key order."""
    values = sql.SQL(", ").join(c.ident for c in table.values)
    return sql.SQL("SELECT {key}, md5(json_build_array({values})::text) FROM {table} ORDER BY {key}").format(
        key=table.key.ident, values=values, table=table.ident
    )


def text_hashes_sql(table: Table, key: Sequence[str], values: Sequence[str]) -> sql.Composed:
    """Each key column's text, then md5 of the ``values`` columns' text as a JSON array, of every
    row, ordered by the key columns' text byte by byte (``COLLATE "C"``)."""
    keys = [sql.SQL('{}::text COLLATE "C"').format(sql.Identifier(k)) for k in key]
    hashed = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(v)) for v in values)
    return sql.SQL(
        "SELECT {keys}, md5(json_build_array({hashed})::text) FROM {table} ORDER BY {keys}"
    ).format(keys=sql.SQL(", ").join(keys), hashed=hashed, table=table.ident)


# Both outboxes as one stream in action_id order (a merge of their primary key indexes); the
# second column says which outbox (true: cdc_outbox).
OUTBOX_IDS_SQL = (
    "SELECT action_id, false FROM emp_records_cdc UNION ALL SELECT action_id, true FROM cdc_outbox"
    " ORDER BY action_id"
)
# Rows of either outbox the producer has not published yet (one cursor covers both); no cursor
# row means nothing was published.
PENDING_SQL = """
WITH cursor AS (
    SELECT coalesce((SELECT last_txid FROM cdc_producer_state WHERE name = %(name)s), '0'::xid8) AS txid,
           coalesce((SELECT last_action_id FROM cdc_producer_state WHERE name = %(name)s), 0) AS action_id
)
SELECT (SELECT count(*) FROM emp_records_cdc e WHERE (e.txid, e.action_id) > (c.txid, c.action_id))
     + (SELECT count(*) FROM cdc_outbox o WHERE (o.txid, o.action_id) > (c.txid, c.action_id))
  FROM cursor c
"""
# The captured tables, as SQL writes their names.
CAPTURED_SQL = f"""
SELECT table_schema, table_name, format('%I.%I', table_schema, table_name)
  FROM {REGISTRY} ORDER BY table_schema COLLATE "C", table_name COLLATE "C"
"""
# A name written as in SQL: its parts (a syntax error raises), and the table it names, if any.
RESOLVE_SQL = """
SELECT parse_ident(%(name)s),
       (SELECT ARRAY[n.nspname::text, c.relname::text] FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%(name)s))
"""

_ABSENT = object()
Rows = Generator[tuple[Any, Any], None, None]


def key_text(values: Sequence[str]) -> str:
    """A generic table's key as the report prints it: one column's text as is, several as
    PostgreSQL prints a row, ``(1,"2024-01-01 00:00:00+00",abc)``; a value that is empty or holds
    a quote, a backslash, a parenthesis, a comma or white space double-quoted."""

    def one(v: str) -> str:
        if v == "" or any(ch in '"\\(),' or ch.isspace() for ch in v):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return v

    if len(values) == 1:
        return one(values[0])
    return "(" + ",".join(one(v) for v in values) + ")"


@dataclass
class IdSample:
    """How many ids fell in one category, and the first ``limit`` of them (in key order), each
    as ``fmt`` makes it (applied to those kept only)."""

    limit: int = DEFAULT_LIMIT
    total: int = 0
    first: list[Any] = field(default_factory=list)
    fmt: Callable[[Any], Any] | None = None

    def add(self, key: Any) -> None:
        self.total += 1
        if len(self.first) < self.limit:
            self.first.append(key if self.fmt is None else self.fmt(key))

    def describe(self, what: str, key: str) -> str:
        if not self.total:
            return f"{what}: 0"
        shown = ", ".join(map(str, self.first))
        more = f" (first {len(self.first)})" if self.total > len(self.first) else ""
        return f"{what}: {self.total} {key}{more}: {shown}"


@dataclass
class RowsReport:
    """One table on the source against the destination's.

    ``problem``: why its rows were not compared (the table is missing on one side, lacks a key
    column...): a difference. ``notes``: what the reader should know but is no difference (columns
    only one side has, which are not compared).
    """

    source_rows: int
    dest_rows: int
    missing: IdSample  # in the source, not in the destination
    extra: IdSample  # in the destination, not in the source
    different: IdSample  # in both, with different values
    seconds: float
    key: str = "key"  # the key column's name (several: "(a, b)"), for the report
    table: str = SOURCE_TABLE  # as SQL writes it
    problem: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def not_compared(cls, table: str, problem: str, limit: int = DEFAULT_LIMIT) -> RowsReport:
        return cls(0, 0, IdSample(limit), IdSample(limit), IdSample(limit), 0.0, table=table, problem=problem)

    @property
    def identical(self) -> bool:
        return self.problem is None and not (self.missing.total or self.extra.total or self.different.total)

    def summary(self) -> str:
        """The table's problem, or its counts of differences."""
        if self.problem is not None:
            return self.problem
        return (
            f"{self.missing.total} missing, {self.extra.total} extra, {self.different.total} different rows"
        )

    def lines(self) -> list[str]:
        if self.problem is not None:
            return [f"rows {self.table}: {self.problem}"]
        lines = [
            f"rows {self.table}: source {self.source_rows}, destination {self.dest_rows},"
            f" missing {self.missing.total}, extra {self.extra.total}, different {self.different.total}"
            f" ({self.seconds:.1f}s)"
        ]
        lines += [f"  {note}" for note in self.notes]
        for sample, what in (
            (self.missing, "missing in destination"),
            (self.extra, "extra in destination"),
            (self.different, "different"),
        ):
            if sample.total:
                lines.append("  " + sample.describe(what, self.key))
        return lines


@dataclass
class EventsReport:
    """Outbox action_ids (both outboxes) against the sink's ``processed_events``.

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
    generic_rows: int = 0  # of outbox_rows, those of cdc_outbox

    @property
    def ok(self) -> bool:
        return not (self.missing.total or self.extra.total)

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {self.outcomes.get(k, 0)}" for k in ("applied", "stale", "dlq"))
        outboxes = f"emp_records_cdc {self.outbox_rows - self.generic_rows}, cdc_outbox {self.generic_rows}"
        lines = [
            f"events: outbox {self.outbox_rows} ({outboxes}), processed_events {self.processed_rows}"
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
    consumer_lag: dict[tuple[str, int], int]  # (topic, partition) -> log end - destination's position

    @property
    def total_consumer_lag(self) -> int:
        return sum(self.consumer_lag.values())

    @property
    def caught_up(self) -> bool:
        return self.outbox_pending == 0 and self.total_consumer_lag == 0

    def describe(self) -> str:
        per_topic: Counter[str] = Counter()
        for (topic, _), n in self.consumer_lag.items():
            per_topic[topic] += n
        behind = ", ".join(f"{t} {n}" for t, n in sorted(per_topic.items()) if n)
        return f"outbox pending {self.outbox_pending}, consumer lag {self.total_consumer_lag}" + (
            f" ({behind})" if behind else ""
        )


@dataclass
class VerifyResult:
    """What ``verify`` found. ``ok`` is the exit status: caught up (if waited), every table
    identical, events ok."""

    tables: list[RowsReport] | None = None  # None: not compared (the pipeline did not catch up)
    events: EventsReport | None = None
    lag: Lag | None = None  # set when --wait was asked
    waited: float = 0.0

    @property
    def rows(self) -> RowsReport | None:
        """employees' report, if it was compared."""
        for report in self.tables or ():
            if report.table == SOURCE_TABLE:
                return report
        return None

    @property
    def caught_up(self) -> bool:
        return self.lag is None or self.lag.caught_up

    @property
    def ok(self) -> bool:
        return (
            self.caught_up
            and self.tables is not None
            and all(t.identical for t in self.tables)
            and (self.events is None or self.events.ok)
        )

    def lines(self) -> list[str]:
        out = []
        if self.lag is not None:
            state = "caught up" if self.lag.caught_up else "NOT caught up"
            out.append(f"pipeline {state} after {self.waited:.1f}s: {self.lag.describe()}")
        for report in self.tables or ():
            out += report.lines()
        if self.events is not None:
            out += self.events.lines()
        out.append(self.verdict())
        return out

    def verdict(self) -> str:
        if not self.caught_up:
            return "result: not compared, the pipeline did not catch up in time"
        assert self.tables is not None
        problems = [f"{t.table}: {t.summary()}" for t in self.tables if not t.identical]
        if self.events is not None and not self.events.ok:
            e = self.events
            problems.append(f"{e.missing.total} events not processed, {e.extra.total} unknown events")
        if problems:
            return "result: DIFFERENT: " + "; ".join(problems)
        n = len(self.tables)
        rows = sum(t.source_rows for t in self.tables)
        return f"result: identical ({n} table{'s' if n != 1 else ''}, {rows} rows)"


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


def _stream(db: Database, query: str | sql.Composable, label: str, *, keys: int = 0) -> Rows:
    """(key, value) rows of ``query`` through a read-only server-side cursor, under ``PINNED``.

    ``keys``: the query returns that many key columns, then the value; the key is their tuple.
    """
    try:
        with db.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SET TRANSACTION READ ONLY")
                cur.execute(PIN_SQL)
            with conn.cursor(name=f"cdc_verify_{label}") as cur:
                cur.itersize = ITERSIZE
                cur.execute(query)
                if keys:
                    for row in cur:
                        yield row[:keys], row[keys]
                else:
                    yield from cur
    except CDCError as exc:
        raise type(exc)(f"{label} database {db.url}: {exc}") from exc
    except psycopg2.Error as exc:
        raise CDCError(f"{label} database {db.url}: {_first_line(exc)}") from exc


def _first_line(exc: psycopg2.Error) -> str:
    first = str(exc).strip().splitlines()[:1]
    return f"{type(exc).__name__}: {''.join(first)}"


@contextlib.contextmanager
def _cursor(db: Database, label: str) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor on ``db``; errors name the database."""
    try:
        with db.connection() as conn, conn.cursor() as cur:
            yield cur
    except CDCError as exc:
        raise type(exc)(f"{label} database {db.url}: {exc}") from exc
    except psycopg2.Error as exc:
        raise CDCError(f"{label} database {db.url}: {_first_line(exc)}") from exc


def merge_sorted(
    left: Iterable[tuple[Any, Any]], right: Iterable[tuple[Any, Any]]
) -> Iterator[tuple[Any, Any, Any]]:
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
    """The default table (employees) as the source's catalog describes it."""
    with _cursor(db, "source") as cur:
        return Table.load(cur, SOURCE_TABLE)


@dataclass(frozen=True)
class Replicated:
    """A table whose rows verify compares: its name parts and its name as SQL writes it."""

    schema: str
    name: str
    qualified: str

    @property
    def default(self) -> bool:
        return self.qualified == SOURCE_TABLE


def replicated_tables(source: Database, names: Sequence[str] | None = None) -> list[Replicated]:
    """employees, then every table of the source's ``cdc_tables``; or only those of ``names``
    (written as in SQL, ``employees`` for the default), in the order given. ConfigError for a
    name that is not a replicated table."""
    with _cursor(source, "source") as cur:
        default = Table.load(cur, SOURCE_TABLE)
        cur.execute(CAPTURED_SQL)
        everything = [Replicated(default.schema, default.name, SOURCE_TABLE)]
        everything += [Replicated(s, n, q) for s, n, q in cur.fetchall()]
        resolved = [(name, _resolve(cur, name)) for name in names or ()]
    if names is None:
        return everything
    by_parts = {(t.schema, t.name): t for t in everything}
    chosen: list[Replicated] = []
    for name, parts in resolved:
        if isinstance(parts, str):
            raise ConfigError(f"--table {name!r} is not a table name: {parts}")
        table = by_parts.get(parts) if parts else None
        if table is None:
            raise ConfigError(
                f"--table {name}: not a replicated table (employees, or one of `python -m cdc tables list`)"
            )
        if table not in chosen:
            chosen.append(table)
    return chosen


def _resolve(cur: psycopg2.extensions.cursor, name: str) -> tuple[str, str] | str | None:
    """(schema, table) of ``name``: the table it names on the source, else its two parts; None
    if it has one part and names no table; PostgreSQL's words if it is no name at all."""
    cur.execute("SAVEPOINT resolve")
    try:
        cur.execute(RESOLVE_SQL, {"name": name})
    except psycopg2.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT resolve")
        return (exc.pgerror or str(exc)).strip().splitlines()[0].removeprefix("ERROR:").strip()
    parts, found = one_row(cur)
    if found is not None:
        return found[0], found[1]
    if len(parts) == 2:
        return parts[0], parts[1]
    return None


def _compare(left: Rows, right: Rows, report: RowsReport) -> RowsReport:
    """Count into ``report`` the rows of the two (key, hash) streams, merged by key."""
    started = time.monotonic()
    with contextlib.closing(left), contextlib.closing(right):
        for key, src_hash, dst_hash in merge_sorted(left, right):
            if src_hash is _ABSENT:
                report.dest_rows += 1
                report.extra.add(key)
                continue
            report.source_rows += 1
            if dst_hash is _ABSENT:
                report.missing.add(key)
                continue
            report.dest_rows += 1
            if src_hash != dst_hash:
                report.different.add(key)
    report.seconds = time.monotonic() - started
    return report


def _compare_default(source: Database, dest: Database, limit: int) -> RowsReport:
    table = source_table(source)
    query = row_hashes_sql(table)
    report = RowsReport(
        0, 0, IdSample(limit), IdSample(limit), IdSample(limit), 0.0, table.key.name, SOURCE_TABLE
    )
    return _compare(_stream(source, query, "source"), _stream(dest, query, "destination"), report)


def _load(db: Database, label: str, table: Replicated) -> Table | str | None:
    """``table`` as ``db``'s catalog describes it; None if it is missing there, the reason if
    it cannot be compared (no primary key)."""
    with _cursor(db, label) as cur:
        regname = sql.Identifier(table.schema, table.name).as_string(cur)
        try:
            return Table.load(cur, regname, any_type=True)
        except SchemaMissingError:
            return None
        except ConfigError as exc:
            return str(exc)


def _columns(ours: Table, theirs: Table) -> tuple[list[str], dict[str, str]]:
    """The columns both tables write, in the source's order; and why each other one is left out
    (a column generated on both sides is computed, not replicated: not worth a word)."""
    mine = {c.name: c for c in ours.columns}
    other = {c.name: c for c in theirs.columns}
    compared, skipped = [], {}
    for name in [*mine, *(n for n in other if n not in mine)]:
        a, b = mine.get(name), other.get(name)
        if a is None:
            skipped[name] = "only on the destination"
        elif b is None:
            skipped[name] = "missing on the destination"
        elif a.generated and not b.generated:
            skipped[name] = "generated on the source"
        elif b.generated and not a.generated:
            skipped[name] = "generated on the destination"
        elif not a.generated:
            compared.append(name)
    return compared, skipped


def _compare_generic(source: Database, dest: Database, table: Replicated, limit: int) -> RowsReport:
    ours = _load(source, "source", table)
    if ours is None:
        return RowsReport.not_compared(
            table.qualified, "missing on the source (yet captured in cdc_tables)", limit
        )
    if isinstance(ours, str):  # e.g. its primary key was dropped after it was added
        return RowsReport.not_compared(table.qualified, f"not compared: on the source, {ours}", limit)
    theirs = _load(dest, "destination", table)
    if theirs is None:
        return RowsReport.not_compared(table.qualified, "missing on the destination", limit)
    if isinstance(theirs, str):
        return RowsReport.not_compared(table.qualified, f"not compared: on the destination, {theirs}", limit)
    key = list(ours.primary_key)
    compared, skipped = _columns(ours, theirs)
    lacking = [k for k in key if k not in {c.name for c in theirs.columns}]
    if lacking:
        return RowsReport.not_compared(
            table.qualified,
            f"not compared: the destination lacks primary key column{'s' if len(lacking) > 1 else ''}"
            f" {', '.join(lacking)}",
            limit,
        )
    values = [n for n in compared if n not in key]
    skipped = {n: why for n, why in skipped.items() if n not in key}  # the key is compared as text
    notes = []
    if skipped:
        notes.append("columns not compared: " + ", ".join(f"{n} ({why})" for n, why in skipped.items()))
    report = RowsReport(
        0,
        0,
        IdSample(limit, fmt=key_text),
        IdSample(limit, fmt=key_text),
        IdSample(limit, fmt=key_text),
        0.0,
        key[0] if len(key) == 1 else f"({', '.join(key)})",
        table.qualified,
        notes=tuple(notes),
    )
    left = _stream(source, text_hashes_sql(ours, key, values), "source", keys=len(key))
    right = _stream(dest, text_hashes_sql(theirs, key, values), "destination", keys=len(key))
    return _compare(left, right, report)


def compare_tables(
    settings: Settings, names: Sequence[str] | None = None, *, limit: int = DEFAULT_LIMIT
) -> list[RowsReport]:
    """Compare every replicated table (or those of ``names``), one report each, in turn."""
    with _databases(settings) as (source, dest):
        reports = []
        for table in replicated_tables(source, names):
            if table.default:
                reports.append(_compare_default(source, dest, limit))
            else:
                reports.append(_compare_generic(source, dest, table, limit))
        return reports


def compare_rows(settings: Settings, *, limit: int = DEFAULT_LIMIT) -> RowsReport:
    """Compare the source and destination employees by key and row hash."""
    with _databases(settings) as (source, dest):
        return _compare_default(source, dest, limit)


def check_events(settings: Settings, *, limit: int = DEFAULT_LIMIT) -> EventsReport:
    """Check that every action_id of both outboxes has exactly one ``processed_events`` row.

    ``processed_events.action_id`` is its primary key, so "at most once" holds by construction;
    this finds the ones never decided on, and decisions about ids the source never wrote.
    """
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    missing, extra = IdSample(limit), IdSample(limit)
    outbox_rows = generic_rows = processed_rows = extra_dlq = 0
    with _databases(settings) as (source, dest):
        left = _stream(source, OUTBOX_IDS_SQL, "source")
        right = _stream(dest, records.DECIDED_IDS, "destination")
        with contextlib.closing(left), contextlib.closing(right):
            for action_id, generic, outcome in merge_sorted(left, right):
                if outcome is not _ABSENT:
                    processed_rows += 1
                if generic is _ABSENT:
                    if outcome == "dlq":
                        extra_dlq += 1
                    else:
                        extra.add(action_id)
                    continue
                outbox_rows += 1
                generic_rows += bool(generic)
                if outcome is _ABSENT:
                    missing.add(action_id)
                else:
                    outcomes[outcome] += 1
    return EventsReport(
        outbox_rows,
        processed_rows,
        outcomes,
        missing,
        extra,
        extra_dlq,
        time.monotonic() - started,
        generic_rows,
    )


class LagProbe:
    """Measures the pipeline's lag; holds a connection to each database and a Kafka consumer and
    admin client between calls.

    The consumer joins no group (it never subscribes) and reads no committed offset: only topic
    metadata and log ranges. The positions are the destination's (``applied_offsets``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._source = _database(settings.source_db_url, settings)
        self._dest = _database(settings.dest_db_url, settings)
        # log_level 0: librdkafka's own connection errors reach the caller as exceptions instead.
        quiet = {"client.id": "cdc-verify", "log_level": 0}
        self._consumer = Consumer(consumer_config(settings, **quiet))
        self._admin = admin_client(settings, **quiet)

    def close(self) -> None:
        self._source.close()
        self._dest.close()
        self._consumer.close()

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outbox_pending(self) -> int:
        with _cursor(self._source, "source") as cur:
            cur.execute(PENDING_SQL, {"name": PRODUCER_STATE_NAME})
            return one_row(cur)[0]

    def topics(self) -> list[str]:
        """CDC_TOPIC and every topic under CDC_TOPIC_PREFIX: what the consumer subscribes to."""
        topic = self.settings.cdc_topic
        where = f"Kafka {self.settings.kafka_bootstrap_servers}"
        under = self.settings.cdc_topic_prefix + "."
        try:
            listed = self._consumer.list_topics(timeout=KAFKA_TIMEOUT).topics
        except KafkaException as exc:
            raise TransientError(f"{where}: {exc.args[0].str()}") from exc
        meta = listed.get(topic)
        if meta is None or meta.error is not None:
            raise CDCError(f"{where}: topic {topic} does not exist")
        tables = sorted(t for t, m in listed.items() if t.startswith(under) and len(t) > len(under))
        return [topic, *tables]

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """Per partition: log end - where the consumer would read next (the destination's stored
        position, as ``cdc.kafka.positions.decide`` takes it)."""
        where = f"Kafka {self.settings.kafka_bootstrap_servers}"
        names = self.topics()
        try:
            futures = self._admin.describe_topics(TopicCollection(names), request_timeout=KAFKA_TIMEOUT)
            described = {name: futures[name].result() for name in names}
        except KafkaException as exc:
            raise TransientError(f"{where}: {exc.args[0].str()}") from exc
        with _cursor(self._dest, "destination") as cur:
            stored = positions.read(cur, names)
        lag = {}
        try:
            for name in names:
                description = described[name]
                for p in sorted(part.id for part in description.partitions):
                    low, high = self._consumer.get_watermark_offsets(
                        TopicPartition(name, p), timeout=KAFKA_TIMEOUT, cached=False
                    )
                    start = decide(
                        name,
                        p,
                        stored=stored.get((name, p)),
                        topic_id=str(description.topic_id),
                        low=low,
                        high=high,
                        group=None,
                    )
                    at = start.gap.first_lost if start.gap is not None else start.offset
                    assert at is not None
                    lag[(name, p)] = max(0, high - at)
        except KafkaException as exc:
            raise TransientError(f"{where}: {exc.args[0].str()}") from exc
        return lag

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
    settings: Settings,
    *,
    wait: float | None = None,
    events: bool = False,
    limit: int = DEFAULT_LIMIT,
    tables: Sequence[str] | None = None,
) -> VerifyResult:
    """Wait for the pipeline (if ``wait``), then compare the rows of every replicated table (or
    of ``tables``), and the events if asked."""
    result = VerifyResult()
    if wait is not None:
        started = time.monotonic()
        result.lag = wait_caught_up(settings, wait)
        result.waited = time.monotonic() - started
        if not result.lag.caught_up:
            return result
    result.tables = compare_tables(settings, tables, limit=limit)
    if events:
        result.events = check_events(settings, limit=limit)
    return result
