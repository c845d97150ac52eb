"""``python -m cdc prepare|up|down|status|monitor``: the local services and their Prometheus."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dotenv import dotenv_values

from cdc.kafka.client import ensure_topics
from cdc.local.env import metrics_ports, write_dotenv
from cdc.local.jars import kafka_lib_dir, resolve_kafka_jars
from cdc.local.ports import port_open
from cdc.local.postgres import find_pg_bindir
from cdc.local.prometheus import JOB_PORTS, PrometheusServer, local_prometheus
from cdc.local.services import LocalServices
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


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
    return exits.OK if services.all_running() else exits.FAILED


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
