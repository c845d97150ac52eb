"""A realistic write load on the source table: ``python -m cdc workload``.

The table is read from the catalog at start (``cdc.model.table``) and every statement and value
is derived from it. Each writer is a thread with its own connections. A transaction holds 1..N
changes drawn from a weighted mix: single and bulk INSERTs, UPDATEs of one row or a range,
DELETEs, INSERTs that re-use the key of a deleted row, key changes (``SET key = nextval(...)``,
captured as a DELETE plus an INSERT; only when the key has a sequence), and "transfers" that
update two rows in random order, so writers deadlock now and then. Values follow each column's
kind and include NULLs, empty strings, non-ASCII text, quotes, text at the column's length limit
and the extremes of integer types.

Every writer also opens a long transaction now and then, on a second connection, which writes a
little, stays open while its writer commits ``long_span`` ordinary transactions, then commits:
its action_ids are lower than ones committed before it, which is the case a naive
``action_id > last`` poll loses.

Deadlocks, unique violations and lock timeouts roll back the transaction and are counted; a lost
connection (a source restart) is counted and reconnected with backoff. Anything else is a bug:
the workload stops and ``stop()`` raises it. It stops by itself after ``duration`` seconds or
``max_changes`` changes, whichever comes first. With one writer the same seed writes the same
changes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import execute_values

from cdc.errors import CDCError, ConfigError
from cdc.model.table import SOURCE_TABLE, Column, Kind, Table
from cdc.runtime.db import CONNECT_TIMEOUT, KEEPALIVES, one_row
from cdc.runtime.settings import redact_url
from cdc.runtime.signals import backoff_delay
from cdc.runtime.stats import Stats

log = logging.getLogger(__name__)

# Longer than deadlock_timeout (1 s), so PostgreSQL's deadlock detector acts first; it also
# ends waits the detector cannot see (a writer's thread waiting on another writer's idle long
# transaction while that writer waits on the first one's).
LOCK_TIMEOUT_MS = 3000
STATEMENT_TIMEOUT_MS = 30000
RECONNECT_BACKOFF_MAX = 5.0
DELETED_POOL_MAX = 1000
NULL_CHANCE = 0.08
EMPTY_CHANCE = 0.02
MAX_LENGTH_CHANCE = 0.02
EXTREME_INTEGER_CHANCE = 0.01
LONG_TEXT = 100  # the "longest" text of a column without a length limit
INTEGER_TYPICAL = (20_000, 250_000)  # most integers, within the column type's range

# One vocabulary for every text column: non-ASCII, several scripts, quotes, a backslash, an emoji.
WORDS = (
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Zoë", "José", "Łukasz", "Søren", "Chloé",
    "Nguyễn", "Иван", "Ольга", "美咲", "太郎", "Αλέξανδρος", "محمد", "אברהם", "Siobhán", "D'Arcy",
    "Jean-Luc", "Ana María", "Björk", "Çağla", "Åsa", "Nnamdi", "Priyā", "Ewa 🌻",
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "O'Brien", "Müller", "García Márquez",
    "Kowalski", "Ødegaard", "Dvořák", "Zhang", "Иванова", "山田", "Nakamura", "Papadopoulos",
    "van der Berg", "Smith, Jr.", 'Quote "Q" Quinn', "Back\\slash", "Núñez", "Şahin", "Þórsdóttir",
    "London", "Zürich", "São Paulo", "Kraków", "Reykjavík", "Москва", "東京", "Ciudad de México",
    "Århus", "New York", "Île-de-France", "Αθήνα", "القاهرة", "Tel Aviv-Yafo", "Łódź", "Nuuk",
)  # fmt: skip
DATE_FIRST = date(1940, 1, 1)
DATE_DAYS = (date(2006, 12, 31) - DATE_FIRST).days

# Why a transaction was rolled back, by SQLSTATE; anything else is a bug.
ROLLBACK_REASONS = {
    psycopg2.errorcodes.DEADLOCK_DETECTED: "deadlock",
    psycopg2.errorcodes.UNIQUE_VIOLATION: "unique_violation",
    psycopg2.errorcodes.LOCK_NOT_AVAILABLE: "lock_timeout",
    psycopg2.errorcodes.SERIALIZATION_FAILURE: "serialization_failure",
    psycopg2.errorcodes.QUERY_CANCELED: "statement_timeout",
}
# Connection classes: 08 connection exception, 57P0x server shutting down / not yet accepting.
_CONNECTION_CODES = ("57P01", "57P02", "57P03")

# Rows one operation changes (at most), where that is more than one.
ROWS_PER_OPERATION = {"bulk_insert": (5, 30), "update_range": (2, 10), "transfer": (2, 2)}
OPERATIONS = ("insert", "bulk_insert", "update", "update_range", "transfer", "delete", "reuse", "id_change")
# The statement each operation runs, where its name differs.
_STATEMENT = {"bulk_insert": "insert"}
# Transfers wait on row locks; a long transaction must not hold its writer up, so it has none.
LONG_OPERATIONS = ("insert", "update", "delete", "reuse", "id_change")


@dataclass(frozen=True)
class Mix:
    """Relative weights of the operations, and the shape of transactions."""

    insert: int = 30
    bulk_insert: int = 3  # one INSERT of 5..30 rows
    update: int = 30
    update_range: int = 5  # one UPDATE of 2..10 neighbouring rows
    transfer: int = 5  # two rows updated in random order, waiting on locks
    delete: int = 12
    reuse: int = 6  # INSERT with the key of a deleted row
    id_change: int = 4  # SET key = nextval(...): only when the key has a sequence
    max_statements: int = 5  # an ordinary transaction holds 1..max_statements operations
    long_every: int = 20  # about one transaction in this many also opens a long one (0: never)
    long_span: int = 8  # a long transaction stays open while its writer commits this many

    def __post_init__(self) -> None:
        weights = [getattr(self, op) for op in OPERATIONS]
        if min(weights) < 0 or sum(weights) == 0:
            raise ConfigError(f"workload mix needs non-negative weights, not all 0: {weights}")
        if self.max_statements < 1 or self.long_every < 0 or self.long_span < 1:
            raise ConfigError(
                "workload mix: max_statements and long_span must be at least 1, long_every >= 0"
            )


def check_local(url: str) -> None:
    """Refuse a database that is not on this machine: the workload writes random rows."""
    try:
        hosts = psycopg2.extensions.parse_dsn(url).get("host") or ""
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(f"SOURCE_DB_URL {redact_url(url)} is not valid: {exc}") from None
    for host in hosts.split(","):
        host = host.strip()
        if not host or host.startswith("/") or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        raise ConfigError(
            f"SOURCE_DB_URL host {host} is not this machine; the workload writes random rows into "
            f"{SOURCE_TABLE}, so it only runs against local databases (--allow-remote to override)"
        )


class _Shared:
    """What the writers share: the change budget, the highest key seen, deleted keys."""

    def __init__(self, max_changes: int | None, max_id: int, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self._left = max_changes
        self._stop = stop
        self.max_id = max_id
        self._deleted: deque[int] = deque(maxlen=DELETED_POOL_MAX)

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` changes of the budget; 0 means the budget is spent."""
        with self._lock:
            if self._left is None:
                return wanted
            granted = min(wanted, self._left)
            self._left -= granted
            if self._left == 0:
                self._stop.set()
            return granted

    def saw_ids(self, ids: list[int]) -> None:
        with self._lock:
            self.max_id = max(self.max_id, *ids)

    def new_keys(self, n: int) -> list[int]:
        """``n`` keys above every key seen (for a key without a sequence)."""
        with self._lock:
            first = self.max_id + 1
            self.max_id += n
        return list(range(first, first + n))

    def deleted(self, ids: list[int]) -> None:
        with self._lock:
            self._deleted.extend(ids)

    def reused(self, ids: list[int]) -> None:
        with self._lock:
            for key in ids:
                with contextlib.suppress(ValueError):
                    self._deleted.remove(key)

    def pick_deleted(self, rng: random.Random, exclude: set[int]) -> int | None:
        # Not removed until the re-insert commits: two writers may race for one id, and the
        # loser gets a unique violation, as two clients re-creating one employee would.
        with self._lock:
            candidates = [i for i in self._deleted if i not in exclude]
        return rng.choice(candidates) if candidates else None


