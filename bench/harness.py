"""The machinery of ``make bench``: private services per scenario, one change set for every
contender, waiting until the destination equals the source, and sampling what it cost.

Nothing here knows a contender's internals; they sit behind ``contenders/base.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg2 import sql

from bench import tables
from bench.contenders.base import BenchEnv
from cdc.local.paths import PROJECT_DIR, SETUP_DEST_SQL, SETUP_SOURCE_SQL
from cdc.local.ports import Ports
from cdc.local.postgres import find_pg_bindir
from cdc.local.services import LocalServices
from cdc.model.table import SOURCE_TABLE, Table

# Both servers: logical decoding for the replication contenders (the project's pipeline does not
# need it, but every contender runs on the same servers).
PG_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "track_commit_timestamp": "on",
}

# One number pair per table state: equal on both sides means the same rows (row text compared).
FINGERPRINT = "SELECT count(*), coalesce(sum(hashtextextended(e::text, 0)::numeric), 0) FROM employees e"
# What wait_equal polls: the fingerprint hashes the text of every row, so polled every 50 ms it
# would take CPU from the contender it times. A row count is far cheaper; the fingerprint is
# computed only when the count is the source's.
ROW_COUNT = "SELECT count(*) FROM employees"


# -- the change set ----------------------------------------------------------------------------


@dataclass
class ChangeSet:
    """Transactions generated once from a seed: identical for every contender.

    A change is ``(action, row)``: an INSERT's or UPDATE's row (key first, then the table's
    value columns), a DELETE's key alone.
    """

    transactions: list[list[tuple[str, tuple[Any, ...]]]]
    changes: int
    actions: dict[str, int] = field(default_factory=dict)
    table: Table = tables.TABLE
    _text: list[bytes] | None = field(default=None, repr=False)

    def prefix(self, changes: int) -> ChangeSet:
        """The first transactions holding ``changes`` changes (whole transactions)."""
        per = self.changes / max(1, len(self.transactions))
        count = max(1, round(changes / per))
        return ChangeSet(self.transactions[:count], round(count * per), {}, self.table)

    def text(self, cur: psycopg2.extensions.cursor) -> list[bytes]:
        """Each transaction as one SQL text (values quoted by psycopg2), made once."""
        if self._text is None:
            t, k, values = self.table.ident, self.table.key.ident, self.table.values
            statements = {
                "INSERT": sql.SQL("INSERT INTO {t} ({c}) VALUES ({p})").format(
                    t=t,
                    c=tables.names((self.table.key, *values)),
                    p=sql.SQL(", ").join([sql.Placeholder()] * (1 + len(values))),
                ),
                "UPDATE": sql.SQL("UPDATE {t} SET {s} WHERE {k} = %s").format(
                    t=t, s=sql.SQL(", ").join(sql.SQL("{} = %s").format(c.ident) for c in values), k=k
                ),
                "DELETE": sql.SQL("DELETE FROM {t} WHERE {k} = %s").format(t=t, k=k),
            }
            rendered = {action: s.as_string(cur) for action, s in statements.items()}
            self._text = [
                b"BEGIN;"
                + b";".join(cur.mogrify(rendered[action], _params(action, row)) for action, row in txn)
                + b";COMMIT"
                for txn in self.transactions
            ]
        return self._text


def _params(action: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    # An UPDATE's statement sets the values first, then names the key.
    return (*row[1:], row[0]) if action == "UPDATE" else row


def generate(
    changes: int, *, per_txn: int = 10, seed: int = 20261128, table: Table = tables.TABLE
) -> ChangeSet:
    """``changes`` changes, 50 % INSERT / 35 % UPDATE / 15 % DELETE, ``per_txn`` per transaction.

    Updates and deletes pick a live row, so every statement changes exactly one row.
    """
    rnd = random.Random(seed)
    alive: list[int] = []
    next_id = 1
    counts = {"INSERT": 0, "UPDATE": 0, "DELETE": 0}
    txns: list[list[tuple[str, tuple[Any, ...]]]] = []
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for _ in range(changes):
        roll = rnd.random()
        if not alive or roll < 0.50:
            change = ("INSERT", tables.random_row(table, rnd, next_id))
            alive.append(next_id)
            next_id += 1
        elif roll < 0.85:
            change = ("UPDATE", tables.random_row(table, rnd, alive[rnd.randrange(len(alive))]))
        else:
            i = rnd.randrange(len(alive))
            change = ("DELETE", (alive[i],))
            alive[i] = alive[-1]
            alive.pop()
        counts[change[0]] += 1
        statements.append(change)
        if len(statements) == per_txn:
            txns.append(statements)
            statements = []
    if statements:
        txns.append(statements)
    return ChangeSet(txns, changes, counts, table)


def write_changes(url: str, changes: ChangeSet) -> float:
    """Commit every transaction of ``changes`` on the source, in order. Returns seconds taken
    (the SQL text is made before the clock starts)."""
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            text = changes.text(cur)
            started = time.monotonic()
            for txn in text:
                cur.execute(txn)
    return time.monotonic() - started


def load_rows(url: str, rows: int) -> None:
    """Fill the table with ``rows`` rows set-based (the initial-load scenario's table)."""
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        table = Table.load(cur, SOURCE_TABLE)
        cur.execute(tables.fill(table, key=True, nulls=True), {"lo": 1, "hi": rows})
        conn.commit()
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("VACUUM ANALYZE {}").format(table.ident))


