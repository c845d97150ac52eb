"""Producer throughput on a backlog, and its idle CPU, on private local services.

    python bench/bench_producer.py [--rows 100000] [--batch-size 1000] [--idle-seconds 10] [--prune]

Starts a private Kafka broker and source/destination PostgreSQL on free ports in a temporary
folder, writes ``--rows`` changes into the outbox (set-based, before the producer starts), runs
``producer.py --once`` until the backlog is published, then runs the daemon idle and samples its
CPU. Prints one result line and writes ``bench-results/producer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from cdc.errors import ServiceError  # noqa: E402
from cdc.kafka import base_config, ensure_topics  # noqa: E402
from cdc.services import LocalServices, Ports  # noqa: E402
from cdc.settings import Settings, load_settings  # noqa: E402
from cdc.stats import process_cpu_seconds  # noqa: E402

ACTIVE_LINE = re.compile(r"^(\S+ \S+) INFO +producer: active:", re.M)
FINAL_LINE = re.compile(r"^(\S+ \S+) INFO +producer: final published=(\d+)", re.M)


def log_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fill_backlog(url: str, rows: int) -> None:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "TRUNCATE employees, emp_records_cdc RESTART IDENTITY;"
            " UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0"
        )
        cur.execute(
            "INSERT INTO employees (first_name, last_name, dob, city, salary)"
            " SELECT 'first' || g, 'last' || g, date '1970-01-01' + g %% 15000, 'Berlin', g"
            " FROM generate_series(1, %s) AS g",
            (rows,),
        )
    conn.close()


def topic_size(settings: Settings) -> int:
    consumer = Consumer({**base_config(settings), "group.id": "bench-producer"})
    try:
        meta = consumer.list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
        return sum(
            consumer.get_watermark_offsets(TopicPartition(settings.cdc_topic, p), timeout=10)[1]
            for p in meta.partitions
        )
    finally:
        consumer.close()


def publish_backlog(
    command: list[str], env: dict[str, str], url: str, rows: int, logfile: Path
) -> tuple[int, float]:
    """Fill the outbox with ``rows`` changes and run ``producer.py --once``: (published, seconds)."""
    fill_backlog(url, rows)
    with open(logfile, "wb") as out:
        code = subprocess.run(
            [*command, "--once"], env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    text = logfile.read_text()
    final, active = FINAL_LINE.search(text), ACTIVE_LINE.search(text)
    if code.returncode != 0 or not final or not active:
        raise SystemExit(f"producer failed (exit {code.returncode}):\n{text}")
    return int(final.group(2)), log_time(final.group(1)) - log_time(active.group(1))


def run(args: argparse.Namespace, services: LocalServices, workdir: Path) -> dict[str, object]:
    tag = time.strftime("%H%M%S")
    settings = load_settings(
        env=services.env(), dotenv_path=None, cdc_topic=f"bench_{tag}", cdc_dlq_topic=f"bench_{tag}_dlq"
    )
    ensure_topics(settings)
    env = {
        **os.environ,
        **services.env(),
        "CDC_DLQ_TOPIC": settings.cdc_dlq_topic,
        "PRODUCER_BATCH_SIZE": str(args.batch_size),
        "CDC_PRUNE": "true" if args.prune else "false",
    }
    command = [sys.executable, str(ROOT / "producer.py"), "--env-file", os.devnull]
    url = settings.source_db_url
    # A fresh broker spends its first seconds loading coordinators (producer ids): warm it up on
    # another topic so the measurement is the producer's steady state.
    publish_backlog(command, {**env, "CDC_TOPIC": f"warmup_{tag}"}, url, 20_000, workdir / "warmup.log")
    env["CDC_TOPIC"] = settings.cdc_topic
    published, publish_seconds = publish_backlog(command, env, url, args.rows, workdir / "producer-once.log")
    on_topic = topic_size(settings)

    idle_log = workdir / "producer-idle.log"
    with open(idle_log, "wb") as out:
        daemon = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not ACTIVE_LINE.search(idle_log.read_text()):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"idle producer did not start:\n{idle_log.read_text()}")
                time.sleep(0.1)
            time.sleep(1)
            cpu0, t0 = process_cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_cpu = (process_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            daemon.terminate()
            daemon.wait(30)

    return {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "prune": args.prune,
        "published": published,
        "on_topic": on_topic,
        "publish_seconds": round(publish_seconds, 2),
        "events_per_second": round(published / publish_seconds) if publish_seconds > 0 else None,
        "idle_cpu_percent": round(idle_cpu * 100, 2),
        "idle_seconds": args.idle_seconds,
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--prune", action="store_true", help="measure with outbox pruning on")
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
    print(
        f"producer: {result['published']} events in {result['publish_seconds']}s = "
        f"{result['events_per_second']} events/s (batch {result['batch_size']}, prune {args.prune}, "
        f"{result['on_topic']} on the topic); "
        f"idle CPU {result['idle_cpu_percent']}% of one core over {result['idle_seconds']:.0f}s"
    )
    return 0 if result["on_topic"] == result["published"] == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
