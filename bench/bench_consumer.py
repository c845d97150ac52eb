"""Consumer throughput on a backlog: ``make bench-consumer`` (or ``python bench/bench_consumer.py``).

    python bench/bench_consumer.py [--events 100000] [--batch-sizes 500,2000] [--partitions 6]
                                   [--rounds 1] [--compare DIR ...]

Starts a private Kafka broker and PostgreSQL servers on free ports under a temporary folder (it
never touches the services of ``make up``), produces N change events to a fresh topic, then
times ``ProductionCDCConsumer``, run in a process of its own, until every event is decided (its
committed-batch count, so the bench's own polling costs the database nothing;
``processed_events`` is checked at the end): from start (group join included) and from its
first committed batch (steady state). Also the CPU per event after the first batch of the
consumer process, and of the destination PostgreSQL server with all its backends over the run.

``--compare DIR`` runs the same backlog, alternating in the same session, with the
``consumer_final.py`` of another checkout (e.g. ``git worktree add /tmp/base <commit>``): the
machine's noise hits both alike, and the events and services are the same. Prints one line per
run and a median per tree, and writes ``bench-results/consumer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Publisher, admin_client, ensure_topics, producer_config
from cdc.local.paths import PROJECT_DIR
from cdc.local.ports import Ports
from cdc.local.runner import settings_env
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings, load_settings
from employee import ChangeEvent, Employee


def events(n: int, keys: int, seed: int = 1) -> list[ChangeEvent]:
    """INSERT the first time a key shows up, then mostly UPDATEs and some DELETEs."""
    rnd = random.Random(seed)
    alive: set[int] = set()
    now = datetime.now(UTC)
    out = []
    for action_id in range(1, n + 1):
        key = rnd.randint(1, keys)
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


# Runs in the consumer's own process, with the tree under test first on sys.path: only the
# interface every checkout has (ProductionCDCConsumer from the environment, tune_gc, its stats).
DRIVER_MAIN = """
import json, os, resource, sys, threading, time
sys.path.insert(0, sys.argv[2])
from consumer_final import ProductionCDCConsumer, tune_gc

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

n, pg = int(sys.argv[1]), [int(p) for p in sys.argv[3:]]
tune_gc()
consumer = ProductionCDCConsumer()
thread = threading.Thread(target=consumer.run, daemon=True)
started = time.monotonic()
first = None
thread.start()
while (done := consumer.stats.get("consumed")) < n:
    if not thread.is_alive():
        sys.exit("bench: the consumer stopped early")
    if first is None and done:
        first = (time.monotonic(), done, cpu(), cpu_seconds(pg))
    time.sleep(0.01)