class _Statements:
    """Every statement of the workload, built from the table and rendered once at start.

    An operation the table cannot do has None: ``update_range`` without a text column,
    ``transfer`` without an integer one, ``id_change`` without a sequence behind the key.
    """

    def __init__(self, table: Table, serial: bool, conn: psycopg2.extensions.connection) -> None:
        key = table.key
        if key.kind is not Kind.INTEGER:
            raise ConfigError(
                f"the workload needs an integer primary key; {table.name}.{key.name} is {key.type}"
            )
        if not table.values:
            raise ConfigError(f"the workload needs a column besides the key in {table.name}")
        self.table = table
        self.key = key
        self.values = table.values
        self.serial = serial  # else the workload picks new keys itself
        t, k = table.ident, key.ident
        self.range_column = next((c for c in self.values if c.kind is Kind.TEXT), None)
        self.transfer_column = next((c for c in self.values if c.kind is Kind.INTEGER), None)
        # SKIP LOCKED: take the next row nobody is writing, so ordinary operations do not queue up.
        self.pick_one = sql.SQL(
            "SELECT {k} FROM {t} WHERE {k} >= %s ORDER BY {k} LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).format(k=k, t=t)
        self._updates: dict[tuple[int, ...], str] = {}

        self.max_key = sql.SQL("SELECT coalesce(max({k}), 0) FROM {t}").format(k=k, t=t).as_string(conn)
        inserted = self.values if serial else (key, *self.values)
        self.insert = (
            sql.SQL("INSERT INTO {t} ({c}) VALUES %s RETURNING {k}")
            .format(t=t, c=_names(inserted), k=k)
            .as_string(conn)
        )
        self.reuse = (
            sql.SQL("INSERT INTO {t} ({k}, {c}){o} VALUES ({p}) RETURNING {k}")
            .format(
                t=t,
                k=k,
                c=_names(self.values),
                o=sql.SQL(" OVERRIDING SYSTEM VALUE" if key.identity else ""),
                p=sql.SQL(", ").join([sql.Placeholder()] * (1 + len(self.values))),
            )
            .as_string(conn)
        )
        self.delete = (
            sql.SQL("DELETE FROM {t} WHERE {k} = ({pick}) RETURNING {k}")
            .format(t=t, k=k, pick=self.pick_one)
            .as_string(conn)
        )
        self.update_range: str | None = None
        if self.range_column is not None:
            self.update_range = (
                sql.SQL(
                    "UPDATE {t} SET {c} = %s WHERE {k} IN ("
                    " SELECT {k} FROM {t} WHERE {k} >= %s ORDER BY {k} LIMIT %s FOR UPDATE SKIP LOCKED"
                    ") RETURNING {k}"
                )
                .format(t=t, c=self.range_column.ident, k=k)
                .as_string(conn)
            )
        # No SKIP LOCKED: two of these in opposite order in two writers is a deadlock. Rows this
        # writer's own long transaction holds are excluded: waiting on them would wait on itself.
        self.transfer: str | None = None
        if self.transfer_column is not None:
            self.transfer = (
                sql.SQL(
                    "UPDATE {t} SET {c} = %s WHERE {k} = (SELECT {k} FROM {t} WHERE {k} >= %s"
                    " AND {k} <> ALL(%s) ORDER BY {k} LIMIT 1) RETURNING {k}"
                )
                .format(t=t, c=self.transfer_column.ident, k=k)
                .as_string(conn)
            )
        self.id_change: str | None = None
        if serial:
            # An identity column GENERATED ALWAYS takes only DEFAULT (its sequence's next value).
            new = (
                sql.SQL("DEFAULT")
                if key.identity
                else sql.SQL("nextval(pg_get_serial_sequence({t}, {n}))").format(
                    t=sql.Literal(t.as_string(conn)), n=sql.Literal(key.name)
                )
            )
            self.id_change = (
                sql.SQL(
                    "WITH old AS ({pick}) UPDATE {t} e SET {k} = {new} FROM old WHERE e.{k} = old.{k}"
                    " RETURNING old.{k}, e.{k}"
                )
                .format(pick=self.pick_one, t=t, k=k, new=new)
                .as_string(conn)
            )

    def update(self, columns: tuple[int, ...], cur: psycopg2.extensions.cursor) -> str:
        """UPDATE of the value columns at these indexes (ascending), of one row picked at a key."""
        statement = self._updates.get(columns)
        if statement is None:
            sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(self.values[i].ident) for i in columns)
            statement = (
                sql.SQL("UPDATE {t} SET {s} WHERE {k} = ({pick}) RETURNING {k}")
                .format(t=self.table.ident, s=sets, k=self.key.ident, pick=self.pick_one)
                .as_string(cur)
            )
            self._updates[columns] = statement
        return statement


