"""Changes of any captured table applied to the destination: typing, the version guard, drift.

A generic change (``cdc.model.change``) carries its row as ``{column: text or null}``: each
value as PostgreSQL's own text output on the source (``cdc_capture`` in setup_db.sql). The
destination types each value from that text with the column's input function, by a cast to the
column's own type without its modifier (``Column.cast_type``): an explicit cast to ``varchar(3)``
or ``bit(4)`` would cut or pad silently, while assignment to the column then applies the modifier
as the source did (an error for a value too long, numeric rounded to the column's scale). Nothing
passes through a JSON number, a Python value or a re-parsed document, so every type the source can
print comes back exactly.

Statements are built from the **destination's** catalog (``Table.load(..., any_type=True)``):
identifiers quoted, values typed by PostgreSQL, never string-built; generated columns never
written, identity columns written with ``OVERRIDING SYSTEM VALUE``. One statement per table and
batch, set-based, in the batch's transaction, the same four steps as employees'
(``cdc.sink.statements``): ``processed_events`` (one row per action_id, the table and key beside
it), the version guard ``cdc_versions`` keyed by the table's name and the row's key
(``cdc.model.change.guard_key``) with tombstones, the writes, the record.

**Drift is held, never guessed** (``drift``): a destination table that is missing, lacks a column
the events carry, has that column generated, has another primary key, or that the consumer may
not write, gets no statement; the caller holds the table's partitions until it is fixed.

**Foreign keys** between replicated tables: where the role may set ``session_replication_role``
(granted in setup_roles_dest.sql), a batch's generic statements run under ``replica``, as
PostgreSQL's logical replication applies, so no order of arrival violates a foreign key.
Otherwise a batch's upserts run parents first and its deletes children first (``order``), and a
violation that remains is transient for ``CDC_FK_WAIT_SECONDS``.
"""

from __future__ import annotations

import graphlib
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from cdc.errors import SchemaMissingError, TransientError, UnencodableValueError
from cdc.model.change import Change, key_text, quoted
from cdc.model.table import Column, Table
from cdc.sink import statements as base

TableName = tuple[str, str]
VERSIONS = "cdc_versions"


def typed(column: Column, text: sql.Composable) -> sql.Composed:
    """``column``'s value from ``text`` (an expression of its source's text output), typed."""
    return sql.SQL("({})::{}").format(text, sql.SQL(column.cast_type))


def _overriding(columns: Iterable[Column]) -> sql.Composable:
    return sql.SQL(" OVERRIDING SYSTEM VALUE") if any(c.identity_always for c in columns) else sql.SQL("")


def insert_rows(table: Table) -> sql.Composed:
    """INSERT of the row images in ``%(rows)s`` (a JSON array of objects) into ``table``."""
    columns = table.written
    return sql.SQL(
        "INSERT INTO {table} ({columns}){overriding} SELECT {values} FROM jsonb_array_elements(%(rows)s::jsonb) AS r"
    ).format(
        table=table.ident,
        columns=sql.SQL(", ").join(c.ident for c in columns),
        overriding=_overriding(columns),
        values=sql.SQL(", ").join(typed(c, sql.SQL("r ->> {}").format(sql.Literal(c.name))) for c in columns),
    )


# The batch: one JSON array [action_id, action, topic, partition, offset, captured_at, key, the
# row's column texts in the statement's column order] per change (see _batch_json), the key the
# row's key as canonical text (members sorted, compact: ``key_text``). Columns by position, as
# employees': read by name from a JSON object they cost the statement a tenth more.
_INPUT = """
WITH b AS (
    SELECT (x->>0)::bigint AS action_id, x->>1 AS action, x->>2 AS topic, (x->>3)::int AS part,
           (x->>4)::bigint AS off, (x->>5)::timestamptz AS captured_at, x->>6 AS _key{inputs}
      FROM jsonb_array_elements(%(batch)s::jsonb) AS x
),"""
# Where the row's first column is in an element of the batch.
_ROW_AT = 7