# -- services ----------------------------------------------------------------------------------


@contextlib.contextmanager
def scenario(
    name: str, *, outbox: bool, keep: bool = False, brokers: int = 1
) -> Iterator[tuple[BenchEnv, LocalServices]]:
    """Fresh private services (both PostgreSQL servers, one broker or a 3-node cluster) under a
    new folder."""
    home = Path(tempfile.mkdtemp(prefix=f"cdc-bench-{name}-"))
    services = LocalServices(home=home, ports=Ports.free(brokers), pg_settings=PG_SETTINGS, brokers=brokers)
    try:
        services.up(apply_schema=False)
        for url in (services.source.url, services.dest.url):
            with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
                cur.execute(tables.create_table())
                conn.commit()
        if outbox:
            services.source.apply_sql(SETUP_SOURCE_SQL)
            services.dest.apply_sql(SETUP_DEST_SQL)
        warm_up_kafka(services.kafka.bootstrap, replication=min(3, brokers))
        yield (
            BenchEnv(
                home=home,
                source_url=services.source.url,
                dest_url=services.dest.url,
                bootstrap=services.kafka.bootstrap,
                env=services.env(),
            ),
            services,
        )
    finally:
        try:
            services.down()
        finally:
            if not keep:
                shutil.rmtree(home, ignore_errors=True)


def warm_up_kafka(bootstrap: str, *, replication: int) -> None:
    """Have the new broker create its internal topics before any clock runs, as a broker that
    has served clients before has them: ``__transaction_state`` (50 partitions, made for the
    first idempotent producer, which waits ~0.6 s for it) and ``__consumer_offsets`` (made for
    the first consumer group, ~1 s). Without this a fresh broker added both to the start-up of
    the first Kafka contender, in every scenario."""
    topic = "bench_warm_up"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, replication)], operation_timeout=30).values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    producer.produce(topic, b"warm-up")
    if producer.flush(60):
        raise RuntimeError("kafka warm-up: the message was not acknowledged in 60 s")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while not consumer.consume(1, 1.0):
            if time.monotonic() > deadline:
                raise RuntimeError("kafka warm-up: no message read in 60 s")
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()


# -- waiting and checking ----------------------------------------------------------------------


def fingerprint(url: str) -> tuple[int, str]:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(FINGERPRINT)
        count, digest = cur.fetchone()
        return count, str(digest)


@dataclass
class Arrival:
    """When the destination first changed and when it became equal to the source (monotonic)."""

    first: float
    done: float


