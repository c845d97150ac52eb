"""The type-fidelity matrix of generic tables: one row per case, each written from a session with
its own settings, and how to print a table's every column the same way in two databases. Used at
the SQL level (``tests/integration/test_type_fidelity.py``) and through the daemons
(``tests/integration/test_tables_pipeline.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from psycopg2 import sql

from cdc.ops.verify import PINNED  # the settings cdc_capture prints under, and verify compares under
from tests.support import connect

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
def dest_database(url: str, name: str) -> Iterator[str]:
    server = url.rsplit("/", 1)[0]
    with connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{server}/{name}"
    finally:
        with connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def execute_as(url: str, settings: dict[str, str], statement: str, params: object = None) -> None:
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
