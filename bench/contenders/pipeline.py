"""This project's pipeline as a contender: ``producer.py`` and ``consumer_final.py``, run as the
user runs them (separate processes, settings from an env file), on a fresh topic and group.

The processes are those of the test suite's pipeline harness (``tests.support.pipeline``), each
in its own folder under the scenario's home with its log there."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from bench.contenders.base import BenchEnv
from cdc.local.runner import Daemon
from cdc.ops.top import Scrape, bucket_delta, fetch, quantile
from tests.support import free_port
from tests.support.pipeline import CONSUMER, PRODUCER
from tests.support.pipeline import Pipeline as Daemons

PARTS = ("producer", "consumer")


class Pipeline:
    name = "cdc"
    uses_kafka = True
    needs_outbox = True

    def __init__(
        self,
        *,
        settings: dict[str, str] | None = None,
        consumer_script: str | None = None,
        tree: Path | None = None,
    ) -> None:
        self.settings = dict(settings or {})  # extra variables for the daemons' env file
        self.consumer_script = consumer_script or CONSUMER
        self.producer_script = PRODUCER
        if tree is not None:  # another checkout's daemons (``make bench`` --compare)
            self.name = "cdc_base"
            self.producer_script = str(tree / PRODUCER)
            self.consumer_script = str(tree / CONSUMER)
        self.env: BenchEnv | None = None
        self.daemons: Daemons | None = None
        self.procs: dict[str, Daemon] = {}  # the parts started and not stopped since
        self.topic = ""
        self.envfile: Path | None = None

    def prepare(self) -> None:
        pass

    def setup(self, env: BenchEnv, *, initial_load: bool) -> None:
        # The outbox trigger was installed by the harness before any change: capture is fixed.
        self.env = env
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
            "PRODUCER_METRICS_PORT": str(free_port()),
            "CONSUMER_METRICS_PORT": str(free_port()),
            **self.settings,
        }
        self.envfile = env.home / f"{self.name}.env"
        self.envfile.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        # Every setting comes from the env file, as for a user; this process's environment only
        # overrides it where a part says so (a second consumer's metrics port).
        self.daemons = Daemons(
            dict(os.environ),
            env.home / self.name,
            "--env-file",
            str(self.envfile),
            producer_args=("--snapshot",) if initial_load else (),
            producer_script=self.producer_script,
            consumer_script=self.consumer_script,
        )

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
        assert self.daemons is not None
        if part == "producer":
            daemon = self.daemons.producer.start()
        else:
            number = int(part.split("-")[1]) if "-" in part else 1
            if number <= len(self.daemons.consumers):
                daemon = self.daemons.consumers[number - 1].start()
            else:
                assert number == len(self.daemons.consumers) + 1, f"start consumer-{number - 1} first"
                # A second consumer serves no metrics: the port in the env file is the first's.
                extra = {"CONSUMER_METRICS_PORT": "0"} if number > 1 else {}
                daemon = self.daemons.add_consumer(**extra)
        self.procs[part] = daemon

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
        for part, daemon in self.procs.items():
            if not daemon.running():
                tail = daemon.output().strip().splitlines()[-3:]
                code = daemon.proc.returncode if daemon.proc is not None else None
                raise RuntimeError(f"{self.name} {part} exited with {code}: {' | '.join(tail)}")

    def processes(self) -> dict[str, int]:
        return {part: d.pid for part, d in self.procs.items() if d.running()}

    def stop_part(self, part: str) -> None:
        daemon = self.procs.pop(part, None)
        if daemon is None or not daemon.running():
            return
        with contextlib.suppress(AssertionError):  # killed after 30 s without an exit
            daemon.stop(30)

    def stop(self) -> None:
        for part in list(self.procs):
            self.stop_part(part)


class Naive(Pipeline):
    """The seed's "before": this project's producer, and a consumer that, per message, connects,
    applies one row, commits, and commits the offset (``bench/naive_consumer.py``)."""

    name = "naive"

    def __init__(self) -> None:
        super().__init__(consumer_script=str(Path(__file__).resolve().parent.parent / "naive_consumer.py"))
