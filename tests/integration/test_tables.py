"""``python -m cdc tables`` and the generic capture, on a real source server: what a table's
changes become in ``cdc_outbox`` (whole row by name as PostgreSQL's text output, generated columns
left out, a primary-key change as DELETE + INSERT, TRUNCATE as DELETEs, a partitioned table under
its root's name, the same image whatever the writer's session settings), action_ids shared with
``emp_records_cdc``, ``--snapshot``, ``list`` and ``remove``, and the one-line refusals."""

from __future__ import annotations

import json

import pytest

from tests.support import connect, query, run_cdc, source_database

pytestmark = pytest.mark.integration


@pytest.fixture
def source(service_env):
    with source_database(service_env["SOURCE_DB_URL"], "cdc_tables_test") as url:
        yield url


@pytest.fixture
def env(service_env, source):
    return {**service_env, "SOURCE_DB_URL": source}


def tables(env, tmp_path, *args):
    return run_cdc(env, tmp_path, "tables", *args)


def changes(url, after=0):
    return query(
        url,
        "SELECT action_id, table_schema, table_name, action, key, row_image FROM cdc_outbox"
        " WHERE action_id > %s ORDER BY action_id",
        (after,),
    )


def run(url, *statements, **settings):
    """Each statement in one transaction of a session with ``settings`` (SET name = value)."""
    with connect(url) as conn, conn.cursor() as cur:
        for name, value in settings.items():
            cur.execute(f"SET {name} = %s", (value,))
        for s in statements:
            cur.execute(s)
        conn.commit()


ORDERS = """
CREATE TABLE "Order Items" (
    order_id bigint,
    at       timestamptz,
    sku      text,
    qty      int NOT NULL,
    price    numeric(38, 18),
    total    numeric GENERATED ALWAYS AS (qty * price) STORED,
    line     int GENERATED ALWAYS AS IDENTITY,
    "select" interval,
    tags     text[],
    doc      json,
    PRIMARY KEY (order_id, at, sku)
)
"""


def test_a_table_added_is_captured_row_by_row_as_text_with_its_key(source, env, tmp_path):
    run(source, ORDERS)
    added = tables(env, tmp_path, "add", 'public."Order Items"')
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [
        'public."Order Items": captured; topic cdc.public.Order-20Items; primary key (order_id, at, sku)'
    ]

    run(
        source,
        """INSERT INTO "Order Items" (order_id, at, sku, qty, price, "select", tags, doc)
           VALUES (1, '2024-02-29 23:30:00+05:30', 'a"b', 2, 0.1, '1 year -2 days +03:04:05.6',
                   '[0:1]={x,NULL}', '{"b": 1, "a": 2, "a": 3}')""",
        'UPDATE "Order Items" SET qty = 3 WHERE order_id = 1',
        "UPDATE \"Order Items\" SET sku = 'z' WHERE order_id = 1",
        'DELETE FROM "Order Items"',
    )
    rows = changes(source)
    assert [r[3] for r in rows] == ["INSERT", "UPDATE", "DELETE", "INSERT", "DELETE"]
    assert {(r[1], r[2]) for r in rows} == {("public", "Order Items")}
    first = rows[0][5]
    assert first == {
        "order_id": "1",
        "at": "2024-02-29 18:00:00+00",
        "sku": 'a"b',
        "qty": "2",
        "price": "0.100000000000000000",
        "line": "1",
        "select": "1 year -2 days +03:04:05.6",
        "tags": "[0:1]={x,NULL}",
        "doc": '{"b": 1, "a": 2, "a": 3}',
    }  # no "total": generated columns are never written
    assert rows[0][4] == {"order_id": "1", "at": "2024-02-29 18:00:00+00", "sku": 'a"b'}
    # A changed primary key: the old key deleted, the new one inserted.
    assert rows[2][4]["sku"] == 'a"b' and rows[2][5]["qty"] == "3"
    assert rows[3][4]["sku"] == "z" and rows[3][5]["qty"] == "3"
    assert rows[4][4]["sku"] == "z"


