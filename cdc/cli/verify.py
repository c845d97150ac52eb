"""``python -m cdc verify``: reconcile the destination with the source."""

from __future__ import annotations

import argparse

from cdc.cli.args import non_negative, positive_int
from cdc.ops.verify import DEFAULT_LIMIT, verify
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when identical (and caught up, and events accounted for), 1 when not, 2 on errors."""
    settings = load_settings(dotenv_path=args.env_file)
    result = verify(settings, wait=args.wait, events=args.events, limit=args.limit)
    for line in result.lines():
        print(line)
    return exits.OK if result.ok else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    verify_cmd = sub.add_parser(
        "verify",
        help="compare destination employees with the source (exit 0 identical, 1 different, 2 error)",
    )
    verify_cmd.add_argument(
        "--wait",
        type=non_negative,
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
        "--limit", type=positive_int, default=DEFAULT_LIMIT, help="ids listed per kind of difference"
    )
    verify_cmd.set_defaults(func=cmd_verify)
