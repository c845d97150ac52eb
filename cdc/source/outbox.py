"""The source side of the producer: the gap-safe outbox query, the durable cursor, leadership.

The two outboxes, ``emp_records_cdc`` (employees) and ``cdc_outbox`` (every other captured table,
action_ids from the same sequence), are read as one stream in ``(txid, action_id)`` order and
only behind the xid horizon (``txid < pg_snapshot_xmin(pg_current_snapshot())``): every
transaction below it has ended, so no row of either can appear behind the cursor later. One
cursor covers both. Each row comes out as its Kafka message, key and event JSON built by
PostgreSQL. xid8 values read into Python are cast with
``txid::text::bigint`` (exact below 2**63, i.e. for the next two billion xid epochs); the cursor
itself is read from the last event, so it needs no cast.

One producer is active at a time: it holds a session advisory lock on a dedicated connection,
which also LISTENs for the trigger's NOTIFY and runs the fetch and the cursor write (prepared
statements, one round trip each). The cursor only moves through that session, so only while the
lock is held.
"""

from __future__ import annotations

import json
import logging
import os
import select
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg2 import sql

from cdc.errors import (
    CDCError,
    ConfigError,
    DeliveryError,
    LeadershipLost,
    SchemaMissingError,
    ServiceError,
    TransientError,
)
from cdc.kafka.client import Headers, Outgoing, admin_client, ensure_topic
from cdc.model.change import ChangeCodec
from cdc.model.event import ACTIONS, Codec
from cdc.model.table import OUTBOX, SOURCE_TABLE, Column, Kind, Table
from cdc.runtime.db import CONNECT_TIMEOUT, KEEPALIVES, Database, classify, one_row
from cdc.runtime.settings import Settings, redact_url

log = logging.getLogger(__name__)

# The advisory lock (two-int form): "CDCP" namespace, producer number 1 (state row 'default').
LOCK_CLASS = 0x43444350
LOCK_ID = 1
STATE_NAME = "default"
# A snapshot must not queue behind a long writer for ever: it would block every new writer.
SNAPSHOT_LOCK_TIMEOUT = "10s"
# The outbox of every other captured table (``python -m cdc tables add``): action_ids from the
# same sequence as emp_records_cdc's, read with it as one stream.
GENERIC_OUTBOX = "cdc_outbox"

# The outbox is a queue: its statistics lag behind (a fresh backlog has none), and a planner
# that guesses few rows picks a full scan and a sort per batch. The (txid, action_id) index is
# always right for the outbox queries, so say so: per transaction on a pooled connection (here),
# for the whole session on the producer's own (``ProducerSession``).
_INDEX_ONLY = "SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off"

# The event JSON and its key, built by PostgreSQL from the table's description (``Table``):
# byte for byte what ``Codec.to_json()`` makes of the row, so Python only hands text to Kafka.
# - to_json() escapes text as json.dumps(ensure_ascii=False) does; to_json(date) is ISO text
#   ("1815-12-10", "12345-06-07", "0044-03-15 BC", "infinity") whatever the session's DateStyle.
# - captured_at in UTC whatever the session's TimeZone, as datetime.isoformat() writes it: six
#   fraction digits, none when there is no fraction, "+00:00". Outside years 1..9999 (which
#   datetime cannot hold) PostgreSQL's own JSON text, which the event model refuses.
# - ``checked``: true when the columns' types and constraints already guarantee a valid event
#   (the schema's own limits, plus what it allows but the contract refuses: an action_id below 1,
#   a captured_at outside years 1..9999). Other rows are checked by the event model before sending.
_CAPTURED_AT = """
coalesce(
       CASE WHEN captured_at >= '0001-01-01 00:00:00+00' AND captured_at < '10000-01-01 00:00:00+00'
            THEN '"' || replace(to_char(captured_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                                '.000000', '') || '+00:00"'
            ELSE to_json(captured_at)::text END,
       'null')
"""


