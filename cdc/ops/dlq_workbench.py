"""The DLQ workbench behind ``python -m cdc dlq list|show|replay``: correct dead letters, replay
them, and learn what the consumer made of the replay. Finding and reading them is
``cdc.dlq.letters``; planning, sending and auditing a replay is ``cdc.dlq.replay``.

1. ``list`` and ``show`` print a selection; ``show --edit-file`` writes it as an edit file: a JSON
   list of ``{"dlq": "<topic>/<partition>/<offset>", "value": {...}}`` entries (plus, for the
   reader only, the original position, the error, the key) whose values the operator corrects.
2. ``replay`` plans every selected letter: its original bytes, or the operator's corrected value,
   checked as a change event. ``--dry-run`` prints the plan (a field-by-field diff for edited
   ones, and what the destination would make of it as it stands now) and produces nothing.
   Otherwise the plan is sent and audited (``cdc.dlq.replay``).
3. Replay only republishes; the consumer decides. ``--wait`` reads the decision back:
   ``processed_events`` row of the action_id at the replayed copy's topic/partition/offset says
   applied, stale or dlq; a destination position (``applied_offsets``) past the copy without
   such a row means the consumer took it for a duplicate of an earlier decision.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2.extensions

from cdc.dlq import queue as dlq
from cdc.dlq.letters import Letter, Selection, list_lines, parse_position, read_letters, show_lines
from cdc.dlq.replay import AuditLog, Planned, Sent, dash, plan, send
from cdc.errors import CDCError, ConfigError
from cdc.model.event import Codec
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime.db import Database
from cdc.runtime.settings import Settings
from cdc.sink import positions, records

log = logging.getLogger(__name__)

WAIT_INTERVAL = 0.5  # seconds between two looks at processed_events while waiting

Printer = Callable[[str], None]


# -- 1. the edit file --------------------------------------------------------------------------


def write_edit_file(path: Path, letters: Sequence[Letter], *, force: bool) -> None:
    """The selection as an edit file: a JSON list, one entry per letter, ``value`` to correct."""
    _refuse_overwrite(path, force=force)
    entries = []
    for m in letters:
        entry: dict[str, Any] = {
            "dlq": m.position,
            "original": m.original,
            "error": f"{m.error_class}: {m.error}" if m.error_class else m.error,
            "key": dlq.text_of(m.key),
            "value": m.data if m.value_format == "json" else None,
        }
        if m.value_format != "json":
            entry["original_value"] = dlq.text_of(m.value)
        entries.append(entry)
    try:
        path.write_text(json.dumps(entries, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the edit file {path}: {exc.strerror}") from None


def _refuse_overwrite(path: Path, *, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: remove it or pass --force (it may hold your corrections)")


def read_edit_file(path: Path, dlq_topic: str) -> dict[tuple[int, int], Any]:
    """The corrected values by DLQ position. Only ``dlq`` and ``value`` are read from an entry."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the edit file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"edit file {path} is not UTF-8 text") from None
    except ValueError as exc:
        raise ConfigError(f"edit file {path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"edit file {path} must be a non-empty JSON list of {{dlq, value}} entries")
    edits: dict[tuple[int, int], Any] = {}
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("dlq"), str) or "value" not in entry:
            raise ConfigError(f'edit file {path}: entry {n} needs "dlq" (text) and "value"')
        where = parse_position(entry["dlq"], dlq_topic, what=f"edit file {path}: entry {n}:")
        if where in edits:
            raise ConfigError(f"edit file {path}: entry {n} repeats {entry['dlq']}")
        edits[where] = entry["value"]
    return edits


# -- 2. the forecast ----------------------------------------------------------------------------


def expectations(settings: Settings, plans: Sequence[Planned]) -> dict[str, str]:
    """What the destination, as it stands now, would make of each message (by DLQ position).

    A forecast: the consumer decides when the message arrives.
    """
    if not settings.dest_db_url:
        return {p.letter.position: "unknown (DEST_DB_URL is not set)" for p in plans}
    try:
        with _dest(settings) as db, db.connection() as conn, conn.cursor() as cur:
            decided, versions = _read_decisions(cur, Table.load(cur, SOURCE_TABLE), plans)
    except CDCError as exc:
        return {p.letter.position: f"unknown (destination: {exc})" for p in plans}
    out = {}
    for p in plans:
        before = decided[p.action_id][0] if p.action_id in decided else None
        version = versions.get(p.version_key)
        expected = (
            records.expect(p.action_id, before, version) if p.action_id is not None else records.APPLIED
        )
        if p.invalid:
            what = f"dead-lettered again ({p.invalid})"
        elif expected == "duplicate":
            what = f"duplicate: action_id {p.action_id} was already decided ({before}); nothing changes"
        elif expected == records.STALE:
            what = f"stale: {p.key_name} {p.row_key} is already at action_id {version}; nothing changes"
        else:
            what = "applied, unless the destination rejects the row"
        out[p.letter.position] = what
    return out


