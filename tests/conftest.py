"""Session fixtures: real Kafka and PostgreSQL, started once per test session.

If SOURCE_DB_URL, DEST_DB_URL and KAFKA_BOOTSTRAP_SERVERS are all set in the environment, those
services are used as they are. Otherwise the fixtures start a private broker and two private
PostgreSQL servers on free loopback ports under a temporary folder, and stop them at the end.
Tests that kill or restart services (marked ``fault``) ask for ``local_services``, which is
always private.

Each test gets its own topic names and consumer group (``settings``, or ``private_settings`` on the
private services) and empty tables (``clean_source`` / ``clean_dest``), so tests do not leak into
each other. ``producers`` starts producer.py subprocesses and kills what is left after the test.
The helpers behind these fixtures are in ``support.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import support

from cdc.local.ports import Ports
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings

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
    return support.fresh_settings(service_env)


@pytest.fixture
def private_settings(local_services: LocalServices) -> Settings:
    """Settings on the private services (which fault tests stop, kill and restart), with a fresh
    topic pair and group. Starts whatever a previous test left stopped."""
    local_services.up()
    return support.fresh_settings(local_services.env(), prefix="cdc_fault")


@pytest.fixture
def clean_source(service_env: dict[str, str]) -> str:
    """An empty source database (employees, outbox, cursor reset). Returns its URL."""
    return support.clean_source(service_env["SOURCE_DB_URL"])


@pytest.fixture
def clean_dest(service_env: dict[str, str]) -> str:
    """An empty destination database. Returns its URL."""
    return support.clean_dest(service_env["DEST_DB_URL"])


@pytest.fixture
def producers(tmp_path: Path) -> Iterator[support.Daemons]:
    """Starts producer.py subprocesses (``producers.start(producer_env(...), *args)``); every one
    is killed at the end of the test."""
    started = support.Daemons("producer.py", tmp_path, wait_timeout=30.0)
    yield started
    started.kill_all()
