"""Smoke tests of the foundation against the real broker and databases."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from cdc.errors import ServiceError
from cdc.kafka.client import consumer_config, producer_config
from cdc.local.paths import PROJECT_DIR
from cdc.local.ports import Ports
from cdc.local.postgres import PostgresServer
from cdc.local.services import LocalServices


def _drain(consumer: Consumer, want: int, timeout: float = 30.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        got.append(msg)
    return got


def test_group_commit_and_resume_from_committed_offset(settings):
    producer = Producer(producer_config(settings))
    for i in range(20):
        producer.produce(settings.cdc_topic, key=b"k", value=str(i).encode())
    assert producer.flush(30) == 0

    first = Consumer(consumer_config(settings))
    first.subscribe([settings.cdc_topic])
    msgs = _drain(first, 20)
    assert [int(m.value()) for m in msgs] == list(range(20))  # one key: one partition, in order
    # Commit only the first 12, synchronously, then leave the group.
    twelfth = msgs[11]
    first.commit(
        offsets=[TopicPartition(twelfth.topic(), twelfth.partition(), twelfth.offset() + 1)],
        asynchronous=False,
    )
    first.close()

    second = Consumer(consumer_config(settings))
    second.subscribe([settings.cdc_topic])
    resumed = _drain(second, 8)
    second.close()
    assert [int(m.value()) for m in resumed] == list(range(12, 20))


def test_source_schema_captures_changes(clean_source):
    with contextlib.closing(psycopg2.connect(clean_source)) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO employees (first_name, last_name, dob, city, salary)"
            " VALUES ('Ada', 'Lovelace', '1815-12-10', 'London', 100) RETURNING emp_id"
        )
        (emp_id,) = cur.fetchone()
        cur.execute("UPDATE employees SET salary = 200 WHERE emp_id = %s", (emp_id,))
        cur.execute("UPDATE employees SET emp_id = %s WHERE emp_id = %s", (emp_id + 100, emp_id))
        cur.execute("DELETE FROM employees WHERE emp_id = %s", (emp_id + 100,))
        conn.commit()
        cur.execute("SELECT emp_id, action, salary, txid IS NOT NULL FROM emp_records_cdc ORDER BY action_id")
        rows = cur.fetchall()
    assert rows == [
        (emp_id, "INSERT", 100, True),
        (emp_id, "UPDATE", 200, True),
        (emp_id, "DELETE", 200, True),
        (emp_id + 100, "INSERT", 200, True),
        (emp_id + 100, "DELETE", 200, True),
    ]


def test_destination_schema_present(clean_dest):
    with contextlib.closing(psycopg2.connect(clean_dest)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
        )
        tables = {r[0] for r in cur.fetchall()}
    assert {"employees", "processed_events", "emp_versions"} <= tables


def test_up_is_idempotent_and_status_reports(local_services: LocalServices):
    pids = (local_services.kafka.pid(), local_services.source.pid(), local_services.dest.pid())
    local_services.up()
    assert (local_services.kafka.pid(), local_services.source.pid(), local_services.dest.pid()) == pids
    out = subprocess.run(
        [sys.executable, "-m", "cdc", "--home", str(local_services.home), "status"],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"127.0.0.1:{local_services.ports.kafka}" in out.stdout
    assert out.stdout.count("running pid=") == 3


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = PostgresServer(name="source", home=tmp_path, port=port, dbname="x", password="p")
        with pytest.raises(ServiceError, match=f"port {port} is already in use"):
            server.start()


def test_broker_logs_to_file(local_services: LocalServices):
    log = (local_services.home / "logs" / "server.log").read_text()
    assert "Kafka Server started" in log


def _our_processes(home) -> list[str]:
    """Command lines of running processes that use ``home`` (broker or PostgreSQL)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(home) in cmdline and ("java" in cmdline or "postgres" in cmdline):
            found.append(cmdline)
    return found


def test_cli_up_status_down_leaves_nothing_behind(tmp_path):
    ports = Ports.free()
    env = {
        **os.environ,
        "CDC_KAFKA_PORT": str(ports.kafka),
        "CDC_KAFKA_CONTROLLER_PORT": str(ports.controller),
        "CDC_SOURCE_PG_PORT": str(ports.source_pg),
        "CDC_DEST_PG_PORT": str(ports.dest_pg),
    }
    home, env_file = tmp_path / "home", tmp_path / ".env"
    env_file.write_text("LOG_LEVEL=DEBUG\n")
    cli = [sys.executable, "-m", "cdc", "--home", str(home), "--env-file", str(env_file)]

    def run(*args):
        return subprocess.run(
            [*cli, *args], env=env, capture_output=True, text=True, cwd=PROJECT_DIR, check=False
        )

    try:
        up = run("up")
        assert up.returncode == 0, up.stderr
        written = env_file.read_text()
        assert "LOG_LEVEL=DEBUG" in written  # the user's own lines are kept
        assert f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{ports.kafka}" in written
        assert f"@127.0.0.1:{ports.dest_pg}/" in written
        assert _our_processes(home)
        status = run("status")
        assert status.returncode == 0 and status.stdout.count("running pid=") == 3
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert _our_processes(home) == []
    status = run("status")
    # The three services and `make monitor`'s Prometheus (never started here).
    assert status.returncode == 1 and status.stdout.count("stopped") == 4, status.stdout


def test_truncate_is_captured_as_deletes(service_env, clean_source):
    with contextlib.closing(psycopg2.connect(clean_source)) as conn, conn.cursor() as cur:
        cur.execute(PROJECT_DIR.joinpath("setup_db.sql").read_text())
        cur.execute("INSERT INTO employees (first_name) VALUES ('a'), ('b')")
        conn.commit()
        cur.execute("TRUNCATE employees")
        conn.commit()
        cur.execute("SELECT emp_id, action FROM emp_records_cdc ORDER BY action_id")
        assert cur.fetchall() == [(1, "INSERT"), (2, "INSERT"), (1, "DELETE"), (2, "DELETE")]
