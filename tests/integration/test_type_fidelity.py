"""Exact type fidelity of the generic path, on real source and destination servers: a row written
on the source (from sessions with other TimeZone, DateStyle, IntervalStyle, extra_float_digits,
bytea_output) is captured by ``cdc_capture`` as text and written on the destination by
``cdc.sink.generic.insert_rows``; every column must then print the same in both databases.

This covers capture and typing (the hardest part of replicating any table) at the SQL level.
The same matrix must run through the daemons once the producer publishes and the consumer
applies generic tables.
"""

from __future__ import annotations

import orjson
import pytest
from psycopg2 import sql

from cdc.model.table import Table
from cdc.sink.generic import insert_rows
from tests.support import connect, query, run_cdc, source_database
from tests.support.types import CASES, PINNED, TYPES, UNICODE, dest_database, execute_as, printed

pytestmark = pytest.mark.integration


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