ended, own, pg_cpu = time.monotonic(), cpu(), cpu_seconds(pg)
first = first or (started, 0, own, pg_cpu)
steady = max(1, n - first[1])
stats = consumer.stats.get_stats()
consumer.stop()
thread.join(60)
print(json.dumps({
    "seconds": round(ended - started, 2),
    "events_per_s": round(n / (ended - started)),
    "steady_events_per_s": round(steady / max(ended - first[0], 1e-9)),
    "consumer_cpu_us_per_event": round((own - first[2]) / steady * 1e6, 1),
    "dest_pg_cpu_us_per_event": round((pg_cpu - first[3]) / steady * 1e6, 1) if pg else None,
    "batch_latency_p50_ms": stats.get("batch_latency_p50_ms", 0),
    "batch_latency_p99_ms": stats.get("batch_latency_p99_ms", 0),
}))
"""

# The driver measures the destination server's CPU itself: its backends end with the process.
DRIVER = "import os\n\n" + inspect.getsource(cpu_seconds) + DRIVER_MAIN


def run_once(
    env: dict[str, str], n: int, batch_size: int, partitions: int, tree: Path, dest_pid: int | None = None
) -> dict[str, float | int | str | None]:
    """One backlog of ``n`` events decided by the consumer of ``tree``."""
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        env=env,
        dotenv_path=None,
        cdc_topic=f"bench_{tag}",
        cdc_dlq_topic=f"bench_{tag}_dlq",
        consumer_group_id=f"bench_{tag}",
        topic_partitions=partitions,
    )
    ensure_topics(settings, admin_client(settings))
    with contextlib.closing(psycopg2.connect(settings.dest_db_url)) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE employees, processed_events, emp_versions")
        conn.commit()
    produce(settings, events(n, keys=max(1, n // 10)))

    child_env = settings_env(
        settings,
        LOG_LEVEL="WARNING",
        STATS_INTERVAL="3600",
        CONSUMER_BATCH_SIZE=str(batch_size),
        CONSUME_TIMEOUT="0.2",
    )
    with tempfile.TemporaryDirectory(prefix="cdc-bench-consumer-") as cwd:  # no .env of anyone's
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(n), str(tree), *([str(dest_pid)] if dest_pid else [])],
            cwd=cwd,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if proc.returncode != 0:
        raise SystemExit(f"bench: the consumer of {tree} failed: {proc.stderr.strip()[-2000:]}")
    if processed(settings.dest_db_url) != n:
        raise SystemExit("bench: processed_events does not hold every event")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "tree": str(tree),
        "events": n,
        "batch_size": batch_size,
        "partitions": partitions,
        **result,
    }


def line(r: dict) -> str:
    return (
        f"consumer {r['tree']}: {r['events']} events, batch {r['batch_size']}, {r['partitions']} partitions: "
        f"{r['seconds']} s from start = {r['events_per_s']} events/s, "
        f"{r['steady_events_per_s']} events/s after the first batch "
        f"(batch p50 {r['batch_latency_p50_ms']} ms, p99 {r['batch_latency_p99_ms']} ms; "
        f"CPU per event: consumer {r['consumer_cpu_us_per_event']} us, "
        f"destination PostgreSQL {r['dest_pg_cpu_us_per_event']} us)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch-sizes", default="500,2000", help="comma-separated CONSUMER_BATCH_SIZE values")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1, help="runs per tree and batch size, alternating")
    p.add_argument("--compare", action="append", default=[], metavar="DIR", help="another checkout")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trees = [PROJECT_DIR, *(Path(d).resolve() for d in args.compare)]
    for tree in trees:
        if not (tree / "consumer_final.py").is_file():
            raise SystemExit(f"bench: {tree} has no consumer_final.py")

    results = []
    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as home:
        services = LocalServices(home=Path(home), ports=Ports.free())
        try:
            services.up()
            for size in (int(s) for s in args.batch_sizes.split(",")):
                # Unmeasured: the broker's first group and topic creations, the caches.
                for tree in trees:
                    run_once(services.env(), min(args.events, 5000), size, args.partitions, tree)
                for round_ in range(args.rounds):
                    # Alternate which tree goes first, so neither always meets a warmer machine.
                    order = trees if round_ % 2 == 0 else trees[::-1]
                    for tree in order:
                        r = run_once(
                            services.env(), args.events, size, args.partitions, tree, services.dest.pid()
                        )
                        results.append(r)
                        print(line(r), flush=True)
        finally:
            services.down()
    if len(trees) > 1 or args.rounds > 1:
        for size in (int(s) for s in args.batch_sizes.split(",")):
            base = None
            for tree in trees:
                runs = [r for r in results if r["tree"] == str(tree) and r["batch_size"] == size]
                median = statistics.median(float(r["events_per_s"]) for r in runs)
                steady = statistics.median(float(r["steady_events_per_s"]) for r in runs)
                base = base or median
                print(
                    f"median, batch {size}, {tree}: {median:.0f} events/s from start, {steady:.0f} steady"
                    f" ({median / base:.3f} of {trees[0]})",
                    flush=True,
                )
    out = PROJECT_DIR / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "consumer.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
