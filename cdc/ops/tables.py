"""``python -m cdc tables add|list|remove``: choose the tables whose changes are captured.

``add`` installs the generic capture (``cdc_capture`` and ``cdc_capture_truncate`` from
setup_db.sql) on a table and records it in ``cdc_tables`` with its topic; ``--snapshot`` also
queues every current row as a SNAPSHOT change. ``remove`` takes the triggers off and the record
out; changes captured before stay in the outbox. ``list`` shows what is captured.

Each table is done in one transaction on the source, run as the table's owner (creating a trigger
needs it). The table is locked against writes (SHARE ROW EXCLUSIVE, what CREATE TRIGGER takes
anyway) before anything is read, so a snapshot and the trigger meet exactly: a row committed before
the lock is in the snapshot, a change after it is captured by the trigger.

Refused with one line each: a name that is not a table, a table without a primary key, a
partition (add its root: a partitioned table is captured under the root's name), ``employees``
(the default table, captured by its own trigger), the pipeline's own tables, and a table whose
topic would clash in Kafka with another captured table's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from cdc.errors import ConfigError, SchemaMissingError
from cdc.model.table import OUTBOX, SOURCE_TABLE, Table
from cdc.model.topics import collision_key, topic_for
from cdc.runtime.db import Database, one_row
from cdc.runtime.settings import Settings

REGISTRY = "cdc_tables"
GENERIC_OUTBOX = "cdc_outbox"
ROW_TRIGGER = "cdc_capture"
TRUNCATE_TRIGGER = "cdc_capture_truncate"
# Tables of the pipeline itself on the source: never captured.
OWN_TABLES = {OUTBOX, GENERIC_OUTBOX, REGISTRY, "cdc_producer_state"}
APPLICATION_NAME = "cdc-tables"


@dataclass(frozen=True)
class Target:
    """A table named on the command line, as the catalog has it."""

    oid: int
    schema: str
    name: str
    qualified: str  # schema.name as SQL writes it, quoted where needed
    kind: str  # pg_class.relkind
    partition_of: str | None  # the root, if this is a partition


@dataclass(frozen=True)
class Added:
    table: str  # schema.name, quoted where needed
    topic: str
    primary_key: tuple[str, ...]
    snapshot_rows: int | None  # None: no --snapshot
    again: bool  # it was captured already: the triggers were installed afresh


@dataclass(frozen=True)
class Captured:
    table: str
    topic: str
    primary_key: tuple[str, ...]
    rows: int | None  # None: the table is gone
    added_at: Any
    added_by: str
    installed: bool  # its row trigger is in place


def _open(settings: Settings) -> Database:
    if not settings.source_db_url:
        raise ConfigError("SOURCE_DB_URL is not set: tables are captured on the source")
    return Database(
        settings.source_db_url,
        minconn=1,
        maxconn=1,
        statement_timeout_ms=settings.statement_timeout_ms,
        application_name=APPLICATION_NAME,
    )


_RESOLVE = """
SELECT c.oid, n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname), c.relkind,
       CASE WHEN c.relispartition THEN pg_partition_root(c.oid)::regclass::text END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%s)
"""


def resolve(cur: psycopg2.extensions.cursor, name: str) -> Target:
    """The table ``name`` (written as in SQL: ``'public."Order Items"'``), or ConfigError."""
    try:
        cur.execute(_RESOLVE, (name,))
    except psycopg2.errors.InvalidName as exc:  # e.g. an unterminated quote
        why = (exc.pgerror or str(exc)).strip().splitlines()[0].removeprefix("ERROR:").strip()
        raise ConfigError(f"{name!r} is not a table name: {why}") from exc
    row = cur.fetchone()
    if row is None:
        raise SchemaMissingError(f"table {name} does not exist on the source")
    target = Target(*row)
    if target.kind not in ("r", "p"):
        raise ConfigError(
            f"{target.qualified} is not a table (relkind {target.kind!r}): only tables are captured"
        )
    if target.partition_of is not None:
        raise ConfigError(
            f"{target.qualified} is a partition of {target.partition_of}: add {target.partition_of}, "
            "whose changes are captured under its name"
        )
    if target.schema == "public" and target.name == SOURCE_TABLE:
        raise ConfigError(f"{SOURCE_TABLE} is the default table: it is captured by its own trigger already")
    if target.name in OWN_TABLES:
        raise ConfigError(f"{target.qualified} is one of the pipeline's own tables")
    return target


def _array(values: Iterable[str]) -> str:
    """A text[] literal of ``values`` (for a trigger argument)."""
    items = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
    return "{" + ",".join(items) + "}"


def _check_topic(cur: psycopg2.extensions.cursor, target: Target, topic: str) -> None:
    """ConfigError if another captured table's topic clashes with ``topic`` in Kafka."""
    cur.execute(
        f"SELECT format('%%I.%%I', table_schema, table_name), topic FROM {REGISTRY}"
        " WHERE (table_schema, table_name) <> (%s, %s)",
        (target.schema, target.name),
    )
    for name, other in cur.fetchall():
        if collision_key(other) == collision_key(topic):
            raise ConfigError(
                f"{target.qualified}'s topic {topic} clashes with {other}, the topic of {name}"
                " (Kafka reads '.' and '_' alike): rename one of the tables"
            )