# Steps 2 and 3, as employees' (cdc.sink.statements._APPLY). The guard's key is the table's
# name ({guarded}, a literal) followed by the key's canonical text: one COLLATE "C" column, each
# comparison a memcmp.
_APPLY = """
d AS (
    SELECT c.*, fresh AND action_id = max(action_id) FILTER (WHERE fresh) OVER (PARTITION BY _key) AS head
      FROM c
),
e AS (
    SELECT d.*, v.last_action_id AS version, head AND coalesce(v.last_action_id < d.action_id, true) AS wins
      FROM d LEFT JOIN LATERAL (
               SELECT v.last_action_id FROM {versions} v
                WHERE d.head AND v.key = {guarded} || d._key OFFSET 0
           ) AS v ON true
),
guard_new AS (
    INSERT INTO {versions} (key, last_action_id, deleted)
    SELECT {guarded} || _key, action_id, action = 'DELETE' FROM e WHERE wins AND version IS NULL ORDER BY _key
),
guard AS (
    INSERT INTO {versions} AS v (key, last_action_id, deleted)
    SELECT {guarded} || _key, action_id, action = 'DELETE' FROM e WHERE wins AND version IS NOT NULL ORDER BY _key
    ON CONFLICT (key) DO UPDATE
       SET last_action_id = EXCLUDED.last_action_id, deleted = EXCLUDED.deleted, updated_at = now()
     WHERE v.last_action_id < EXCLUDED.last_action_id
    RETURNING 1
),
removed AS (
    {remove}
),
written AS (
    INSERT INTO {table} ({columns}){overriding}
    SELECT {values} FROM e
     WHERE wins AND action <> 'DELETE' ORDER BY _key
    ON CONFLICT ({key_columns}) {upsert}
)"""

# processed_events' columns for a change of a generic table, and the update of an id decided
# before: only a dead letter the operator replayed comes back to life.
_RECORDED = """(action_id, table_schema, table_name, row_key, action, outcome, topic, "partition", "offset", captured_at)"""
_REVIVE = """ON CONFLICT (action_id) DO UPDATE
   SET table_schema = EXCLUDED.table_schema, table_name = EXCLUDED.table_name, row_key = EXCLUDED.row_key,
       action = EXCLUDED.action, outcome = EXCLUDED.outcome,
       topic = EXCLUDED.topic, "partition" = EXCLUDED."partition", "offset" = EXCLUDED."offset",
       captured_at = EXCLUDED.captured_at, processed_at = now()
 WHERE p.outcome = 'dlq' AND p.action_id = ANY(%(replayed)s::bigint[])"""

_RECORD_NEW = f""",
recorded_new AS (
    INSERT INTO processed_events
           {_RECORDED}
    SELECT action_id, {{schema}}, {{name}}, _key::jsonb, action, CASE WHEN wins THEN 'applied' ELSE 'stale' END,
           topic, part, off, captured_at
      FROM e WHERE fresh AND NOT seen ORDER BY action_id
),
recorded AS (
    INSERT INTO processed_events AS p
           {_RECORDED}
    SELECT action_id, {{schema}}, {{name}}, _key::jsonb, action, CASE WHEN wins THEN 'applied' ELSE 'stale' END,
           topic, part, off, captured_at
      FROM e WHERE fresh AND seen ORDER BY action_id
    {_REVIVE}
    RETURNING 1
)"""

# Dead letters of generic tables: recorded as ``dlq`` with their table and key where known.
RECORD_DEAD = f"""
INSERT INTO processed_events AS p
       {_RECORDED}
SELECT t.action_id, t.table_schema, t.table_name, t.row_key, t.action, 'dlq', t.topic, t.part, t.off, t.captured_at
  FROM unnest(%(action_id)s::bigint[], %(schema)s::text[], %(name)s::text[], %(key)s::jsonb[], %(action)s::text[],
              %(topic)s::text[], %(part)s::int[], %(off)s::bigint[], %(captured_at)s::timestamptz[])
       AS t(action_id, table_schema, table_name, row_key, action, topic, part, off, captured_at)
{_REVIVE}
RETURNING action_id
"""


