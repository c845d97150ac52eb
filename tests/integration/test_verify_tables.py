"""``verify`` of the tables added with ``cdc tables add``, beside employees: rows compared per table
on the columns both sides have, keys matched by their text byte by byte, whatever collation and
session defaults either database has; ``--table``; ``--events`` over both outboxes.

Each test has a source and a destination database of its own (no other test's tables in
``cdc_tables``) and rows copied to the destination by hand, with the same statements."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from psycopg2 import sql

from cdc.local.paths import SETUP_DEST_SQL
from cdc.local.runner import settings_env
from cdc.ops import tables
from cdc.ops.verify import check_events, verify
from cdc.runtime.settings import Settings
from tests.support import connect, execute, fresh_settings, query, run_cdc, source_database

ITEMS = '"shop.eu"."Order Items"'

SCHEMA = """
CREATE TABLE k (
    a bigint, at timestamptz, s text, v text, n numeric, f float8, iv interval, b bytea,
    gen int GENERATED ALWAYS AS (length(s)) STORED,
    PRIMARY KEY (a, at, s)
);
CREATE SCHEMA "shop.eu";
CREATE TABLE "shop.eu"."Order Items" (sku text PRIMARY KEY, "select" text, qty numeric(10, 2), d date, ts timestamp);
"""
# The destination's: k.gen written by no one (generated on the source only), and a column of its own.
DEST_SCHEMA = SCHEMA.replace("gen int GENERATED ALWAYS AS (length(s)) STORED", "gen int").replace(
    "ts timestamp);", "ts timestamp, loaded_at timestamptz DEFAULT clock_timestamp());"
)

ROWS = r"""
INSERT INTO k (a, at, s, v, n, f, iv, b) VALUES
    (-1, '2024-01-01 00:00:00.5+00', 'a b', 'x', 1.50, 0.1, '1 day 02:00', '\x00ff'),
    (1, '2024-01-01 05:45:00+05:45', 'B', NULL, 10, 1e300, '-1 mon', ''),
    (1, '2024-01-01 00:00:00+00', 'a', '', 0, 'NaN', '0', NULL),
    (9223372036854775807, 'infinity', '', 'é', -0.000001, '-0', '1 year', '\x5c'),
    (10, '1999-12-31 23:59:59.999999+00', 'é', 'z', 3, 2.5, '3 hours', '\x61'),
    (9, '1999-12-31 23:59:59+00', 'Z', 'q', 4, 3, '4 hours', '\x62');
INSERT INTO "shop.eu"."Order Items" (sku, "select", qty, d, ts)
SELECT 'sku ' || i, 'sel' || i, i / 4.0, '2020-01-01'::date + i, '2020-01-01 10:00'::timestamp + i * interval '1 minute'
  FROM generate_series(1, 30) i;
