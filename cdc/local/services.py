"""Real local services without Docker: one Apache Kafka broker (KRaft) and two PostgreSQL servers.

Used by ``make up`` / ``make down`` / ``make status`` (``python -m cdc up|down|status``) and by the
test fixtures, which start their own copy on free ports under a temporary folder.

- Kafka jars are resolved from Maven Central by ``mvn`` into ``<home>/kafka-lib`` (cached), or
  taken from ``$KAFKA_HOME/libs`` when that is set.
- PostgreSQL binaries are Debian's (``/usr/lib/postgresql/<v>/bin``) or ``$PG_BIN``. PostgreSQL
  refuses to run as root, so as root every server command runs as the ``postgres`` user.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cdc.errors import ServiceError
from cdc.local.tls import Certificates, make_ca

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
KAFKA_POM = PROJECT_DIR / "services" / "kafka" / "pom.xml"
KAFKA_LOG4J = PROJECT_DIR / "services" / "kafka" / "log4j2.properties"
SETUP_SOURCE_SQL = PROJECT_DIR / "setup_db.sql"
SETUP_DEST_SQL = PROJECT_DIR / "setup_db_with_idempotency.sql"
SETUP_ROLES_SOURCE_SQL = PROJECT_DIR / "setup_roles_source.sql"
SETUP_ROLES_DEST_SQL = PROJECT_DIR / "setup_roles_dest.sql"
# The daemons' least-privilege roles: (role, server) pairs; see the setup_roles_*.sql files.
ROLES = {"cdc_producer": "source", "cdc_consumer": "dest"}

PG_USER = "postgres"
PG_PASSWORD_DEFAULT = "postgres"
SOURCE_DB = "cdc_source"
DEST_DB = "cdc_dest"
KAFKA_HEAP = "-Xms256m -Xmx512m"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Ports:
    kafka: int = 9092
    controller: int = 9093
    source_pg: int = 5432
    dest_pg: int = 5433
    # Brokers 2..n of a local cluster: (broker, controller) port pairs, flattened.
    extra: tuple[int, ...] = ()

    def kafka_nodes(self, count: int) -> list[tuple[int, int]]:
        """(broker port, controller port) of each node of a ``count``-node cluster."""
        nodes = [(self.kafka, self.controller)]
        for k in range(1, count):
            if len(self.extra) >= 2 * k:
                nodes.append((self.extra[2 * k - 2], self.extra[2 * k - 1]))
            else:  # next to the first node's ports: 9094/9095, 9096/9097 by default
                nodes.append((self.kafka + 2 * k, self.controller + 2 * k))
        return nodes

    @classmethod
    def from_env(cls) -> Ports:
        def port(name: str, default: int) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise ServiceError(f"{name}={raw!r} is not a TCP port")
            return int(raw)

        return cls(
            kafka=port("CDC_KAFKA_PORT", cls.kafka),
            controller=port("CDC_KAFKA_CONTROLLER_PORT", cls.controller),
            source_pg=port("CDC_SOURCE_PG_PORT", cls.source_pg),
            dest_pg=port("CDC_DEST_PG_PORT", cls.dest_pg),
        )

    def sasl_ports(self, count: int) -> list[int]:
        """The SASL_SSL listener port of each node: after the node pairs in ``extra``, else the
        node's broker port + 100 (9192 by default)."""
        pairs = 2 * (count - 1)
        if len(self.extra) >= pairs + count:
            return list(self.extra[pairs : pairs + count])
        return [port + 100 for port, _ in self.kafka_nodes(count)]

    @classmethod
    def free(cls, brokers: int = 1, secure: bool = False) -> Ports:
        """Distinct free loopback ports for the services (two more per extra broker, one more
        per broker with the SASL_SSL listener), for tests."""
        socks = []
        try:
            for _ in range(4 + 2 * (brokers - 1) + (brokers if secure else 0)):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
            return cls(*ports[:4], extra=tuple(ports[4:]))
        finally:
            for s in socks:
                s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class PostgresServer:
    """One PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        *,
        name: str,
        home: Path,
        port: int,
        dbname: str,
        password: str,
        settings: dict[str, str] | None = None,
        tls: Certificates | None = None,
    ) -> None:
        self.name = name
        self.settings = dict(settings or {})  # extra server settings (-c name=value) at start
        self.tls = tls  # TLS on, with this server certificate
        self.datadir = home / f"pg-{name}"
        self.logfile = home / "logs" / f"pg-{name}.log"
        self.port = port
        self.dbname = dbname
        self.password = password
        self._bindir: Path | None = None

    @property
    def url(self) -> str:
        """The URL clients use: with TLS, ``sslmode=verify-full`` against the local CA."""
        url = self._url(self.dbname)
        if self.tls:
            url += f"?sslmode=verify-full&sslrootcert={quote(str(self.tls.ca), safe='/')}"
        return url

    def _url(self, dbname: str, user: str = PG_USER, password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{dbname}"

    def url_as(self, user: str, password: str) -> str:
        """``url`` for another role (TLS parameters kept)."""
        return self._url(self.dbname, user, password) + self.url[len(self._url(self.dbname)) :]

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    def _run(
        self, *args: str, check: bool = True, timeout: float = START_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ServiceError(
                f"postgres {self.name}: {' '.join(args[:2])} failed: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            )
        return proc

    def pid(self) -> int | None:
        pid = read_pid(self.datadir / "postmaster.pid")
        return pid if pid and pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        pwfile = self.datadir.parent / f".pw-{self.name}"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        try:
            if os.geteuid() == 0:
                pg = pwd.getpwnam("postgres")
                for path in (self.datadir, pwfile):
                    os.chown(path, pg.pw_uid, pg.pw_gid)
                _make_traversable(self.datadir.parent)
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# cdc local service\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\n"
                "max_connections = 200\n"
                # Speed for a throwaway dev server: these only matter if the machine itself
                # crashes. synchronous_commit stays on, so a killed server loses no commit.
                "fsync = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 128MB\n"
            )

    def start(self) -> None:
        if self.running():
            return
        if port_open(self.port):
            raise ServiceError(
                f"postgres {self.name}: port {self.port} is already in use by another program; "
                f"choose another with CDC_{self.name.upper()}_PG_PORT"
            )
        self.init()
        settings = dict(self.settings)
        if self.tls:
            # The server reads its key only if the server's user owns it with mode 0600.
            for src, dst in ((self.tls.cert, "server.crt"), (self.tls.key, "server.key")):
                shutil.copyfile(src, self.datadir / dst)
                (self.datadir / dst).chmod(0o600)
                if os.geteuid() == 0:
                    pg = pwd.getpwnam("postgres")
                    os.chown(self.datadir / dst, pg.pw_uid, pg.pw_gid)
            settings.update({"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            self.logfile.touch()
            os.chown(self.logfile, pg.pw_uid, pg.pw_gid)
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            # Prepared transactions on: the producer's horizon warning must be testable with one.
            " ".join(
                [f"-p {self.port} -c max_prepared_transactions=10"]
                + [f"-c {k}={v}" for k, v in settings.items()]
            ),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        self._ensure_database()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. ``mode`` is pg_ctl's: smart, fast or immediate (a crash, no checkpoint)."""
        if not self.running():
            return
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(STOP_TIMEOUT)),
            "stop",
            timeout=STOP_TIMEOUT + 10,
        )

    def _ensure_database(self) -> None:
        import psycopg2
        from psycopg2 import sql

        with contextlib.closing(psycopg2.connect(self._url("postgres"))) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))

    def apply_sql(self, path: Path) -> None:
        apply_sql(self.url, path)

    def status(self) -> str:
        pid = self.pid()
        state = f"running pid={pid}" if pid else "stopped"
        return (
            f"postgres-{self.name:<6} {state:<22} 127.0.0.1:{self.port} db={self.dbname} data={self.datadir}"
        )


