"""``python -m cdc top``: a live view of both daemons from their metrics endpoints."""

from __future__ import annotations

import argparse

from cdc.cli.args import positive
from cdc.ops.top import DEFAULT_INTERVAL, run_top, targets
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


def cmd_top(args: argparse.Namespace) -> int:
    """With --once: exit 0 when every daemon answered, 1 when one did not."""
    settings = load_settings(dotenv_path=args.env_file)
    watched = targets(settings, producers=args.producer, consumers=args.consumer)
    answered = run_top(watched, interval=args.interval, once=args.once)
    return exits.OK if answered else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        type=positive,
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