def event_sql(table: Table) -> sql.Composed:
    """The expression of an outbox row's event JSON (the outbox has the table's columns)."""
    parts: list[sql.Composable] = [
        sql.SQL("""'{"action_id":' || action_id || ',"action":' || coalesce(to_json(action)::text, 'null')""")
    ]
    for column in table.written:
        value = (
            "coalesce({}::text, 'null')"
            if column.kind is Kind.INTEGER
            else "coalesce(to_json({})::text, 'null')"
        )
        parts.append(
            sql.SQL("\n|| {} || " + value).format(
                sql.Literal("," + json.dumps(column.name) + ":"), column.ident
            )
        )
    parts.append(
        sql.SQL("""\n|| ',"txid":' || txid\n|| ',"captured_at":' || """ + _CAPTURED_AT.strip() + "\n|| '}'")
    )
    return sql.Composed(parts)


def checked_sql(table: Table) -> sql.Composed:
    """True for a row whose columns' types and constraints already make its event valid."""
    checks = [
        sql.SQL("action_id > 0 AND action = ANY($4) AND {} IS NOT NULL").format(table.key.ident),
        sql.SQL("captured_at >= '0001-01-01 00:00:00+00' AND captured_at < '10000-01-01 00:00:00+00'"),
    ]
    # A DELETE carries its old image leniently: only the other actions must fit the text limits.
    limits: dict[int, list[Column]] = {}
    for column in table.values:
        if column.kind is Kind.TEXT and column.length is not None:
            limits.setdefault(column.length, []).append(column)
    for limit, columns in limits.items():
        lengths = sql.SQL(", ").join(sql.SQL("length({})").format(c.ident) for c in columns)
        checks.append(
            sql.SQL("(action = 'DELETE' OR coalesce(greatest({}), 0) <= {})").format(
                lengths, sql.Literal(limit)
            )
        )
    return sql.SQL("\nAND ").join(checks)


@dataclass(frozen=True)
class Statement:
    """A statement of the hot path, prepared once on the producer's own session (``ProducerSession``):
    no parse or plan per batch, and a short EXECUTE on the wire."""

    name: str
    types: tuple[str, ...]  # of $1, $2, ...
    text: str

    @property
    def prepare(self) -> str:
        return f"PREPARE {self.name} ({', '.join(self.types)}) AS {self.text}"

    @property
    def execute(self) -> str:
        return f"EXECUTE {self.name} ({', '.join(['%s'] * len(self.types))})"


def generic_event_sql() -> str:
    """The expression of a ``cdc_outbox`` row's event JSON (``cdc.model.change``), fields in a fixed
    order: key and row as jsonb's own text, names as JSON strings, captured_at as employees'."""
    return (
        """'{"action_id":' || action_id || ',"action":' || coalesce(to_json(action)::text, 'null')"""
        """\n|| ',"schema":' || coalesce(to_json(table_schema)::text, 'null')"""
        """\n|| ',"table":' || coalesce(to_json(table_name)::text, 'null')"""
        """\n|| ',"key":' || coalesce(key::text, 'null')"""
        """\n|| ',"row":' || coalesce(row_image::text, 'null')"""
        """\n|| ',"txid":' || txid"""
        """\n|| ',"captured_at":' || """ + _CAPTURED_AT.strip() + "\n|| '}'"
    )


# A generic row's event is valid whatever its table when these hold (the capture function builds
# key and row from the table itself); the others are checked by ``ChangeCodec`` before sending.
_GENERIC_CHECKED = """action_id > 0 AND action = ANY($4)
AND captured_at >= '0001-01-01 00:00:00+00' AND captured_at < '10000-01-01 00:00:00+00'"""


def fetch_statement(cur: psycopg2.extensions.cursor, table: Table) -> Statement:
    """The next batch of both outboxes, one stream in cursor order, as Kafka messages: key, event,
    captured_at, checked, and the table's schema and name (NULL for employees, whose topic is
    CDC_TOPIC).

    Each branch reads its outbox's (txid, action_id) index behind the same horizon, and the
    planner merges the two ordered scans (Merge Append): no sort, and a LIMIT that stops both.
    $1, $2: the cursor (txid as text), $3: the limit, $4: the actions.
    """
    text = sql.SQL(
        """
SELECT key, value, captured, checked, table_schema, table_name
  FROM (SELECT txid, action_id, {key}::text AS key, {event} AS value,
               extract(epoch FROM captured_at)::float8 AS captured, coalesce({checked}, false) AS checked,
               NULL::text AS table_schema, NULL::text AS table_name
          FROM {outbox}
        UNION ALL
        SELECT txid, action_id, key::text, {generic_event},
               extract(epoch FROM captured_at)::float8, coalesce({generic_checked}, false),
               table_schema, table_name
          FROM {generic_outbox}) AS outboxes
 WHERE (txid, action_id) > ($1, $2)
   AND txid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY txid, action_id
 LIMIT $3
"""
    ).format(
        key=table.key.ident,
        event=event_sql(table),
        checked=checked_sql(table),
        outbox=sql.Identifier(OUTBOX),
        generic_event=sql.SQL(generic_event_sql()),
        generic_checked=sql.SQL(_GENERIC_CHECKED),
        generic_outbox=sql.Identifier(GENERIC_OUTBOX),
    )
    return Statement("cdc_fetch", ("xid8", "bigint", "int", "text[]"), text.as_string(cur))