def _read_decisions(
    cur: psycopg2.extensions.cursor, table: Table, plans: Iterable[Planned]
) -> tuple[dict[int, tuple[str, str, int, int]], dict[Any, int]]:
    """The sink's decisions on the plans' action_ids, and its versions of their rows (by
    ``Planned.version_key``: employees' key, or another table's key in ``cdc_versions``)."""
    plans = list(plans)
    ids = [p.action_id for p in plans if p.action_id is not None]
    keys = [p.row_key for p in plans if not p.of_table and p.row_key is not None]
    guards = [p.guard for p in plans if p.of_table and p.guard is not None]
    return records.decisions(cur, ids), {
        **records.versions(cur, table, keys),
        **records.generic_versions(cur, guards),
    }


def table_codec(settings: Settings) -> Codec:
    """The table's events as the destination's catalog describes them (the source's, if no
    destination is set): what a replayed message is checked against."""
    url = settings.dest_db_url or settings.source_db_url
    if not url:
        raise ConfigError("replay checks messages against the table: set DEST_DB_URL (or SOURCE_DB_URL)")
    with (
        Database(url, minconn=1, maxconn=1, application_name="cdc-dlq-workbench") as db,
        db.connection() as conn,
        conn.cursor() as cur,
    ):
        return Codec(Table.load(cur, SOURCE_TABLE))


def _dest(settings: Settings) -> Database:
    return Database(
        settings.dest_db_url,
        minconn=1,
        maxconn=1,
        statement_timeout_ms=settings.statement_timeout_ms,
        application_name="cdc-dlq-workbench",
    )


def plan_lines(p: Planned, expected: str | None) -> list[str]:
    lines = [
        f"{p.letter.position} -> {p.topic}  action_id={dash(p.action_id)} {p.key_name}={dash(p.row_key)}"
        + ("  edited" if p.edited else "  as it was")
    ]
    lines += [f"    {c.line()}" for c in p.changes]
    if expected:
        lines.append(f"    expected: {expected}")
    return lines


# -- 3. what the consumer made of it ----------------------------------------------------------

APPLIED = "applied"


@dataclass(frozen=True)
class Decision:
    outcome: str  # applied, stale, dlq, duplicate, unrecorded, undecided, unknown
    detail: str


def wait_for_decisions(settings: Settings, sent: Sequence[Sent], timeout: float) -> dict[str, Decision]:
    """Each replayed message's decision (by DLQ position), as the consumer recorded it.

    Reads the destination's ``applied_offsets`` before ``processed_events``: the consumer writes
    both in one transaction, so a position past a copy means its decision (if any) is visible to
    the later read. The group's committed offset is not asked: it is not the record.
    """
    pending = {s.planned.letter.position: s for s in sent}
    decided: dict[str, Decision] = {}
    deadline = time.monotonic() + timeout
    try:
        with _dest(settings) as db:
            with db.connection() as conn, conn.cursor() as cur:
                table = Table.load(cur, SOURCE_TABLE)
            while True:
                with db.connection() as conn, conn.cursor() as cur:
                    applied = _applied(cur, pending.values())
                    rows, versions = _read_decisions(cur, table, (s.planned for s in pending.values()))
                for where, s in list(pending.items()):
                    decision = decide(s, rows, versions, applied)
                    if decision is not None:
                        decided[where] = decision
                        del pending[where]
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(WAIT_INTERVAL)
    except CDCError as exc:
        for where in pending:
            decided[where] = Decision("unknown", f"could not check: {exc}")
        return decided
    for where in pending:
        decided[where] = Decision(
            "undecided",
            f"not decided within {timeout:.0f}s (is consumer_final.py running, group "
            f"{settings.consumer_group_id}?); processed_events has the outcome once it is",
        )
    return decided


def _applied(cur: psycopg2.extensions.cursor, sent: Iterable[Sent]) -> dict[tuple[str, int], int]:
    """The destination's next offset per (topic, partition) the copies went to."""
    wanted = {(s.topic, s.partition) for s in sent}
    if not wanted:
        return {}
    stored = positions.read(cur, {t for t, _ in wanted})
    return {tp: stored[tp].next_offset for tp in wanted if tp in stored}


def decide(
    s: Sent,
    rows: dict[int, tuple[str, str, int, int]],
    versions: dict[Any, int],
    applied: dict[tuple[str, int], int],
) -> Decision | None:
    """The decision on ``s``, or None while the consumer has not reached it.

    ``rows``: processed_events by action_id (outcome, topic, partition, offset); ``versions``:
    the version table; ``applied``: the destination's next offset per (topic, partition).
    """
    p = s.planned
    row = rows.get(p.action_id) if p.action_id is not None else None
    if row is not None and tuple(row[1:]) == (s.topic, s.partition, s.offset):
        outcome = row[0]
        if outcome == records.STALE:
            return Decision(
                records.STALE,
                f"{p.key_name} {p.row_key} is at action_id {versions.get(p.version_key)}, newer: nothing changed",
            )
        if outcome == records.DLQ:
            return Decision(
                records.DLQ, f"dead-lettered again: `python -m cdc dlq list --action-id {p.action_id}`"
            )
        return Decision(outcome, f"applied to {p.letter.table or 'employees'}")
    if applied.get((s.topic, s.partition), -1) <= s.offset:
        return None
    if row is not None:
        return Decision(
            "duplicate", f"action_id {p.action_id} was decided before this replay ({row[0]}): nothing changed"
        )
    if p.invalid:
        return Decision("dlq", f"dead-lettered again: {p.invalid}")
    return Decision("unrecorded", "the consumer passed it without recording a decision (--no-idempotency?)")


