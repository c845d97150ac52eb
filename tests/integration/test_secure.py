"""The pipeline through a secured setup (``CDC_SECURE=1``): Kafka only over SASL/SCRAM-SHA-512 +
TLS, PostgreSQL with ``sslmode=verify-full``, all against a CA made when the services start.

The daemons are configured only by the ``.env`` file in their working folder (``KAFKA_*``
variables for librdkafka, ``sslmode`` in the URLs), as a user would point them at a secured
production cluster; ``python -m cdc top`` finds both daemons' metrics through the same file. A
wrong password or an untrusted certificate stops a daemon with one line and no secret in any log
line (nor on top's screen).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from cdc.kafka.client import admin_client, base_config, ensure_topics
from cdc.local.paths import PROJECT_DIR
from cdc.local.ports import Ports
from cdc.local.runner import Daemon
from cdc.local.services import LocalServices
from cdc.local.tls import make_ca
from cdc.ops.verify import verify
from cdc.ops.workload import Workload
from cdc.runtime.settings import Settings, load_settings
from tests.support import clean_dest, clean_source, dlq_count, query, wait_until

pytestmark = pytest.mark.daemon

PG_PASSWORD = "pg-" + secrets.token_hex(8)
KAFKA_PASSWORD = "kafka-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    os.environ["CDC_KAFKA_PASSWORD"] = KAFKA_PASSWORD
    try:
        services = LocalServices(
            home=tmp_path_factory.mktemp("secure"),
            ports=Ports.free(secure=True),
            password=PG_PASSWORD,
            secure=True,
        )
    finally:
        del os.environ["CDC_KAFKA_PASSWORD"]
    try:
        services.up()
        yield services
    finally:
        services.down()


def base_env() -> dict[str, str]:
    """The process environment with nothing of ours in it: settings come from .env only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "CDC_", "CONSUMER_", "PRODUCER_", "METRICS_", "SOURCE_", "DEST_"))
    }
    return {**env, "PYTHONUNBUFFERED": "1"}


def write_env(folder: Path, values: dict[str, str]) -> Settings:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return load_settings(env={}, dotenv_path=folder / ".env")