def fetch_params(after: Cursor, limit: int) -> tuple[object, ...]:
    """``fetch_statement``'s parameters: the rows after ``after``, at most ``limit``."""
    return (str(after.txid), after.action_id, limit, list(ACTIONS))


def fetch_published(
    cur: psycopg2.extensions.cursor, fetch: Statement, after: Cursor, upto: Cursor, limit: int
) -> Batch:
    """``ProducerSession.fetch`` on a connection of the caller's, without the producer lock, ending at
    ``upto`` (the cursor: these rows were published already). ``fetch`` (``fetch_statement``) is
    prepared on ``cur``'s connection; the same statement makes the same messages."""
    cur.execute(_INDEX_ONLY)
    cur.execute(fetch.execute, fetch_params(after, limit))
    rows = cur.fetchall()
    return Batch(rows[: bisect_right(rows, upto, key=_position)])


# Store the cursor ($1, $2; $3 more published under row $4) and, with $5, delete the rows at or
# behind it: one statement, so one transaction. It runs on the session that holds the producer
# lock, so it applies only while this producer is the active one (a lost session fails it), and
# the cursor never moves backwards; nothing is pruned then.
_ADVANCE = Statement(
    "cdc_advance",
    ("xid8", "bigint", "bigint", "text", "boolean"),
    """
WITH moved AS (
    UPDATE cdc_producer_state
       SET last_txid = $1, last_action_id = $2, published_total = published_total + $3, updated_at = now()
     WHERE name = $4 AND (last_txid, last_action_id) < ($1, $2)
    RETURNING 1
), pruned AS (
    DELETE FROM emp_records_cdc
     WHERE $5 AND EXISTS (SELECT FROM moved) AND (txid, action_id) <= ($1, $2)
    RETURNING 1
), pruned_generic AS (
    DELETE FROM cdc_outbox
     WHERE $5 AND EXISTS (SELECT FROM moved) AND (txid, action_id) <= ($1, $2)
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM pruned) + (SELECT count(*) FROM pruned_generic)
""",
)

# True only while the session %(pid)s holds the producer lock: the fence of a cursor reset, which
# runs on a pooled connection.
_HOLDS_LOCK = """
EXISTS (SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND classid = %(lock_class)s AND objid = %(lock_id)s
           AND objsubid = 2 AND pid = %(pid)s AND granted)
"""

# Both outboxes' rows after the cursor.
_AFTER = """
SELECT txid, captured_at FROM emp_records_cdc WHERE (txid, action_id) > (%(txid)s::text::xid8, %(action_id)s)
UNION ALL
SELECT txid, captured_at FROM cdc_outbox WHERE (txid, action_id) > (%(txid)s::text::xid8, %(action_id)s)
"""

_BACKLOG = f"""
WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT count(*),
       count(*) FILTER (WHERE txid >= h.xmin),
       extract(epoch FROM clock_timestamp() - min(captured_at) FILTER (WHERE txid >= h.xmin)),
       (SELECT extract(epoch FROM clock_timestamp() - min(started))
          FROM (SELECT xact_start FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
                UNION ALL
                SELECT prepared FROM pg_prepared_xacts) AS open_xacts (started))
  FROM ({_AFTER}) AS outboxes, h
"""

# The server's next txid, and outbox rows beyond it: rows no transaction of this server wrote.
_FUTURE = """
WITH h AS (SELECT pg_snapshot_xmax(pg_current_snapshot()) AS next)
SELECT h.next::text::bigint,
       (SELECT count(*) FROM emp_records_cdc WHERE txid >= h.next)
       + (SELECT count(*) FROM cdc_outbox WHERE txid >= h.next)
  FROM h
"""