@dataclass(frozen=True)
class GenericStatements:
    """The apply statements of one destination table, for changes carrying ``columns``."""

    table: Table
    columns: tuple[Column, ...]  # written: the destination's columns the changes carry
    apply_recorded: str
    apply_unrecorded: str

    @property
    def names(self) -> tuple[str, ...]:
        """The columns' names, in the order the batch carries their texts (``_batch_json``)."""
        return tuple(c.name for c in self.columns)

    @classmethod
    def build(
        cls, cur: psycopg2.extensions.cursor, table: Table, carried: Iterable[str]
    ) -> GenericStatements:
        names = set(carried)
        columns = tuple(c for c in table.written if c.name in names)
        key = [table.column(n) for n in table.primary_key]
        # An ALWAYS identity cannot be set by an UPDATE (ON CONFLICT has no OVERRIDING): it keeps
        # the value its row was inserted with, as on the source, where only SET DEFAULT changes it.
        rest = [c for c in columns if c.name not in table.primary_key and not c.identity_always]
        # The batch carries the row's texts by position (``_batch_json``), as ``_c0``, ``_c1``, ...
        # in the statement: a key's values are typed from them (the key is the row's slice:
        # ``ChangeCodec`` checks).
        texts = {c.name: sql.SQL(f"_c{i}") for i, c in enumerate(columns)}
        upsert: sql.Composable = (
            sql.SQL("DO UPDATE\n       SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(c.ident) for c in rest)
            )
            if rest
            else sql.SQL("DO NOTHING")
        )
        # The deleted keys as index probes: one column through = ANY(ARRAY(...)) (as employees'),
        # several through a join whose other side is the batch (its size unknown to the planner,
        # which then probes the primary key per row rather than scanning the table).
        if len(key) == 1:
            remove = sql.SQL(
                "DELETE FROM {table} WHERE {column} = ANY(ARRAY(SELECT {value} FROM e WHERE wins AND action = 'DELETE'))"
            ).format(table=table.ident, column=key[0].ident, value=typed(key[0], texts[key[0].name]))
        else:
            remove = sql.SQL(
                "DELETE FROM {table} AS t USING (SELECT {values} FROM e WHERE wins AND action = 'DELETE') AS gone ({names})"
                " WHERE {match}"
            ).format(
                table=table.ident,
                values=sql.SQL(", ").join(typed(c, texts[c.name]) for c in key),
                names=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(key))),
                match=sql.SQL(" AND ").join(
                    sql.SQL("t.{} = gone.{}").format(c.ident, sql.Identifier(f"k{i}"))
                    for i, c in enumerate(key)
                ),
            )
        parts = {
            "remove": remove,
            "table": table.ident,
            "versions": sql.Identifier(VERSIONS),
            "inputs": sql.Composed(
                [
                    sql.SQL(", x->>{} AS {}").format(sql.SQL(str(_ROW_AT + i)), t)
                    for i, t in enumerate(texts.values())
                ]
            ),
            "guarded": sql.Literal(quoted(table.schema, table.name)),
            "schema": sql.Literal(table.schema),
            "name": sql.Literal(table.name),
            "key_columns": sql.SQL(", ").join(c.ident for c in key),
            "columns": sql.SQL(", ").join(c.ident for c in columns),
            "overriding": _overriding(columns),
            "values": sql.SQL(", ").join(typed(c, texts[c.name]) for c in columns),
            "upsert": upsert,
        }

        def text(template: str, recorded: str) -> str:
            composed = sql.SQL(template).format(**parts, recorded=sql.SQL(recorded))
            return composed.as_string(cur)

        recorded = _INPUT + base.FRESH_RECORDED + _APPLY + _RECORD_NEW + base.REPORT
        unrecorded = _INPUT + base.FRESH_UNRECORDED + _APPLY + base.REPORT
        return cls(table, columns, text(recorded, base.RECORDED_TOO), text(unrecorded, ""))


_PRIVILEGES = """
SELECT has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
  FROM pg_class c WHERE c.oid = to_regclass(%s)
"""


def drift(table: Table | None, name: TableName, carried: Iterable[str], key: Iterable[str]) -> str | None:
    """What keeps changes of ``name`` carrying ``carried`` columns keyed by ``key`` from the
    destination ``table`` (None: the table is missing), or None if nothing does."""
    qualified = ".".join(name)
    if table is None:
        return f"{qualified} does not exist on the destination"
    theirs, ours = sorted(key), sorted(table.primary_key)
    if theirs != ours:
        return (
            f"{qualified} has primary key ({', '.join(ours)}) on the destination, "
            f"({', '.join(theirs)}) on the source"
        )
    have = {c.name: c for c in table.columns}
    lacking = sorted(n for n in carried if n not in have)
    if lacking:
        return f"{qualified} lacks column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)} on the destination"
    generated = sorted(n for n in carried if have[n].generated)
    if generated:
        return (
            f"{qualified}: column {', '.join(generated)} is generated on the destination, not on the source"
        )
    return None


