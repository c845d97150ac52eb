"""Exact type fidelity of the generic path, on real source and destination servers: a row written
on the source (from sessions with other TimeZone, DateStyle, IntervalStyle, extra_float_digits,
bytea_output) is captured by ``cdc_capture`` as text and written on the destination by
``cdc.sink.generic.insert_rows``; every column must then print the same in both databases.

This covers capture and typing (the hardest part of replicating any table) at the SQL level.
The same matrix must run through the daemons once the producer publishes and the consumer
applies generic tables.
"""

from __future__ import annotations

import contextlib

import orjson
import pytest
from psycopg2 import sql

from cdc.model.table import Table
from cdc.sink.generic import insert_rows
from tests.support import connect, query, run_cdc, source_database

pytestmark = pytest.mark.integration

PINNED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}

TYPES = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE m (
    id    int PRIMARY KEY,
    i2    int2, i4 int4, i8 int8,
    n     numeric, n38 numeric(38, 18),
    f4    float4, f8 float8,
    t     text, c5 char(5), vc varchar(10),
    b     bytea, bo bool,
    d     date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
    u     uuid, j json, jb jsonb,
    a2    int[], ta text[], na numeric[],
    e     mood, dm posint, cp pair, r int4range, mr int4multirange, tr tstzrange,
    ip    inet, cd cidr, mac macaddr, mac8 macaddr8,
    bt    bit(4), vb varbit,
    ident int GENERATED ALWAYS AS IDENTITY,
    gen   int GENERATED ALWAYS AS (id * 2) STORED
);
CREATE TABLE k (a bigint, at timestamptz, s text, v text, PRIMARY KEY (a, at, s));
"""

UNICODE = (
    "plain ASCII, Latin-1 é ñ ü, combining e\u0301, Greek Ωμέγα, Cyrillic Жж, CJK 漢字, Hangul 한글,"
    " Arabic مرحبا, Hebrew שלום, Devanagari नमस्ते, astral 😀🀄𝄞, ZWJ 👩\u200d💻, zero width \u200b,"
    " BOM \ufeff, LRM \u200e, noncharacter \ufffe, private use \ue000, controls \x01\x1f\x7f,"
    " newline \n tab \t CR \r, backslash \\ quote ' double \" "
)

# (id, the writer's session settings, column -> SQL expression)
CASES: list[tuple[int, dict[str, str], dict[str, str]]] = [
    (1, {}, {"i2": "-32768", "i4": "-2147483648", "i8": "-9223372036854775808"}),
    (2, {}, {"i2": "32767", "i4": "2147483647", "i8": "9223372036854775807"}),
    (
        3,
        {},
        {
            "n": "'12345678901234567890.12345678901234567890'",
            "n38": "'12345678901234567890.123456789012345678'",
            "na": "'{1.50,NaN,-0.000001,Infinity}'",
        },
    ),
    (4, {}, {"n": "'NaN'", "f4": "'NaN'", "f8": "'NaN'"}),
    (5, {}, {"n": "'Infinity'", "f4": "'Infinity'", "f8": "'Infinity'"}),
    (6, {}, {"n": "'-Infinity'", "f4": "'-Infinity'", "f8": "'-Infinity'"}),
    (7, {"extra_float_digits": "-15"}, {"f4": "0.1", "f8": "0.1"}),
    (8, {"extra_float_digits": "0"}, {"f4": "'3.4028235e38'", "f8": "'1e308'"}),
    (9, {}, {"f4": "'1e-45'", "f8": "'5e-324'"}),
    (10, {}, {"f4": "'-0'", "f8": "'-0'"}),
    (11, {}, {"t": "%(unicode)s", "vc": "'null'", "c5": "'ab'"}),
    (12, {}, {"t": "repeat('x', 2 * 1024 * 1024)", "b": "decode(repeat('00ff', 1024 * 1024), 'hex')"}),
    (13, {"bytea_output": "escape"}, {"b": "'\\x'::bytea", "bo": "true", "t": "''"}),
    (14, {}, {"b": "'\\x00'::bytea", "bo": "false", "t": "'null'"}),
    (
        15,
        {"TimeZone": "Pacific/Chatham", "DateStyle": "SQL, DMY"},
        {
            "d": "'infinity'",
            "ts": "'-infinity'",
            "tstz": "'infinity'",
            "tm": "'24:00:00'",
            "tmtz": "'23:59:59.999999+14:59'",
        },
    ),
    (
        16,
        {"TimeZone": "America/St_Johns", "DateStyle": "German, DMY"},
        {
            "d": "'4713-01-01 BC'",
            "ts": "'0044-03-15 12:00:00.000001 BC'",
            "tstz": "'2024-02-29 23:59:59.999999+05:45'",
            "tr": "'[2024-01-01 00:00+00, infinity)'",
        },
    ),
    (17, {"DateStyle": "Postgres, MDY"}, {"d": "'5874897-12-31'", "ts": "'294276-12-31 23:59:59.999999'"}),
    (18, {"IntervalStyle": "postgres"}, {"iv": "'1 year -2 mons +3 days -04:05:06.000007'"}),
    (19, {"IntervalStyle": "postgres_verbose"}, {"iv": "'@ 1 year -2 mons 3 days -4 hours -5 mins ago'"}),
    (20, {"IntervalStyle": "sql_standard"}, {"iv": "'-1-2 +3 -4:05:06'"}),
    (21, {"IntervalStyle": "iso_8601"}, {"iv": "'P-1Y2M-3DT4H-5M6.5S'"}),
    (22, {}, {"u": "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "j": '\'{"b": 1, "a": 2, "a": 3}\''}),
    (23, {}, {"j": "'  [1, 2.50, \"x\"]  '", "jb": "'null'"}),
    (24, {}, {"j": "'null'", "jb": '\'{"b": [1, 2.50], "a": "\\u00e9"}\''}),
    (
        25,
        {},
        {
            "a2": "'{{1,2},{3,NULL}}'",
            "ta": '\'{"NULL",NULL,"","a,b","q\\"uote"}\'',
            "na": "'{}'",
        },
    ),
    (26, {}, {"a2": "'[0:2]={7,8,9}'", "ta": "'[-1:0]={x,y}'"}),
    (
        27,
        {},
        {
            "e": "'happy'",
            "dm": "42",
            "cp": "ROW(1, 'a,\"b\"')::pair",
            "r": "'[1,10)'",
            "mr": "'{[1,3), [5,8)}'",
        },
    ),
    (28, {}, {"cp": "ROW(NULL, NULL)::pair", "r": "'empty'", "mr": "'{}'"}),
    (
        29,
        {},
        {
            "ip": "'2001:db8::1/64'",
            "cd": "'10.0.0.0/8'",
            "mac": "'08:00:2b:01:02:03'",
            "mac8": "'08:00:2b:01:02:03:04:05'",
        },
    ),
    (30, {}, {"bt": "B'1010'", "vb": "B'10101010101'"}),
    (31, {}, {}),  # every column NULL (but the key, identity and generated)
]


@contextlib.contextmanager
def dest_database(url: str, name: str):
    server = url.rsplit("/", 1)[0]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{server}/{name}"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def execute_as(url: str, settings: dict[str, str], statement: str, params=None) -> None:
    with connect(url) as conn, conn.cursor() as cur:
        for name, value in settings.items():
            cur.execute(sql.SQL("SET {} = %s").format(sql.Identifier(name)), (value,))
        cur.execute(statement, params)
        conn.commit()


def printed(url: str, table: str, order: str) -> list[tuple]:
    """Every column of ``table`` as text, under the pinned settings."""
    with connect(url) as conn, conn.cursor() as cur:
        for name, value in PINNED.items():
            cur.execute(sql.SQL("SET {} = %s").format(sql.Identifier(name)), (value,))
        cur.execute(
            "SELECT string_agg(format('%%I::text', attname), ', ' ORDER BY attnum) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        (columns,) = cur.fetchone()
        cur.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
        return cur.fetchall()


def apply_images(dest: str, table_name: str, images: list[dict]) -> None:
    with connect(dest) as conn, conn.cursor() as cur:
        for name, value in PINNED.items():
            cur.execute(sql.SQL("SET {} = %s").format(sql.Identifier(name)), (value,))
        table = Table.load(cur, table_name, any_type=True)
        cur.execute(insert_rows(table), {"rows": orjson.dumps(images).decode()})
        conn.commit()


def test_every_case_prints_the_same_in_both_databases(service_env, tmp_path):
    with (
        source_database(service_env["SOURCE_DB_URL"], "cdc_types_source") as source,
        dest_database(service_env["DEST_DB_URL"], "cdc_types_dest") as dest,
    ):
        for url in (source, dest):
            execute_as(url, {}, TYPES)
        env = {**service_env, "SOURCE_DB_URL": source}
        added = run_cdc(env, tmp_path, "tables", "add", "m", "k")
        assert added.returncode == 0, added.stderr

        for case_id, settings, values in CASES:
            columns = ", ".join(["id", *values])
            exprs = ", ".join([str(case_id), *values.values()])
            execute_as(source, settings, f"INSERT INTO m ({columns}) VALUES ({exprs})", {"unicode": UNICODE})
        # The composite key (bigint, timestamptz, text), written from two time zones.
        execute_as(
            source,
            {"TimeZone": "Asia/Kathmandu"},
            "INSERT INTO k VALUES (-1, '2024-01-01 00:00:00.5', 'a b', 'x')",
        )
        execute_as(
            source, {"TimeZone": "UTC"}, "INSERT INTO k VALUES (9223372036854775807, 'infinity', '', NULL)"
        )

        rows = query(source, "SELECT table_name, row_image FROM cdc_outbox ORDER BY action_id")
        assert [t for t, _ in rows] == ["m"] * len(CASES) + ["k", "k"]
        apply_images(dest, "m", [image for t, image in rows if t == "m"])
        apply_images(dest, "k", [image for t, image in rows if t == "k"])

        want, got = printed(source, "m", "id"), printed(dest, "m", "id")
        assert len(want) == len(CASES)
        for w, g in zip(want, got, strict=True):
            assert w == g, f"case {w[0]}: {[(a, b) for a, b in zip(w, g, strict=True) if a != b]}"
        assert printed(source, "k", "a") == printed(dest, "k", "a")
        # What the matrix is about, spelled out for a few: text output keeps what JSON would lose.
        by_id = {r[0]: r for r in want}
        names = [
            r[0]
            for r in query(
                source,
                "SELECT attname FROM pg_attribute WHERE attrelid = 'm'::regclass AND attnum > 0 ORDER BY attnum",
            )
        ]
        col = {name: i for i, name in enumerate(names)}
        assert by_id["10"][col["f8"]] == "-0"
        assert by_id["22"][col["j"]] == '{"b": 1, "a": 2, "a": 3}'
        assert by_id["23"][col["jb"]] == "null" and by_id["31"][col["jb"]] is None
        assert by_id["26"][col["a2"]] == "[0:2]={7,8,9}"
        assert by_id["11"][col["c5"]] == "ab"  # char(n) pads; its text (and equality) ignores the pad
        assert by_id["15"][col["tm"]] == "24:00:00"


def test_a_value_the_destination_column_cannot_hold_is_an_error_not_a_cut(service_env):
    """An explicit cast to varchar(3) would cut 'abcdef' to 'abc'; the typing casts to the type
    without its modifier, so the column refuses it as the source would have."""
    with dest_database(service_env["DEST_DB_URL"], "cdc_types_narrow") as dest:
        execute_as(dest, {}, "CREATE TABLE n (id int PRIMARY KEY, v varchar(3), b bit(4), c char(2))")
        for image, error in [
            (
                {"id": "1", "v": "abcdef", "b": None, "c": None},
                "value too long for type character varying(3)",
            ),
            ({"id": "2", "v": None, "b": "101", "c": None}, "bit string length 3 does not match type bit(4)"),
            ({"id": "3", "v": None, "b": None, "c": "abc"}, "value too long for type character(2)"),
        ]:
            with pytest.raises(Exception, match=error.replace("(", r"\(").replace(")", r"\)")):
                apply_images(dest, "n", [image])
        apply_images(dest, "n", [{"id": "4", "v": "abc", "b": "1010", "c": "a"}])
        assert query(dest, "SELECT id, v, b::text, c FROM n") == [(4, "abc", "1010", "a ")]