_HORIZON = """
SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint FROM pg_current_snapshot() AS s
"""

# Moves the cursor anywhere, but only while the caller's lock session holds the producer lock.
_RESET = f"""
UPDATE cdc_producer_state SET last_txid = %(txid)s::text::xid8, last_action_id = %(action_id)s, updated_at = now()
 WHERE name = %(name)s AND {_HOLDS_LOCK}
"""

_LAST = """
SELECT last.txid::text::bigint, last.action_id
  FROM ((SELECT txid, action_id FROM emp_records_cdc
          WHERE (txid, action_id) > (%(txid)s::text::xid8, %(action_id)s)
          ORDER BY txid DESC, action_id DESC
          LIMIT 1)
        UNION ALL
        (SELECT txid, action_id FROM cdc_outbox
          WHERE (txid, action_id) > (%(txid)s::text::xid8, %(action_id)s)
          ORDER BY txid DESC, action_id DESC
          LIMIT 1)) AS last
 ORDER BY last.txid DESC, last.action_id DESC
 LIMIT 1
"""

# Where the row of an action_id sits (in either outbox: one sequence numbers both).
_POSITION = """
SELECT txid::text::bigint, action_id FROM emp_records_cdc WHERE action_id = %(action_id)s
UNION ALL
SELECT txid::text::bigint, action_id FROM cdc_outbox WHERE action_id = %(action_id)s
"""

_BETWEEN = """
SELECT (SELECT count(*) FROM emp_records_cdc
         WHERE (txid, action_id) > (%(after_txid)s::text::xid8, %(after_action_id)s)
           AND (txid, action_id) <= (%(upto_txid)s::text::xid8, %(upto_action_id)s))
     + (SELECT count(*) FROM cdc_outbox
         WHERE (txid, action_id) > (%(after_txid)s::text::xid8, %(after_action_id)s)
           AND (txid, action_id) <= (%(upto_txid)s::text::xid8, %(upto_action_id)s))
"""

# The oldest transaction that has a transaction id: it is the one holding the xid horizon.
# A prepared transaction (PREPARE TRANSACTION) holds it too, with no session left to show it.
_HORIZON_HOLDER = """
SELECT pid, x::text, age_s, state, query, gid, prepared, owner, database
  FROM (SELECT pid, backend_xid AS x, extract(epoch FROM clock_timestamp() - xact_start) AS age_s, state,
               left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query,
               NULL::text AS gid, NULL::timestamptz AS prepared, usename AS owner, datname AS database
          FROM pg_stat_activity
         WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
        UNION ALL
        SELECT NULL, transaction, extract(epoch FROM clock_timestamp() - prepared), NULL, NULL,
               gid, prepared, owner, database
          FROM pg_prepared_xacts) AS holders
 ORDER BY age(x) DESC
 LIMIT 1
"""


def snapshot_sql(table: Table) -> sql.Composed:
    """Every current row of the table queued as a SNAPSHOT event, in key order."""
    columns = sql.SQL(", ").join(c.ident for c in table.written)
    return sql.SQL(
        """
WITH ins AS (
    INSERT INTO {outbox} ({columns}, action)
    SELECT {columns}, 'SNAPSHOT' FROM {table} ORDER BY {key}
    RETURNING action_id
)
SELECT count(*), min(action_id), max(action_id) FROM ins
"""
    ).format(outbox=sql.Identifier(OUTBOX), columns=columns, table=table.ident, key=table.key.ident)


@dataclass(frozen=True, order=True)
class Cursor:
    """The position of the last published row, in the order rows are read."""

    txid: int = 0
    action_id: int = 0


# A fetched row (``fetch_statement``): key, value, captured_at epoch, checked, and the table's
# schema and name (None for employees).
Row = tuple[str, str, float | None, bool, str | None, str | None]


def _position(row: Row) -> Cursor:
    """Where a fetched row sits in cursor order, read from its event (so no xid8 cast)."""
    event = json.loads(row[1])
    return Cursor(event["txid"], event["action_id"])