@dataclass
class Shape:
    """What the changes of one table in a batch look like: the columns and key they carry."""

    carried: frozenset[str]
    key: frozenset[str]


@dataclass
class GenericSink:
    """Statements and drift per destination table, built from its catalog once and cached.

    ``fk_wait``: seconds a foreign-key violation counts as transient (no replica role).
    """

    fk_wait: float = 30.0
    replica: bool = False  # the role may SET session_replication_role
    _statements: dict[tuple[TableName, frozenset[str], frozenset[str]], GenericStatements] = field(
        default_factory=dict
    )
    _drift: dict[tuple[TableName, frozenset[str], frozenset[str]], str] = field(default_factory=dict)
    _parents: dict[TableName, set[TableName]] = field(default_factory=dict)
    _fk_since: float | None = None

    def probe(self, cur: psycopg2.extensions.cursor) -> None:
        """Whether this role may apply under ``session_replication_role = replica``."""
        cur.execute(
            "SELECT rolsuper OR has_parameter_privilege('session_replication_role', 'SET')"
            " FROM pg_roles WHERE rolname = current_user"
        )
        row = cur.fetchone()
        self.replica = bool(row and row[0])

    def forget(self, name: TableName) -> None:
        """Read ``name``'s catalog again at its next use (its drift may be fixed)."""
        for cache in (self._statements, self._drift):
            for k in [k for k in cache if k[0] == name]:
                del cache[k]
        self._parents.pop(name, None)

    def known(self, name: TableName, shape: Shape) -> tuple[bool, str | None]:
        """Whether ``check`` has decided ``name`` for ``shape`` already (no database needed), and
        its drift then."""
        k = (name, shape.carried, shape.key)
        if k in self._statements:
            return True, None
        return (True, self._drift[k]) if k in self._drift else (False, None)

    def check(self, cur: psycopg2.extensions.cursor, name: TableName, shape: Shape) -> str | None:
        """The drift of ``name`` for changes of ``shape`` (None: its statements are ready)."""
        k = (name, shape.carried, shape.key)
        if k in self._statements:
            return None
        if k in self._drift:
            return self._drift[k]
        table = _load(cur, name)
        why = drift(table, name, shape.carried, shape.key)
        if why is None and table is not None:
            cur.execute(_PRIVILEGES, (quoted(*name),))
            row = cur.fetchone()
            if row is not None and not all(row):
                why = (
                    f"{'.'.join(name)}: this role may not SELECT, INSERT, UPDATE and DELETE it on the "
                    "destination (GRANT them to the consumer's role)"
                )
        if why is not None:
            self._drift[k] = why
            return why
        assert table is not None
        self._statements[k] = GenericStatements.build(cur, table, shape.carried)
        self._parents[name] = _parents(cur, name)
        return None

    def statements(self, name: TableName, shape: Shape) -> GenericStatements:
        return self._statements[(name, shape.carried, shape.key)]

    def order(self, names: Iterable[TableName]) -> list[TableName]:
        """``names`` parents first by the destination's foreign keys among them (a cycle: as given)."""
        todo = list(dict.fromkeys(names))
        graph = {n: {p for p in self._parents.get(n, set()) if p in todo and p != n} for n in todo}
        try:
            return list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError:
            return todo

    def apply(
        self, cur: psycopg2.extensions.cursor, items: Sequence[base.Delivered], *, idempotency: bool
    ) -> base.ApplyResult:
        """Apply generic ``items`` (all checked: ``check`` said no drift) in the open transaction."""
        by_table: dict[TableName, list[base.Delivered]] = {}
        for item in items:
            change: Change = item.event  # type: ignore[assignment]
            by_table.setdefault((change.schema, change.table), []).append(item)
        for name, group in by_table.items():
            why = self.check(cur, name, shape_of(group))  # done before the batch, unless called alone
            if why is not None:
                raise TransientError(f"not applied: {why}", "other")
        result = base.ApplyResult()
        if self.replica:
            cur.execute("SET LOCAL session_replication_role = replica")
            for name, group in by_table.items():
                result.add(self._apply_table(cur, name, group, idempotency))
            return result
        order = self.order(by_table)
        try:
            for name in order:
                upserts = [i for i in by_table[name] if i.event.action != "DELETE"]
                result.add(self._apply_table(cur, name, upserts, idempotency))
            for name in reversed(order):
                deletes = [i for i in by_table[name] if i.event.action == "DELETE"]
                result.add(self._apply_table(cur, name, deletes, idempotency))
        except psycopg2.errors.ForeignKeyViolation as exc:
            now = time.monotonic()
            if self._fk_since is None:
                self._fk_since = now
            if now - self._fk_since < self.fk_wait:
                raise TransientError(
                    f"foreign key not satisfied yet ({base.first_line(exc)}): waiting up to "
                    f"{self.fk_wait:.0f}s for the other table's change",
                    "conflict",
                ) from exc
            raise
        self._fk_since = None
        return result

    def _apply_table(
        self, cur: psycopg2.extensions.cursor, name: TableName, items: list[base.Delivered], idempotency: bool
    ) -> base.ApplyResult:
        fresh, copies = base.dedupe(items)
        result = base.ApplyResult(duplicates=copies)
        if not fresh:
            return result
        statements = self.statements(name, shape_of(fresh.values()))
        statement = statements.apply_recorded if idempotency else statements.apply_unrecorded
        base.run_apply(cur, statement, _batch_json(fresh.values(), statements.names), fresh, result)
        return result


