"""Debezium as a contender: its PostgreSQL source connector (pgoutput) and its JDBC sink connector
(upsert, deletes applied) on one Kafka Connect standalone worker, all resolved from Maven Central.

- ``prepare()`` resolves the worker's classpath and one plugin folder per connector with ``mvn``
  from ``bench/debezium/pom.xml`` into ``.cdc/debezium`` (cached; re-resolved when a pom changes).
- ``setup()`` writes the worker and connector configs under ``env.home/debezium``, creates the
  publication (``public.employees`` only) and the change topic, starts the worker and creates both
  connectors over its REST API. The sink runs from the start (it has nothing to read yet).
  ``initial_load=False``: the source runs until its replication slot streams (``snapshot.mode=
  no_data``: capture starts at the slot), then it is paused: changes collect in the slot.
  ``initial_load=True``: the source is created paused (``snapshot.mode=initial``): its task does
  not start, so the slot and the snapshot are made only after ``resume()``.
- ``resume()`` resumes the source connector and waits for its task to run.

Tuning, as a user would set it (``bench/debezium/*.json``): the sink's ``batch.size`` (4000)
equals its consumer's ``max.poll.records`` and the source's ``max.batch.size``; the sink's
consumer fetches enough bytes for a whole batch (an event is about 3.6 KiB as JSON with schemas);
the sink's reduction buffer is on (one statement per key and batch); the source emits no
tombstones (the sink deletes on the ``d`` event); the source's producer sends 512 KiB batches
compressed with lz4, as the project's own producer does (the Java default of 16 KiB holds about
four events). One JVM, heap from 256 MiB up to 1 GiB. Converters: JSON with schemas (there is no
schema registry here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg2

from bench.contenders.base import BenchEnv
from cdc.local.paths import PROJECT_DIR

CONF_DIR = PROJECT_DIR / "bench" / "debezium"
POMS = ("pom.xml", "worker/pom.xml", "postgres/pom.xml", "jdbc/pom.xml")
LOG4J = CONF_DIR / "log4j2.properties"

BATCH_SIZE = 4000  # sink batch.size = consumer max.poll.records = source max.batch.size
HEAP = "1g"
RECORD_BYTES = 4096  # a change event as JSON with its schemas is about 3.6 KiB
START_TIMEOUT = 180.0  # the worker's JVM start and plugin scan, on a busy 2-core machine
TASK_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def cache_dir() -> Path:
    """Where the resolved jars live: ``worker/`` and ``plugins/<connector>/``."""
    return Path(os.environ.get("CDC_DEBEZIUM_LIB") or PROJECT_DIR / ".cdc" / "debezium")


def resolve_jars(libdir: Path) -> Path:
    """Resolve the worker and both connectors with Maven into ``libdir`` once; reuse it later."""
    stamp = libdir / ".resolved"
    poms = "".join((CONF_DIR / p).read_text() for p in POMS)
    if stamp.exists() and stamp.read_text() == poms:
        return libdir
    mvn = shutil.which("mvn")
    if not mvn:
        raise RuntimeError("mvn not found: install Apache Maven (apt-get install maven)")
    if not shutil.which("java"):
        raise RuntimeError(
            "java not found: install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
        )
    if libdir.exists():
        shutil.rmtree(libdir)
    libdir.mkdir(parents=True)
    proc = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(CONF_DIR / "pom.xml"),
            "dependency:copy-dependencies",
            f"-Ddbz.out={libdir}",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "[ERROR]" in ln] or lines or ["no output"]
        raise RuntimeError(
            f"mvn could not resolve the Debezium jars (exit {proc.returncode}): {errors[0][:400]}"
        )
    stamp.write_text(poms)
    return libdir


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "dbname": parts.path.lstrip("/"),
    }


def _template(name: str, values: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    """A connector config from ``bench/debezium/<name>`` with ``overrides`` set over it: each value
    filled in on its own (``$port``, ``$batch_size``, ... work in overrides too)."""
    raw = {**json.loads((CONF_DIR / name).read_text()), **overrides}
    return {k: string.Template(v).substitute(values) for k, v in raw.items()}


def _first_line(text: str | None) -> str:
    """A trace's first line, and its root cause (the last "Caused by:") when it has one."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return "no trace"
    causes = [ln for ln in lines if ln.startswith("Caused by:")]
    first = lines[0][:300]
    return f"{first} (root cause: {causes[-1][10:].strip()[:300]})" if causes else first


