"""``python -m cdc COMMAND``: local services and operator tools.

Commands: up, down, status (local services without Docker) and monitor (a local Prometheus with
the alerts, scraping the daemons); verify (reconcile the destination with the source), workload
(a realistic write load on the source), dlq (list, show, correct and replay dead letters) and
top (a live view of both daemons), the operator tools.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from dotenv import dotenv_values

from cdc.cli import dlq
from cdc.cli.args import non_negative as _non_negative
from cdc.cli.args import positive as _positive
from cdc.cli.args import positive_int as _positive_int
from cdc.errors import CDCError
from cdc.kafka.client import ensure_topics
from cdc.local.demo import run_demo
from cdc.local.prometheus import JOB_PORTS, PrometheusServer, local_prometheus
from cdc.local.services import (
    PROJECT_DIR,
    LocalServices,
    find_pg_bindir,
    kafka_lib_dir,
    metrics_ports,
    port_open,
    resolve_kafka_jars,
    write_dotenv,
)
from cdc.ops.top import DEFAULT_INTERVAL, run_top, targets
from cdc.ops.verify import DEFAULT_LIMIT, verify
from cdc.ops.workload import Workload
from cdc.runtime import exits
from cdc.runtime.logs import configure_logging
from cdc.runtime.settings import load_settings

log = logging.getLogger("cdc")


def _services(args: argparse.Namespace) -> LocalServices:
    return LocalServices(home=Path(args.home))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Resolve what the services need before any is started: broker jars, PostgreSQL binaries."""
    kafka_home = os.environ.get("KAFKA_HOME")
    libs = f"{kafka_home}/libs" if kafka_home else str(resolve_kafka_jars(kafka_lib_dir()))
    print(f"kafka jars: {libs}; postgres binaries: {find_pg_bindir()}")
    return exits.OK


def _env_over_dotenv(args: argparse.Namespace) -> dict[str, str]:
    """The environment over the .env file (what the daemons will read), unset values left out."""
    merged = {**dotenv_values(args.env_file), **os.environ}
    return {k: v for k, v in merged.items() if v}


def _prometheus(args: argparse.Namespace) -> PrometheusServer:
    return local_prometheus(Path(args.home), _env_over_dotenv(args))


def cmd_up(args: argparse.Namespace) -> int:
    services = _services(args)
    timings = services.up()
    write_dotenv(Path(args.env_file), {**services.env(), **metrics_ports(_env_over_dotenv(args))})
    # Topic names and partitions come from the user's settings, pointed at these services.
    ensure_topics(load_settings(env={**os.environ, **services.env()}, dotenv_path=args.env_file))
    for line in services.status_lines():
        print(line)
    rss = services.kafka.rss_mb()
    print(
        f"ready: postgres {timings['postgres']:.1f}s, kafka {timings['kafka']:.1f}s"
        + (f", broker rss {rss:.0f} MiB" if rss else "")
        + f"; wrote {args.env_file}"
    )
    return exits.OK


def cmd_down(args: argparse.Namespace) -> int:
    _prometheus(args).stop()
    services = _services(args)
    services.down()
    print("stopped prometheus, kafka, postgres-source, postgres-dest")
    return exits.OK


def cmd_status(args: argparse.Namespace) -> int:
    services = _services(args)
    for line in [*services.status_lines(), _prometheus(args).status()]:
        print(line)
    return exits.OK if services.all_running() else 1


