"""Backlog drain over three tables against employees alone (``make bench-tables``).

    python bench/bench_tables.py [--changes 150000] [--rounds 3]

(``make bench`` runs it too, as its "tables" scenario: ``measure``.)

Starts a private Kafka broker and source/destination PostgreSQL on free ports in a temporary
folder, creates two more tables on both sides (``orders``, a one-column key; ``lines``, a
composite key; each of six columns like ``employees``) and captures them (``cdc tables add``).
Then, ``--rounds`` times, alternating which goes first so the machine's drift hits both alike:

- employees only: ``--changes`` INSERTs into ``employees``;
- mix: the same number, a third into each table;

each written while the daemons are stopped (transactions of 1,000 rows), then ``producer.py`` and
``consumer_final.py`` started and timed until the destination has decided every change
(``processed_events``), with the CPU seconds per 100k changes of each daemon and server. The
tables' topics exist before (as in a pipeline that ran before: a drain measures throughput, not
how soon the consumer sees a new topic). A first, smaller employees-only round warms the services
up and is not counted. Every round gets new topics and a new consumer group on emptied tables.
Prints the medians and the ratio mix / employees only, and writes ``bench-results/tables.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402

from bench import harness, report  # noqa: E402
from cdc.kafka.client import admin_client, ensure_topic, ensure_topics  # noqa: E402
from cdc.local.ports import Ports  # noqa: E402
from cdc.local.runner import Daemon  # noqa: E402
from cdc.local.services import LocalServices  # noqa: E402
from cdc.model.topics import topic_for  # noqa: E402
from cdc.ops import tables  # noqa: E402
from cdc.runtime.settings import Settings, load_settings  # noqa: E402

DDL = """
CREATE TABLE IF NOT EXISTS orders (
    id bigint PRIMARY KEY, customer int, sku varchar(40), qty int, price numeric(10, 2), placed date
);
CREATE TABLE IF NOT EXISTS lines (
    order_id bigint, line int, sku varchar(40), qty int, price numeric(10, 2), PRIMARY KEY (order_id, line)
);
"""
CHUNK = 1000
EMPLOYEES_ONLY = "employees only"
MIX = "mix of three tables"
# (table, INSERT of rows %(lo)s..%(hi)s)
WRITES = {
    "employees": "INSERT INTO employees (first_name, last_name, dob, city, salary)"
    " SELECT 'First' || i, 'Last' || i, date '1980-01-01' + mod(i, 9000), 'Oslo', i FROM generate_series(%(lo)s, %(hi)s) i",
    "orders": "INSERT INTO orders SELECT i, mod(i, 5000), 'SKU-' || mod(i, 700), mod(i, 9), (mod(i, 10000)) / 100.0,"
    " date '2024-01-01' + mod(i, 300) FROM generate_series(%(lo)s, %(hi)s) i",
    "lines": "INSERT INTO lines SELECT i / 4, mod(i, 4), 'SKU-' || mod(i, 700), mod(i, 9), (mod(i, 10000)) / 100.0"
    " FROM generate_series(%(lo)s, %(hi)s) i",
}
CLEAN_SOURCE = (
    "TRUNCATE employees, orders, lines, emp_records_cdc, cdc_outbox;"
    " UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0;"
)
CLEAN_DEST = "TRUNCATE employees, orders, lines, processed_events, emp_versions, cdc_versions, applied_offsets, accepted_gaps;"


def execute(url: str, statement: str, params: dict[str, int] | None = None) -> None:
    """One statement (or a ;-separated few) committed by itself (VACUUM included)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
    finally:
        conn.close()


