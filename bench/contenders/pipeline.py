"""This project's pipeline as a contender: ``producer.py`` and ``consumer_final.py``, run as the
user runs them (separate processes, settings from an env file), on a fresh topic and group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from bench.contenders.base import BenchEnv
from cdc.local.paths import PROJECT_DIR
from cdc.ops.top import Scrape, bucket_delta, fetch, quantile

PARTS = ("producer", "consumer")
SCRIPTS = {"producer": "producer.py", "consumer": "consumer_final.py"}


class Pipeline:
    name = "cdc"
    uses_kafka = True
    needs_outbox = True

    def __init__(self, *, settings: dict[str, str] | None = None, consumer_script: str | None = None) -> None:
        self.settings = dict(settings or {})  # extra variables for the daemons' env file
        self.scripts = dict(SCRIPTS)
        if consumer_script:
            self.scripts["consumer"] = consumer_script
        self.env: BenchEnv | None = None
        self.initial_load = False
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.topic = ""
        self.envfile: Path | None = None

    def prepare(self) -> None:
        pass

    def setup(self, env: BenchEnv, *, initial_load: bool) -> None:
        # The outbox trigger was installed by the harness before any change: capture is fixed.
        self.env = env
        self.initial_load = initial_load
        tag = uuid.uuid4().hex[:8]
        self.topic = f"bench_{tag}"
        values = {
            **env.env,
            "CDC_TOPIC": self.topic,
            "CDC_DLQ_TOPIC": f"{self.topic}_dlq",
            "CONSUMER_GROUP_ID": f"bench_{tag}",
            "LOG_LEVEL": "INFO",
            "STATS_INTERVAL": "10",
            # Their histograms split a latency run into capture -> broker ack and the whole path.
            "PRODUCER_METRICS_PORT": str(_free_port()),
            "CONSUMER_METRICS_PORT": str(_free_port()),
            **self.settings,
        }
        self.envfile = env.home / f"{self.name}.env"
        self.envfile.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def new_topic(self) -> None:
        """Daemons started from now on use a new topic pair and a new consumer group."""
        assert self.envfile is not None
        tag = uuid.uuid4().hex[:8]
        self.topic = f"bench_{tag}"
        fresh = {
            "CDC_TOPIC": self.topic,
            "CDC_DLQ_TOPIC": f"{self.topic}_dlq",
            "CONSUMER_GROUP_ID": f"bench_{tag}",
        }
        lines = [ln for ln in self.envfile.read_text().splitlines() if ln.split("=", 1)[0] not in fresh]
        self.envfile.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in fresh.items())]) + "\n")

    def group(self) -> str:
        assert self.envfile is not None
        for line in self.envfile.read_text().splitlines():
            if line.startswith("CONSUMER_GROUP_ID="):
                return line.split("=", 1)[1]
        raise RuntimeError("no CONSUMER_GROUP_ID in the env file")

    def resume(self, parts: tuple[str, ...] = PARTS) -> None:
        for part in parts:
            self.start(part)

    def start(self, part: str) -> None:
        """Start ``part``: "producer", "consumer", or another consumer as "consumer-2" etc."""
        assert self.env is not None and self.envfile is not None
        args = [sys.executable, self.scripts[part.split("-")[0]], "--env-file", str(self.envfile)]
        if part == "producer" and self.initial_load:
            args.append("--snapshot")
        log = self.env.home / f"{self.name}-{part}.log"
        self.logs[part] = log
        # A second consumer ("consumer-2") serves no metrics: the port in the env file is the first's.
        env = {**os.environ, "CONSUMER_METRICS_PORT": "0"} if "-" in part else None
        with open(log, "ab") as out:
            self.procs[part] = subprocess.Popen(
                args, cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def _port(self, name: str) -> int:
        assert self.envfile is not None
        for line in self.envfile.read_text().splitlines():
            if line.startswith(f"{name}="):
                return int(line.split("=", 1)[1])
        raise RuntimeError(f"no {name} in the env file")

    def scrape_stages(self) -> dict[str, Scrape]:
        """The daemons' metrics now (see ``stages``)."""
        return {
            part: fetch(f"http://127.0.0.1:{self._port(f'{part.upper()}_METRICS_PORT')}")
            for part in ("producer", "consumer")
        }

    @staticmethod
    def stages(before: dict[str, Scrape], after: dict[str, Scrape]) -> dict[str, float | None]:
        """p50/p99 (ms) between two scrapes of the producer's capture -> broker acknowledgement and
        the consumer's capture -> destination commit, from their histograms (interpolated within
        buckets: 25, 50, 100, 250 ms ... coarse, but it says which side a tail comes from)."""
        out: dict[str, float | None] = {}
        for part, histogram, name in (
            ("producer", "cdc_producer_capture_to_ack_seconds", "capture_to_ack"),
            ("consumer", "cdc_consumer_end_to_end_seconds", "end_to_end"),
        ):
            b, a = before[part].metrics, after[part].metrics
            delta = bucket_delta(a.buckets(histogram), b.buckets(histogram)) if a and b else None
            for q in (0.5, 0.99):
                value = quantile(q, delta) if delta else None
                out[f"{name}_p{round(q * 100)}_ms"] = None if value is None else round(value * 1000, 1)
        return out

    def check_alive(self) -> None:
        for part, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.logs[part].read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{self.name} {part} exited with {proc.returncode}: {' | '.join(tail)}")

    def processes(self) -> dict[str, int]:
        return {part: p.pid for part, p in self.procs.items() if p.poll() is None}

    def stop_part(self, part: str) -> None:
        proc = self.procs.pop(part, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for part in list(self.procs):
            self.stop_part(part)


class Naive(Pipeline):
    """The seed's "before": this project's producer, and a consumer that, per message, connects,
    applies one row, commits, and commits the offset (``bench/naive_consumer.py``)."""

    name = "naive"

    def __init__(self) -> None:
        super().__init__(consumer_script=str(Path(__file__).resolve().parent.parent / "naive_consumer.py"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