def shape_of(items: Iterable[base.Delivered]) -> Shape:
    """The columns and key the changes carry (all of one table). Changes of one table carry the
    same columns until its schema changes on the source (a later issue); the first one's are taken."""
    change: Change = next(iter(items)).event  # type: ignore[assignment]
    return Shape(frozenset(change.row), frozenset(change.key))


def _load(cur: psycopg2.extensions.cursor, name: TableName) -> Table | None:
    try:
        return Table.load(cur, quoted(*name), any_type=True)
    except SchemaMissingError:
        return None


def _parents(cur: psycopg2.extensions.cursor, name: TableName) -> set[TableName]:
    """The tables ``name`` references by foreign keys on the destination."""
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_constraint f"
        " JOIN pg_class c ON c.oid = f.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE f.contype = 'f' AND f.conrelid = to_regclass(%s)",
        (quoted(*name),),
    )
    return {(s, n) for s, n in cur.fetchall()}


def _batch_json(items: Iterable[base.Delivered], names: Sequence[str]) -> Any:
    """The batch parameter of a table's statement, the row's texts in the order of ``names``
    (a column a change lacks is NULL)."""
    rows = []
    values = operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    for event, record, _ in items:
        change: Change = event  # type: ignore[assignment]
        action_id, action, row, _, at, _, _, key = change
        try:
            texts = values(row)
        except KeyError:
            texts = tuple(map(row.get, names))
        rows.append(
            (
                action_id,
                action,
                record.topic,
                record.partition,
                record.offset,
                base.timestamp(at),
                key_text(key),
                *texts,
            )
        )
    try:
        text = orjson.dumps(rows)
    except orjson.JSONEncodeError as exc:
        raise UnencodableValueError(f"{type(exc).__name__}: {exc}") from exc
    return base.Json(text)


@dataclass(frozen=True, slots=True)
class DeadRecord:
    """What ``processed_events`` keeps about a dead-lettered generic message."""

    action_id: int
    schema: str | None
    name: str | None
    key: Any
    action: str | None
    topic: str
    partition: int
    offset: int
    replayed: bool = False


def record_dead(cur: psycopg2.extensions.cursor, records: Sequence[DeadRecord]) -> set[int]:
    """Record dead-lettered generic ids as ``dlq``. Returns the ids not recorded before (or replayed)."""
    if not records:
        return set()
    cur.execute(
        RECORD_DEAD,
        {
            "action_id": [r.action_id for r in records],
            "schema": [r.schema for r in records],
            "name": [r.name for r in records],
            "key": [None if r.key is None else orjson.dumps(r.key).decode() for r in records],
            "action": [r.action for r in records],
            "topic": [r.topic for r in records],
            "part": [r.partition for r in records],
            "off": [r.offset for r in records],
            "captured_at": [None for _ in records],
            "replayed": [r.action_id for r in records if r.replayed],
        },
    )
    return {row[0] for row in cur.fetchall()}