def cmd_monitor(args: argparse.Namespace) -> int:
    """Start (or reload) the local Prometheus; say which daemons it does not reach yet."""
    prometheus = _prometheus(args)
    prometheus.start()
    print(prometheus.status())
    for job, var in JOB_PORTS.items():
        target = prometheus.targets[job][0]
        port = int(target.rsplit(":", 1)[1])
        answering = "answering" if port_open(port) else "nothing there yet"
        print(f"  scrapes {job:<13} {target:<16} ({var}; {answering})")
    print(f"alerts: {prometheus.url}/alerts   queries: {prometheus.url}/graph   log: {prometheus.logfile}")
    return exits.OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when identical (and caught up, and events accounted for), 1 when not, 2 on errors."""
    settings = load_settings(dotenv_path=args.env_file)
    result = verify(settings, wait=args.wait, events=args.events, limit=args.limit)
    for line in result.lines():
        print(line)
    return exits.OK if result.ok else exits.FAILED


def cmd_workload(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    workload = Workload(
        settings.source_db_url,
        rate=args.rate,
        writers=args.writers,
        seed=args.seed,
        max_changes=args.max_changes,
        allow_remote=args.allow_remote,
    )
    # SIGTERM stops it like Ctrl-C: writers finish their transaction, the summary is printed.
    signal.signal(signal.SIGTERM, lambda signum, frame: workload.stop_event.set())
    try:
        workload.run(args.duration)
    except KeyboardInterrupt:
        workload.stop()
    print(workload.summary())
    return exits.OK


def cmd_demo(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    identical = run_demo(
        settings, duration=args.duration, rate=args.rate, writers=args.writers, seed=args.seed
    )
    return exits.OK if identical else exits.FAILED


def cmd_top(args: argparse.Namespace) -> int:
    """With --once: exit 0 when every daemon answered, 1 when one did not."""
    settings = load_settings(dotenv_path=args.env_file)
    watched = targets(settings, producers=args.producer, consumers=args.consumer)
    answered = run_top(watched, interval=args.interval, once=args.once)
    return exits.OK if answered else exits.FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cdc", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(PROJECT_DIR / ".cdc"), help="folder for service data and logs")
    parser.add_argument(
        "--env-file", default=str(PROJECT_DIR / ".env"), help=".env file to read (and, for up, to write)"
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="resolve the Kafka jars and find the PostgreSQL binaries").set_defaults(
        func=cmd_prepare
    )
    sub.add_parser(
        "up", help="start Kafka and both PostgreSQL servers, apply the schemas, write .env"
    ).set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop all local services (Prometheus too)").set_defaults(func=cmd_down)
    sub.add_parser("status", help="say what runs where (exit 1 unless all run)").set_defaults(func=cmd_status)
    sub.add_parser(
        "monitor",
        help="start a local Prometheus (PROMETHEUS_PORT, 9090) with the alerts, scraping the daemons' "
        "metrics ports from .env",
    ).set_defaults(func=cmd_monitor)
    verify_cmd = sub.add_parser(
        "verify",
        help="compare destination employees with the source (exit 0 identical, 1 different, 2 error)",
    )
    verify_cmd.add_argument(
        "--wait",
        type=_non_negative,
        metavar="SECONDS",
        help="first wait until the producer has published the whole outbox and the consumer lag is 0;"
        " not caught up in time: exit 1",
    )
    verify_cmd.add_argument(
        "--events",
        action="store_true",
        help="also check that every outbox action_id has its row in processed_events",
    )
    verify_cmd.add_argument(
        "--limit", type=_positive_int, default=DEFAULT_LIMIT, help="ids listed per kind of difference"
    )
    verify_cmd.set_defaults(func=cmd_verify)
    load = sub.add_parser(
        "workload", help="write a realistic INSERT/UPDATE/DELETE load into the source employees"
    )
    load.add_argument(
        "--rate", type=_non_negative, default=100.0, help="changes per second, all writers (0: no limit)"
    )
    load.add_argument(
        "--duration", type=_non_negative, default=10.0, metavar="SECONDS", help="stop after this long"
    )
    load.add_argument(
        "--writers", type=_positive_int, default=4, help="concurrent writers, one connection each"
    )
    load.add_argument("--seed", type=int, help="random seed (printed in the summary, to replay a run)")
    load.add_argument("--max-changes", type=_positive_int, help="stop after this many changes")
    load.add_argument(
        "--allow-remote", action="store_true", help="allow a SOURCE_DB_URL that is not on this machine"
    )
    load.set_defaults(func=cmd_workload)
    demo = sub.add_parser(
        "demo", help="run producer, consumer and a workload on the local services, then verify"
    )
    demo.add_argument(
        "--duration", type=_non_negative, default=30.0, metavar="SECONDS", help="length of the load"
    )
    demo.add_argument("--rate", type=_non_negative, default=200.0, help="changes per second, all writers")
    demo.add_argument("--writers", type=_positive_int, default=4, help="concurrent writers")
    demo.add_argument("--seed", type=int, help="workload random seed")
    demo.add_argument(
        "--no-long-transactions",
        action="store_true",
        help="no long source transactions (they hold later changes back, which dominates latency)",
    )
    demo.set_defaults(func=cmd_demo)
    dlq.add_parser(sub)
    _add_top(sub)
    return parser


def _add_top(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser(
        "top",
        help="a live view of both daemons from their metrics endpoints (Ctrl-C to leave)",
        description="Show both daemons' state from their /metrics, /ready and /live endpoints,"
        " refreshed every --interval seconds: producer active/standby, publish rate, outbox backlog,"
        " rows held back by an open transaction, capture->ack p50/p99; consumer rates, lag per"
        " partition, end-to-end p50/p99, DLQ, retries, pause, pool, readiness. The URLs default to"
        " http://127.0.0.1:PRODUCER_METRICS_PORT and http://127.0.0.1:CONSUMER_METRICS_PORT (each"
        " falling back to METRICS_PORT) from the environment, then the .env file"
        " (python -m cdc --env-file FILE top).",
        epilog="exit codes with --once: 0 every daemon answered, 1 one is down or has its metrics"
        " off, 2 bad settings",
    )
    top.add_argument(
        "--interval",
        type=_positive,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"refresh every this many seconds (default {DEFAULT_INTERVAL:g}); rates and percentiles"
        " are over the same span",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one screen (rates and percentiles since each daemon started) and exit: 0 when"
        " every daemon answered, 1 when not",
    )
    top.add_argument(
        "--producer",
        action="append",
        metavar="URL",
        help="producer metrics URL, e.g. http://127.0.0.1:9101 (repeat it to watch standbys too)",
    )
    top.add_argument(
        "--consumer",
        action="append",
        metavar="URL",
        help="consumer metrics URL, e.g. http://127.0.0.1:9102 (repeat it for every consumer of the group)",
    )
    top.set_defaults(func=cmd_top)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper())
    try:
        return args.func(args)
    except CDCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exits.CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