@dataclass(frozen=True)
class CursorReset:
    """What ``Outbox.reset_cursor`` did."""

    old: Cursor
    new: Cursor
    restamped: int  # outbox rows whose txid lay beyond the server's, moved to restamped_to
    restamped_to: int
    behind: int  # outbox rows at or behind the new cursor: not published (again)
    ahead: int  # committed outbox rows after it: published next


@dataclass(frozen=True)
class Backlog:
    rows: int  # not yet published, readable or not
    held_back: int  # committed, but behind an open transaction's xid: not readable yet
    held_for: float  # seconds the oldest held-back row has waited
    oldest_xact_age: float = 0.0  # seconds since the oldest transaction holding an xid began (0: none)


@dataclass(frozen=True)
class Batch:
    """The next outbox rows as Kafka messages, in cursor order (``ProducerSession.fetch``).

    Each row (``Row``): key (the primary key as text: an employees row's emp_id, another table's
    key object as jsonb's text), value (the event JSON), captured_at (epoch seconds, for the latency
    stats), ``checked`` (False: the event model must look at it, see ``checked_sql``), and the
    table's schema and name: None for employees (topic CDC_TOPIC), else the table's own topic's.
    """

    rows: list[Row]

    @property
    def first(self) -> Cursor:
        """The position of its first event."""
        return _position(self.rows[0])

    @property
    def last(self) -> Cursor:
        """The cursor after this batch: the position of its last event."""
        return _position(self.rows[-1])


class Routes:
    """The topic of each fetched row: CDC_TOPIC for employees, its table's own topic
    (``ChangeCodec.topic``, under CDC_TOPIC_PREFIX) for any other, created the first time the
    table is seen (``prepare``). ``existing``: the topics the cluster had at the start.

    An admin client is made only to create a topic, and dropped after: an idle one would only
    queue the events of every broker outage."""

    def __init__(self, settings: Settings, existing: set[str]) -> None:
        self.settings = settings
        self.codec = ChangeCodec(settings.cdc_topic_prefix)
        self._existing = set(existing)
        self._tables: dict[tuple[str, str], str] = {}  # tables seen, with their topic (it exists)

    def prepare(self, rows: list[Row]) -> None:
        """See that the topic of every table in ``rows`` exists, before any of them is produced.
        DeliveryError if one could not be created: the batch is not sent."""
        tables = self._tables
        new = {(r[4], r[5]) for r in rows if r[4] is not None and (r[4], r[5]) not in tables}
        admin: AdminClient | None = None
        for schema, table in sorted(new):
            assert schema is not None and table is not None
            topic = self.codec.topic(schema, table)
            if topic not in self._existing:
                try:
                    admin = admin or admin_client(self.settings, logger=log)
                    ensure_topic(self.settings, admin, topic)
                except (ServiceError, KafkaException) as exc:
                    raise DeliveryError(f"topic of table {schema}.{table} not ready: {exc}") from exc
                self._existing.add(topic)
            tables[(schema, table)] = topic
            log.info("publishing table %s.%s to topic %s", schema, table, topic)

    def messages(self, rows: list[Row], headers: Headers) -> Iterator[Outgoing]:
        """Each row as the message to send (``prepare`` first): topic, key, value, ``headers``."""
        default, tables = self.settings.cdc_topic, self._tables
        return (
            (default if schema is None else tables[(schema, table)], key, value, headers)  # type: ignore[index]
            for key, value, _, _, schema, table in rows
        )


