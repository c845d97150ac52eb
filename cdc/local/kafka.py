"""The local Kafka: one KRaft node (``KafkaBroker``) or a cluster of them (``KafkaCluster``)."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from cdc.errors import ServiceError
from cdc.local.jars import kafka_lib_dir, resolve_kafka_jars
from cdc.local.paths import KAFKA_LOG4J
from cdc.local.ports import port_open
from cdc.local.processes import START_TIMEOUT, STOP_TIMEOUT, pid_alive, read_pid, terminate
from cdc.local.tls import Certificates

KAFKA_HEAP = "-Xms256m -Xmx512m"


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
        secure_ports = [self.sasl_port] if self.secure and self.sasl_port is not None else []
        for port in (self.port, self.controller_port, *secure_ports):
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