def apply_sql(url: str, path: Path) -> None:
    """Run a setup SQL file in one round trip; its own BEGIN/COMMIT make it one transaction."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(path.read_text())


class KafkaBroker:
    """One KRaft node in combined mode (broker + controller in one JVM) on 127.0.0.1.

    Alone (the default) it is a single-node cluster; ``KafkaCluster`` runs several that share
    ``voters``.
    """

    def __init__(
        self,
        *,
        home: Path,
        port: int,
        controller_port: int,
        node_id: int = 1,
        voters: str | None = None,
        cluster_size: int = 1,
        sasl_port: int | None = None,
        tls: Certificates | None = None,
        scram: tuple[str, str] | None = None,
    ) -> None:
        self.home = home
        self.node_id = node_id
        # Opt-in: a SASL_SSL listener (SCRAM-SHA-512 over TLS) for clients, next to PLAINTEXT.
        self.sasl_port = sasl_port
        self.tls = tls
        self.scram = scram  # (user, password) created when the storage is formatted
        self.voters = voters or f"{node_id}@127.0.0.1:{controller_port}"
        self.cluster_size = cluster_size
        self.dir = home / ("kafka" if node_id == 1 else f"kafka-{node_id}")
        self.datadir = self.dir / "data"
        self.logdir = home / "logs" if node_id == 1 else home / "logs" / f"kafka-{node_id}"
        self.config = self.dir / "server.properties"
        self.pidfile = self.dir / "broker.pid"
        self.port = port
        self.controller_port = controller_port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def classpath(self) -> str:
        kafka_home = os.environ.get("KAFKA_HOME")
        if kafka_home:
            libs = Path(kafka_home) / "libs"
            if not libs.is_dir():
                raise ServiceError(f"KAFKA_HOME={kafka_home} has no libs/ folder")
            return f"{libs}/*"
        return f"{resolve_kafka_jars(kafka_lib_dir())}/*"

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid and pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def _java(self) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise ServiceError(
                "java not found: install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
            )
        return [java, "-cp", self.classpath()]

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # Internal topics replicated like the data topics: three copies, two needed to write.
        rf = min(3, self.cluster_size)
        isr = 2 if rf >= 3 else 1
        self.config.write_text(
            "process.roles=broker,controller\n"
            f"node.id={self.node_id}\n"
            f"controller.quorum.voters={self.voters}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            f"{f',SASL_SSL://127.0.0.1:{self.sasl_port}' if self.secure else ''}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}"
            f"{f',SASL_SSL://127.0.0.1:{self.sasl_port}' if self.secure else ''}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL\n"
            f"{self._sasl_config()}"
            f"log.dirs={self.datadir}\n"
            "num.partitions=6\n"
            f"default.replication.factor={rf}\n"
            f"min.insync.replicas={isr}\n"
            f"offsets.topic.replication.factor={rf}\n"
            "offsets.topic.num.partitions=10\n"
            f"transaction.state.log.replication.factor={rf}\n"
            f"transaction.state.log.min.isr={isr}\n"
            f"share.coordinator.state.topic.replication.factor={rf}\n"
            f"share.coordinator.state.topic.min.isr={isr}\n"
            "group.initial.rebalance.delay.ms=0\n"
            "auto.create.topics.enable=false\n"
            "log.retention.hours=168\n"
            "log.segment.bytes=67108864\n"
        )

    @property
    def secure(self) -> bool:
        return self.sasl_port is not None and self.tls is not None

    def _sasl_config(self) -> str:
        if not self.secure:
            return ""
        assert self.tls is not None
        return (
            "sasl.enabled.mechanisms=SCRAM-SHA-512\n"
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
            "listener.name.sasl_ssl.ssl.keystore.type=PEM\n"
            f"listener.name.sasl_ssl.ssl.keystore.location={self.tls.bundle}\n"
        )

    def cluster_id(self) -> str | None:
        """The id this node's storage was formatted with, None before the first start."""
        with contextlib.suppress(OSError):
            for line in (self.datadir / "meta.properties").read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.split("=", 1)[1].strip()
        return None

    def _format(self, cluster_id: str | None = None) -> None:
        if (self.datadir / "meta.properties").exists():
            return
        cluster_id = cluster_id or new_cluster_id()
        # One argv element: an id starting with "-" (1 in 64) must not be read as an option.
        cmd = [
            *self._java(),
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            f"--config={self.config}",
        ]
        if self.secure and self.scram:
            user, password = self.scram
            cmd.append(f"--add-scram=SCRAM-SHA-512=[name={user},password={password}]")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()[-500:]
            if self.scram:
                detail = detail.replace(self.scram[1], "***")
            raise ServiceError(f"kafka storage format failed: {detail}")

    def start(self) -> None:
        if self.running():
            return
        self._wait_ready(self.launch())

    def launch(self, cluster_id: str | None = None) -> subprocess.Popen[bytes]:
        """Configure, format if new, and start the JVM; ``_wait_ready`` waits for it."""
        for port in (self.port, self.controller_port, *([self.sasl_port] if self.secure else [])):
            if port_open(port):
                raise ServiceError(
                    f"kafka: port {port} is already in use by another program; "
                    "choose others with CDC_KAFKA_PORT / CDC_KAFKA_CONTROLLER_PORT"
                )
        self._write_config()
        self._format(cluster_id)
        cmd = [
            *KAFKA_HEAP.split(),
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.logdir}",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
        ]
        java = self._java()
        out = open(self.logdir / "kafka-stdout.log", "ab")  # noqa: SIM115 - handed to the child
        with out:
            proc = subprocess.Popen(
                [java[0], *cmd, *java[1:], "kafka.Kafka", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"kafka broker exited with {proc.returncode}; see {self.logdir / 'server.log'}"
                )
            if port_open(self.port):
                try:
                    md = admin.list_topics(timeout=2)
                    if md.brokers:
                        return
                except Exception:  # noqa: BLE001 - not ready yet
                    pass
            time.sleep(0.2)
        raise ServiceError(
            f"kafka broker not ready after {START_TIMEOUT:.0f}s; see {self.logdir / 'server.log'}"
        )

    def stop(self, hard: bool = False) -> None:
        """Stop the broker: SIGTERM and wait (clean), or SIGKILL (``hard``, a crash)."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        terminate(pid, hard=hard, timeout=STOP_TIMEOUT)
        self.pidfile.unlink(missing_ok=True)

    def rss_mb(self) -> float | None:
        pid = self.pid()
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def status(self) -> str:
        pid = self.pid()
        state = f"running pid={pid}" if pid else "stopped"
        name = "kafka" if self.cluster_size == 1 else f"kafka-{self.node_id}"
        return f"{name:<16} {state:<22} {self.bootstrap} controller=127.0.0.1:{self.controller_port}"


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class KafkaCluster:
    """``count`` KRaft nodes in combined mode (each a broker and a controller voter).

    Combined mode: three JVMs instead of six on a two-core machine, and a controller quorum that
    survives one lost node, like the brokers. One node is the plain single-node broker.
    """

    def __init__(
        self,
        *,
        home: Path,
        nodes: list[tuple[int, int]],
        sasl_ports: list[int] | None = None,
        tls: Certificates | None = None,
        scram: tuple[str, str] | None = None,
    ) -> None:
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(nodes, 1))
        self.brokers = [
            KafkaBroker(
                home=home,
                port=p,
                controller_port=c,
                node_id=i,
                voters=voters,
                cluster_size=len(nodes),
                sasl_port=sasl_ports[i - 1] if sasl_ports else None,
                tls=tls,
                scram=scram,
            )
            for i, (p, c) in enumerate(nodes, 1)
        ]

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT listeners (the services' own tools use them)."""
        return ",".join(b.bootstrap for b in self.brokers)

    @property
    def secure_bootstrap(self) -> str:
        """The SASL_SSL listeners, for clients, when the services run secured."""
        return ",".join(b.secure_bootstrap for b in self.brokers)

    def broker(self, node_id: int) -> KafkaBroker:
        return self.brokers[node_id - 1]

    def pid(self) -> int | None:
        return self.brokers[0].pid()

    def pids(self) -> dict[int, int]:
        return {b.node_id: pid for b in self.brokers if (pid := b.pid())}

    def running(self) -> bool:
        return all(b.running() for b in self.brokers)

    def start(self) -> None:
        """Start every node that is not running, then wait until all have joined the cluster."""
        if len(self.brokers) == 1:
            self.brokers[0].start()
            return
        cluster_id = next((cid for b in self.brokers if (cid := b.cluster_id())), None) or new_cluster_id()
        # All at once: a node alone cannot elect a controller, so none is ready before a majority runs.
        started = [(b, b.launch(cluster_id)) for b in self.brokers if not b.running()]
        for broker, proc in started:
            broker._wait_ready(proc)
        self._wait_members()

    def _wait_members(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + START_TIMEOUT
        seen = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                seen = len(admin.list_topics(timeout=2).brokers)
                if seen == len(self.brokers):
                    return
            time.sleep(0.2)
        raise ServiceError(
            f"kafka cluster: {seen} of {len(self.brokers)} brokers joined after {START_TIMEOUT:.0f}s"
        )

    def stop(self, hard: bool = False) -> None:
        """Stop every node: all signalled at once, so the last one is not left without a quorum."""
        pids = [(b, b.pid()) for b in self.brokers]
        sig = signal.SIGKILL if hard else signal.SIGTERM
        for _, pid in pids:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
        for broker, pid in pids:
            if pid is not None:
                terminate(pid, hard=hard, timeout=STOP_TIMEOUT)
            broker.pidfile.unlink(missing_ok=True)

    def rss_mb(self) -> float | None:
        values = [v for b in self.brokers if (v := b.rss_mb()) is not None]
        return sum(values) if values else None

    def status_lines(self) -> list[str]:
        return [b.status() for b in self.brokers]


def terminate(pid: int, *, hard: bool, timeout: float) -> None:
    # The service was started in its own session, so its process group is its pid.
    sig = signal.SIGKILL if hard else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)


def _make_traversable(path: Path) -> None:
    """Let the postgres user reach a data dir below a root-owned folder."""
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                p.chmod(mode | 0o001)
        except OSError:
            pass


def find_pg_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live: $PG_BIN, else the newest Debian install."""
    env = os.environ.get("PG_BIN")
    candidates = [Path(env)] if env else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True
    )
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(os.path.realpath(pg_ctl)).parent)
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise ServiceError(
        "PostgreSQL server binaries not found: install them (apt-get install postgresql) or set PG_BIN"
    )


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)


def kafka_lib_dir() -> Path:
    """Where the resolved broker jars are cached; shared by `make up` and the test fixtures."""
    return Path(os.environ.get("CDC_KAFKA_LIB") or PROJECT_DIR / ".cdc" / "kafka-lib")


def resolve_kafka_jars(libdir: Path) -> Path:
    """Resolve the broker's jars with Maven into ``libdir`` once; later calls reuse the cache."""
    stamp = libdir / ".resolved"
    pom_text = KAFKA_POM.read_text()
    # The stamp holds the pom it was resolved from, so a version bump re-resolves.
    if stamp.exists() and stamp.read_text() == pom_text:
        return libdir
    mvn = shutil.which("mvn")
    if not mvn:
        raise ServiceError("mvn not found: install Apache Maven (apt-get install maven) or set KAFKA_HOME")
    if not shutil.which("java"):
        raise ServiceError(
            "java not found: install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
        )
    log.info("resolving Kafka broker jars with Maven into %s", libdir)
    if libdir.exists():
        shutil.rmtree(libdir)
    libdir.mkdir(parents=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libdir}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise ServiceError(
            f"mvn could not resolve the Kafka jars: {(proc.stdout + proc.stderr).strip()[-800:]}"
        )
    stamp.write_text(pom_text)
    return libdir


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


# The daemons' metrics ports that `make up` writes into .env (each daemon reads its own, else
# METRICS_PORT): distinct, so both run on one machine, and what `make monitor` scrapes.
METRICS_PORTS = {"PRODUCER_METRICS_PORT": 9101, "CONSUMER_METRICS_PORT": 9102}


def metrics_ports(current: Mapping[str, str | None]) -> dict[str, str]:
    """``METRICS_PORTS`` as .env values: where ``current`` (the environment over the .env file)
    already sets a port, that one, so `make up` never moves a port the user chose. 0 (off, as in
    .env.example) counts as unset: `make up` prepares the daemons for `make monitor`."""
    chosen = {name: (current.get(name) or "").strip() for name in METRICS_PORTS}
    return {
        name: chosen[name] if chosen[name] not in ("", "0") else str(default)
        for name, default in METRICS_PORTS.items()
    }


def write_dotenv(path: Path, values: dict[str, str]) -> None:
    """Set ``values`` in a .env file, keeping every other line the user wrote there."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in values]
    kept += [f"{k}={v}" for k, v in values.items()]
    path.write_text("\n".join(kept) + "\n")
    path.chmod(0o600)