# -- 4. the three commands -------------------------------------------------------------------------


def list_command(
    settings: Settings, chosen: Selection, *, limit: int | None, as_json: bool, out: Printer = print
) -> None:
    letters = read_letters(settings, chosen.matches, limit=limit)
    if as_json:
        for m in letters:
            out(json.dumps(m.summary(), ensure_ascii=False))
    else:
        for line in list_lines(letters):
            out(line)
    log.info("%d dead letter(s) selected on %s", len(letters), settings.cdc_dlq_topic)


def show_command(
    settings: Settings,
    chosen: Selection,
    *,
    limit: int | None,
    as_json: bool,
    edit_file: Path | None = None,
    force: bool = False,
    out: Printer = print,
) -> bool:
    """Print the selection, or write it to ``edit_file``; False if that would be empty."""
    if edit_file is not None:
        _refuse_overwrite(edit_file, force=force)  # before the DLQ is read
    letters = read_letters(settings, chosen.matches, limit=limit)
    if edit_file is not None:
        if not letters:
            out("no dead letter matches: no edit file written")
            return False
        write_edit_file(edit_file, letters, force=force)
        out(
            f"wrote {len(letters)} entr{'y' if len(letters) == 1 else 'ies'} to {edit_file}: correct the "
            f'"value"s, then `python -m cdc dlq replay --edit-file {edit_file} --dry-run`'
        )
        return True
    for m in letters:
        if as_json:
            out(json.dumps(m.full(), ensure_ascii=False))
        else:
            for line in show_lines(m):
                out(line)
    log.info("%d dead letter(s) selected on %s", len(letters), settings.cdc_dlq_topic)
    return True


def replay_command(
    settings: Settings,
    chosen: Selection,
    *,
    limit: int | None,
    edit_file: Path | None,
    everything: bool,
    dry_run: bool,
    wait: float | None,
    audit_file: Path,
    note: str | None = None,
    out: Printer = print,
) -> bool:
    """Replay the selection (or print it, ``dry_run``). True when something was sent (or would be)
    and, with ``wait``, every message was applied."""
    edits = read_edit_file(edit_file, settings.cdc_dlq_topic) if edit_file is not None else {}
    if not edits and chosen.is_everything() and not everything:
        raise ConfigError("replay needs a selection: filters, --edit-file, or --all for the whole DLQ")
    if wait is not None and not settings.dest_db_url:
        raise ConfigError("--wait reads the decisions from processed_events: set DEST_DB_URL")
    if edits:
        letters = read_letters(settings, lambda m: (m.partition, m.offset) in edits)
        missing = sorted(edits.keys() - {(m.partition, m.offset) for m in letters})
        if missing:
            partition, offset = missing[0]
            raise ConfigError(
                f"edit file {edit_file}: {settings.cdc_dlq_topic}/{partition}/{offset} is not on the DLQ"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        letters = [m for m in letters if chosen.matches(m)][:limit]
    else:
        letters = read_letters(settings, chosen.matches, limit=limit)
    plans = plan(settings, letters, edits, table_codec(settings))
    if not plans:
        out("nothing to replay: no dead letter matches")
        return False
    expected = expectations(settings, plans)
    if dry_run:
        for p in plans:
            for line in plan_lines(p, expected[p.letter.position]):
                out(line)
        out(f"dry run: {len(plans)} message(s) would be replayed; nothing was sent")
        return True

    audit = AuditLog(audit_file, note=note)
    try:
        sent = send(settings, plans, audit)
    finally:
        audit.close()
    for s in sent:
        p = s.planned
        out(
            f"replayed {p.letter.position} -> {s.position}  action_id={dash(p.action_id)} "
            f"{p.key_name}={dash(p.row_key)}"
            + (f"  edited: {', '.join(c.name for c in p.changes)}" if p.edited else "")
        )
        out(f"    expected: {expected[p.letter.position]}")
    out(f"replayed {len(sent)} message(s); audit: {audit_file}")
    if wait is None:
        out("the consumer decides; `expected` is a forecast. Add --wait SECONDS to see its decisions")
        return True
    decisions = wait_for_decisions(settings, sent, wait)
    for s in sent:
        d = decisions[s.planned.letter.position]
        out(f"{s.planned.letter.position} action_id={dash(s.planned.action_id)}: {d.outcome}: {d.detail}")
    applied = sum(d.outcome == APPLIED for d in decisions.values())
    out(f"decided: {applied} of {len(sent)} applied")
    return applied == len(sent)
