"""``python -m cdc COMMAND``: local services and operator tools.

Commands: up, down, status (local services without Docker).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cdc.errors import CDCError
from cdc.kafka import ensure_topics
from cdc.logs import configure_logging
from cdc.services import (
    PROJECT_DIR,
    LocalServices,
    find_pg_bindir,
    kafka_lib_dir,
    resolve_kafka_jars,
    write_dotenv,
)
from cdc.settings import load_settings

EXIT_OK = 0
EXIT_ERROR = 2

log = logging.getLogger("cdc")


def _services(args: argparse.Namespace) -> LocalServices:
    return LocalServices(home=Path(args.home))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Resolve what the services need before any is started: broker jars, PostgreSQL binaries."""
    kafka_home = os.environ.get("KAFKA_HOME")
    libs = f"{kafka_home}/libs" if kafka_home else str(resolve_kafka_jars(kafka_lib_dir()))
    print(f"kafka jars: {libs}; postgres binaries: {find_pg_bindir()}")
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    services = _services(args)
    timings = services.up()
    write_dotenv(Path(args.env_file), services.env())
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
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    services = _services(args)
    services.down()
    print("stopped kafka, postgres-source, postgres-dest")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    services = _services(args)
    for line in services.status_lines():
        print(line)
    return EXIT_OK if services.all_running() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cdc", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(PROJECT_DIR / ".cdc"), help="folder for service data and logs")
    parser.add_argument("--env-file", default=str(PROJECT_DIR / ".env"), help=".env file to write (up)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="resolve the Kafka jars and find the PostgreSQL binaries").set_defaults(
        func=cmd_prepare
    )
    sub.add_parser(
        "up", help="start Kafka and both PostgreSQL servers, apply the schemas, write .env"
    ).set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop all local services").set_defaults(func=cmd_down)
    sub.add_parser("status", help="say what runs where (exit 1 unless all run)").set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper())
    try:
        return args.func(args)
    except CDCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