class Outbox:
    """SQL on both outboxes (``emp_records_cdc``, ``cdc_outbox``) and the cursor row, through the
    connection pool."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def check_schema(self) -> None:
        """Fail with a clear line if setup_db.sql has not been applied; make sure the cursor row exists."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL",
                ([SOURCE_TABLE, OUTBOX, GENERIC_OUTBOX, "cdc_producer_state"],),
            )
            missing = [r[0] for r in cur.fetchall()]
            if missing:
                raise SchemaMissingError(
                    f"source database {self.db.url} has no CDC schema (missing: {', '.join(missing)}); "
                    "apply setup_db.sql (psql -f setup_db.sql) or run `make up`"
                )
            cur.execute(
                "INSERT INTO cdc_producer_state (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                (STATE_NAME,),
            )

    def load_cursor(self) -> Cursor:
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT last_txid::text::bigint, last_action_id FROM cdc_producer_state WHERE name = %s",
                (STATE_NAME,),
            )
            row = cur.fetchone()
        if row is None:
            raise SchemaMissingError(f"cdc_producer_state has no row {STATE_NAME!r}; apply setup_db.sql")
        return Cursor(*row)

    def check_horizon(self, cursor: Cursor) -> None:
        """ConfigError if ``cursor`` or any outbox row carries a txid this server never assigned.

        After a restore into another cluster (dump/restore, cutover, PITR) the copied cursor can
        lie above every new txid, so every new change would be skipped; copied rows above it
        would be held back for ever. Nothing waits that out: the operator must reset the cursor.
        """
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_INDEX_ONLY)  # a fresh backlog has no statistics: no full scan per check
            cur.execute(_FUTURE)
            next_xid, future_rows = one_row(cur)
        fix = (
            "stop every producer, then run `producer.py --reset-cursor beginning` (re-publish the outbox) "
            "or `producer.py --reset-cursor end` (skip it; then verify and --snapshot), see USAGE.md"
        )
        if cursor.txid >= next_xid:
            raise ConfigError(
                f"cursor txid={cursor.txid} action_id={cursor.action_id} is beyond this server's "
                f"transaction ids (next xid {next_xid}): the source comes from another cluster "
                f"(restore, cutover, PITR) and every new change would be skipped; {fix}"
            )
        if future_rows:
            raise ConfigError(
                f"{future_rows} outbox rows carry txids beyond this server's transaction ids "
                f"(next xid {next_xid}): copied from another cluster, they would be held back for ever; {fix}"
            )

    def reset_cursor(self, to_end: bool, *, lock_pid: int) -> CursorReset:
        """Move the cursor to the beginning (re-publish the outbox) or to the end (skip it).

        Outbox rows whose txid lies beyond the server's (copied from another cluster) first get
        the txid just below the horizon: ended, so readable at once, and ordered before every
        transaction still running. The end is that same point, so a transaction running now is
        still published when it commits: only what has ended is skipped.
        """
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_HORIZON)
            xmin, xmax = one_row(cur)
            stamp = xmin - 1
            cur.execute(_INDEX_ONLY)
            restamped = 0
            for outbox in (OUTBOX, GENERIC_OUTBOX):
                cur.execute(
                    sql.SQL("UPDATE {} SET txid = %s::text::xid8 WHERE txid >= %s::text::xid8").format(
                        sql.Identifier(outbox)
                    ),
                    (stamp, xmax),
                )
                restamped += cur.rowcount
            if to_end:
                cur.execute(
                    "SELECT greatest((SELECT max(action_id) FROM emp_records_cdc),"
                    " (SELECT max(action_id) FROM cdc_outbox), 0)"
                )
                new = Cursor(stamp, one_row(cur)[0])
            else:
                new = Cursor()
            cur.execute(
                "SELECT last_txid::text::bigint, last_action_id FROM cdc_producer_state WHERE name = %s",
                (STATE_NAME,),
            )
            old = Cursor(*one_row(cur))
            params = {"txid": new.txid, "action_id": new.action_id, "name": STATE_NAME}
            params.update(lock_class=LOCK_CLASS, lock_id=LOCK_ID, pid=lock_pid)
            cur.execute(_RESET, params)
            if cur.rowcount != 1:
                raise LeadershipLost("cursor not reset: this process does not hold the producer lock")
            cur.execute(
                "SELECT count(*) FILTER (WHERE (txid, action_id) <= (%(txid)s::text::xid8, %(action_id)s)),"
                " count(*) FILTER (WHERE (txid, action_id) > (%(txid)s::text::xid8, %(action_id)s))"
                " FROM (SELECT txid, action_id FROM emp_records_cdc"
                " UNION ALL SELECT txid, action_id FROM cdc_outbox) AS outboxes",
                params,
            )
            behind, ahead = one_row(cur)
        return CursorReset(old, new, restamped, stamp, behind, ahead)

    def backlog(self, after: Cursor) -> Backlog:
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_BACKLOG, {"txid": after.txid, "action_id": after.action_id})
            rows, held, held_for, oldest = one_row(cur)
        return Backlog(
            rows=rows, held_back=held, held_for=float(held_for or 0.0), oldest_xact_age=float(oldest or 0.0)
        )

    def position(self, action_id: int) -> Cursor | None:
        """Where the row ``action_id`` sits in cursor order; None if neither outbox has it."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_POSITION, {"action_id": action_id})
            row = cur.fetchone()
        return Cursor(*row) if row else None

    def count_between(self, after: Cursor, upto: Cursor) -> int:
        """Rows of both outboxes after ``after`` up to and including ``upto``, in cursor order."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_INDEX_ONLY)
            cur.execute(
                _BETWEEN,
                {
                    "after_txid": after.txid,
                    "after_action_id": after.action_id,
                    "upto_txid": upto.txid,
                    "upto_action_id": upto.action_id,
                },
            )
            return int(one_row(cur)[0])

    def last_committed(self, after: Cursor) -> Cursor | None:
        """The last committed row after ``after`` in cursor order, readable yet or not."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_LAST, {"txid": after.txid, "action_id": after.action_id})
            row = cur.fetchone()
        return Cursor(*row) if row else None

    def horizon_holder(self) -> dict[str, Any] | None:
        """The transaction holding the horizon back: pid, xid, age_s, state, query for an open
        one; gid, xid, age_s, prepared, owner, database for a prepared one (pid None)."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(_HORIZON_HOLDER)
            row = cur.fetchone()
        if row is None:
            return None
        keys = ("pid", "xid", "age_s", "state", "query", "gid", "prepared", "owner", "database")
        return dict(zip(keys, row, strict=True))

    def snapshot(self, channel: str) -> tuple[int, int | None, int | None]:
        """Queue every current row of the table as a SNAPSHOT event. Returns (rows, first action_id, last).

        The SHARE lock waits for writers in flight and holds new ones off during the copy: the
        copy sees every change that took a lower action_id, and every later change gets a higher
        one, so the sink's version guard never lets the copy overwrite a newer change.
        """
        try:
            with self.db.connection() as conn, conn.cursor() as cur:
                # At REPEATABLE READ or SERIALIZABLE (a database default) the transaction's one
                # snapshot could predate the lock and copy an image older than a change that
                # committed during the wait, under a newer action_id.
                cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute("SELECT set_config('lock_timeout', %s, true)", (SNAPSHOT_LOCK_TIMEOUT,))
                cur.execute("SELECT set_config('statement_timeout', '0', true)")
                table = Table.load(cur, SOURCE_TABLE)
                cur.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(table.ident))
                cur.execute(snapshot_sql(table))
                count, first, last = one_row(cur)
                cur.execute("SELECT pg_notify(%s, '')", (channel,))
        except TransientError as exc:
            if isinstance(exc.__cause__, psycopg2.errors.LockNotAvailable):
                raise CDCError(
                    f"snapshot: {SOURCE_TABLE} could not be locked within {SNAPSHOT_LOCK_TIMEOUT} (a long "
                    "transaction is writing to it); nothing was queued, try again"
                ) from exc
            raise
        return count, first, last


