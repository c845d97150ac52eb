"""Consumer throughput on a backlog: ``make bench-consumer`` (or ``python bench/bench_consumer.py``).

Starts a private Kafka broker and PostgreSQL servers on free ports under a temporary folder (it
never touches the services of ``make up``), produces N change events to a fresh topic, then
times ``ProductionCDCConsumer`` until every event is decided (its committed-batch count, so the
bench's own polling costs the database nothing; ``processed_events`` is checked at the end):
from start (group join included) and from its first committed batch (steady state). Also the
CPU per event after the first batch: this process (the consumer; the bench thread only sleeps)
and the destination PostgreSQL server with all its backends. The machine is shared: rates vary
from run to run, CPU per event much less.
Prints one line per batch size and writes ``bench-results/consumer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Publisher, admin_client, ensure_topics, producer_config
from cdc.local.paths import PROJECT_DIR
from cdc.local.ports import Ports
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings, load_settings
from consumer_final import ProductionCDCConsumer, tune_gc
from employee import ChangeEvent, Employee


def events(n: int, emps: int, seed: int = 1) -> list[ChangeEvent]:
    """INSERT the first time a key shows up, then mostly UPDATEs and some DELETEs."""
    rnd = random.Random(seed)
    alive: set[int] = set()
    now = datetime.now(UTC)
    out = []
    for action_id in range(1, n + 1):
        key = rnd.randint(1, emps)
        if key not in alive:
            action = "INSERT"
            alive.add(key)
        elif rnd.random() < 0.05:
            action = "DELETE"
            alive.discard(key)
        else:
            action = "UPDATE"
        employee = Employee(key, f"First{key}", f"Last{action_id}", "1980-01-01", "Oslo", action_id)
        out.append(ChangeEvent(action_id, action, employee, txid=action_id, captured_at=now))
    return out


def produce(settings: Settings, stream: list[ChangeEvent]) -> None:
    publisher = Publisher(
        producer_config(settings), logger=logging.getLogger("bench.kafka"), flush_timeout=120
    )
    mark = [(MARK_HEADER, MARK_VALUE)]  # as producer.py sends them
    publisher.send((settings.cdc_topic, ev.key(), ev.to_json(), mark) for ev in stream)


def processed(url: str) -> int:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM processed_events")
        return cur.fetchone()[0]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and their children processes still running."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(entry.name) in pids or int(fields[1]) in pids:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_once(
    env: dict[str, str], n: int, batch_size: int, partitions: int, dest_pid: int | None = None
) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        env={**env, "LOG_LEVEL": "WARNING"},
        dotenv_path=None,
        cdc_topic=f"bench_{tag}",
        cdc_dlq_topic=f"bench_{tag}_dlq",
        consumer_group_id=f"bench_{tag}",
        topic_partitions=partitions,
        consumer_batch_size=batch_size,
        consume_timeout=0.2,
        stats_interval=3600.0,
    )
    ensure_topics(settings, admin_client(settings))
    with contextlib.closing(psycopg2.connect(settings.dest_db_url)) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE employees, processed_events, emp_versions")
        conn.commit()
    produce(settings, events(n, emps=max(1, n // 10)))

    tune_gc()  # as consumer_final.py's main() does, once the produced events are gone
    consumer = ProductionCDCConsumer(settings=settings)
    thread = threading.Thread(target=consumer.run, daemon=True)
    pg = [dest_pid] if dest_pid else []
    started = time.monotonic()
    first = None  # when the first batch was committed: start-up (group join) excluded
    thread.start()
    while (done := consumer.stats.get("consumed")) < n:
        if not thread.is_alive():
            raise SystemExit("bench: the consumer stopped early")
        if first is None and done:
            first = (time.monotonic(), done, own_cpu_seconds(), cpu_seconds(pg))
        time.sleep(0.01)
    ended, own_cpu, pg_cpu = time.monotonic(), own_cpu_seconds(), cpu_seconds(pg)
    elapsed = ended - started
    first = first or (started, 0, own_cpu, pg_cpu)
    steady_events = max(1, n - first[1])
    stats = consumer.stats.get_stats()
    consumer.stop()
    thread.join(60)
    if processed(settings.dest_db_url) != n:
        raise SystemExit("bench: processed_events does not hold every event")
    return {
        "events": n,
        "batch_size": batch_size,
        "partitions": partitions,
        "seconds": round(elapsed, 2),
        "events_per_s": round(n / elapsed),
        "steady_events_per_s": round(steady_events / max(ended - first[0], 1e-9)),
        "consumer_cpu_us_per_event": round((own_cpu - first[2]) / steady_events * 1e6, 1),
        "dest_pg_cpu_us_per_event": round((pg_cpu - first[3]) / steady_events * 1e6, 1) if pg else None,
        "batch_latency_p50_ms": stats.get("batch_latency_p50_ms", 0),
        "batch_latency_p99_ms": stats.get("batch_latency_p99_ms", 0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch-sizes", default="500,2000", help="comma-separated CONSUMER_BATCH_SIZE values")
    p.add_argument("--partitions", type=int, default=6)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    results = []
    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as home:
        services = LocalServices(home=Path(home), ports=Ports.free())
        try:
            services.up()
            for size in (int(s) for s in args.batch_sizes.split(",")):
                r = run_once(services.env(), args.events, size, args.partitions, services.dest.pid())
                results.append(r)
                print(
                    f"consumer: {r['events']} events, batch {r['batch_size']}, {r['partitions']} partitions: "
                    f"{r['seconds']} s from start = {r['events_per_s']} events/s, "
                    f"{r['steady_events_per_s']} events/s after the first batch "
                    f"(batch p50 {r['batch_latency_p50_ms']} ms, p99 {r['batch_latency_p99_ms']} ms; "
                    f"CPU per event: consumer {r['consumer_cpu_us_per_event']} us, "
                    f"destination PostgreSQL {r['dest_pg_cpu_us_per_event']} us)",
                    flush=True,
                )
        finally:
            services.down()
    out = PROJECT_DIR / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "consumer.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
