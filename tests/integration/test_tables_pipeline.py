"""Any table with a primary key, through the real daemons: ``cdc tables add`` on a source, producer.py
and consumer_final.py running, a destination with the same tables (foreign keys on).

- The whole type matrix (``tests.support.types``): every column of every case prints the same in
  both databases after the trip through Kafka.
- Odd names: a schema with a dot, a table called ``"Order Items"`` with a column ``select``, a
  63-byte table name; a composite primary key; a change of primary key; deletes; employees
  beside them, unchanged.
- A table added while both daemons run is replicated without a restart.
- Drift: a destination table lacking a column holds that table (one line, ``/ready`` says so),
  the other tables flow on, and once the column is added it resumes by itself; nothing is lost.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.request

import pytest

from cdc.local.paths import SETUP_DEST_SQL
from tests.support import free_port, query, run_cdc, scalar, source_database, wait_until
from tests.support.consumer import consumer_env
from tests.support.producer import producer_env
from tests.support.types import CASES, TYPES, UNICODE, dest_database, execute_as, printed

pytestmark = pytest.mark.daemon

LONG = "t" * 63  # the longest name PostgreSQL keeps

SHOP = f"""
CREATE TABLE customers (id int PRIMARY KEY, name text, since date);
CREATE SCHEMA "shop.eu";
CREATE TABLE "shop.eu"."Order Items" (
    customer_id int NOT NULL REFERENCES customers (id),
    order_id    bigint,
    line        int,
    "select"    text,
    qty         numeric(10, 2),
    PRIMARY KEY (order_id, line)
);
CREATE TABLE {LONG} (id int PRIMARY KEY, v text);
CREATE TABLE late (id int PRIMARY KEY, v text, note text);
"""

TABLES = ["m", "k", "customers", '"shop.eu"."Order Items"']


def outbox_rows(source: str) -> int:
    return scalar(source, "SELECT (SELECT count(*) FROM emp_records_cdc) + (SELECT count(*) FROM cdc_outbox)")


def decided(dest: str) -> int:
    return scalar(dest, "SELECT count(*) FROM processed_events")


def caught_up(source: str, dest: str, timeout: float = 120) -> None:
    wait_until(
        lambda: decided(dest) == outbox_rows(source),
        timeout,
        "every change of the outboxes decided on the destination",
        step=0.5,
    )


def same(source: str, dest: str, table: str, order: str) -> None:
    want, got = printed(source, table, order), printed(dest, table, order)
    assert want, f"{table}: no rows on the source"
    assert want == got, f"{table}: {[(w, g) for w, g in zip(want, got, strict=False) if w != g][:3]}"


def ready(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_any_table_flows_with_exact_types_odd_names_and_foreign_keys(
    settings, service_env, tmp_path, producers, consumers
):
    with (
        source_database(service_env["SOURCE_DB_URL"], "cdc_pipe_source") as source,
        dest_database(service_env["DEST_DB_URL"], "cdc_pipe_dest") as dest,
    ):
        execute_as(source, {}, TYPES + SHOP)
        execute_as(dest, {}, SETUP_DEST_SQL.read_text())
        execute_as(dest, {}, TYPES + SHOP)
        s = dataclasses.replace(settings, source_db_url=source, dest_db_url=dest)
        env = producer_env(s)
        added = run_cdc(env, tmp_path, "tables", "add", *TABLES)
        assert added.returncode == 0, added.stderr

        # Before the daemons: the matrix, the shop with a key change and deletes, employees.
        for case_id, session, values in CASES:
            columns = ", ".join(["id", *values])
            exprs = ", ".join([str(case_id), *values.values()])
            execute_as(source, session, f"INSERT INTO m ({columns}) VALUES ({exprs})", {"unicode": UNICODE})
        execute_as(
            source,
            {"TimeZone": "Asia/Kathmandu"},
            "INSERT INTO k VALUES (-1, '2024-01-01 00:00:00.5', 'a b', 'x');"
            " INSERT INTO k VALUES (9223372036854775807, 'infinity', '', NULL)",
        )
        execute_as(
            source,
            {},
            "INSERT INTO customers SELECT i, 'c' || i, '2020-01-01'::date + i FROM generate_series(1, 50) i;"
            ' INSERT INTO "shop.eu"."Order Items"'
            " SELECT i % 50 + 1, i / 10, i % 10, 'sel' || i, i / 4.0 FROM generate_series(1, 300) i;"
            ' UPDATE "shop.eu"."Order Items" SET line = line + 100 WHERE order_id = 3;'  # key change
            ' DELETE FROM "shop.eu"."Order Items" WHERE order_id = 5;'
            " INSERT INTO employees (emp_id, first_name, city, salary)"
            " SELECT i, 'E' || i, 'Oslo', i FROM generate_series(1, 40) i;"
            " UPDATE m SET t = t || '!' WHERE id = 3;",
        )
        port = free_port()
        producer = producers.start(env)
        consumer = consumers.start(consumer_env(s, CONSUMER_METRICS_PORT=str(port)))
        caught_up(source, dest)
        same(source, dest, "m", "id")
        same(source, dest, "k", "a")
        same(source, dest, "customers", "id")
        same(source, dest, '"shop.eu"."Order Items"', "order_id, line")
        same(source, dest, "employees", "emp_id")
        assert scalar(dest, 'SELECT count(*) FROM "shop.eu"."Order Items" WHERE line >= 100') == 10

        # A table added while both run: its topic is created and subscribed to without a restart.
        assert run_cdc(env, tmp_path, "tables", "add", LONG).returncode == 0
        execute_as(source, {}, f"INSERT INTO {LONG} SELECT i, repeat('v', i) FROM generate_series(1, 20) i")
        caught_up(source, dest, timeout=150)
        same(source, dest, LONG, "id")

        # Drift: the destination's `late` lacks a column its changes carry: held, the rest flows.
        execute_as(dest, {}, "ALTER TABLE late DROP COLUMN note")
        assert run_cdc(env, tmp_path, "tables", "add", "late").returncode == 0
        execute_as(source, {}, "INSERT INTO late SELECT i, 'v', 'n' || i FROM generate_series(1, 10) i")
        consumer.wait_for_log(
            r"holding table public\.late .*lacks column note on the destination", timeout=150
        )
        status, text = ready(port)
        assert status == 503 and "holding table public.late" in text
        execute_as(source, {}, "INSERT INTO customers VALUES (1000, 'while held', NULL)")
        wait_until(
            lambda: scalar(dest, "SELECT count(*) FROM customers WHERE id = 1000"),
            60,
            "another table flowing",
        )
        assert scalar(dest, "SELECT count(*) FROM late") == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        assert 'cdc_consumer_drifted_tables{table="public.late"} 1.0' in metrics
        applied = re.search(
            r'cdc_consumer_table_events_total\{outcome="applied",table="shop\.eu\.Order Items"\} (\d+)',
            metrics,
        )
        assert applied and int(applied.group(1)) > 0, metrics
        execute_as(dest, {}, "ALTER TABLE late ADD COLUMN note text")
        caught_up(source, dest, timeout=60)
        same(source, dest, "late", "id")
        consumer.wait_for_log(r"table public\.late: the destination now takes its changes")
        wait_until(lambda: ready(port)[0] == 200, 30, "/ready again")
        outcomes = dict(query(dest, "SELECT outcome, count(*) FROM processed_events GROUP BY 1"))
        assert set(outcomes) <= {"applied", "stale"}, outcomes  # nothing dead-lettered
        for daemon in (producer, consumer):
            assert daemon.stop() == 0
