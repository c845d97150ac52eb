"""``python -m cdc workload``: a realistic write load on the source employees."""

from __future__ import annotations

import argparse
import signal

from cdc.cli.args import non_negative, positive_int
from cdc.ops.workload import Workload
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    load = sub.add_parser(
        "workload", help="write a realistic INSERT/UPDATE/DELETE load into the source employees"
    )
    load.add_argument(
        "--rate", type=non_negative, default=100.0, help="changes per second, all writers (0: no limit)"
    )
    load.add_argument(
        "--duration", type=non_negative, default=10.0, metavar="SECONDS", help="stop after this long"
    )
    load.add_argument(
        "--writers", type=positive_int, default=4, help="concurrent writers, one connection each"
    )
    load.add_argument("--seed", type=int, help="random seed (printed in the summary, to replay a run)")
    load.add_argument("--max-changes", type=positive_int, help="stop after this many changes")
    load.add_argument(
        "--allow-remote", action="store_true", help="allow a SOURCE_DB_URL that is not on this machine"
    )
    load.set_defaults(func=cmd_workload)
