"""Run the real daemons (producer.py, consumer_final.py) as subprocesses: for ``make demo`` and tests.

Each process gets its settings through its environment, runs in its own folder (so no stray
.env is picked up) and logs to a file there. ``kill()`` is a crash (SIGKILL), ``stop()`` the
clean path (SIGTERM, then wait for the exit code).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cdc.services import PROJECT_DIR
from cdc.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a daemon use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CDC_"))}
    env.update(
        {
            "SOURCE_DB_URL": settings.source_db_url,
            "DEST_DB_URL": settings.dest_db_url,
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "CDC_TOPIC": settings.cdc_topic,
            "CDC_DLQ_TOPIC": settings.cdc_dlq_topic,
            "CDC_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "CONSUMER_GROUP_ID": settings.consumer_group_id,
            "STATS_INTERVAL": "2",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Daemon:
    """One daemon script; ``start()`` may be called again after ``kill()`` / ``stop()``."""

    def __init__(self, script: str, settings: Settings, workdir: Path, *args: str, **env: str) -> None:
        self.script = script
        self.args = args
        self.env = {**settings_env(settings), **env}
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logfile = workdir / f"{Path(script).stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        assert not self.running(), f"{self.script} already running"
        self.starts += 1
        with open(self.logfile, "ab") as out:
            out.write(f"\n===== start #{self.starts} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(PROJECT_DIR / self.script), *self.args],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash at whatever point the process is."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

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
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if not self.running():
                raise AssertionError(
                    f"{self.script} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} not in {self.script} log after {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.2)
