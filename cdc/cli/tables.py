"""``python -m cdc tables``: add, list and remove the tables whose changes are captured."""

from __future__ import annotations

import argparse
import json

from cdc.ops import tables
from cdc.runtime import exits
from cdc.runtime.settings import load_settings


def cmd_add(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    for added in tables.add(settings, args.table, snapshot=args.snapshot):
        what = "captured again (triggers installed afresh)" if added.again else "captured"
        print(f"{added.table}: {what}; topic {added.topic}; primary key ({', '.join(added.primary_key)})")
        if added.snapshot_rows is not None:
            print(f"{added.table}: {added.snapshot_rows} current rows queued as SNAPSHOT changes")
    return exits.OK


def cmd_remove(args: argparse.Namespace) -> int:
    settings = load_settings(dotenv_path=args.env_file)
    for name in tables.remove(settings, args.table):
        print(f"{name}: no longer captured (changes captured before stay in the outbox)")
    return exits.OK


def cmd_list(args: argparse.Namespace) -> int:
    """Exit 1 when a recorded table lost its table or its trigger (it is not being captured)."""
    settings = load_settings(dotenv_path=args.env_file)
    found = tables.captured(settings)
    if args.json:
        for c in found:
            print(
                json.dumps(
                    {
                        "table": c.table,
                        "topic": c.topic,
                        "primary_key": list(c.primary_key),
                        "rows": c.rows,
                        "capturing": c.installed,
                        "added_at": c.added_at.isoformat(),
                        "added_by": c.added_by,
                    }
                )
            )
    else:
        print(f"{'TABLE':<40} {'ROWS':>12}  {'PRIMARY KEY':<24} {'STATE':<10} TOPIC")
        for c in found:
            rows = "-" if c.rows is None else c.rows
            state = "capturing" if c.installed else ("gone" if c.rows is None else "no trigger")
            print(f"{c.table:<40} {rows:>12}  {', '.join(c.primary_key):<24} {state:<10} {c.topic}")
        if not found:
            print("(no table besides employees; add one with `python -m cdc tables add SCHEMA.TABLE`)")
    return exits.OK if all(c.installed for c in found) else exits.FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "tables", help="the tables captured besides employees: add, list, remove (run as the tables' owner)"
    )
    group = cmd.add_subparsers(dest="tables_command", required=True)
    name_help = "a table as written in SQL, schema-qualified where needed: 'public.\"Order Items\"'"

    add = group.add_parser("add", help="capture these tables' changes (a table needs a primary key)")
    add.add_argument("table", nargs="+", help=name_help)
    add.add_argument(
        "--snapshot", action="store_true", help="also queue every current row as a SNAPSHOT change"
    )
    add.set_defaults(func=cmd_add)

    listing = group.add_parser("list", help="the captured tables, their topics and row counts")
    listing.add_argument("--json", action="store_true", help="one JSON object per table")
    listing.set_defaults(func=cmd_list)

    remove = group.add_parser("remove", help="stop capturing these tables")
    remove.add_argument("table", nargs="+", help=name_help)
    remove.set_defaults(func=cmd_remove)
