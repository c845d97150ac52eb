"""Run the real daemons (producer.py, consumer_final.py) as subprocesses: for ``make demo`` and tests.

Each process gets its settings through its environment (``settings_env``), runs in its own folder
(so no stray .env is picked up) and logs to a file there. ``kill()`` is a crash (SIGKILL), ``stop()``
the clean path (SIGTERM, then wait for the exit code); ``signal()`` and ``wait()`` are the two halves
for a test that wants something in between.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from cdc.local.paths import DAEMON_MODULES, IN_CHECKOUT, PROJECT_DIR
from cdc.runtime.settings import Settings


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The environment that makes a daemon use exactly these settings (plus ``extra`` variables).

    Kafka, CDC and consumer variables of this process's own environment are left out, so only
    ``settings`` and ``extra`` say where the daemon connects and what it reads.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "CDC_", "CONSUMER_", "PRODUCER_", "METRICS_"))
    }
    env.update(
        {
            "SOURCE_DB_URL": settings.source_db_url,
            "DEST_DB_URL": settings.dest_db_url,
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "CDC_TOPIC": settings.cdc_topic,
            "CDC_DLQ_TOPIC": settings.cdc_dlq_topic,
            "CDC_TOPIC_PREFIX": settings.cdc_topic_prefix,
            "CDC_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "CONSUMER_GROUP_ID": settings.consumer_group_id,
            "STATS_INTERVAL": "2",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in (
        ("PRODUCER_METRICS_PORT", settings.producer_metrics_port),
        ("CONSUMER_METRICS_PORT", settings.consumer_metrics_port),
    ):
        if value is not None:
            env[name] = str(value)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Daemon:
    """One daemon script; ``start()`` may be called again after ``kill()`` / ``stop()``.

    ``settings`` is a ``Settings`` (made into an environment by ``settings_env``) or an environment
    ``settings_env`` already made; ``env`` adds or overrides variables. Every start appends to the
    same log file after a ``===== start #N =====`` line; ``output()`` is the latest start's part.
    ``wait_timeout`` is the default timeout of ``wait_for_log()``.
    """

    def __init__(
        self,
        script: str,
        settings: Settings | Mapping[str, str],
        workdir: Path,
        *args: str,
        wait_timeout: float = 60.0,
        **env: Any,
    ) -> None:
        self.script = script
        self.args = args
        base = settings_env(settings) if isinstance(settings, Settings) else dict(settings)
        self.env = {**base, **{k: str(v) for k, v in env.items()}}
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logfile = workdir / f"{Path(script).stem}.log"
        self.wait_timeout = wait_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_start = 0  # where the latest start's output begins in the log file (bytes)

    def command(self) -> list[str]:
        if IN_CHECKOUT or self.script not in DAEMON_MODULES:
            return [sys.executable, str(PROJECT_DIR / self.script), *self.args]
        return [sys.executable, "-m", DAEMON_MODULES[self.script], *self.args]

    def spawn(self, out: IO[bytes] | int, **env: str) -> subprocess.Popen[bytes]:
        """Start the process with its output (stdout and stderr) going to ``out``."""
        assert not self.running(), f"{self.script} already running"
        self.starts += 1
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env={**self.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self.proc

    def start(self) -> Daemon:
        assert not self.running(), f"{self.script} already running"
        with open(self.logfile, "ab") as out:
            out.write(f"\n===== start #{self.starts + 1} =====\n".encode())
            out.flush()
            self.log_start = out.tell()
            self.spawn(out)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.script} never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash at whatever point the process is."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit by itself (or after ``signal()``). Returns the exit code."""
        assert self.proc is not None, f"{self.script} never started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.script} still running after {timeout}s:\n{self.output()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for a clean exit. Returns the exit code."""
        assert self.proc is not None
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.script} did not stop within {timeout}s after SIGTERM") from None

    def log(self) -> str:
        """The whole log file: every start."""
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def output(self) -> str:
        """What the latest start wrote."""
        if not self.logfile.exists():
            return ""
        with open(self.logfile, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float | None = None, start: int = 0) -> re.Match[str]:
        """Wait until the regex ``pattern`` matches the latest start's output from position ``start``.

        Fails (AssertionError) when the process exits without it, or after ``timeout`` seconds.
        """
        timeout = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            alive = self.running()  # before reading: a line written just before the exit counts
            match = re.search(pattern, self.output()[start:])
            if match:
                return match
            if not alive:
                code = self.proc.returncode if self.proc is not None else None
                raise AssertionError(
                    f"{self.script} exited with {code} before {pattern!r}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not in {self.script} log after {timeout}s:\n{self.output()[-3000:]}"
                )
            time.sleep(0.1)

    # Last: from here on ``signal`` in the class body is this method, not the module.
    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGTERM, SIGINT, ...) without waiting."""
        assert self.proc is not None, f"{self.script} never started"
        self.proc.send_signal(sig)
