"""The table model read from a real PostgreSQL catalog: what the pipeline derives everything from."""

from __future__ import annotations

import pytest
from psycopg2 import sql

from cdc.errors import ConfigError, SchemaMissingError
from cdc.model.event import Codec, InvalidEventError
from cdc.model.table import Kind, Table
from cdc.sink.statements import Statements
from employee import EMPLOYEES
from tests.support import connect, execute


def _load(url: str, name: str) -> Table:
    with connect(url) as conn, conn.cursor() as cur:
        return Table.load(cur, name)


def test_the_seed_contract_is_what_both_setup_files_create(clean_source, clean_dest):
    # employee.py writes the table out for typed code; the pipeline reads it from each catalog.
    assert _load(clean_source, "employees") == EMPLOYEES
    assert _load(clean_dest, "employees") == EMPLOYEES


@pytest.fixture
def scratch(clean_source):
    """A schema of odd tables on the source server, dropped afterwards."""
    execute(clean_source, 'DROP SCHEMA IF EXISTS "Model Test" CASCADE; CREATE SCHEMA "Model Test"')
    yield clean_source
    execute(clean_source, 'DROP SCHEMA IF EXISTS "Model Test" CASCADE')


def test_columns_keep_order_types_limits_and_generated_ones_are_not_written(scratch):
    execute(
        scratch,
        '''
        CREATE DOMAIN "Model Test".short AS smallint;
        CREATE TABLE "Model Test"."Odd ""Names""" (
            "Action" text,
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            "Code" char(3) NOT NULL,
            n "Model Test".short,
            doubled bigint GENERATED ALWAYS AS (id * 2) STORED,
            born date
        );
        ALTER TABLE "Model Test"."Odd ""Names""" DROP COLUMN born;
        ''',
    )
    table = _load(scratch, '"Model Test"."Odd ""Names"""')
    assert (table.schema, table.name, table.primary_key) == ("Model Test", 'Odd "Names"', ("id",))
    assert [(c.name, c.kind, c.range, c.length) for c in table.columns] == [
        ("Action", Kind.TEXT, None, None),
        ("id", Kind.INTEGER, (-(2**63), 2**63 - 1), None),
        ("Code", Kind.TEXT, None, 3),
        ("n", Kind.INTEGER, (-(2**15), 2**15 - 1), None),
        ("doubled", Kind.INTEGER, (-(2**63), 2**63 - 1), None),
    ]
    assert table.column("id").identity and table.column("Code").not_null
    assert [c.name for c in table.written] == ["Action", "id", "Code", "n"]
    assert table.key.name == "id" and [c.name for c in table.values] == ["Action", "Code", "n"]

    codec = Codec(table)
    event = codec.from_mapping(
        {"action_id": 1, "action": "INSERT", "id": 5, "Action": "x", "Code": "abc", "n": 7}
    )
    assert event.row == ("x", 5, "abc", 7)
    assert codec.from_json(codec.to_json(event)) == event and codec.key(event) == b"5"
    with pytest.raises(InvalidEventError, match=r"Code is 4 characters, at most 3 allowed"):
        codec.from_mapping({"action_id": 1, "action": "INSERT", "id": 5, "Code": "abcd"})
    with pytest.raises(InvalidEventError, match="n=40000 is out of range"):
        codec.from_mapping({"action_id": 1, "action": "INSERT", "id": 5, "n": 40000})

    # Every name is quoted where the statements use it, so the sink's SQL parses for this table.
    with connect(scratch) as conn, conn.cursor() as cur:
        statements = Statements.build(cur, table)
        assert '"Model Test"."Odd ""Names"""' in statements.apply_recorded
        assert "(x->>7)::bigint AS _key" in statements.apply_recorded  # the key is the row's second column
        cur.execute(sql.SQL("PREPARE probe AS SELECT 1 FROM {} WHERE false").format(table.ident))


def test_a_table_that_cannot_be_replicated_is_refused_with_one_line(scratch):
    execute(
        scratch,
        """
        CREATE TABLE "Model Test".no_key (a int);
        CREATE TABLE "Model Test".two_keys (a int, b int, PRIMARY KEY (a, b));
        CREATE TABLE "Model Test".money (id int PRIMARY KEY, amount numeric);
        CREATE TABLE "Model Test".clash (id int PRIMARY KEY, txid bigint);
        """,
    )
    with pytest.raises(SchemaMissingError, match=r"table public\.nowhere does not exist"):
        _load(scratch, "public.nowhere")
    with pytest.raises(ConfigError, match=r"Model Test\.no_key has no primary key"):
        _load(scratch, '"Model Test".no_key')
    with pytest.raises(ConfigError, match="amount is of type numeric, which change events cannot carry yet"):
        _load(scratch, '"Model Test".money')
    with pytest.raises(ConfigError, match=r"Model Test\.clash\.txid: a column of this name cannot travel"):
        Codec(_load(scratch, '"Model Test".clash'))
    with pytest.raises(ConfigError, match="primary key of 2 columns"):
        _ = _load(scratch, '"Model Test".two_keys').key
