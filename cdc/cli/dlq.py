"""``python -m cdc dlq``: list, show, correct and replay dead letters."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdc.cli.args import non_negative, positive_int
from cdc.dlq import letters as dlq_letters
from cdc.ops import dlq_workbench
from cdc.runtime import exits
from cdc.runtime.settings import Settings, load_settings

DLQ_AUDIT_FILE = "dlq-audit.jsonl"  # under --home, unless --audit-file says otherwise


def _dlq_selection(args: argparse.Namespace, settings: Settings) -> dlq_letters.Selection:
    return dlq_letters.selection(
        settings,
        action_ids=args.action_id,
        keys=args.key,
        error_classes=args.error_class,
        partitions=args.partition,
        offsets=args.offset,
        since=args.since,
        until=args.until,
        positions=args.dlq,
        tables=args.table,
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    chosen = _dlq_selection(args, settings)
    dlq_workbench.list_command(settings, chosen, limit=args.limit, as_json=args.json)
    return exits.OK


def cmd_dlq_show(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    chosen = _dlq_selection(args, settings)
    written = dlq_workbench.show_command(
        settings,
        chosen,
        limit=args.limit,
        as_json=args.json,
        edit_file=Path(args.edit_file) if args.edit_file else None,
        force=args.force,
    )
    return exits.OK if written else exits.FAILED


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Exit 0 when replayed (with --wait: every message applied), 1 when not, 2 on errors."""
    settings = load_settings(dotenv_path=args.env_file)
    chosen = _dlq_selection(args, settings)
    done = dlq_workbench.replay_command(
        settings,
        chosen,
        limit=args.limit,
        edit_file=Path(args.edit_file) if args.edit_file else None,
        everything=args.all,
        dry_run=args.dry_run,
        wait=args.wait,
        audit_file=Path(args.audit_file) if args.audit_file else Path(args.home) / DLQ_AUDIT_FILE,
        note=args.note,
    )
    return exits.OK if done else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    filters = argparse.ArgumentParser(add_help=False)
    f = filters.add_argument_group(
        "filters (all must match; a filter's values, comma-separated or repeated, are alternatives)"
    )
    f.add_argument("--action-id", action="append", default=[], metavar="IDS", help="e.g. 42, 40..50, 42,97")
    f.add_argument(
        "--key",
        "--emp-id",
        dest="key",
        action="append",
        default=[],
        metavar="KEYS",
        help="the changed row's primary key (the message key), e.g. 7, -3, 1..100",
    )
    f.add_argument(
        "--error-class",
        action="append",
        default=[],
        metavar="NAME",
        help="cdc.error.class, e.g. CheckViolation",
    )
    f.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="TABLE",
        help="the replicated table: employees, or schema.table as the cdc.table header names it",
    )
    f.add_argument("--partition", action="append", default=[], metavar="N", help="original partition")
    f.add_argument(
        "--offset", action="append", default=[], metavar="RANGE", help="original offset: 120, 100..200, 100.."
    )
    f.add_argument(
        "--since", metavar="TIME", help="cdc.failed.at at or after: ISO 8601 (UTC unless given) or an age, 2h"
    )
    f.add_argument("--until", metavar="TIME", help="cdc.failed.at before: ISO 8601 or an age")
    f.add_argument(
        "--dlq", action="append", default=[], metavar="P/O", help="DLQ position as `list` shows it, e.g. 0/12"
    )
    f.add_argument(
        "--limit", type=positive_int, metavar="N", help="at most this many (the first in DLQ order)"
    )

    dlq = sub.add_parser("dlq", help="the dead-letter queue: list, show, correct and replay dead letters")
    cmds = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = cmds.add_parser("list", parents=[filters], help="one line per dead letter")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_dlq_list)

    show = cmds.add_parser("show", parents=[filters], help="whole messages: headers, key, value")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.add_argument(
        "--edit-file", metavar="FILE", help="write the selected events to FILE for correcting, then replay it"
    )
    show.add_argument("--force", action="store_true", help="with --edit-file: overwrite FILE")
    show.set_defaults(func=cmd_dlq_show)

    replay = cmds.add_parser(
        "replay", parents=[filters], help="republish to the CDC topic (exit 1 if --wait saw any not applied)"
    )
    replay.add_argument(
        "--edit-file", metavar="FILE", help="replay FILE's entries, with their corrected values"
    )
    replay.add_argument("--all", action="store_true", help="without filters: the whole DLQ")
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be sent (and diffs); send nothing"
    )
    replay.add_argument(
        "--wait",
        type=non_negative,
        metavar="SECONDS",
        help="then wait for the consumer's decisions (processed_events, DEST_DB_URL) and report them",
    )
    replay.add_argument(
        "--audit-file", metavar="FILE", help=f"JSON-lines audit (default: <--home>/{DLQ_AUDIT_FILE})"
    )
    replay.add_argument("--note", help="a free-text reason, kept in the audit file")
    replay.set_defaults(func=cmd_dlq_replay)