class ProducerSession:
    """The active producer's own session: it holds the advisory lock, LISTENs on the channel, and
    runs the hot path (``fetch``, ``advance``) as prepared statements.

    The cursor is written only here: a session that lost the lock is a session that is gone, so
    a producer replaced by another can never move the cursor.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        application_name: str = "cdc-producer-lock",
        statement_timeout_ms: int = 30000,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.application_name = application_name
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg2.extensions.connection | None = None
        self._prepared: set[str] = set()
        self.pid: int | None = None  # backend pid of the lock connection while the lock is held
        self.table: Table | None = None  # the source table, read from the catalog when the lock is taken
        self._codec: Codec | None = None
        self._fetch: Statement | None = None

    @property
    def held(self) -> bool:
        return self.pid is not None and self._conn is not None and self._conn.closed == 0

    def try_acquire(self) -> bool:
        """Take the lock if it is free. True if this process holds it now."""
        if self.held:
            return True
        try:
            if self._conn is None or self._conn.closed:
                self._prepared.clear()
                self._conn = psycopg2.connect(
                    self.dsn,
                    connect_timeout=CONNECT_TIMEOUT,
                    application_name=self.application_name,
                    options=" ".join(f"-c {name}={value}" for name, value in self._session_settings()),
                    **KEEPALIVES,
                )
                self._conn.autocommit = True
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()", (LOCK_CLASS, LOCK_ID))
                got, pid = one_row(cur)
                if not got:
                    return False
                cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self.table = Table.load(cur, SOURCE_TABLE)
                self._fetch = fetch_statement(cur, self.table)
                self._codec = Codec(self.table)
        except psycopg2.Error as exc:
            self.close()
            raise (classify(exc) or TransientError(str(exc).strip())) from exc
        self.pid = pid
        return True

    @property
    def codec(self) -> Codec:
        """The table's events, for rows the fetch cannot vouch for (known once the lock is held)."""
        if self._codec is None:
            raise LeadershipLost("the lock is not held")
        return self._codec

    def _session_settings(self) -> list[tuple[str, object]]:
        return [
            # The server keeps the lock until it sees this session die: if this host or its
            # network goes away, its own keepalives tell it within about a minute.
            ("tcp_keepalives_idle", 30),
            ("tcp_keepalives_interval", 10),
            ("tcp_keepalives_count", 3),
            ("statement_timeout", self.statement_timeout_ms),
            # The outbox's statistics lag behind (see _INDEX_ONLY): the prepared statements
            # read it through the (txid, action_id) index, with one plan for every batch.
            ("enable_seqscan", "off"),
            ("enable_sort", "off"),
            ("enable_bitmapscan", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ]

    def fetch(self, after: Cursor, limit: int) -> Batch:
        """The next rows after ``after`` whose transactions have all ended, in cursor order."""
        if self._fetch is None:
            raise LeadershipLost("the lock is not held")
        return Batch(self._run(self._fetch, fetch_params(after, limit)))

    def advance(self, to: Cursor, count: int, *, prune: bool) -> int:
        """Store the cursor (and prune behind it) in one transaction. Returns rows pruned."""
        [(moved, pruned)] = self._run(_ADVANCE, (str(to.txid), to.action_id, count, STATE_NAME, prune))
        if moved != 1:
            raise LeadershipLost("cursor not stored: another producer moved it (this one was replaced)")
        return pruned

    def _run(self, statement: Statement, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """Execute ``statement`` on the lock session (preparing it the first time).

        A failed session means the lock is gone: LeadershipLost. Any other error is classified
        as the pool does (``cdc.runtime.db.classify``).
        """
        if not self.held:
            raise LeadershipLost("the lock connection is closed")
        assert self._conn is not None
        try:
            with self._conn.cursor() as cur:
                if statement.name not in self._prepared:
                    cur.execute(statement.prepare)
                    self._prepared.add(statement.name)
                cur.execute(statement.execute, params)
                return cur.fetchall()
        except psycopg2.Error as exc:
            if self._conn.closed:
                self.close()
                raise LeadershipLost(f"the lock connection failed: {_first_line(exc)}") from exc
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def wait(self, timeout: float, wakeup_fd: int | None = None) -> bool:
        """Sleep until a NOTIFY, a signal (``wakeup_fd`` readable) or ``timeout``. True if notified.

        A closed lock connection means the lock is gone: LeadershipLost.
        """
        if not self.held:
            raise LeadershipLost("the lock connection is closed")
        assert self._conn is not None
        if self._conn.notifies:
            # Arrived with the results of a statement on this session: already read off the socket.
            self._conn.notifies.clear()
            return True
        fds: list[Any] = [self._conn] if wakeup_fd is None else [self._conn, wakeup_fd]
        ready, _, _ = select.select(fds, [], [], timeout)
        if wakeup_fd is not None and wakeup_fd in ready:
            _drain(wakeup_fd)
        return self.check() if self._conn in ready else False

    def check(self) -> bool:
        """Read pending notifications without blocking. True if any; LeadershipLost if the connection died."""
        if not self.held:
            raise LeadershipLost("the lock connection is closed")
        assert self._conn is not None
        try:
            self._conn.poll()
        except psycopg2.Error as exc:
            self.close()
            raise LeadershipLost(f"the lock connection failed: {_first_line(exc)}") from exc
        notified = bool(self._conn.notifies)
        self._conn.notifies.clear()
        return notified

    def close(self) -> None:
        """Drop the connection; the server releases the lock with the session."""
        self.pid = None
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                log.debug("closing the lock connection failed", exc_info=True)
            self._conn = None

    def __repr__(self) -> str:
        return f"ProducerSession({redact_url(self.dsn)}, pid={self.pid})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
