"""Markers by folder, and the session's services with per-test settings and tables.

Markers: every test under ``integration/`` is marked ``integration``, every test under ``faults/``
``integration`` and ``fault``; a test under ``unit/`` may carry neither. ``daemon`` (runs
producer.py / consumer_final.py as subprocesses) and ``prometheus`` (needs promtool and prometheus)
are set by the tests themselves.

Services: if SOURCE_DB_URL, DEST_DB_URL and KAFKA_BOOTSTRAP_SERVERS are all set in the environment,
those services are used as they are. Otherwise the fixtures start a private broker and two private
PostgreSQL servers on free loopback ports under a temporary folder, and stop them at the end. Tests
that stop, kill or restart services ask for ``local_services`` (through ``private_settings`` or
``private``), which is always private.

Each test gets its own topic names and consumer group (``settings``, or ``private_settings`` on the
private services) and empty tables (``clean_source`` / ``clean_dest``, or both with ``private``), so
tests do not leak into each other. ``producers`` and ``consumers`` start the daemons as
subprocesses and kill what is left after the test. The helpers behind these fixtures are in
``tests/support``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc.local.ports import Ports
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings
from tests import support

ENV_KEYS = ("SOURCE_DB_URL", "DEST_DB_URL", "KAFKA_BOOTSTRAP_SERVERS")
TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"unit": (), "integration": ("integration",), "faults": ("integration", "fault")}


@pytest.hookimpl(tryfirst=True)  # before -m selects on them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue  # not one of this suite's files
        if folder not in FOLDER_MARKERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in {', '.join(FOLDER_MARKERS)}")
        marks = FOLDER_MARKERS[folder]
        for name in ("integration", "fault"):
            if name not in marks and item.get_closest_marker(name):
                raise pytest.UsageError(f"{item.nodeid}: marked {name} but not in a folder that means it")
        for name in marks:
            item.add_marker(name)


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
def private(private_settings: Settings, local_services: LocalServices) -> Iterator[Settings]:
    """``private_settings`` with both databases emptied; whatever the test stopped is started again
    after it."""
    support.clean_source(private_settings.source_db_url)
    support.clean_dest(private_settings.dest_db_url)
    yield private_settings
    local_services.up()


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


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[support.Daemons]:
    """Starts consumer_final.py subprocesses (``consumers.start(consumer_env(...), *args)``); every
    one is killed at the end of the test."""
    started = support.Daemons("consumer_final.py", tmp_path)
    yield started
    started.kill_all()
