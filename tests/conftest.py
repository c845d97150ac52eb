"""Session fixtures: real Kafka and PostgreSQL, started once per test session.

If SOURCE_DB_URL, DEST_DB_URL and KAFKA_BOOTSTRAP_SERVERS are all set in the environment, those
services are used as they are. Otherwise the fixtures start a private broker and two private
PostgreSQL servers on free loopback ports under a temporary folder, and stop them at the end.
Tests that kill or restart services (marked ``fault``) ask for ``local_services``, which is
always private.

Each test gets its own topic names and consumer group (``settings``) and empty tables
(``clean_source`` / ``clean_dest``), so tests do not leak into each other.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from cdc.kafka import admin_client, ensure_topics
from cdc.services import LocalServices, Ports
from cdc.settings import Settings, load_settings

ENV_KEYS = ("SOURCE_DB_URL", "DEST_DB_URL", "KAFKA_BOOTSTRAP_SERVERS")


def _start_private(home: Path) -> LocalServices:
    services = LocalServices(home=home, ports=Ports.free())
    try:
        services.up()
    except BaseException:
        services.down()
        raise
    return services


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    """Private services this session controls (tests may stop, kill and restart them)."""
    services = _start_private(tmp_path_factory.mktemp("services"))
    yield services
    services.down()


@pytest.fixture(scope="session")
def service_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """URLs of the services the tests talk to: the environment's, else the private ones."""
    if all(os.environ.get(k) for k in ENV_KEYS):
        return {k: os.environ[k] for k in ENV_KEYS}
    services: LocalServices = request.getfixturevalue("local_services")
    return services.env()


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    """Settings pointing at the test services, with a fresh topic pair and group for this test."""
    tag = uuid.uuid4().hex[:10]
    s = load_settings(
        env={**service_env, "LOG_LEVEL": "INFO"},
        dotenv_path=None,
        cdc_topic=f"cdc_test_{tag}",
        cdc_dlq_topic=f"cdc_test_{tag}_dlq",
        consumer_group_id=f"cdc_test_group_{tag}",
        topic_partitions=3,
    )
    ensure_topics(s, admin_client(s))
    return s


def _truncate(url: str, statement: str) -> None:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(statement)
        conn.commit()


@pytest.fixture
def clean_source(service_env: dict[str, str]) -> str:
    """An empty source database (employees, outbox, cursor reset). Returns its URL."""
    url = service_env["SOURCE_DB_URL"]
    _truncate(
        url,
        "TRUNCATE employees, emp_records_cdc RESTART IDENTITY;"
        " UPDATE cdc_producer_state SET last_txid = '0', last_action_id = 0, published_total = 0;",
    )
    return url


@pytest.fixture
def clean_dest(service_env: dict[str, str]) -> str:
    """An empty destination database. Returns its URL."""
    url = service_env["DEST_DB_URL"]
    _truncate(url, "TRUNCATE employees, processed_events, emp_versions;")
    return url
