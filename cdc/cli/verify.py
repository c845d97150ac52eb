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
    result = verify(settings, wait=args.wait, events=args.events, limit=args.limit, tables=args.tables)
    for line in result.lines():
        print(line)
    return exits.OK if result.ok else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    verify_cmd = sub.add_parser(
        "verify",
        help="compare every replicated table on the destination with the source"
        " (exit 0 identical, 1 different, 2 error)",
    )
    verify_cmd.add_argument(
        "--table",
        dest="tables",
        action="append",
        metavar="SCHEMA.TABLE",
        help="compare only this table's rows, named as in SQL ('public.\"Order Items\"'; employees for the"
        " default table); repeatable. Default: employees and every table of cdc_tables",
    )
    verify_cmd.add_argument(
        "--wait",
        type=non_negative,
        metavar="SECONDS",
        help="first wait until the producer has published both outboxes and the destination has applied"
        " every message of CDC_TOPIC and of the topics under CDC_TOPIC_PREFIX; not caught up in time: exit 1",
    )
    verify_cmd.add_argument(
        "--events",
        action="store_true",
        help="also check that every action_id of both outboxes has its row in processed_events",
    )
    verify_cmd.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        help="keys listed per kind of difference and table",
    )
    verify_cmd.set_defaults(func=cmd_verify)
