"""``python -m cdc offsets``: show the destination's applied offsets, accept a gap, rewind."""

from __future__ import annotations

import argparse
import json

from cdc.ops import offsets
from cdc.runtime import exits
from cdc.runtime.settings import Settings, load_settings


def _topics(args: argparse.Namespace, settings: Settings, *, both: bool) -> list[str]:
    if args.topic:
        return list(dict.fromkeys(args.topic))
    return offsets.default_topics(settings) if both else [settings.cdc_topic]


def cmd_show(args: argparse.Namespace) -> int:
    """Exit 0 when no partition is held by a gap, 1 when one is."""
    settings = load_settings(dotenv_path=args.env_file)
    states = offsets.inspect(settings, _topics(args, settings, both=True), args.partition)
    if args.json:
        for s in states:
            print(json.dumps(s.as_dict()))
    else:
        print(
            f"{'PARTITION':<40} {'LOG START':>10} {'LOG END':>10} {'DEST':>10} {'GROUP':>10} {'START':>10}  STATE"
        )
        for s in states:
            dest = s.stored.next_offset if s.stored else "-"
            group = s.group if s.group is not None else "-"
            start = s.start.offset if s.start.offset is not None else "held"
            print(f"{s.where:<40} {s.low:>10} {s.high:>10} {dest:>10} {group:>10} {start:>10}  {s.state}")
        for s in states:
            if s.start.gap is not None:
                print(s.start.gap.line())
                print(s.advice())
    return exits.FAILED if any(s.start.gap for s in states) else exits.OK


def cmd_accept_gap(args: argparse.Namespace) -> int:
    """Exit 0 when every gap found was accepted (or there was none), 1 when one moved meanwhile."""
    settings = load_settings(dotenv_path=args.env_file)
    done = offsets.accept_gaps(settings, _topics(args, settings, both=False), args.partition)
    if not done:
        print("no gap: every partition's log starts at or below the destination's position")
    for gap, ok in done:
        if ok:
            print(
                f"accepted: {gap.where} offsets {gap.first_lost}..{gap.next_kept - 1} ({gap.missing} messages)"
            )
        else:
            print(f"not accepted: {gap.where}: the destination's position moved meanwhile; run it again")
    return exits.OK if all(ok for _, ok in done) else exits.FAILED


def cmd_rewind(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    moved = offsets.rewind(settings, _topics(args, settings, both=False), args.partition, to=args.to_offset)
    for topic, partition, was, now in moved:
        print(f"{topic}[{partition}]: {'-' if was is None else was} -> {now}")
    return exits.OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "offsets",
        help="the destination's applied offsets per partition: show, accept a gap, rewind",
    )
    group = cmd.add_subparsers(dest="offsets_command", required=True)

    def common(p: argparse.ArgumentParser, topic_help: str) -> None:
        p.add_argument("--topic", action="append", default=[], metavar="NAME", help=topic_help)
        p.add_argument(
            "--partition", action="append", type=int, default=[], metavar="N", help="only this partition"
        )

    show = group.add_parser(
        "show", help="positions, group offsets and log ranges (exit 1: a gap holds a partition)"
    )
    common(show, "topic to show (default: CDC_TOPIC, CDC_DLQ_TOPIC and every table's topic)")
    show.add_argument("--json", action="store_true", help="one JSON object per partition")
    show.set_defaults(func=cmd_show)

    accept = group.add_parser(
        "accept-gap",
        help="move held partitions past their gap (the lost offsets are recorded in accepted_gaps)",
    )
    common(accept, "topic (default: CDC_TOPIC; a table's topic, or the DLQ topic for --replay-dlq's cursor)")
    accept.set_defaults(func=cmd_accept_gap)

    rewind = group.add_parser(
        "rewind", help="set positions back to apply the topic again (stop the consumers first)"
    )
    common(rewind, "topic (default: CDC_TOPIC)")
    rewind.add_argument(
        "--to-offset", type=int, metavar="N", help="this offset (default: the log start; kept within the log)"
    )
    rewind.set_defaults(func=cmd_rewind)