def _names(columns: tuple[Column, ...]) -> sql.Composable:
    return sql.SQL(", ").join(c.ident for c in columns)


def _has_sequence(cur: psycopg2.extensions.cursor, table: Table) -> bool:
    """Whether a sequence (serial or identity) gives the key its values."""
    cur.execute(
        "SELECT pg_get_serial_sequence(%s, %s) IS NOT NULL", (table.ident.as_string(cur), table.key.name)
    )
    return bool(cur.fetchone()[0])  # type: ignore[index]


class _Tx:
    """What one transaction did, counted in the stats only if it commits."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.deleted: list[int] = []
        self.reused: list[int] = []
        self.locked: set[int] = set()  # keys of the rows this transaction holds


class _Writer(threading.Thread):
    def __init__(self, workload: Workload, index: int) -> None:
        super().__init__(name=f"workload-writer-{index}", daemon=True)
        self.wl = workload
        self.rng = random.Random(workload.seed * 1000 + index)
        self.rate = workload.rate / workload.writers if workload.rate else 0.0
        self.conn: psycopg2.extensions.connection | None = None
        self.long_conn: psycopg2.extensions.connection | None = None
        self.long: _Tx | None = None
        self.long_left = 0
        self.reserved = 0  # changes reserved so far, for pacing

    # --- connections -------------------------------------------------------------------------

    def connect(self) -> None:
        self.conn = self.wl.connect()
        self.long_conn = self.wl.connect()

    def _close(self) -> None:
        if self.long is not None:
            self.wl.stats.incr("rolled_back")
            self.wl.stats.incr("rolled_back_connection")
        for conn in (self.conn, self.long_conn):
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()
        self.conn = self.long_conn = None
        self.long = None

    def _reconnect(self) -> None:
        self._close()
        attempt = 0
        while not self.wl.stopping():
            attempt += 1
            if self.wl.stop_event.wait(backoff_delay(attempt, RECONNECT_BACKOFF_MAX)):
                return
            try:
                self.connect()
            except psycopg2.OperationalError as exc:
                log.debug("writer %s: reconnect failed: %s", self.name, exc)
                self._close()
                continue
            self.wl.stats.incr("reconnects")
            return

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.wl.stopping():
                if self.conn is None:
                    self._reconnect()
                    continue
                self._pace()
                if self.wl.stopping():
                    break
                if self.long is None and self.wl.long_every and self.rng.randrange(self.wl.long_every) == 0:
                    self._open_long()
                elif self.long is not None:
                    self._step_long()
                if self.conn is not None:
                    self._ordinary()
            self._finish_long()
        except Exception as exc:  # noqa: BLE001 - a bug: stop every writer, stop() re-raises it
            self.wl.fail(exc)
        finally:
            self._close()

    def _pace(self) -> None:
        if not self.rate:
            return
        ahead = self.wl.started + self.reserved / self.rate - time.monotonic()
        if ahead > 0:
            self.wl.stop_event.wait(ahead)

    def _ordinary(self) -> None:
        tx = _Tx()
        statements = self.rng.randint(1, self.wl.mix.max_statements)
        assert self.conn is not None
        with self._attempt(self.conn, long=False):
            done = 0
            with self.conn.cursor() as cur:
                while done < statements and self._operation(cur, tx, self.wl.operations):
                    done += 1
            if done:
                self._commit(self.conn, tx)

    def _open_long(self) -> None:
        tx = _Tx()
        assert self.long_conn is not None
        with self._attempt(self.long_conn, long=True), self.long_conn.cursor() as cur:
            if self._operation(cur, tx, self.wl.long_operations):
                self.long, self.long_left = tx, self.wl.mix.long_span

    def _step_long(self) -> None:
        """Write a little more in the long transaction, or commit it when its span is over."""
        tx, conn = self.long, self.long_conn
        assert tx is not None and conn is not None
        self.long_left -= 1
        with self._attempt(conn, long=True):
            if self.long_left > 0:
                if self.rng.random() < 0.5:
                    with conn.cursor() as cur:
                        self._operation(cur, tx, self.wl.long_operations)
            else:
                self.long = None
                self._commit(conn, tx, long=True)

    def _finish_long(self) -> None:
        if self.long is not None and self.long_conn is not None:
            tx, self.long = self.long, None
            with self._attempt(self.long_conn, long=True):
                self._commit(self.long_conn, tx, long=True)

    def _commit(self, conn: psycopg2.extensions.connection, tx: _Tx, *, long: bool = False) -> None:
        try:
            conn.commit()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            # The server may or may not have committed: the counts cannot be trusted any more.
            self.wl.stats.incr("commit_unknown")
            raise
        stats = self.wl.stats
        for key, n in tx.counts.items():
            stats.incr(key, n)
        stats.incr("transactions")
        if long:
            stats.incr("long_transactions")
        if tx.deleted:
            self.wl.shared.deleted(tx.deleted)
        if tx.reused:
            self.wl.shared.reused(tx.reused)

    @contextlib.contextmanager
    def _attempt(self, conn: psycopg2.extensions.connection, *, long: bool) -> Iterator[None]:
        """Roll back and count what the database refused; reconnect on a lost connection."""
        try:
            yield
        except psycopg2.Error as exc:
            reason = _rollback_reason(exc)
            if reason is None:
                raise
            self.wl.stats.incr("rolled_back")
            self.wl.stats.incr(f"rolled_back_{reason}")
            if long:
                self.long = None
            if reason == "connection":
                self._close()  # the loop reconnects both connections
                return
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            log.debug("writer %s: rolled back (%s): %s", self.name, reason, str(exc).strip())

    # --- operations --------------------------------------------------------------------------

    def _operation(self, cur: psycopg2.extensions.cursor, tx: _Tx, ops: tuple[str, ...]) -> bool:
        """One weighted-random operation. False when the change budget is spent."""
        op = self.rng.choices(ops, weights=[getattr(self.wl.mix, o) for o in ops])[0]
        wanted = self.rng.randint(*ROWS_PER_OPERATION.get(op, (1, 1)))
        granted = self.wl.shared.take(wanted)
        if granted == 0:
            return False
        self.reserved += granted
        getattr(self, f"_op_{op}")(cur, tx, granted)
        return True

    def _pivot(self) -> int:
        return self.rng.randint(1, max(1, self.wl.shared.max_id))

    def _op_insert(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        statements = self.wl.statements
        rows = [self._row() for _ in range(n)]
        if not statements.serial:
            rows = [(key, *row) for key, row in zip(self.wl.shared.new_keys(n), rows, strict=True)]
        ids = [r[0] for r in execute_values(cur, statements.insert, rows, fetch=True)]
        self.wl.shared.saw_ids(ids)
        tx.locked.update(ids)
        tx.counts["insert"] += len(ids)
        tx.counts["changes"] += len(ids)
        tx.counts["events"] += len(ids)

    _op_bulk_insert = _op_insert

    def _op_update(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        values = self.wl.statements.values
        chosen = tuple(sorted(self.rng.sample(range(len(values)), self.rng.randint(1, len(values)))))
        params = [self._value(values[i]) for i in chosen]
        cur.execute(self.wl.statements.update(chosen, cur), [*params, self._pivot()])
        self._count(cur, tx, "update")

    def _op_update_range(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        statements = self.wl.statements
        assert statements.update_range is not None and statements.range_column is not None
        cur.execute(statements.update_range, (self._value(statements.range_column), self._pivot(), n))
        self._count(cur, tx, "update")

    def _op_transfer(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        statements = self.wl.statements
        assert statements.transfer is not None and statements.transfer_column is not None
        own = sorted(self.long.locked) if self.long is not None else []
        for _ in range(n):
            cur.execute(statements.transfer, (self._typical(statements.transfer_column), self._pivot(), own))
            self._count(cur, tx, "update")

    def _op_delete(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        cur.execute(self.wl.statements.delete, (self._pivot(),))
        tx.deleted += self._count(cur, tx, "delete")

    def _op_reuse(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        own = self.long.locked if self.long is not None else set()
        key = self.wl.shared.pick_deleted(self.rng, own | tx.locked)
        if key is None:
            self._op_insert(cur, tx, 1)
            return
        cur.execute(self.wl.statements.reuse, (key, *self._row()))
        tx.reused += self._count(cur, tx, "reuse")

    def _op_id_change(self, cur: psycopg2.extensions.cursor, tx: _Tx, n: int) -> None:
        assert self.wl.statements.id_change is not None
        cur.execute(self.wl.statements.id_change, (self._pivot(),))
        for old_id, new_id in cur.fetchall():
            self.wl.shared.saw_ids([new_id])
            tx.deleted.append(old_id)
            tx.locked.update((old_id, new_id))
            tx.counts["id_change"] += 1
            tx.counts["changes"] += 1
            tx.counts["events"] += 2  # captured as DELETE of the old key plus INSERT of the new one

    def _count(self, cur: psycopg2.extensions.cursor, tx: _Tx, kind: str) -> list[int]:
        ids = [r[0] for r in cur.fetchall()]
        tx.locked.update(ids)
        tx.counts[kind] += len(ids)
        tx.counts["changes"] += len(ids)
        tx.counts["events"] += len(ids)
        return ids

    # --- values ------------------------------------------------------------------------------

    def _row(self) -> tuple[Any, ...]:
        """A value for every written column but the key."""
        return tuple(self._value(c) for c in self.wl.statements.values)

    def _value(self, column: Column) -> Any:
        return _VALUES[column.kind](self, column)

    def _integer(self, column: Column) -> int | None:
        roll = self.rng.random()
        if roll < NULL_CHANCE and not column.not_null:
            return None
        if NULL_CHANCE <= roll < NULL_CHANCE + EXTREME_INTEGER_CHANCE:
            assert column.range is not None
            return self.rng.choice((column.range[0], 0, column.range[1]))
        return self._typical(column)

    def _typical(self, column: Column) -> int:
        assert column.range is not None
        lo, hi = column.range
        return self.rng.randint(max(lo, INTEGER_TYPICAL[0]), min(hi, INTEGER_TYPICAL[1]))

    def _text(self, column: Column) -> str | None:
        roll = self.rng.random()
        if roll < NULL_CHANCE and not column.not_null:
            return None
        if NULL_CHANCE <= roll < NULL_CHANCE + EMPTY_CHANCE:
            return ""
        value = self.rng.choice(WORDS)
        longest = column.length or LONG_TEXT
        if NULL_CHANCE + EMPTY_CHANCE <= roll < NULL_CHANCE + EMPTY_CHANCE + MAX_LENGTH_CHANCE:
            value = (value + " ") * (longest // (len(value) + 1) + 1)
        return value[:longest]

    def _date(self, column: Column) -> date | None:
        if self.rng.random() < NULL_CHANCE and not column.not_null:
            return None
        return DATE_FIRST + timedelta(days=self.rng.randint(0, DATE_DAYS))


_VALUES: dict[Kind, Callable[[_Writer, Column], Any]] = {
    Kind.INTEGER: _Writer._integer,
    Kind.TEXT: _Writer._text,
    Kind.DATE: _Writer._date,
}


def _rollback_reason(exc: psycopg2.Error) -> str | None:
    code = exc.pgcode or ""
    if code in ROLLBACK_REASONS:
        return ROLLBACK_REASONS[code]
    if code.startswith("08") or code in _CONNECTION_CODES:
        return "connection"
    if not code and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return "connection"
    return None


class Workload:
    """Writers changing the source table until stopped, out of time or out of budget.

    ``run(duration)`` blocks; ``start()`` / ``stop()`` run it in the background (the fault suite
    does that while it kills things). ``stats.get_stats()`` counts, for committed transactions
    only: ``changes`` (rows changed), ``events`` (outbox rows they made: a key change makes
    two), ``insert`` / ``update`` / ``delete`` / ``reuse`` / ``id_change``, ``transactions``,
    ``long_transactions``; and ``rolled_back`` (``rolled_back_<reason>``), ``reconnects``,
    ``commit_unknown`` (a commit cut off by a lost connection, which makes ``events`` a guess).
    """

    def __init__(
        self,
        source_db_url: str,
        *,
        rate: float = 100.0,
        writers: int = 4,
        seed: int | None = None,
        max_changes: int | None = None,
        mix: Mix | None = None,
        allow_remote: bool = False,
    ) -> None:
        if not source_db_url:
            raise ConfigError("SOURCE_DB_URL is empty (set it, or run `make up`)")
        if not allow_remote:
            check_local(source_db_url)
        if rate < 0:
            raise ConfigError(f"workload rate {rate} must not be negative (0 means as fast as possible)")
        if writers < 1:
            raise ConfigError(f"workload writers {writers} must be at least 1")
        if max_changes is not None and max_changes < 1:
            raise ConfigError(f"workload max_changes {max_changes} must be at least 1")
        self.url = source_db_url
        self.rate = rate
        self.writers = writers
        self.seed = random.randrange(1_000_000) if seed is None else seed
        self.max_changes = max_changes
        self.mix = mix or Mix()
        self.operations = tuple(op for op in OPERATIONS if getattr(self.mix, op))
        self.long_operations = tuple(op for op in LONG_OPERATIONS if getattr(self.mix, op))
        self.long_every = self.mix.long_every if self.long_operations else 0
        self.stats = Stats("workload")
        self.stop_event = threading.Event()
        self.started = 0.0
        self.elapsed = 0.0
        self.shared: _Shared
        self.statements: _Statements
        self._threads: list[_Writer] = []
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    def connect(self) -> psycopg2.extensions.connection:
        return psycopg2.connect(
            self.url,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="cdc-workload",
            options=f"-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            **KEEPALIVES,
        )

    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc
        self.stop_event.set()

    def start(self) -> None:
        """Connect every writer (raising CDCError if the source is unreachable), then start them."""
        try:
            with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
                table = Table.load(cur, SOURCE_TABLE)
                self.statements = _Statements(table, _has_sequence(cur, table), conn)
                cur.execute(self.statements.max_key)
                max_id = one_row(cur)[0]
            self._drop_impossible()
            self._threads = [_Writer(self, i) for i in range(self.writers)]
            for writer in self._threads:
                writer.connect()
        except psycopg2.Error as exc:
            for writer in self._threads:
                writer._close()
            first = str(exc).strip().splitlines()[:1]
            raise CDCError(f"workload: source database {redact_url(self.url)}: {''.join(first)}") from exc
        self.shared = _Shared(self.max_changes, max_id, self.stop_event)
        self.started = time.monotonic()
        for writer in self._threads:
            writer.start()
        log.info(
            "workload started: writers=%d rate=%s seed=%d max_changes=%s",
            self.writers,
            self.rate or "max",
            self.seed,
            self.max_changes,
        )

    def _drop_impossible(self) -> None:
        """Leave out the operations the table cannot do (see ``_Statements``)."""
        possible = [op for op in OPERATIONS if getattr(self.statements, _STATEMENT.get(op, op)) is not None]
        self.operations = tuple(op for op in self.operations if op in possible)
        self.long_operations = tuple(op for op in self.long_operations if op in possible)
        self.long_every = self.mix.long_every if self.long_operations else 0
        if not self.operations:
            raise ConfigError(f"workload: {SOURCE_TABLE} cannot do any operation of the mix {self.mix}")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the workload stops by itself (budget spent, or a bug) or ``timeout``."""
        return self.stop_event.wait(timeout)

    def stop(self, timeout: float = 30.0) -> dict[str, object]:
        """Stop the writers (long transactions are committed), wait for them, return the stats.

        Raises the first unexpected error a writer hit.
        """
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for writer in self._threads:
            writer.join(max(0.0, deadline - time.monotonic()))
        alive = [w.name for w in self._threads if w.is_alive()]
        self.elapsed = time.monotonic() - self.started
        if self._error is not None:
            first = str(self._error).strip().splitlines()[:1]
            raise CDCError(
                f"workload stopped on an unexpected error: {type(self._error).__name__}: {''.join(first)}"
            ) from self._error
        if alive:
            raise CDCError(f"workload writers did not stop within {timeout:.0f}s: {', '.join(alive)}")
        return self.stats.get_stats()

    def run(self, duration: float) -> dict[str, object]:
        """Run for ``duration`` seconds (or until the budget is spent); return the stats."""
        self.start()
        try:
            self.wait(duration)
        finally:
            stats = self.stop()
        return stats

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> str:
        """One line: what was written, what was rolled back, and the seed to replay it."""
        s = self.stats.get_stats()
        kinds = ", ".join(f"{k} {s.get(k, 0)}" for k in ("insert", "update", "delete", "reuse", "id_change"))
        reasons = [*ROLLBACK_REASONS.values(), "connection"]
        rolled = ", ".join(f"{r} {s[f'rolled_back_{r}']}" for r in reasons if s.get(f"rolled_back_{r}"))
        elapsed = self.elapsed or (time.monotonic() - self.started)
        rate = s.get("changes", 0) / elapsed if elapsed > 0 else 0.0
        line = (
            f"workload seed={self.seed} writers={self.writers} {elapsed:.1f}s: "
            f"{s.get('changes', 0)} changes ({kinds}), {s.get('events', 0)} outbox events, "
            f"{s.get('transactions', 0)} transactions committed ({s.get('long_transactions', 0)} long), "
            f"{rate:.0f} changes/s; rolled back {s.get('rolled_back', 0)}"
            + (f" ({rolled})" if rolled else "")
        )
        if s.get("reconnects"):
            line += f"; reconnects {s['reconnects']}"
        if s.get("commit_unknown"):
            line += f"; commits with unknown outcome {s['commit_unknown']}"
        return line