def test_one_row_gives_one_image_whatever_the_writers_session_settings(source, env, tmp_path):
    run(
        source,
        "CREATE TABLE t (id int PRIMARY KEY, ts timestamptz, d date, iv interval, f float8, r float4, b bytea)",
    )
    assert tables(env, tmp_path, "add", "t").returncode == 0
    insert = (
        "INSERT INTO t VALUES (1, '2024-01-01 12:00:00+00', '2024-01-02', '-1 days +02:03:04', 0.1, 0.1,"
        " '\\x00ff')"
    )
    run(source, insert)
    run(source, "DELETE FROM t")
    run(
        source,
        insert,
        TimeZone="America/New_York",
        DateStyle="SQL, DMY",
        IntervalStyle="sql_standard",
        extra_float_digits="-5",
        bytea_output="escape",
    )
    images = [r[5] for r in changes(source) if r[3] == "INSERT"]
    assert (
        images[0]
        == images[1]
        == {
            "id": "1",
            "ts": "2024-01-01 12:00:00+00",
            "d": "2024-01-02",
            "iv": "-1 days +02:03:04",
            "f": "0.1",
            "r": "0.1",
            "b": "\\x00ff",
        }
    )


def test_values_keep_what_json_would_lose(source, env, tmp_path):
    run(
        source,
        "CREATE TABLE v (id int PRIMARY KEY, jb jsonb, f float8, n numeric, s text, a int[])",
    )
    assert tables(env, tmp_path, "add", "v").returncode == 0
    run(
        source,
        "INSERT INTO v VALUES (1, 'null', '-0', 'NaN', 'null', '{}'), (2, NULL, 'Infinity', '1e-40', NULL, NULL)",
    )
    images = {r[4]["id"]: r[5] for r in changes(source)}
    # The JSON value null, the string 'null' and SQL NULL stay three different things.
    assert images["1"] == {"id": "1", "jb": "null", "f": "-0", "n": "NaN", "s": "null", "a": "{}"}
    assert images["2"] == {
        "id": "2",
        "jb": None,
        "f": "Infinity",
        "n": "0.0000000000000000000000000000000000000001",
        "s": None,
        "a": None,
    }


def test_action_ids_are_shared_with_the_employees_outbox(source, env, tmp_path):
    run(source, "CREATE TABLE t (id int PRIMARY KEY)")
    assert tables(env, tmp_path, "add", "t").returncode == 0
    run(
        source,
        "INSERT INTO employees (first_name) VALUES ('a')",
        "INSERT INTO t VALUES (1)",
        "INSERT INTO employees (first_name) VALUES ('b')",
    )
    ours = [r[0] for r in changes(source)]
    theirs = [r[0] for r in query(source, "SELECT action_id FROM emp_records_cdc ORDER BY 1")]
    assert len(ours) == 1 and len(theirs) == 2
    assert theirs[0] < ours[0] < theirs[1]
    # One transaction: one txid for all three.
    assert query(source, "SELECT count(DISTINCT txid) FROM (SELECT txid FROM cdc_outbox UNION ALL"
                         " SELECT txid FROM emp_records_cdc) x")[0][0] == 1  # fmt: skip


def test_a_partitioned_table_is_captured_under_its_roots_name_truncate_included(source, env, tmp_path):
    run(
        source,
        "CREATE TABLE m (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
        "CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
        "CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        "INSERT INTO m VALUES (1, '2024-05-05', 'before')",
    )
    partition = tables(env, tmp_path, "add", "m_2024")
    assert partition.returncode == 2
    assert partition.stderr.strip() == (
        "error: public.m_2024 is a partition of m: add m, whose changes are captured under its name"
    )
    added = tables(env, tmp_path, "add", "m", "--snapshot")
    assert added.returncode == 0, added.stderr
    assert "public.m: 1 current rows queued as SNAPSHOT changes" in added.stdout
    run(
        source,
        "INSERT INTO m VALUES (2, '2025-05-05', 'x')",
        "UPDATE m SET at = '2025-06-06' WHERE id = 1",  # moves between partitions
    )
    run(source, "TRUNCATE m_2025")
    rows = changes(source)
    assert {(r[1], r[2]) for r in rows} == {("public", "m")}
    seen = [(r[3], r[4]["id"], r[4]["at"]) for r in rows]
    assert seen[:4] == [
        ("SNAPSHOT", "1", "2024-05-05"),
        ("INSERT", "2", "2025-05-05"),
        ("DELETE", "1", "2024-05-05"),
        ("INSERT", "1", "2025-06-06"),
    ]
    # TRUNCATE of one partition: a DELETE of each of its rows (in heap order).
    assert sorted(seen[4:]) == [("DELETE", "1", "2025-06-06"), ("DELETE", "2", "2025-05-05")]
    assert query(source, "SELECT count(*) FROM m")[0][0] == 0
    # TRUNCATE of the root: each partition's own trigger records its rows, once.
    run(source, "INSERT INTO m VALUES (3, '2024-07-07', 'a'), (4, '2025-07-07', 'b')")
    last = rows[-1][0]
    run(source, "TRUNCATE m")
    deleted = [(r[3], r[2], r[4]["id"]) for r in changes(source, last) if r[3] == "DELETE"]
    assert sorted(deleted) == [("DELETE", "m", "3"), ("DELETE", "m", "4")]


