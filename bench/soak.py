"""``make soak``: the pipeline at a steady rate for a long time, with a fault every few minutes.

    python -m bench.soak [--minutes 30] [--rate 300] [--fault-every 180]

On fresh private services (one broker, two PostgreSQL servers), runs ``producer.py`` and
``consumer_final.py`` under the concurrent workload (long, out-of-order transactions included)
and injects, in turn: a consumer kill -9, a broker hard kill and restart, a destination crash
(immediate stop) and restart, a producer kill -9, a clean broker restart, a source restart.
Every 10 s it samples each daemon's RSS, open file descriptors and database connections. At the
end: the workload stops, the pipeline must catch up, ``verify --events`` must say identical and the
DLQ must be empty.

Memory and descriptors count as flat when, for each daemon's longest-lived process, the median
of the last fifth of its samples is within 10 % of the median of the first fifth after warm-up
(descriptors: within 10 % or 2, whichever is more). Warm-up is 60 s from the process's start,
and it includes full-size batches: a daemon's memory grows to a ceiling the first time it moves a
full batch and stays
there, which at 300 changes/s happens only when it catches up after an outage. So each time a
daemon starts, the soak writes a burst of ``BURST`` changes in one transaction: the process meets
its largest batches in warm-up, and what the comparison sees after it is growth, not the ceiling.
Writes ``bench-results/soak.json`` and ``soak.md``; exit status 0 only if identical, nothing in the
DLQ, and flat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import tables
from cdc.kafka.client import admin_client, ensure_topics
from cdc.local.paths import PROJECT_DIR
from cdc.local.ports import Ports
from cdc.local.runner import Daemon
from cdc.local.services import LocalServices
from cdc.model.table import SOURCE_TABLE, Table
from cdc.ops.verify import verify
from cdc.runtime.settings import Settings, load_settings
from tests.support import dlq_count
from tests.support.pipeline import Pipeline

SAMPLE_EVERY = 10.0
WARMUP = 60.0
BURST = 10_000  # two full batches of either daemon at its default batch size (5000)
FAULTS = (
    "consumer kill",
    "broker hard restart",
    "destination crash",
    "producer kill",
    "broker restart",
    "source restart",
)


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def connections(url: str, application: str) -> int | None:
    """Sessions of one daemon on a server (by application_name prefix)."""
    try:
        with contextlib.closing(psycopg2.connect(url, connect_timeout=3)) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (application + "%",)
            )
            return cur.fetchone()[0]
    except psycopg2.Error:
        return None


class Soak:
    def __init__(self, services: LocalServices, settings: Settings, workdir: Path, rate: float) -> None:
        self.services = services
        self.settings = settings
        self.rate = rate
        self.pipeline = Pipeline(settings, workdir, STATS_INTERVAL="30")
        self.producer = self.pipeline.producer
        self.samples: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def sample(self) -> None:
        now = round(time.monotonic() - self.started, 1)
        row: dict[str, Any] = {"t": now}
        for name, daemon, url, app in (
            ("producer", self.producer, self.settings.source_db_url, "cdc-producer"),
            ("consumer", self.consumer, self.settings.dest_db_url, "cdc-consumer"),
        ):
            if daemon.running():
                row[name] = {
                    "pid": daemon.pid,
                    "rss_mib": rss_mib(daemon.pid),
                    "fds": open_fds(daemon.pid),
                    "db_connections": connections(url, app),
                }
        self.samples.append(row)

    @property
    def consumer(self) -> Daemon:
        return self.pipeline.consumers[0]

    def begin(self) -> None:
        """Both daemons, one burst to warm them up, then the workload."""
        self.producer.start()
        self.pipeline.add_consumer()
        self.burst()
        self.pipeline.start_load(rate=self.rate, writers=4, seed=20261128)

    def start(self, daemon: Daemon) -> None:
        """Start ``daemon`` and give it full-size batches to warm up on (see the module docstring)."""
        daemon.start()
        self.burst()

    def burst(self) -> None:
        with contextlib.closing(psycopg2.connect(self.settings.source_db_url)) as conn, conn.cursor() as cur:
            cur.execute(
                tables.fill(Table.load(cur, SOURCE_TABLE), key=False, nulls=False), {"lo": 1, "hi": BURST}
            )
            conn.commit()

    def fault(self, kind: str) -> None:
        t = round(time.monotonic() - self.started, 1)
        print(f"soak: t={t:.0f}s fault: {kind}", flush=True)
        s = self.services
        if kind == "consumer kill":
            self.consumer.kill()
            self.start(self.consumer)
        elif kind == "producer kill":
            self.producer.kill()
            self.start(self.producer)
        elif kind == "broker hard restart":
            s.kafka.stop(hard=True)
            time.sleep(5)
            s.kafka.start()
        elif kind == "broker restart":
            s.kafka.stop()
            time.sleep(2)
            s.kafka.start()
        elif kind == "destination crash":
            s.dest.stop(mode="immediate")
            time.sleep(5)
            s.dest.start()
        elif kind == "source restart":
            s.source.stop(mode="fast")
            time.sleep(2)
            s.source.start()
        self.faults.append({"t": t, "fault": kind})


def flatness(samples: list[dict[str, Any]], daemon: str) -> dict[str, Any]:
    """Compare the start and the end of the daemon's longest-lived process (after warm-up)."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for row in samples:
        if daemon in row:
            by_pid.setdefault(row[daemon]["pid"], []).append({"t": row["t"], **row[daemon]})
    if not by_pid:
        return {"flat": False, "why": "never sampled"}
    rows = max(by_pid.values(), key=lambda r: r[-1]["t"] - r[0]["t"])
    rows = [r for r in rows if r["t"] - rows[0]["t"] >= WARMUP]
    if len(rows) < 10:
        return {"flat": False, "why": f"only {len(rows)} samples after warm-up in its longest-lived process"}
    fifth = max(2, len(rows) // 5)
    out: dict[str, Any] = {
        "pid": rows[0]["pid"],
        "minutes": round((rows[-1]["t"] - rows[0]["t"]) / 60, 1),
        "samples": len(rows),
    }
    flat = True
    for key, slack in (("rss_mib", 0.0), ("fds", 2.0), ("db_connections", 1.0)):
        head = [r[key] for r in rows[:fifth] if r[key] is not None]
        tail = [r[key] for r in rows[-fifth:] if r[key] is not None]
        if not head or not tail:
            continue
        a, b = statistics.median(head), statistics.median(tail)
        ok = abs(b - a) <= max(0.10 * a, slack)
        out[key] = {
            "start": round(a, 1),
            "end": round(b, 1),
            "max": round(max(r[key] or 0 for r in rows), 1),
            "flat": ok,
        }
        flat = flat and ok
    out["flat"] = flat
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=300.0, help="changes per second (default 300)")
    p.add_argument("--fault-every", type=float, default=180.0, help="seconds between faults (default 180)")
    p.add_argument("--out", type=Path, default=PROJECT_DIR / "bench-results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    home = Path(tempfile.mkdtemp(prefix="cdc-soak-"))
    services = LocalServices(home=home, ports=Ports.free())
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": vars(args) | {"out": str(args.out)},
    }
    try:
        services.up()
        tag = uuid.uuid4().hex[:8]
        settings = load_settings(
            env={**services.env(), "LOG_LEVEL": "INFO"},
            dotenv_path=None,
            cdc_topic=f"soak_{tag}",
            cdc_dlq_topic=f"soak_{tag}_dlq",
            consumer_group_id=f"soak_{tag}",
        )
        ensure_topics(settings, admin_client(settings))
        soak = Soak(services, settings, home / "daemons", args.rate)
        soak.begin()
        end = soak.started + args.minutes * 60
        next_fault = soak.started + args.fault_every
        k = 0
        while time.monotonic() < end:
            soak.sample()
            if time.monotonic() >= next_fault and time.monotonic() < end - 60:
                soak.fault(FAULTS[k % len(FAULTS)])
                k += 1
                next_fault += args.fault_every
            for daemon in (soak.producer, soak.consumer):
                if not daemon.running():
                    raise RuntimeError(f"{daemon.script} exited:\n{daemon.log()[-2000:]}")
            time.sleep(SAMPLE_EVERY)
        assert soak.pipeline.workload is not None
        soak.pipeline.workload.stop()
        written = soak.pipeline.workload.stats.get_stats()
        check = verify(settings, wait=600, events=True)
        dlq = dlq_count(settings)
        result.update(
            {
                "minutes": args.minutes,
                "changes_written": written.get("changes", 0),
                "faults": soak.faults,
                "identical": check.ok,
                "verify": check.lines(),
                "dlq_messages": dlq,
                "producer": flatness(soak.samples, "producer"),
                "consumer": flatness(soak.samples, "consumer"),
                "samples": soak.samples,
            }
        )
        codes = [soak.producer.stop(), soak.consumer.stop()]
        result["exit_codes"] = codes
    finally:
        with contextlib.suppress(Exception):
            services.down()
        shutil.rmtree(home, ignore_errors=True)
    result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    ok = bool(result.get("identical")) and result.get("dlq_messages") == 0
    ok = ok and result["producer"]["flat"] and result["consumer"]["flat"]
    result["ok"] = ok
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    print((args.out / "soak.md").read_text())
    return 0 if ok else 1


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Soak",
        "",
        f"{r['started']} to {r['finished']}: {r.get('minutes')} minutes at {r['settings']['rate']} changes/s, "
        f"a fault every {r['settings']['fault_every']:.0f} s; {r.get('changes_written', 0):,} changes written.",
        "",
        f"- result: {'PASS' if r.get('ok') else 'FAIL'}",
        f"- verify: {'identical' if r.get('identical') else 'NOT identical'} ({'; '.join(x for x in r.get('verify', []) if x)})",
        f"- DLQ messages: {r.get('dlq_messages')}",
        "- faults: " + ", ".join(f"{f['fault']} at {f['t']:.0f}s" for f in r.get("faults", [])),
        "",
        "| daemon | longest process, minutes | RSS MiB start → end (max) | fds start → end (max) | DB connections start → end (max) | flat |",
        "|---|---|---|---|---|---|",
    ]
    for daemon in ("producer", "consumer"):
        f = r.get(daemon, {})
        if "why" in f:
            lines.append(f"| {daemon} | {f['why']} | | | | no |")
            continue

        def cell(key: str, f: dict[str, Any] = f) -> str:
            v = f.get(key)
            return f"{v['start']} → {v['end']} ({v['max']})" if v else "-"

        lines.append(
            f"| {daemon} | {f.get('minutes')} | {cell('rss_mib')} | {cell('fds')} | {cell('db_connections')} "
            f"| {'yes' if f.get('flat') else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