def scalar(url: str, statement: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def write(url: str, table: str, count: int) -> None:
    for lo in range(1, count + 1, CHUNK):
        execute(url, WRITES[table], {"lo": lo, "hi": min(lo + CHUNK - 1, count)})


def drain(
    base: Settings, workdir: Path, mix: bool, changes: int, services: dict[str, int]
) -> tuple[float, dict[str, float]]:
    """Changes per second from starting both daemons to the destination deciding the last one,
    and the CPU seconds per 100k changes of each process (the daemons, the servers)."""
    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        base,
        cdc_topic=f"bench_{tag}",
        cdc_dlq_topic=f"bench_{tag}_dlq",
        cdc_topic_prefix=f"bench_{tag}_t",
        consumer_group_id=f"bench_{tag}",
    )
    execute(settings.source_db_url, CLEAN_SOURCE)
    execute(settings.dest_db_url, CLEAN_DEST)
    # The tables' topics exist already, as in a pipeline that has run before: a drain measures
    # throughput, not how soon a consumer sees a topic created after it subscribed (30 s at most).
    admin = admin_client(settings)
    ensure_topics(settings, admin)
    for table in ("orders", "lines"):
        ensure_topic(settings, admin, topic_for(settings.cdc_topic_prefix, "public", table))
    shares = {"employees": changes} if not mix else dict.fromkeys(WRITES, changes // 3)
    shares["employees"] += changes - sum(shares.values())
    for table, count in shares.items():
        write(settings.source_db_url, table, count)
    execute(settings.source_db_url, "VACUUM ANALYZE emp_records_cdc")
    execute(settings.source_db_url, "VACUUM ANALYZE cdc_outbox")
    daemons = [
        Daemon(script, settings, workdir / f"{tag}-{Path(script).stem}", STATS_INTERVAL="5")
        for script in ("producer.py", "consumer_final.py")
    ]
    before = {name: harness.tree_cpu_seconds(pid) or 0.0 for name, pid in services.items()}
    started = time.monotonic()
    for d in daemons:
        d.start()
    cpu: dict[str, float] = {}
    try:
        while scalar(settings.dest_db_url, "SELECT count(*) FROM processed_events") < changes:
            for d in daemons:
                if not d.running():
                    raise SystemExit(f"{d.script} exited; see {d.logfile}")
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        for d in daemons:
            assert d.proc is not None
            cpu[Path(d.script).stem] = harness.cpu_seconds(d.proc.pid) or 0.0
        for name, pid in services.items():
            cpu[name] = (harness.tree_cpu_seconds(pid) or 0.0) - before[name]
    finally:
        for d in daemons:
            d.stop()
    # Every change applied (none stale or dead-lettered: each INSERT is a new row) and each table
    # as big on both sides: a fast drain that lost rows is no figure.
    kept = scalar(settings.dest_db_url, "SELECT count(*) FROM processed_events WHERE outcome <> 'applied'")
    if kept:
        raise SystemExit(f"{kept} of {changes} changes were not applied; see {workdir}")
    for table in WRITES:
        counts = [
            scalar(url, f"SELECT count(*) FROM {table}")
            for url in (settings.source_db_url, settings.dest_db_url)
        ]
        if counts[0] != counts[1]:
            raise SystemExit(f"{table}: {counts[0]} rows on the source, {counts[1]} on the destination")
    return changes / elapsed, {k: round(v * 100_000 / changes, 2) for k, v in cpu.items()}


def measure(changes: int = 150_000, rounds: int = 3, log=print) -> dict[str, Any]:
    """The drains of ``rounds`` rounds on private services: the rates, their medians, the CPU
    seconds per 100k changes, and the ratio mix / employees only (``make bench``'s "tables")."""
    with tempfile.TemporaryDirectory(prefix="cdc-bench-tables-") as tmp:
        services = LocalServices(home=Path(tmp), ports=Ports.free())
        try:
            services.up()
            base = load_settings(env=services.env(), dotenv_path=None)
            for url in (base.source_db_url, base.dest_db_url):
                execute(url, DDL)
            tables.add(base, ["orders", "lines"])
            rates: dict[str, list[float]] = {EMPLOYEES_ONLY: [], MIX: []}
            costs: dict[str, list[dict[str, float]]] = {EMPLOYEES_ONLY: [], MIX: []}
            pids = harness.service_pids(services)
            drain(base, Path(tmp) / "runs", False, changes // 4, pids)  # warm-up, not counted
            for n in range(rounds):
                order = [False, True] if n % 2 == 0 else [True, False]
                for mix in order:
                    name = MIX if mix else EMPLOYEES_ONLY
                    rate, cpu = drain(base, Path(tmp) / "runs", mix, changes, pids)
                    rates[name].append(rate)
                    costs[name].append(cpu)
                    log(f"round {n + 1}: {name} {rate:,.0f} changes/s; CPU s per 100k: {cpu}")
        finally:
            services.down()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "at": datetime.now().isoformat(timespec="seconds"),
        "changes": changes,
        "rounds": rates,
        "medians": medians,
        "cpu_seconds_per_100k": costs,
        "ratio": medians[MIX] / medians[EMPLOYEES_ONLY],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "tables.json"))
    args = parser.parse_args()
    result = measure(args.changes, args.rounds, log=lambda line: print(line, flush=True))
    for name, rate in result["medians"].items():
        rounds = ", ".join(f"{r:,.0f}" for r in result["rounds"][name])
        print(f"{name:<22} {rate:>9,.0f} changes/s (rounds: {rounds})")
    print(f"ratio mix / employees only: {result['ratio']:.3f} (target >= {report.TABLES_TARGET})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