@pytest.fixture
def env_values(secure: LocalServices) -> dict[str, str]:
    clean_source(secure.source.url)
    clean_dest(secure.dest.url)
    tag = uuid.uuid4().hex[:8]
    return {
        **secure.env(),
        "CDC_TOPIC": f"secure_{tag}",
        "CDC_DLQ_TOPIC": f"secure_{tag}_dlq",
        "CONSUMER_GROUP_ID": f"secure_{tag}",
        "STATS_INTERVAL": "2",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusals(log: str) -> list[str]:
    """The daemon's own error lines about a refused Kafka connection (librdkafka's own log
    lines about the failed handshake may come before them)."""
    return [ln for ln in log.splitlines() if " ERROR " in ln and "refused the connection" in ln]


def assert_no_secret(*logs: str) -> None:
    for text in logs:
        assert KAFKA_PASSWORD not in text
        assert PG_PASSWORD not in text


def test_whole_pipeline_over_sasl_and_tls(secure: LocalServices, env_values: dict[str, str], tmp_path: Path):
    assert env_values["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert (
        "sslmode=verify-full" in env_values["SOURCE_DB_URL"]
        and "sslmode=verify-full" in env_values["DEST_DB_URL"]
    )
    # Both daemons serve their metrics, each on its own port from the same .env, for `top`.
    settings = write_env(
        tmp_path,
        {**env_values, "PRODUCER_METRICS_PORT": str(free_port()), "CONSUMER_METRICS_PORT": str(free_port())},
    )
    producer = Daemon("producer.py", base_env(), tmp_path).start()
    consumer = Daemon("consumer_final.py", base_env(), tmp_path).start()
    try:
        workload = Workload(settings.source_db_url, rate=200, writers=2, seed=11, max_changes=600)
        workload.run(30)
        # A poison message through the secured listener ends on the DLQ, read back the same way.
        wait_until(lambda: len(admin_client(settings).list_topics(timeout=5).topics) >= 2, 30, "the topics")
        poison = Producer(base_config(settings))
        poison.produce(settings.cdc_topic, key=b"1", value=b"{not json")
        assert poison.flush(30) == 0
        result = verify(settings, wait=120, events=True)
        assert result.ok, "\n".join(result.lines()) + producer.log()[-3000:] + consumer.log()[-3000:]
        wait_until(lambda: dlq_count(settings) == 1, 60, "the poison on the DLQ")
        # Every session of the daemons on both servers is encrypted.
        for url in (settings.source_db_url, settings.dest_db_url):
            rows = query(
                url,
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
                " WHERE a.application_name LIKE 'cdc-%%'",
            )
            assert rows and all(ssl for _, ssl in rows), rows
        shown = Daemon("consumer_final.py", base_env(), tmp_path / "show", "--show-dlq")
        (tmp_path / "show" / ".env").write_text((tmp_path / ".env").read_text())
        shown.start()
        assert shown.wait(60) == 0
        assert "{not json" in shown.output()
        # `top` finds both daemons from the same .env and shows what went through (the lag
        # gauge is refreshed every few seconds: it may take a screen or two to reach 0).
        screens: list[str] = []

        def top_caught_up() -> bool:
            done = subprocess.run(
                [sys.executable, "-m", "cdc", "--env-file", str(tmp_path / ".env"), "top", "--once"],
                cwd=tmp_path,
                env={**base_env(), "PYTHONPATH": str(PROJECT_DIR)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0 and done.stderr == "", done
            screens.append(done.stdout)
            return bool(re.search(r"^\s+lag\s+0\s*$", done.stdout, re.M))

        wait_until(top_caught_up, 30, "top showing the lag at 0", step=1)
        outbox = query(settings.source_db_url, "SELECT count(*) FROM emp_records_cdc")[0][0]
        assert re.search(rf"^\s+published\s+{outbox:,}\s", screens[-1], re.M), screens[-1]
        assert re.search(r"^\s+DLQ\s+1\s", screens[-1], re.M), screens[-1]
        assert producer.stop() == 0 and consumer.stop() == 0
    finally:
        producer.kill()
        consumer.kill()
    assert_no_secret(producer.log(), consumer.log(), *screens)


@pytest.mark.parametrize("script", ["producer.py", "consumer_final.py"])
def test_wrong_kafka_password_is_one_line_and_no_secret(
    secure: LocalServices, env_values: dict[str, str], tmp_path: Path, script: str
):
    wrong = "wrong-" + secrets.token_hex(6)
    write_env(tmp_path, {**env_values, "KAFKA_SASL_PASSWORD": wrong})
    daemon = Daemon(script, base_env(), tmp_path).start()
    try:
        assert daemon.wait(60) == 2, daemon.log()[-2000:]
    finally:
        daemon.kill()
    log = daemon.log()
    ours = refusals(log)
    assert len(ours) == 1 and "SASL authentication" in ours[0] and "KAFKA_SASL_PASSWORD" in ours[0], log
    assert "Traceback" not in log
    assert wrong not in log
    assert_no_secret(log)


def test_untrusted_kafka_certificate_is_one_line(
    secure: LocalServices, env_values: dict[str, str], tmp_path: Path
):
    other = make_ca(tmp_path / "other-ca")
    write_env(tmp_path, {**env_values, "KAFKA_SSL_CA_LOCATION": str(other.ca)})
    daemon = Daemon("consumer_final.py", base_env(), tmp_path).start()
    try:
        assert daemon.wait(60) == 2, daemon.log()[-2000:]
    finally:
        daemon.kill()
    errors = [ln for ln in daemon.log().splitlines() if " ERROR " in ln]
    assert (
        len(errors) == 1 and "certificate verify failed" in errors[0] and "KAFKA_SSL_CA_LOCATION" in errors[0]
    )
    assert "Traceback" not in daemon.log()


def test_untrusted_postgres_certificate_is_one_line(
    secure: LocalServices, env_values: dict[str, str], tmp_path: Path
):
    other = make_ca(tmp_path / "other-ca")
    dest = env_values["DEST_DB_URL"].split("&sslrootcert=")[0] + f"&sslrootcert={other.ca}"
    write_env(tmp_path, {**env_values, "DEST_DB_URL": dest})
    ensure_topics(write_env(tmp_path / "ok", env_values))
    daemon = Daemon("consumer_final.py", base_env(), tmp_path).start()
    try:
        assert daemon.wait(60) == 2, daemon.log()[-2000:]
    finally:
        daemon.kill()
    errors = [ln for ln in daemon.log().splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "certificate verify failed" in errors[0], daemon.log()[-2000:]
    assert_no_secret(daemon.log())