def _partitions(cur: psycopg2.extensions.cursor, target: Target) -> list[tuple[str, str]]:
    """Every table in ``target``'s partition tree, itself included (a plain table: itself)."""
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_partition_tree(%s) t"
        " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') ORDER BY t.level, c.relname",
        (target.oid,),
    )
    return [(s, n) for s, n in cur.fetchall()] or [(target.schema, target.name)]


def add(settings: Settings, names: Sequence[str], *, snapshot: bool = False) -> list[Added]:
    """Capture each table of ``names``, each in its own transaction; stops at the first refusal
    (the tables before it are captured)."""
    done = []
    with _open(settings) as db:
        for name in names:
            with db.connection() as conn, conn.cursor() as cur:
                done.append(_add(cur, settings, name, snapshot=snapshot))
    return done


def _add(cur: psycopg2.extensions.cursor, settings: Settings, name: str, *, snapshot: bool) -> Added:
    _require_schema(cur)
    target = resolve(cur, name)
    ident = sql.Identifier(target.schema, target.name)
    cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(ident))
    table = Table.load(cur, target.qualified, any_type=True)  # ConfigError without a primary key
    topic = topic_for(settings.cdc_topic_prefix, target.schema, target.name)
    _check_topic(cur, target, topic)
    generated = [c.name for c in table.columns if c.generated]
    args = [_array(table.primary_key), _array(generated)]
    literals = sql.SQL(", ").join(sql.Literal(a) for a in args)
    cur.execute(
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {}"
            " FOR EACH ROW EXECUTE FUNCTION cdc_capture({})"
        ).format(sql.Identifier(ROW_TRIGGER), ident, literals)
    )
    # Statement triggers are not inherited: each table of the tree gets the TRUNCATE one.
    for schema, part in _partitions(cur, target):
        cur.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {} BEFORE TRUNCATE ON {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION cdc_capture_truncate({})"
            ).format(sql.Identifier(TRUNCATE_TRIGGER), sql.Identifier(schema, part), literals)
        )
    cur.execute(
        f"INSERT INTO {REGISTRY} (table_schema, table_name, topic, primary_key) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (table_schema, table_name) DO UPDATE"
        " SET topic = EXCLUDED.topic, primary_key = EXCLUDED.primary_key"
        " RETURNING xmax <> 0",
        (target.schema, target.name, topic, list(table.primary_key)),
    )
    (again,) = one_row(cur)
    rows = None
    if snapshot:
        cur.execute(
            "SELECT cdc_copy_rows('SNAPSHOT', %s::oid::regclass, false, %s, %s, %s, %s)",
            [target.oid, target.schema, target.name, *args],
        )
        (rows,) = one_row(cur)
    return Added(target.qualified, topic, table.primary_key, rows, bool(again))


def remove(settings: Settings, names: Sequence[str]) -> list[str]:
    """Stop capturing each table of ``names``: its triggers dropped, its record deleted. What was
    captured before stays in the outbox (and is published). Returns the tables' names."""
    done = []
    with _open(settings) as db:
        for name in names:
            with db.connection() as conn, conn.cursor() as cur:
                _require_schema(cur)
                target = resolve(cur, name)
                cur.execute(
                    f"DELETE FROM {REGISTRY} WHERE table_schema = %s AND table_name = %s",
                    (target.schema, target.name),
                )
                if cur.rowcount == 0:
                    raise ConfigError(f"{target.qualified} is not captured (`python -m cdc tables list`)")
                cur.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(ROW_TRIGGER), sql.Identifier(target.schema, target.name)
                    )
                )
                for schema, part in _partitions(cur, target):
                    cur.execute(
                        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                            sql.Identifier(TRUNCATE_TRIGGER), sql.Identifier(schema, part)
                        )
                    )
                done.append(target.qualified)
    return done


def captured(settings: Settings) -> list[Captured]:
    """Every table in the registry, with its row count (a count(*) each) and whether its
    trigger is still in place."""
    out = []
    with _open(settings) as db, db.connection() as conn, conn.cursor() as cur:
        _require_schema(cur)
        cur.execute(
            "SELECT r.table_schema, r.table_name, format('%%I.%%I', r.table_schema, r.table_name), r.topic,"
            " r.primary_key, r.added_at, r.added_by,"
            " c.oid, EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s)"
            f" FROM {REGISTRY} r"
            " LEFT JOIN pg_namespace n ON n.nspname = r.table_schema"
            " LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.table_name"
            " ORDER BY r.table_schema, r.table_name",
            (ROW_TRIGGER,),
        )
        for schema, name, qualified, topic, key, added_at, added_by, oid, installed in cur.fetchall():
            rows = None
            if oid is not None:
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
                (rows,) = one_row(cur)
            out.append(Captured(qualified, topic, tuple(key), rows, added_at, added_by, bool(installed)))
    return out


def _require_schema(cur: psycopg2.extensions.cursor) -> None:
    cur.execute("SELECT to_regclass(%s), to_regclass(%s)", (REGISTRY, GENERIC_OUTBOX))
    if None in one_row(cur):
        raise SchemaMissingError(
            f"the source lacks {REGISTRY} and {GENERIC_OUTBOX}: apply setup_db.sql (psql -f setup_db.sql)"
        )
