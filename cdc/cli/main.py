"""``python -m cdc COMMAND``: local services and operator tools.

Commands: up, down, status (local services without Docker) and monitor (a local Prometheus with
the alerts, scraping the daemons); verify (reconcile the destination with the source), workload
(a realistic write load on the source), dlq (list, show, correct and replay dead letters),
offsets (the destination's applied offsets: show, accept a gap, rewind), tables (capture
more tables: add, list, remove) and top (a live view
of both daemons), the operator tools. Each command (or group) is a module of
this package with its ``add_parser``; this one builds the parser and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from cdc.cli import demo, dlq, offsets, services, tables, top, verify, workload
from cdc.errors import CDCError
from cdc.local.paths import WORK_DIR
from cdc.runtime import exits
from cdc.runtime.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cdc", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(WORK_DIR / ".cdc"), help="folder for service data and logs")
    parser.add_argument(
        "--env-file", default=str(WORK_DIR / ".env"), help=".env file to read (and, for up, to write)"
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    # In this order in --help.
    services.add_parsers(sub)
    verify.add_parser(sub)
    workload.add_parser(sub)
    demo.add_parser(sub)
    dlq.add_parser(sub)
    offsets.add_parser(sub)
    tables.add_parser(sub)
    top.add_parser(sub)
    return parser


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
