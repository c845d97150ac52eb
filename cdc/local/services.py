"""``LocalServices``: Kafka and the source and destination PostgreSQL, together under one folder.

Used by ``make up`` / ``make down`` / ``make status`` (``python -m cdc up|down|status``) and by the
test fixtures, which start their own copy on free ports under a temporary folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from pathlib import Path

from cdc.errors import ServiceError
from cdc.local.kafka import KafkaCluster
from cdc.local.paths import SETUP_DEST_SQL, SETUP_ROLES_DEST_SQL, SETUP_ROLES_SOURCE_SQL, SETUP_SOURCE_SQL
from cdc.local.ports import Ports
from cdc.local.postgres import PostgresServer
from cdc.local.tls import Certificates, make_ca

# The daemons' least-privilege roles: (role, server) pairs; see the setup_roles_*.sql files.
ROLES = {"cdc_producer": "source", "cdc_consumer": "dest"}
PG_PASSWORD_DEFAULT = "postgres"
SOURCE_DB = "cdc_source"
DEST_DB = "cdc_dest"


class LocalServices:
    """The three services of the pipeline under one folder (``home``)."""

    def __init__(
        self,
        *,
        home: Path,
        ports: Ports | None = None,
        password: str | None = None,
        pg_settings: dict[str, str] | None = None,
        brokers: int | None = None,
        secure: bool | None = None,
    ) -> None:
        """``pg_settings``: extra settings for both PostgreSQL servers (the benchmarks use it).
        ``brokers``: Kafka nodes (default: ``CDC_KAFKA_BROKERS``, else what runs, else 1).
        ``secure``: clients reach Kafka only over SASL/SCRAM-SHA-512 + TLS and PostgreSQL with
        ``sslmode=verify-full``, all against a CA made here (default: ``CDC_SECURE``, else what
        runs, else off)."""
        self.home = home.resolve()
        self.statefile = self.home / "services.json"
        saved = self._load_state()
        if ports is None:
            if saved and not _ports_in_env():
                ports = Ports(**{**saved["ports"], "extra": tuple(saved["ports"].get("extra", ()))})
            else:
                ports = Ports.from_env()
        self.ports = ports
        self.brokers = brokers or _brokers_from_env() or (saved or {}).get("brokers") or 1
        self.password = password or os.environ.get("CDC_PG_PASSWORD") or PG_PASSWORD_DEFAULT
        if secure is None:
            secure = _secure_from_env()
        self.secure = bool((saved or {}).get("secure")) if secure is None else secure
        self.tls = Certificates(self.home / "tls") if self.secure else None
        self.kafka_user = "cdc"
        self.kafka_password = self._kafka_password() if self.secure else ""
        self.kafka = KafkaCluster(
            home=self.home,
            nodes=ports.kafka_nodes(self.brokers),
            sasl_ports=ports.sasl_ports(self.brokers) if self.secure else None,
            tls=self.tls,
            scram=(self.kafka_user, self.kafka_password) if self.secure else None,
        )
        self.source = PostgresServer(
            name="source",
            home=self.home,
            port=ports.source_pg,
            dbname=SOURCE_DB,
            password=self.password,
            settings=pg_settings,
            tls=self.tls,
        )
        self.dest = PostgresServer(
            name="dest",
            home=self.home,
            port=ports.dest_pg,
            dbname=DEST_DB,
            password=self.password,
            settings=pg_settings,
            tls=self.tls,
        )

    def _load_state(self) -> dict | None:
        try:
            return json.loads(self.statefile.read_text())
        except (OSError, ValueError):
            return None

    def _kafka_password(self) -> str:
        """The SCRAM password of the Kafka user: ``CDC_KAFKA_PASSWORD``, else one made once."""
        given = os.environ.get("CDC_KAFKA_PASSWORD")
        if given:
            return given
        path = self.home / "tls" / "kafka-password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(base64.urlsafe_b64encode(os.urandom(18)).decode())
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        env = {
            "SOURCE_DB_URL": self.source.url,
            "DEST_DB_URL": self.dest.url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap,
        }
        if self.secure:
            assert self.tls is not None
            env.update(
                {
                    "KAFKA_BOOTSTRAP_SERVERS": self.kafka.secure_bootstrap,
                    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                    "KAFKA_SASL_MECHANISMS": "SCRAM-SHA-512",
                    "KAFKA_SASL_USERNAME": self.kafka_user,
                    "KAFKA_SASL_PASSWORD": self.kafka_password,
                    "KAFKA_SSL_CA_LOCATION": str(self.tls.ca),
                }
            )
        # Always written, so .env follows a switch between one broker and the cluster.
        env["CDC_TOPIC_REPLICATION_FACTOR"] = str(min(3, self.brokers))
        return env

    def up(self, *, apply_schema: bool = True) -> dict[str, float]:
        """Start whatever is not running, wait until all three answer, apply the setup SQL.

        Returns how long each part took, in seconds.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        saved = (self._load_state() or {}).get("brokers", 1)
        if saved != self.brokers and self.kafka.brokers[0].cluster_id() is not None:
            raise ServiceError(
                f"the local Kafka data in {self.home} belongs to a {saved}-broker setup; "
                f"`make down && make clean` (deletes it) to switch to {self.brokers}"
            )
        if self.secure:
            make_ca(self.home / "tls")
        timings = {}
        t = time.monotonic()
        self.source.start()
        self.dest.start()
        timings["postgres"] = time.monotonic() - t
        t = time.monotonic()
        self.kafka.start()
        timings["kafka"] = time.monotonic() - t
        state = {
            "ports": {**self.ports.__dict__, "extra": list(self.ports.extra)},
            "brokers": self.brokers,
            "secure": self.secure,
        }
        self.statefile.write_text(json.dumps(state, indent=1))
        if apply_schema:
            self.source.apply_sql(SETUP_SOURCE_SQL)
            self.dest.apply_sql(SETUP_DEST_SQL)
            self.source.apply_sql(SETUP_ROLES_SOURCE_SQL)
            self.dest.apply_sql(SETUP_ROLES_DEST_SQL)
            self._set_role_passwords()
        return timings

    def role_passwords(self) -> dict[str, str]:
        """The daemons' role passwords, made once and kept (mode 0600) under ``home``."""
        path = self.home / "role-passwords.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if set(saved) != set(ROLES):
            saved = {role: base64.urlsafe_b64encode(os.urandom(12)).decode() for role in ROLES}
            path.write_text(json.dumps(saved))
            path.chmod(0o600)
        return saved

    def _set_role_passwords(self) -> None:
        import psycopg2
        from psycopg2 import sql

        for role, password in self.role_passwords().items():
            server = self.source if ROLES[role] == "source" else self.dest
            with contextlib.closing(psycopg2.connect(server.url)) as conn, conn.cursor() as cur:
                cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(role)), (password,))
                conn.commit()

    def role_env(self) -> dict[str, str]:
        """``env()`` with the daemons' least-privilege roles in the URLs: the producer's source
        URL as cdc_producer, the consumer's destination URL as cdc_consumer."""
        passwords = self.role_passwords()
        return {
            **self.env(),
            "SOURCE_DB_URL": self.source.url_as("cdc_producer", passwords["cdc_producer"]),
            "DEST_DB_URL": self.dest.url_as("cdc_consumer", passwords["cdc_consumer"]),
        }

    def down(self) -> None:
        errors = []
        for stop in (self.kafka.stop, self.source.stop, self.dest.stop):
            try:
                stop()
            except ServiceError as exc:
                errors.append(str(exc))
        if errors:
            raise ServiceError("; ".join(errors))

    def status_lines(self) -> list[str]:
        return [*self.kafka.status_lines(), self.source.status(), self.dest.status()]

    def all_running(self) -> bool:
        return self.kafka.running() and self.source.running() and self.dest.running()


def _secure_from_env() -> bool | None:
    raw = os.environ.get("CDC_SECURE", "").strip().lower()
    if not raw:
        return None
    if raw not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ServiceError(f"CDC_SECURE={raw!r}: 1 (SASL/TLS and sslmode=verify-full) or 0")
    return raw in ("1", "true", "yes", "on")


def _brokers_from_env() -> int | None:
    raw = os.environ.get("CDC_KAFKA_BROKERS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in (1, 3):
        raise ServiceError(f"CDC_KAFKA_BROKERS={raw!r}: 1 (one broker) or 3 (a replicated cluster)")
    return int(raw)


def _ports_in_env() -> bool:
    return any(
        os.environ.get(n)
        for n in ("CDC_KAFKA_PORT", "CDC_KAFKA_CONTROLLER_PORT", "CDC_SOURCE_PG_PORT", "CDC_DEST_PG_PORT")
    )
