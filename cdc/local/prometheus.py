"""The local Prometheus of ``make monitor``: the docker-compose scrape config, with local targets.

``monitoring/prometheus/prometheus.yml`` is written for docker-compose.monitoring.yml (targets on
host.docker.internal). ``local_config`` turns it into the config of a Prometheus on this machine:
the same rules file (by its absolute path), the same intervals, only each job's targets changed.
``PrometheusServer`` runs Debian's ``prometheus`` with it on 127.0.0.1, its data, pid file and
log under the services' folder, like the other local services (``cdc.local.services``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdc.errors import ServiceError
from cdc.local.env import metrics_ports
from cdc.local.paths import PROMETHEUS_CONFIG
from cdc.local.ports import port_open
from cdc.local.processes import START_TIMEOUT, STOP_TIMEOUT, pid_alive, read_pid, terminate

# Each scrape job of PROMETHEUS_CONFIG and the .env variable with its daemon's metrics port.
JOB_PORTS = {"cdc-producer": "PRODUCER_METRICS_PORT", "cdc-consumer": "CONSUMER_METRICS_PORT"}
PROMETHEUS_PORT = 9090
RETENTION = "7d"


def local_config(targets: Mapping[str, list[str]], *, scrape_interval: str | None = None) -> dict[str, Any]:
    """PROMETHEUS_CONFIG with each job's targets replaced by ``targets[job]`` and the rule files
    by their absolute paths. ``scrape_interval`` overrides the scrape and evaluation intervals
    (the tests scrape every second)."""
    import yaml  # only `make monitor` and its tests need it (requirements-dev.txt)

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    if set(jobs) != set(targets):
        raise ServiceError(f"{PROMETHEUS_CONFIG} has the jobs {sorted(jobs)}, not {sorted(targets)}")
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": list(targets[name])}]
    config["rule_files"] = [
        str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config.get("rule_files", [])
    ]
    if scrape_interval:
        config["global"].update(
            scrape_interval=scrape_interval,
            scrape_timeout=scrape_interval,
            evaluation_interval=scrape_interval,
        )
    return config


class PrometheusServer:
    """Prometheus on 127.0.0.1:``port`` with ``local_config(targets)``, under ``home/prometheus``."""

    def __init__(
        self,
        *,
        home: Path,
        port: int = PROMETHEUS_PORT,
        targets: Mapping[str, list[str]] | None = None,
        scrape_interval: str | None = None,
    ) -> None:
        self.port = port
        self.targets = dict(targets or {})
        self.scrape_interval = scrape_interval
        self.dir = home / "prometheus"
        self.config = self.dir / "prometheus.yml"
        self.datadir = self.dir / "data"
        self.pidfile = self.dir / "prometheus.pid"
        self.logfile = home / "logs" / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        if not pid or not pid_alive(pid):
            return None
        # A pid file that outlived its Prometheus may name another program by now: never signal it.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if f"--config.file={self.config}".encode() in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None

    def write_config(self) -> Path:
        import yaml

        self.dir.mkdir(parents=True, exist_ok=True)
        config = local_config(self.targets, scrape_interval=self.scrape_interval)
        self.config.write_text(
            "# Made by `python -m cdc monitor` from monitoring/prometheus/prometheus.yml: only the\n"
            "# targets differ. Edit that file, not this one.\n" + yaml.safe_dump(config, sort_keys=False)
        )
        return self.config

    def start(self) -> None:
        """Start Prometheus and wait until it is ready; if it runs, reload it with the new config."""
        pid = self.pid()
        if pid is not None:
            self.write_config()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)  # Prometheus rereads its config on SIGHUP
            return
        if port_open(self.port):
            raise ServiceError(
                f"prometheus: port {self.port} is already in use by another program; "
                "choose another with PROMETHEUS_PORT"
            )
        binary = shutil.which("prometheus")
        if not binary:
            raise ServiceError("prometheus not found: install Debian's prometheus package (`make deps` does)")
        self.write_config()
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.datadir}",
                    f"--storage.tsdb.retention.time={RETENTION}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `stop` signals the group
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        self._wait_ready(proc)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise ServiceError(
                    f"prometheus exited with {proc.returncode}: {self._log_tail()} (see {self.logfile})"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise ServiceError(f"prometheus not ready after {START_TIMEOUT:.0f}s; see {self.logfile}")

    def _log_tail(self) -> str:
        lines = self.logfile.read_text(errors="replace").strip().splitlines() if self.logfile.exists() else []
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, hard=False, timeout=STOP_TIMEOUT)
        self.pidfile.unlink(missing_ok=True)

    def status(self) -> str:
        pid = self.pid()
        state = f"running pid={pid}" if pid else "stopped"
        return f"{'prometheus':<16} {state:<22} {self.url} data={self.datadir}"


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServiceError(f"{name}={raw!r} is not a TCP port")
    return int(raw)


def local_prometheus(home: Path, env: Mapping[str, str]) -> PrometheusServer:
    """`make monitor`'s Prometheus: on PROMETHEUS_PORT (9090), scraping the daemons on 127.0.0.1
    at the metrics ports ``env`` (the environment over .env) names, else `make up`'s defaults."""
    ports = metrics_ports(env)
    return PrometheusServer(
        home=home,
        port=_port("PROMETHEUS_PORT", env.get("PROMETHEUS_PORT") or str(PROMETHEUS_PORT)),
        targets={job: [f"127.0.0.1:{_port(var, ports[var])}"] for job, var in JOB_PORTS.items()},
    )
