"""``make demo``: the whole pipeline on local services, under load, verified at the end.

1. Start the local services (``make up`` does it before this runs; already running is fine).
2. Start ``producer.py`` and ``consumer_final.py`` as subprocesses (logs in ``<home>/logs/``).
3. Drive the workload generator for a while, showing one refreshing progress line.
4. Stop the load, wait for the pipeline to catch up, run ``verify`` (rows and events).
5. Stop both daemons cleanly and print a short summary.

The services are left running (``make down`` stops them); the daemons are not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path

import psycopg2

from cdc.errors import CDCError
from cdc.kafka.client import ensure_topics
from cdc.local import shop
from cdc.local.ports import Ports
from cdc.local.runner import Daemon
from cdc.ops import tables
from cdc.ops.verify import LagProbe, verify
from cdc.ops.workload import Mix, Workload
from cdc.runtime.settings import Settings
from cdc.sink import records

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT = 180.0
PROGRESS_EVERY = 1.0
# The progress line says what their INFO lines would; keep the screen to one refreshing line.
QUIET_LOGGERS = (Workload.__module__, verify.__module__, "cdc.kafka")


def _scalar(url: str, query: str) -> int:
    with contextlib.closing(psycopg2.connect(url, connect_timeout=5)) as conn, conn.cursor() as cur:
        cur.execute(query)
        row = cur.fetchone()  # an aggregate: always one row
        return int(row[0] or 0) if row else 0


class Progress:
    """Counts for the progress line, read from where each stage keeps them."""

    def __init__(self, settings: Settings, workload: Workload) -> None:
        self.settings = settings
        self.workload = workload
        self.probe = LagProbe(settings)

    def close(self) -> None:
        self.probe.close()

    def line(self, elapsed: float, duration: float) -> str:
        s = self.settings
        written = self.workload.stats.get("events")
        published = _scalar(
            s.source_db_url, "SELECT coalesce(sum(published_total), 0) FROM cdc_producer_state"
        )
        with (
            contextlib.closing(psycopg2.connect(s.dest_db_url, connect_timeout=5)) as conn,
            conn.cursor() as cur,
        ):
            decided, dlq = records.counts(cur)
        try:
            lag = self.probe.measure()
            lag_text = f"{lag.outbox_pending + lag.total_consumer_lag}"
        except CDCError:
            lag_text = "?"
        done = min(1.0, elapsed / duration) if duration else 1.0
        bar = "#" * int(done * 20) + "." * (20 - int(done * 20))
        return (
            f"[{bar}] {elapsed:5.1f}s  written {written:>7}  published {published:>7}  "
            f"applied {decided:>7}  lag {lag_text:>6}  dlq {dlq}"
        )


def _show(text: str, final: bool = False) -> None:
    if sys.stdout.isatty():
        sys.stdout.write("\r" + text + ("\n" if final else ""))
        sys.stdout.flush()
    else:
        print(text, flush=True)


def _consumer_stats(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return {}


def run_demo(
    settings: Settings,
    *,
    home: Path,
    duration: float,
    rate: float,
    writers: int,
    seed: int | None,
    long_transactions: bool = True,
) -> bool:
    """Run the demo, the daemons' logs under ``home``; True when the destination ended identical to
    the source."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    ensure_topics(settings)
    logdir = home / "logs"
    # The consumer's port from .env (`make up` writes one, for `make monitor` and `cdc top`), else any.
    metrics_port = settings.metrics_port_of("consumer") or Ports.free().kafka
    producer = Daemon("producer.py", settings, logdir / "demo-producer", STATS_INTERVAL="5")
    consumer = Daemon(
        "consumer_final.py",
        settings,
        logdir / "demo-consumer",
        STATS_INTERVAL="5",
        CONSUMER_METRICS_PORT=str(metrics_port),
    )
    # Long transactions hold every later change back until they end: that is the gap-safe
    # capture at work, and it dominates the latency the summary shows.
    mix = Mix() if long_transactions else Mix(long_every=0)
    workload = Workload(settings.source_db_url, rate=rate, writers=writers, seed=seed, mix=mix)
    # Two more tables beside employees, linked by a foreign key, one with a composite key.
    shop.create(settings.source_db_url, settings.dest_db_url)
    tables.add(settings, shop.TABLES)
    shop_writer = shop.ShopWriter(settings.source_db_url, rate=max(1.0, rate / 8), seed=workload.seed)
    print(
        f"demo: {writers} writers at about {rate:.0f} changes/s on employees and one at about "
        f"{shop_writer.rate:.0f} transactions/s on {' and '.join(shop.TABLES)} for {duration:.0f}s "
        f"(seed {workload.seed}); logs in {Path(producer.logfile).parent.parent}"
    )
    progress = Progress(settings, workload)
    try:
        producer.start()
        consumer.start()
        started = time.monotonic()
        workload.start()
        shop_writer.start()
        while (elapsed := time.monotonic() - started) < duration:
            for d in (producer, consumer):
                if not d.running():
                    raise CDCError(f"{d.script} exited early; see {d.logfile}")
            _show(progress.line(elapsed, duration))
            time.sleep(PROGRESS_EVERY)
        workload.stop()
        shop_writer.stop()
        load_seconds = time.monotonic() - started
        _show(progress.line(duration, duration), final=True)
        print("load stopped; waiting for the pipeline to catch up, then verifying ...", flush=True)
        result = verify(settings, wait=CATCH_UP_TIMEOUT, events=True)
        _show(progress.line(duration, duration), final=True)
        stats = _consumer_stats(metrics_port)
    finally:
        workload.stop()
        shop_writer.stop()
        progress.close()
        codes = [d.stop() for d in (producer, consumer) if d.running()]
    for line in result.lines():
        print("  " + line)
    written = workload.stats.get("events") + shop_writer.changes
    identical = result.ok
    print()
    print("summary")
    for table in result.tables or []:
        state = "identical" if table.identical else "DIFFERENT: " + table.summary()
        print(
            f"  {table.table:<29}: {table.source_rows} / {table.dest_rows} rows (source / destination), {state}"
        )
    print(
        f"  changes captured             : {written} ({written / load_seconds:.0f}/s over {load_seconds:.0f}s)"
    )
    print(
        f"  events applied (consumer)    : {sum(stats.get(f'applied_{a}', 0) for a in ('insert', 'update', 'delete', 'snapshot'))}"
        f", stale {stats.get('stale', 0)}, duplicates {stats.get('duplicates', 0)}"
    )
    print(
        f"  end-to-end latency p50 / p99 : {stats.get('e2e_latency_p50_ms', '?')} ms / {stats.get('e2e_latency_p99_ms', '?')} ms"
    )
    print(f"  dead-lettered                : {stats.get('dlq', 0)}")
    print(f"  daemons stopped cleanly      : {'yes' if codes and set(codes) == {0} else 'no ' + str(codes)}")
    print(f"  identical                    : {'yes' if identical else 'NO'}")
    print()
    print("The local services are still running (make status); stop them with: make down")
    return identical