def test_list_shows_topics_and_rows_and_remove_stops_the_capture(source, env, tmp_path):
    run(
        source,
        "CREATE TABLE a (id int PRIMARY KEY)",
        'CREATE SCHEMA "my.schema"',
        'CREATE TABLE "my.schema"."Ünïcode-näme" (k text PRIMARY KEY)',
        "INSERT INTO a SELECT generate_series(1, 5)",
    )
    added = tables(env, tmp_path, "add", "a", '"my.schema"."Ünïcode-näme"')
    assert added.returncode == 0, added.stderr
    listed = tables(env, tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    found = {t["table"]: t for t in map(json.loads, listed.stdout.splitlines())}
    assert found["public.a"]["topic"] == "cdc.public.a" and found["public.a"]["rows"] == 5
    odd = found['"my.schema"."Ünïcode-näme"']
    assert odd["topic"] == "cdc.my-2eschema.-c3-9cn-c3-afcode-2dn-c3-a4me"
    assert odd["primary_key"] == ["k"] and odd["capturing"] is True

    removed = tables(env, tmp_path, "remove", "a")
    assert removed.returncode == 0, removed.stderr
    run(source, "INSERT INTO a VALUES (6)")
    assert changes(source) == []
    assert "public.a" not in tables(env, tmp_path, "list").stdout
    again = tables(env, tmp_path, "remove", "a")
    assert again.returncode == 2 and "public.a is not captured" in again.stderr

    # A recorded table whose trigger was dropped by hand: list says so and exits 1.
    run(source, 'DROP TRIGGER cdc_capture ON "my.schema"."Ünïcode-näme"')
    broken = tables(env, tmp_path, "list")
    assert broken.returncode == 1 and "no trigger" in broken.stdout


@pytest.mark.parametrize(
    ("setup", "name", "message"),
    [
        ("CREATE TABLE nopk (a int)", "nopk", "public.nopk has no primary key"),
        ("CREATE VIEW vw AS SELECT 1 AS a", "vw", "public.vw is not a table"),
        ("", "employees", "employees is the default table"),
        ("", "cdc_outbox", "public.cdc_outbox is one of the pipeline's own tables"),
        ("", "nosuch", "table nosuch does not exist on the source"),
        ("", 'public."unterminated', "is not a table name"),
    ],
)
def test_what_cannot_be_captured_is_refused_with_one_line(source, env, tmp_path, setup, name, message):
    if setup:
        run(source, setup)
    refused = tables(env, tmp_path, "add", name)
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert query(source, "SELECT count(*) FROM cdc_tables")[0][0] == 0


def test_a_topic_that_would_clash_in_kafka_is_refused(source, env, tmp_path):
    run(
        source,
        'CREATE TABLE "a_b" (id int PRIMARY KEY)',
        "CREATE SCHEMA a",
        "CREATE TABLE a.b_c (id int PRIMARY KEY)",
    )
    assert tables(env, tmp_path, "add", "a_b").returncode == 0
    # cdc.public.a_b and cdc.a.b_c do not clash; make one that does: schema "public_a" table "b".
    run(source, "CREATE SCHEMA public_a", "CREATE TABLE public_a.b (id int PRIMARY KEY)")
    refused = tables(env, tmp_path, "add", "public_a.b")
    assert refused.returncode == 2
    assert "clashes with cdc.public.a_b" in refused.stderr and "rename one" in refused.stderr
    assert tables(env, tmp_path, "add", "a.b_c").returncode == 0


def test_names_as_long_as_postgresql_allows_with_dots_and_keywords(source, env, tmp_path):
    long_name = "l" * 63  # PostgreSQL's limit in bytes
    run(
        source,
        f'CREATE TABLE "{long_name}" ("select" int PRIMARY KEY, "from" text)',
        'CREATE TABLE "a.b" (id int PRIMARY KEY)',
    )
    added = tables(env, tmp_path, "add", f'"{long_name}"', '"a.b"')
    assert added.returncode == 0, added.stderr
    run(source, f"INSERT INTO \"{long_name}\" VALUES (1, 'x')", 'INSERT INTO "a.b" VALUES (2)')
    rows = changes(source)
    assert [(r[2], r[4], r[5]) for r in rows] == [
        (long_name, {"select": "1"}, {"select": "1", "from": "x"}),
        ("a.b", {"id": "2"}, {"id": "2"}),
    ]
    assert f"topic cdc.public.{long_name};" in added.stdout
    assert "topic cdc.public.a-2eb;" in added.stdout