class Debezium:
    name = "debezium"
    uses_kafka = True
    needs_outbox = False

    def __init__(
        self,
        *,
        batch_size: int = BATCH_SIZE,
        heap: str = HEAP,
        source_overrides: dict[str, str] | None = None,
        sink_overrides: dict[str, str] | None = None,
    ) -> None:
        """``*_overrides``: connector config entries set over the templates (for experiments)."""
        self.batch_size = batch_size
        self.heap = heap
        self.source_overrides = dict(source_overrides or {})
        self.sink_overrides = dict(sink_overrides or {})
        self.libdir = cache_dir()
        self.env: BenchEnv | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.log: Path | None = None
        self.rest = ""
        self.id = ""
        self.source_name = self.sink_name = ""
        self.slot = self.publication = self.topic = ""
        self._checked = 0.0  # when check_alive last asked for the tasks' states

    # -- the interface -----------------------------------------------------------------------

    def prepare(self) -> None:
        resolve_jars(self.libdir)

    def setup(self, env: BenchEnv, *, initial_load: bool) -> None:
        if self.proc is not None:
            raise RuntimeError("debezium: setup called twice without stop")
        resolve_jars(self.libdir)
        self.env = env
        self.id = uuid.uuid4().hex[:10]
        self.source_name, self.sink_name = f"dbz-source-{self.id}", f"dbz-sink-{self.id}"
        self.slot, self.publication = f"dbz_{self.id}", f"dbz_{self.id}_pub"
        prefix = f"dbz_{self.id}"
        self.topic = f"{prefix}.public.employees"
        self.dir = env.home / "debezium"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "connect.log"
        for old in (self.log, self.dir / "connect-stdout.log"):
            old.unlink(missing_ok=True)  # this run's errors only

        # The publication: public.employees only, made by us (Debezium's is then left alone).
        with contextlib.closing(psycopg2.connect(env.source_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE PUBLICATION {self.publication} FOR TABLE public.employees")
        self._create_topic(env.bootstrap)

        port = _free_port()
        self.rest = f"http://127.0.0.1:{port}"
        worker = string.Template((CONF_DIR / "worker.properties").read_text()).substitute(
            bootstrap=env.bootstrap,
            rest_port=port,
            offsets_file=self.dir / "connect.offsets",
            plugin_path=self.libdir / "plugins",
            plugin_discovery="service_load",
        )
        (self.dir / "worker.properties").write_text(worker)
        source = _template(
            "source.json",
            {
                **_pg(env.source_url),
                "topic_prefix": prefix,
                "publication": self.publication,
                "slot": self.slot,
                "snapshot_mode": "initial" if initial_load else "no_data",
                "batch_size": str(self.batch_size),
                "queue_size": str(4 * self.batch_size),
            },
            self.source_overrides,
        )
        sink = _template(
            "sink.json",
            {
                **_pg(env.dest_url),
                "topic": self.topic,
                "batch_size": str(self.batch_size),
                # A change event is about 3.6 KiB as JSON with its schemas: one fetch holds a whole batch.
                "fetch_bytes": str(max(RECORD_BYTES * self.batch_size, 1 << 20)),
            },
            self.sink_overrides,
        )
        for name, config in ((self.source_name, source), (self.sink_name, sink)):
            shown = {k: ("***" if k.endswith("password") else v) for k, v in config.items()}
            (self.dir / f"{name}.json").write_text(json.dumps(shown, indent=1) + "\n")

        self._start_worker()
        try:
            # The sink first, running: it starts its JDBC pool now, untimed; it has nothing to read.
            self._create(self.sink_name, sink, paused=False)
            self._wait_task(self.sink_name, "RUNNING")
            if initial_load:
                # Paused from birth: the task is not started, so no slot and no snapshot until resume().
                self._create(self.source_name, source, paused=True)
                self._wait_connector(self.source_name, "PAUSED")
            else:
                self._create(self.source_name, source, paused=False)
                self._wait_task(self.source_name, "RUNNING")
                self._wait_slot_streaming()
                self._request("PUT", f"/connectors/{self.source_name}/pause")
                self._wait_task(self.source_name, "PAUSED")
        except BaseException:
            self.stop()
            raise

    def resume(self) -> None:
        if self.proc is None:
            raise RuntimeError("debezium: resume before setup")
        self._request("PUT", f"/connectors/{self.source_name}/resume")
        self._wait_task(self.source_name, "RUNNING")

    def processes(self) -> dict[str, int]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        return {"connect": self.proc.pid}

    def check_alive(self) -> None:
        """Raise RuntimeError if the worker died or a task failed (for the harness's wait loop).

        Cheap enough for a tight loop: the tasks' states are asked at most once a second.
        """
        if self.proc is None:
            return
        self._check_worker()
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        for name in (self.sink_name, self.source_name):
            status = self._status(name)
            for task in status.get("tasks", []) if status else []:
                if task.get("state") == "FAILED":
                    self._raise_failed(name, task)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        env, self.env = self.env, None
        if env is not None and self.slot:
            # Best effort: no slot left holding WAL on the source (the worker is gone, so it is idle).
            with (
                contextlib.suppress(psycopg2.Error),
                contextlib.closing(psycopg2.connect(env.source_url, connect_timeout=3)) as conn,
            ):
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name = %s AND NOT active",
                        (self.slot,),
                    )
                    cur.execute(f"DROP PUBLICATION IF EXISTS {self.publication}")

    # -- the worker --------------------------------------------------------------------------

    def _start_worker(self) -> None:
        assert self.dir is not None and self.log is not None
        java = shutil.which("java")
        if not java:
            raise RuntimeError("java not found: install a Java 17+ runtime")
        cmd = [
            java,
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J}",
            f"-Dconnect.log.file={self.log}",
            "-cp",
            f"{self.libdir / 'worker'}/*",
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(self.dir / "worker.properties"),
        ]
        with open(self.dir / "connect-stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_worker()
            try:
                with urllib.request.urlopen(self.rest + "/connectors", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"debezium: Kafka Connect REST not up after {START_TIMEOUT:.0f} s; see {self.log}"
                )
            time.sleep(0.5)

    def _check_worker(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            raise RuntimeError(
                f"debezium: Kafka Connect exited with {code}: {self._log_error()}; see {self.log}"
            )

    def _log_error(self) -> str:
        """The first ERROR line of the worker's log, for a one-line message."""
        for path in (self.log, self.dir / "connect-stdout.log" if self.dir else None):
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines() if path else []:
                    if " ERROR " in line or line.startswith("Exception") or "Error:" in line:
                        return line.strip()[:300]
        return "no ERROR line in its log"

    # -- REST --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list | None]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.rest + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw).get("message", "")
            except ValueError:
                message = raw.decode(errors="replace")
            detail = f" (log: {self._log_error()})" if exc.code >= 500 else ""
            raise RuntimeError(
                f"debezium: {method} {path} -> {exc.code}: {_first_line(message)}{detail}; see {self.log}"
            ) from None

    def _create(self, name: str, config: dict[str, str], *, paused: bool) -> None:
        body: dict = {"name": name, "config": config}
        if paused:
            body["initial_state"] = "PAUSED"
        self._request("POST", "/connectors", body)

    def _status(self, name: str) -> dict | None:
        try:
            _, status = self._request("GET", f"/connectors/{name}/status")
        except (RuntimeError, OSError):
            return None  # not created yet, or the worker is busy (the caller checks the JVM)
        return status if isinstance(status, dict) else None

    def _raise_failed(self, name: str, task: dict) -> None:
        raise RuntimeError(
            f"debezium: {name} task {task.get('id')} FAILED: {_first_line(task.get('trace'))}; see {self.log}"
        )

    def _wait_task(self, name: str, state: str, timeout: float = TASK_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        seen = "no status"
        while True:
            self._check_worker()
            status = self._status(name)
            if status:
                connector = status.get("connector", {})
                if connector.get("state") == "FAILED":
                    raise RuntimeError(
                        f"debezium: connector {name} FAILED: {_first_line(connector.get('trace'))}; see {self.log}"
                    )
                tasks = status.get("tasks", [])
                for task in tasks:
                    if task.get("state") == "FAILED":
                        self._raise_failed(name, task)
                seen = ",".join(t.get("state", "?") for t in tasks) or "no task"
                if tasks and all(t.get("state") == state for t in tasks):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"debezium: {name} task not {state} after {timeout:.0f} s ({seen}); see {self.log}"
                )
            time.sleep(0.1)

    def _wait_connector(self, name: str, state: str, timeout: float = TASK_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_worker()
            status = self._status(name)
            if status and status.get("connector", {}).get("state") == state:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"debezium: connector {name} not {state} after {timeout:.0f} s; see {self.log}"
                )
            time.sleep(0.1)

    # -- capture position --------------------------------------------------------------------

    def _wait_slot_streaming(self, timeout: float = TASK_TIMEOUT) -> None:
        """Until the slot exists and a walsender streams from it: every later commit is captured."""
        assert self.env is not None
        deadline = time.monotonic() + timeout
        with contextlib.closing(psycopg2.connect(self.env.source_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                while True:
                    self._check_worker()
                    for task in (self._status(self.source_name) or {}).get("tasks", []):
                        if task.get("state") == "FAILED":
                            self._raise_failed(self.source_name, task)
                    cur.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                        (self.slot,),
                    )
                    row = cur.fetchone()
                    if row and row[0]:
                        return
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"debezium: slot {self.slot} not streaming after {timeout:.0f} s; see {self.log}"
                        )
                    time.sleep(0.1)

    def _create_topic(self, bootstrap: str) -> None:
        """The change topic, one partition: the sink subscribes before the source writes to it."""
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        futures = admin.create_topics([NewTopic(self.topic, num_partitions=1, replication_factor=1)])
        try:
            futures[self.topic].result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - already there is fine, anything else is one line
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"debezium: cannot create topic {self.topic}: {exc}") from None