INSERT INTO "shop.eu"."Order Items" (sku) VALUES ('B'), ('a'), ('"q"'), ('x,y'), ('Ä'), ('b');
INSERT INTO employees (emp_id, first_name, city) SELECT i, 'E' || i, 'Oslo' FROM generate_series(1, 5) i;
"""
K_ROWS, ITEM_ROWS, EMPLOYEES = 6, 36, 5
# Session defaults of a destination unlike the source's: every text output the hash reads differs.
ODD_DEFAULTS = {
    "TimeZone": "Asia/Kathmandu",
    "DateStyle": "SQL, DMY",
    "IntervalStyle": "sql_standard",
    "extra_float_digits": "0",
    "bytea_output": "escape",
}


@contextlib.contextmanager
def _database(url: str, name: str, *, icu: str | None = None, **defaults: str) -> Iterator[str]:
    """A new empty database ``name`` on ``url``'s server (with ICU collation ``icu``, and
    ``defaults`` as its session defaults); dropped afterwards."""
    server = url.rsplit("/", 1)[0]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if icu is not None:
            create += sql.SQL(
                " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE {} LOCALE 'C.UTF-8'"
            ).format(sql.Literal(icu))
        cur.execute(create)
        for setting, value in defaults.items():
            cur.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                )
            )
    try:
        yield f"{server}/{name}"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def _pair(service_env: dict[str, str], *, icu: str | None = None, **dest_defaults: str) -> Iterator[Settings]:
    """A source and a destination with both tables and the same rows, the tables captured."""
    tag = uuid.uuid4().hex[:8]
    with (
        source_database(service_env["SOURCE_DB_URL"], f"cdc_vt_src_{tag}") as source,
        _database(service_env["DEST_DB_URL"], f"cdc_vt_dst_{tag}", icu=icu, **dest_defaults) as dest,
    ):
        execute(source, SCHEMA)
        execute(dest, SETUP_DEST_SQL.read_text())
        execute(dest, DEST_SCHEMA)
        settings = fresh_settings(
            {**service_env, "SOURCE_DB_URL": source, "DEST_DB_URL": dest},
            cdc_topic_prefix=f"cdc_vt_{tag}",
        )
        added = tables.add(settings, ["k", ITEMS])
        assert [a.table for a in added] == ["public.k", ITEMS]
        execute(source, ROWS)
        execute(dest, ROWS)
        yield settings


@pytest.fixture
def pair(service_env) -> Iterator[Settings]:
    with _pair(service_env) as settings:
        yield settings


def _verify(settings: Settings, tmp_path, *args: str):
    """``python -m cdc verify *args`` with exactly ``settings``."""
    return run_cdc(settings_env(settings), tmp_path, "verify", *args)


def _line(out: str, start: str) -> str:
    [line] = [ln for ln in out.splitlines() if ln.startswith(start)]
    return line


def test_identical_tables_exit_0_with_a_line_per_table(pair, tmp_path):
    proc = _verify(pair, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert _line(out, "rows employees:").startswith(
        f"rows employees: source {EMPLOYEES}, destination {EMPLOYEES}, missing 0, extra 0, different 0 ("
    )
    assert _line(out, "rows public.k:").startswith(
        f"rows public.k: source {K_ROWS}, destination {K_ROWS}, missing 0, extra 0, different 0 ("
    )
    assert _line(out, f"rows {ITEMS}:").startswith(
        f"rows {ITEMS}: source {ITEM_ROWS}, destination {ITEM_ROWS}, missing 0, extra 0, different 0 ("
    )
    # Not compared, and said so: what only one side writes.
    assert "  columns not compared: gen (generated on the source)" in out
    assert "  columns not compared: loaded_at (only on the destination)" in out
    assert out.splitlines()[-1] == f"result: identical (3 tables, {EMPLOYEES + K_ROWS + ITEM_ROWS} rows)"
    # The order of the lines: employees, then cdc_tables by schema and name.
    tables_in_order = [ln.split(":")[0] for ln in out.splitlines() if ln.startswith("rows ")]
    assert tables_in_order == ["rows employees", "rows public.k", f"rows {ITEMS}"]


def test_differences_are_named_by_table_and_key_and_exit_1(pair, tmp_path):
    dest = pair.dest_db_url
    execute(dest, "UPDATE k SET f = 2.5000001 WHERE a = 10")  # one value, in the 8th digit
    execute(dest, "DELETE FROM k WHERE a = -1")
    execute(dest, "INSERT INTO k (a, at, s) VALUES (5, '2000-01-01 00:00:00+00', 'new')")
    execute(dest, 'UPDATE "shop.eu"."Order Items" SET "select" = \'changed\' WHERE sku = \'x,y\'')
    execute(dest, 'UPDATE "shop.eu"."Order Items" SET loaded_at = now() - interval \'1 day\'')  # not compared
    execute(dest, "UPDATE k SET gen = 42")  # generated on the source: not compared

    proc = _verify(pair, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert _line(out, "rows public.k:").startswith(
        f"rows public.k: source {K_ROWS}, destination {K_ROWS}, missing 1, extra 1, different 1 ("
    )
    assert '  missing in destination: 1 (a, at, s): (-1,"2024-01-01 00:00:00.5+00","a b")' in out
    assert '  extra in destination: 1 (a, at, s): (5,"2000-01-01 00:00:00+00",new)' in out
    assert '  different: 1 (a, at, s): (10,"1999-12-31 23:59:59.999999+00",é)' in out
    assert '  different: 1 sku: "x,y"' in out
    assert _line(out, "rows employees:").startswith("rows employees: source 5, destination 5, missing 0,")
    assert out.splitlines()[-1] == (
        "result: DIFFERENT: public.k: 1 missing, 1 extra, 1 different rows;"
        f" {ITEMS}: 0 missing, 0 extra, 1 different rows"
    )

    result = verify(pair, limit=1)
    assert not result.ok and result.rows is not None and result.rows.identical
    k = next(t for t in result.tables or () if t.table == "public.k")
    assert (k.missing.first, k.extra.first, k.different.first) == (
        ['(-1,"2024-01-01 00:00:00.5+00","a b")'],
        ['(5,"2000-01-01 00:00:00+00",new)'],
        ['(10,"1999-12-31 23:59:59.999999+00",é)'],
    )


def test_many_differences_list_the_first_keys_in_byte_order(pair, tmp_path):
    execute(pair.dest_db_url, 'DELETE FROM "shop.eu"."Order Items" WHERE "select" IS NULL')
    proc = _verify(pair, tmp_path, "--limit", "4", "--table", ITEMS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Byte order of the keys' text: '"' < 'B' < 'a' < 'b' < 'x' < 'Ä', whatever the collation.
    assert '  missing in destination: 6 sku (first 4): "\\"q\\"", B, a, b' in proc.stdout


def test_a_table_missing_on_the_destination_is_one_line(pair, tmp_path):
    execute(pair.dest_db_url, 'DROP TABLE "shop.eu"."Order Items"')
    proc = _verify(pair, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"rows {ITEMS}: missing on the destination" in out.splitlines()
    assert _line(out, "rows public.k:").startswith(f"rows public.k: source {K_ROWS}, destination {K_ROWS},")
    assert out.splitlines()[-1] == f"result: DIFFERENT: {ITEMS}: missing on the destination"
    assert proc.stderr == ""

    # Its schema gone too, and a key column missing on the other table: still lines, not errors.
    execute(
        pair.dest_db_url,
        'DROP SCHEMA "shop.eu"; ALTER TABLE k DROP COLUMN s, ADD COLUMN id serial PRIMARY KEY',
    )
    proc = _verify(pair, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"rows {ITEMS}: missing on the destination" in proc.stdout
    assert "rows public.k: not compared: the destination lacks primary key column s" in proc.stdout


def test_table_option_restricts_the_rows_check(pair, tmp_path):
    execute(pair.dest_db_url, "DELETE FROM k")
    proc = _verify(pair, tmp_path, "--table", ITEMS, "--table", "employees")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split(":")[0] for ln in proc.stdout.splitlines() if ln.startswith("rows ")]
    assert rows == [f"rows {ITEMS}", "rows employees"]
    assert proc.stdout.splitlines()[-1] == f"result: identical (2 tables, {ITEM_ROWS + EMPLOYEES} rows)"

    proc = _verify(pair, tmp_path, "--table", "public.k")
    assert proc.returncode == 1 and "rows public.k: source 6, destination 0, missing 6" in proc.stdout
    assert "rows employees" not in proc.stdout

    # Names as SQL writes them; a name that is not replicated, or no name at all: exit 2, one line.
    assert _verify(pair, tmp_path, "--table", '"shop.eu"."order items"').returncode == 2
    for name, words in (
        ("public.nosuch", "not a replicated table"),
        ('"shop.eu"."Order Items', "is not a table name"),
        ("cdc_outbox", "not a replicated table"),
    ):
        proc = _verify(pair, tmp_path, "--table", name)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("error: ") and words in line, line
        assert proc.stdout == ""


def test_events_account_for_both_outboxes(pair, tmp_path):
    source, dest = pair.source_db_url, pair.dest_db_url
    both = query(
        source,
        "SELECT action_id, NULL, NULL FROM emp_records_cdc UNION ALL"
        " SELECT action_id, table_schema, table_name FROM cdc_outbox ORDER BY 1",
    )
    generic = [a for a, s, _ in both if s is not None]
    assert len(both) == EMPLOYEES + K_ROWS + ITEM_ROWS and len(generic) == K_ROWS + ITEM_ROWS
    unprocessed = [generic[3], generic[20]]
    with connect(dest) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO processed_events (action_id, table_schema, table_name, outcome) VALUES (%s, %s, %s, 'applied')",
            [(a, s, t) for a, s, t in both if a not in unprocessed],
        )
        conn.commit()

    report = check_events(pair)
    assert report.missing.first == unprocessed and not report.ok
    assert (report.outbox_rows, report.generic_rows, report.processed_rows) == (
        len(both),
        len(generic),
        len(both) - 2,
    )

    proc = _verify(pair, tmp_path, "--events")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"events not processed: 2 action_id: {unprocessed[0]}, {unprocessed[1]}" in proc.stdout
    assert (
        f"events: outbox {len(both)} (emp_records_cdc {EMPLOYEES}, cdc_outbox {len(generic)}),"
        f" processed_events {len(both) - 2} (applied {len(both) - 2}, stale 0, dlq 0)"
    ) in proc.stdout
    assert proc.stdout.splitlines()[-1] == "result: DIFFERENT: 2 events not processed, 0 unknown events"

    query(
        dest,
        "INSERT INTO processed_events (action_id, outcome) SELECT unnest(%s::bigint[]), 'stale'",
        (unprocessed,),
    )
    assert _verify(pair, tmp_path, "--events").returncode == 0


def test_wait_covers_the_generic_outbox(pair):
    """No outbox row of either is published yet: not caught up, and nothing compared."""
    result = verify(pair, wait=0.5)
    assert result.lag is not None and result.lag.outbox_pending == EMPLOYEES + K_ROWS + ITEM_ROWS
    assert not result.ok and result.tables is None


def test_other_collation_and_session_defaults_on_the_destination_are_still_identical(service_env, tmp_path):
    with _pair(service_env, icu="en-US", **ODD_DEFAULTS) as settings:
        dest = settings.dest_db_url
        # The destination really orders and prints otherwise by default.
        assert query(
            dest, "SELECT sku FROM \"shop.eu\".\"Order Items\" WHERE sku IN ('a', 'B') ORDER BY sku"
        ) == [
            ("a",),
            ("B",),
        ]
        assert query(settings.source_db_url, "SELECT string_agg(s, ',' ORDER BY s) FROM k WHERE a = 1") == [
            ("B,a",)
        ]
        assert query(dest, "SELECT at::text, iv::text FROM k WHERE a = -1") == [
            ("2024-01-01 05:45:00.5+05:45", "1 2:00:00"),
        ]
        proc = _verify(settings, tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (
            proc.stdout.splitlines()[-1]
            == f"result: identical (3 tables, {EMPLOYEES + K_ROWS + ITEM_ROWS} rows)"
        )

        # A real difference is still one: a microsecond, a float's 17th digit (which the
        # destination's extra_float_digits 0 would not print).
        execute(dest, "UPDATE k SET at = at + interval '1 microsecond' WHERE a = 9")
        execute(dest, "UPDATE k SET f = 0.10000000000000002 WHERE a = -1")
        assert query(dest, "SELECT f::text FROM k WHERE a = -1") == [("0.1",)]
        proc = _verify(settings, tmp_path, "--table", "k")
        assert proc.returncode == 1
        assert '  missing in destination: 1 (a, at, s): (9,"1999-12-31 23:59:59+00",Z)' in proc.stdout
        assert '  extra in destination: 1 (a, at, s): (9,"1999-12-31 23:59:59.000001+00",Z)' in proc.stdout
        assert '  different: 1 (a, at, s): (-1,"2024-01-01 00:00:00.5+00","a b")' in proc.stdout
