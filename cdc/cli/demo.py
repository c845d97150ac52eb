"""``python -m cdc demo``: producer, consumer and a workload on the local services, then verify."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdc.cli.args import non_negative, positive_int
from cdc.local.demo import run_demo
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


def cmd_demo(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    identical = run_demo(
        settings,
        home=Path(args.home),
        duration=args.duration,
        rate=args.rate,
        writers=args.writers,
        seed=args.seed,
        long_transactions=not args.no_long_transactions,
    )
    return exits.OK if identical else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="run producer, consumer and a workload on the local services, then verify"
    )
    demo.add_argument(
        "--duration", type=non_negative, default=30.0, metavar="SECONDS", help="length of the load"
    )
    demo.add_argument("--rate", type=non_negative, default=200.0, help="changes per second, all writers")
    demo.add_argument("--writers", type=positive_int, default=4, help="concurrent writers")
    demo.add_argument("--seed", type=int, help="workload random seed")
    demo.add_argument(
        "--no-long-transactions",
        action="store_true",
        help="no long source transactions (they hold later changes back, which dominates latency)",
    )
    demo.set_defaults(func=cmd_demo)