def wait_equal(
    dest_url: str,
    target: tuple[int, str],
    *,
    timeout: float,
    interval: float = 0.05,
    alive: Callable[[], None] | None = None,
) -> Arrival:
    """Poll the destination until its fingerprint is ``target``.

    Each poll counts the rows; only a count equal to the target's computes the fingerprint
    (see ROW_COUNT). The first change seen is the first change of the row count (every scenario
    starts from an empty destination, so its first commit adds rows).
    ``alive``: raises if the contender died (checked between polls).
    """
    deadline = time.monotonic() + timeout
    with contextlib.closing(psycopg2.connect(dest_url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            initial = None
            first = None
            while True:
                cur.execute(ROW_COUNT)
                (count,) = cur.fetchone()
                equal = False
                if count == target[0]:
                    cur.execute(FINGERPRINT)
                    found, digest = cur.fetchone()
                    equal = (found, str(digest)) == target
                now = time.monotonic()
                if initial is None:
                    initial = count
                elif first is None and count != initial:
                    first = now
                if equal:
                    return Arrival(first if first is not None else now, now)
                if now > deadline:
                    raise TimeoutError(
                        f"destination not equal to the source after {timeout:.0f} s ({count} rows of {target[0]})"
                    )
                if alive is not None:
                    alive()
                time.sleep(interval)


def rows_identical(source_url: str, dest_url: str) -> bool:
    """Row-by-row check after the fingerprints matched: every column of every row, in order."""
    query = sql.SQL("SELECT md5(coalesce(string_agg(e::text, E'\\n' ORDER BY e.{k}), '')) FROM {t} e").format(
        k=tables.TABLE.key.ident, t=tables.TABLE.ident
    )
    digests = []
    for url in (source_url, dest_url):
        with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
            cur.execute(query)
            digests.append(cur.fetchone()[0])
    return digests[0] == digests[1]


# -- cost --------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid`` and its waited-for children, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def tree_cpu_seconds(root: int) -> float | None:
    """CPU of a server process and all its children, live or ended (a PostgreSQL postmaster and
    its backends; a JVM). Ended children are in the parent's cutime once reaped."""
    total = cpu_seconds(root)
    if total is None:
        return None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def service_pids(services: LocalServices) -> dict[str, int]:
    pids = {"source pg": services.source.pid(), "dest pg": services.dest.pid()}
    nodes = services.kafka.pids()
    for node, pid in nodes.items():
        pids["kafka" if len(services.kafka.brokers) == 1 else f"kafka-{node}"] = pid
    return {k: v for k, v in pids.items() if v}


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cores): everything a run costs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


class CostMeter:
    """CPU seconds of each daemon and of the machine between ``start`` and ``stop``; peak RSS."""

    def __init__(self, processes, services: dict[str, int] | None = None) -> None:
        self.processes = processes  # callable -> {name: pid}
        self.services = services or {}  # server processes measured with their children
        self.service_cpu: dict[str, float] = {}
        self._service0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.rss: dict[str, float] = {}
        self.machine = 0.0
        self._start: dict[int, float] = {}
        self._machine0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, tuple[int, float]] = {}

    def start(self) -> None:
        self._machine0 = machine_cpu_seconds()
        for name, pid in self.services.items():
            self._service0[name] = tree_cpu_seconds(pid) or 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        # Processes appear after resume() (the apply worker, the JVM's work) and may end: keep
        # the last reading of each, and its first reading as the base.
        while True:
            self._read()
            if self._stop.wait(0.2):
                break

    def _read(self) -> None:
        try:
            procs = self.processes()
        except Exception:  # noqa: BLE001 - a contender between states; try again next tick
            return
        for name, pid in procs.items():
            now = cpu_seconds(pid)
            if now is None:
                continue
            self._start.setdefault(pid, now)
            self._last[name] = (pid, now)
            rss = peak_rss_mib(pid)
            if rss is not None:
                self.rss[name] = max(self.rss.get(name, 0.0), rss)

    def stop(self) -> None:
        self._read()
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.machine = machine_cpu_seconds() - self._machine0
        for name, pid in self.services.items():
            now = tree_cpu_seconds(pid)
            if now is not None:
                self.service_cpu[name] = now - self._service0[name]
        for name, (pid, last) in self._last.items():
            self.cpu[name] = last - self._start.get(pid, last)


# -- the machine -------------------------------------------------------------------------------


def describe_machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    pg = subprocess.run(
        [str(find_pg_bindir() / "postgres"), "--version"], capture_output=True, text=True
    ).stdout
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[:1]
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg.strip(),
        "java": java[0] if java else "unknown",
        "project_dir": str(PROJECT_DIR),
    }
