"""Producer throughput and cost on a backlog, its CPU at a steady rate and idle, on private services.

    python bench/bench_producer.py [--rows 100000] [--batch-size N] [--rounds 3] [--prune]
                                   [--rate 1000] [--steady-seconds 20] [--e2e] [--idle-seconds 10]
                                   [--compare DIR ...]

Starts a private Kafka broker and source/destination PostgreSQL on free ports in a temporary
folder, then, ``--rounds`` times:

- backlog: writes ``--rows`` changes into the outbox (set-based, then VACUUM ANALYZE, before the
  producer starts) and runs ``producer.py --once`` until they are published: events/s, and the CPU
  seconds per 100k changes of the producer (less the CPU of a run with nothing to publish: its
  start-up), of the source PostgreSQL server and of the broker; the producer's peak RSS;
- steady (``--rate`` > 0): runs the daemon while writers commit ``--rate`` single-statement
  transactions per second (UPDATEs of random rows) for ``--steady-seconds``: the producer's CPU
  in % of one core (and the source server's and the broker's, writers included) and its
  capture-to-acknowledgement p50/p99 (``/metrics``); with ``--e2e`` also ``consumer_final.py``,
  for the source-commit-to-destination-commit p50/p99 it measures.

Then samples the idle daemon's CPU. ``--compare DIR`` runs the same scenarios, alternating in
the same session, with the producer.py of another checkout (e.g. ``git worktree add /tmp/base
main``): the machine's noise hits both alike. Prints one line per tree and writes
``bench-results/producer.json`` (medians, ranges and every round).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from psycopg2 import sql  # noqa: E402

from bench import tables  # noqa: E402
from cdc.errors import ServiceError  # noqa: E402
from cdc.kafka.client import base_config, ensure_topics  # noqa: E402
from cdc.local.ports import Ports  # noqa: E402
from cdc.local.services import LocalServices  # noqa: E402
from cdc.model.table import SOURCE_TABLE, Kind, Table  # noqa: E402
from cdc.runtime.settings import Settings, load_settings  # noqa: E402
from cdc.runtime.stats import process_cpu_seconds  # noqa: E402

ACTIVE_LINE = re.compile(r"^(\S+ \S+) INFO +producer: active:", re.M)
FINAL_LINE = re.compile(r"^(\S+ \S+) INFO +producer: final published=(\d+)", re.M)
# Rows the steady writers update (inserted and published before the measurement).
STEADY_EMPLOYEES = 10_000
STEADY_WRITERS = 4
STEADY_WARMUP = 3.0


def log_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its ended children (backends of a
    producer that exited) and the running ones."""
    with open(f"/proc/{postmaster}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                child = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(child[1]) == postmaster:
            total += (int(child[11]) + int(child[12])) / os.sysconf("SC_CLK_TCK")
    return total


def fill_backlog(url: str, rows: int) -> None:
    """``rows`` INSERTs, keys 1..rows, in the outbox (no NULLs)."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "TRUNCATE employees, emp_records_cdc RESTART IDENTITY;"
            " UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0"
        )
        cur.execute(tables.fill(Table.load(cur, SOURCE_TABLE), key=False, nulls=False), {"lo": 1, "hi": rows})
    conn.autocommit = True
    with conn.cursor() as cur:
        # Autovacuum would otherwise do this during the measurement.
        cur.execute("VACUUM ANALYZE employees, emp_records_cdc")
    conn.close()


def topic_size(settings: Settings, topic: str) -> int:
    consumer = Consumer({**base_config(settings), "group.id": "bench-producer"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions
        )
    finally:
        consumer.close()


def metrics(port: int) -> dict[str, float]:
    """A daemon's stats (its /health JSON: counters and p50/p99); nothing while it is not serving yet."""
    try:
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args: argparse.Namespace, services: LocalServices, workdir: Path) -> None:
        self.args = args
        self.services = services
        self.workdir = workdir
        self.tag = time.strftime("%H%M%S")
        self.runs = 0
        self.settings = load_settings(env=services.env(), dotenv_path=None)
        self.url = self.settings.source_db_url
        self.env = {
            **os.environ,
            **services.env(),
            "CDC_DLQ_TOPIC": f"bench_{self.tag}_dlq",
            "CDC_PRUNE": "true" if args.prune else "false",
            "PYTHONUNBUFFERED": "1",
        }
        if args.batch_size:
            self.env["PRODUCER_BATCH_SIZE"] = str(args.batch_size)
        # The steady writers' change: one row's first integer column + 1.
        table = tables.TABLE
        integer = next(c for c in table.values if c.kind is Kind.INTEGER)
        self.bump = sql.SQL("UPDATE {t} SET {c} = {c} + 1 WHERE {k} = %s").format(
            t=table.ident, c=integer.ident, k=table.key.ident
        )

    def command(self, tree: Path) -> list[str]:
        return [sys.executable, str(tree / "producer.py"), "--env-file", os.devnull]

    def topic(self) -> str:
        """A fresh topic per run, its partitions led already (a new topic is not, for a moment)."""
        self.runs += 1
        topic = f"bench_{self.tag}_{self.runs}"
        ensure_topics(load_settings(env=self.services.env(), dotenv_path=None, cdc_topic=topic))
        consumer = Consumer({**base_config(self.settings), "group.id": "bench-producer"})
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                if meta.partitions and all(p.leader >= 0 for p in meta.partitions.values()):
                    break
                time.sleep(0.1)
        finally:
            consumer.close()
        return topic

    def once(self, tree: Path, rows: int) -> dict[str, float]:
        """Fill the outbox with ``rows`` changes and run ``producer.py --once`` until published."""
        fill_backlog(self.url, rows)
        topic = self.topic()
        logfile = self.workdir / f"once-{self.runs}.log"
        pg, broker = self.services.source.pid(), self.services.kafka.pid()
        assert pg is not None and broker is not None
        pg0, broker0 = server_cpu_seconds(pg), process_cpu_seconds(broker)
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(
                [*self.command(tree), "--once"],
                env={**self.env, "CDC_TOPIC": topic},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        time.sleep(0.2)  # the server reaps the producer's backends
        text = logfile.read_text()
        final, active = FINAL_LINE.search(text), ACTIVE_LINE.search(text)
        if proc.returncode != 0 or not final or not active:
            raise SystemExit(f"producer failed (exit {proc.returncode}):\n{text}")
        return {
            "published": int(final.group(2)),
            "on_topic": topic_size(self.settings, topic),
            "seconds": log_time(final.group(1)) - log_time(active.group(1)),
            "cpu": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "pg_cpu": server_cpu_seconds(pg) - pg0,
            "broker_cpu": process_cpu_seconds(broker) - broker0,
        }

    def backlog(self, tree: Path) -> dict[str, float]:
        rows = self.args.rows
        empty, full = self.once(tree, 0), self.once(tree, rows)
        per_100k = 100_000 / rows
        return {
            "published": full["published"],
            "on_topic": full["on_topic"],
            "publish_seconds": round(full["seconds"], 2),
            "events_per_second": round(full["published"] / full["seconds"]),
            "cpu_seconds_per_100k": round((full["cpu"] - empty["cpu"]) * per_100k, 3),
            "startup_cpu_seconds": round(empty["cpu"], 3),
            "source_pg_cpu_seconds_per_100k": round((full["pg_cpu"] - empty["pg_cpu"]) * per_100k, 3),
            "broker_cpu_seconds_per_100k": round((full["broker_cpu"] - empty["broker_cpu"]) * per_100k, 3),
            "peak_rss_mib": round(full["peak_rss_mib"], 1),
        }

    def daemon(self, tree: Path, topic: str, name: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        logfile = self.workdir / f"{name}-{self.runs}.log"
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(
                self.command(tree),
                env={**self.env, "CDC_TOPIC": topic, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not ACTIVE_LINE.search(logfile.read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"producer did not start:\n{logfile.read_text()}")
            time.sleep(0.1)
        return proc, logfile

    def idle(self, tree: Path) -> float:
        proc, _ = self.daemon(tree, self.topic(), "idle")
        try:
            time.sleep(1)
            cpu0, t0 = process_cpu_seconds(proc.pid), time.monotonic()
            time.sleep(self.args.idle_seconds)
            return (process_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(30)

    def steady(self, tree: Path) -> dict[str, float]:
        """The daemon (and with --e2e the consumer) while writers commit --rate changes/s."""
        fill_backlog(self.url, STEADY_EMPLOYEES)
        # The rows exist; their INSERTs are not part of the measurement (nor of its percentiles).
        with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE emp_records_cdc")
        conn.close()
        topic = self.topic()
        port, consumer_port = free_port(), free_port()
        proc, _ = self.daemon(tree, topic, "steady", METRICS_PORT=str(port), STATS_INTERVAL="1")
        consumer = None
        if self.args.e2e:
            with psycopg2.connect(self.settings.dest_db_url) as conn, conn.cursor() as cur:
                cur.execute("TRUNCATE employees, processed_events, emp_versions")
            conn.close()
            consumer_env = {
                **self.env,
                "CDC_TOPIC": topic,
                "CONSUMER_GROUP_ID": f"{topic}_group",
                "METRICS_PORT": str(consumer_port),
            }
            with open(self.workdir / f"consumer-{self.runs}.log", "wb") as out:
                consumer = subprocess.Popen(
                    [sys.executable, str(ROOT / "consumer_final.py"), "--env-file", os.devnull],
                    env=consumer_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        stop = threading.Event()
        writers = [
            threading.Thread(target=self._write, args=(self.args.rate / STEADY_WRITERS, stop, i))
            for i in range(STEADY_WRITERS)
        ]
        try:
            # One change through the pipeline first: the consumer has joined its group.
            with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
                cur.execute(self.bump, (1,))
            conn.close()
            deadline = time.monotonic() + 120
            while metrics(port).get("published", 0) < 1 or (
                consumer is not None and metrics(consumer_port).get("batches", 0) < 1
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the first change did not get through")
                time.sleep(0.2)
            for w in writers:
                w.start()
            time.sleep(STEADY_WARMUP)
            pg, broker = self.services.source.pid(), self.services.kafka.pid()
            assert pg is not None and broker is not None
            published0 = metrics(port).get("published", 0)
            pg0, broker0 = server_cpu_seconds(pg), process_cpu_seconds(broker)
            cpu0, t0 = process_cpu_seconds(proc.pid), time.monotonic()
            time.sleep(self.args.steady_seconds)
            cpu, seen = process_cpu_seconds(proc.pid) - cpu0, metrics(port)
            pg_cpu, broker_cpu = server_cpu_seconds(pg) - pg0, process_cpu_seconds(broker) - broker0
            elapsed = time.monotonic() - t0
            result = {
                "rate": self.args.rate,
                "published_per_second": round((seen.get("published", 0) - published0) / elapsed),
                "cpu_percent": round(cpu / elapsed * 100, 2),
                # The whole server and broker: the writers' (and the consumer's) work included.
                "source_pg_cpu_percent": round(pg_cpu / elapsed * 100, 1),
                "broker_cpu_percent": round(broker_cpu / elapsed * 100, 1),
                "capture_to_ack_p50_ms": seen.get("capture_to_ack_p50_ms"),
                "capture_to_ack_p99_ms": seen.get("capture_to_ack_p99_ms"),
            }
            if consumer is not None:
                applied = metrics(consumer_port)
                result["e2e_p50_ms"] = applied.get("e2e_latency_p50_ms")
                result["e2e_p99_ms"] = applied.get("e2e_latency_p99_ms")
            return result
        finally:
            stop.set()
            for w in writers:
                if w.is_alive():
                    w.join(30)
            for p in (proc, consumer):
                if p is not None:
                    p.terminate()
                    p.wait(30)

    def _write(self, rate: float, stop: threading.Event, seed: int) -> None:
        rnd = random.Random(seed)
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                next_at = time.monotonic()
                while not stop.is_set():
                    cur.execute(self.bump, (rnd.randint(1, STEADY_EMPLOYEES),))
                    next_at += 1 / rate
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
        finally:
            conn.close()


def summary(runs: list[dict[str, float]]) -> dict[str, object]:
    """Median of every number over the rounds, its range, and the rounds themselves."""
    out: dict[str, object] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values and all(isinstance(v, int | float) for v in values):
            out[key] = statistics.median(values)
            if len(values) > 1:
                out[f"{key}_range"] = [min(values), max(values)]
    out["rounds"] = runs
    return out


def run(args: argparse.Namespace, services: LocalServices, workdir: Path) -> dict[str, object]:
    bench = Bench(args, services, workdir)
    trees = [ROOT, *(Path(d).resolve() for d in args.compare)]
    # A fresh broker spends its first seconds loading coordinators (producer ids): warm it up.
    bench.once(ROOT, 20_000)
    backlog: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    steady: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            backlog[tree].append(bench.backlog(tree))
            print(f"  {tree}: backlog {backlog[tree][-1]}", flush=True)
    for _ in range(args.rounds if args.rate else 0):
        for tree in trees:
            steady[tree].append(bench.steady(tree))
            print(f"  {tree}: steady {steady[tree][-1]}", flush=True)
    results = {}
    for tree in trees:
        result = {
            "rows": args.rows,
            "batch_size": args.batch_size or "default",
            "prune": args.prune,
            **summary(backlog[tree]),
            "idle_cpu_percent": round(bench.idle(tree) * 100, 2),
            "idle_seconds": args.idle_seconds,
            "cpus": os.cpu_count(),
        }
        if steady[tree]:
            result["steady"] = summary(steady[tree])
        results[str(tree)] = result
    main = results.pop(str(ROOT))
    if results:
        main["compare"] = results
    return main


def line(name: str, r: dict[str, object]) -> str:
    def rng(key: str, source: dict[str, object] = r) -> str:
        span = source.get(f"{key}_range")
        return f"{source.get(key)}" if span is None else f"{source.get(key)} ({span[0]}..{span[1]})"

    text = (
        f"{name}: {rng('events_per_second')} events/s; per 100k changes CPU s: producer "
        f"{rng('cpu_seconds_per_100k')}, source PostgreSQL {rng('source_pg_cpu_seconds_per_100k')}, "
        f"broker {rng('broker_cpu_seconds_per_100k')}; peak RSS {r.get('peak_rss_mib')} MiB; "
        f"idle CPU {r.get('idle_cpu_percent')}%"
    )
    steady = r.get("steady")
    if isinstance(steady, dict):
        text += (
            f"; at {steady.get('rate'):.0f}/s: CPU {rng('cpu_percent', steady)}% (source PostgreSQL "
            f"{rng('source_pg_cpu_percent', steady)}%, broker {rng('broker_cpu_percent', steady)}%), capture->ack p50/p99 "
            f"{rng('capture_to_ack_p50_ms', steady)}/{rng('capture_to_ack_p99_ms', steady)} ms"
        )
        if "e2e_p50_ms" in steady:
            text += f", e2e p50/p99 {rng('e2e_p50_ms', steady)}/{rng('e2e_p99_ms', steady)} ms"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--batch-size", type=int, default=0, help="PRODUCER_BATCH_SIZE (default: its default)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="steady changes/s (0: no steady run)")
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--e2e", action="store_true", help="steady run with consumer_final.py too")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--prune", action="store_true", help="measure with outbox pruning on")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR", help="another checkout")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "producer.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp:
        services = LocalServices(home=Path(tmp), ports=Ports.free())
        try:
            services.up()
            result = run(args, services, Path(tmp))
        finally:
            try:
                services.down()
            except ServiceError as exc:
                # The measurement stands; say what was left behind.
                print(f"warning: stopping the bench services: {exc}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(line("producer", result))
    for tree, other in dict(result.get("compare", {})).items():
        print(line(tree, other))
    ok = all(r["on_topic"] == r["published"] == args.rows for r in result["rounds"])  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
