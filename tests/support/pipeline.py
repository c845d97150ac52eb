"""The pipeline harness: producer.py and consumer_final.py as subprocesses on one configuration.

One harness for the fault suite (``tests/faults``), ``make soak`` (``bench/soak.py``) and the
``cdc`` and ``naive`` contenders of ``make bench`` (``bench/contenders/pipeline.py``). Each daemon
is a ``cdc.local.runner.Daemon`` in its own folder under ``workdir``, logging to a file there that
every start appends to; a daemon may be killed, restarted or added at any point.

Beside the daemons: the concurrent workload (``cdc.ops.workload.Workload``) on the source, and
``check()``, the fault suite's verdict on a run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdc.local.runner import Daemon
from cdc.ops.verify import verify
from cdc.ops.workload import Workload
from cdc.runtime.settings import Settings
from tests.support import dlq_count, scalar, wait_until

PRODUCER = "producer.py"
CONSUMER = "consumer_final.py"


class Pipeline:
    """The producer and any number of consumers.

    ``env`` is a ``Settings`` (made into each daemon's environment by ``settings_env``) or an
    environment; ``args`` go to every daemon (``--env-file path``, say), ``producer_args`` to the
    producer only; ``variables`` are set for every daemon, ``consumer_variables`` for consumers
    only. ``consumer_script`` replaces consumer_final.py (the bench's naive consumer), and
    ``producer_script`` producer.py (the bench's other checkout).
    """

    def __init__(
        self,
        env: Settings | Mapping[str, str],
        workdir: Path,
        *args: str,
        producer_args: Sequence[str] = (),
        producer_script: str = PRODUCER,
        consumer_script: str = CONSUMER,
        consumer_variables: Mapping[str, Any] | None = None,
        **variables: Any,
    ) -> None:
        self.env = env
        self.workdir = workdir
        self.args = args
        self.consumer_script = consumer_script
        self.variables = variables
        self.consumer_variables = dict(consumer_variables or {})
        self.producer = Daemon(producer_script, env, workdir / "producer", *args, *producer_args, **variables)
        self.consumers: list[Daemon] = []
        self.workload: Workload | None = None

    @property
    def settings(self) -> Settings:
        assert isinstance(self.env, Settings), "this pipeline was given an environment, not Settings"
        return self.env

    def add_consumer(self, **variables: Any) -> Daemon:
        """Start one more consumer (its own folder, ``consumer<n>``), with ``variables`` on top."""
        daemon = Daemon(
            self.consumer_script,
            self.env,
            self.workdir / f"consumer{len(self.consumers) + 1}",
            *self.args,
            **{**self.variables, **self.consumer_variables, **variables},
        )
        self.consumers.append(daemon)
        return daemon.start()

    def start(self, consumers: int = 1) -> Pipeline:
        """Start the producer and ``consumers`` consumers."""
        self.producer.start()
        for _ in range(consumers):
            self.add_consumer()
        return self

    def daemons(self) -> list[Daemon]:
        return [self.producer, *self.consumers]

    def logs(self, tail: int = 4000) -> str:
        """The end of every daemon's log, for a failure message."""
        return "\n".join(f"----- {d.logfile}\n{d.log()[-tail:]}" for d in self.daemons())

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to every running daemon; each must exit 0. Returns the exit codes by log file."""
        codes = {str(d.logfile): d.stop() for d in self.daemons() if d.running()}
        assert set(codes.values()) <= {0}, f"exit codes {codes}\n{self.logs()}"
        return codes

    def kill_all(self) -> None:
        """The end of a test, whatever happened: the workload stopped, every daemon killed."""
        if self.workload is not None:
            self.workload.stop()
        for d in self.daemons():
            d.kill()

    # -- the workload and the verdict (Settings only) ---------------------------------------------

    def start_load(self, *, rate: float, writers: int, seed: int) -> Workload:
        """The concurrent workload on the source: ``writers`` sessions, ``rate`` changes per second
        in all, long transactions that commit out of order, emp_id changes, re-used ids."""
        self.workload = Workload(self.settings.source_db_url, rate=rate, writers=writers, seed=seed)
        self.workload.start()
        return self.workload

    def stop_load(self) -> dict:
        assert self.workload is not None
        self.workload.stop()
        stats = self.workload.stats.get_stats()
        assert stats.get("changes", 0) > 0, "the workload wrote nothing"
        return stats

    def decided(self) -> int:
        """How many changes the destination has decided (``processed_events`` rows)."""
        return scalar(self.settings.dest_db_url, "SELECT count(*) FROM processed_events")

    def wait_for_progress(self, more: int = 1, timeout: float = 120) -> None:
        """Until the destination has decided ``more`` changes beyond what it had decided so far:
        the pipeline moves end to end."""
        target = self.decided() + more
        wait_until(lambda: self.decided() >= target, timeout, f"{more} more changes decided", step=0.2)

    def check(self, *, wait: float = 180.0, dlq_expected: int = 0, seed: int | None = None) -> None:
        """The fault suite's verdict, after the load stopped: the pipeline catches up (outbox fully
        published, consumer lag 0); ``verify``: the destination equals the source row by row and
        every action_id of the outbox has exactly one ``processed_events`` row; exactly
        ``dlq_expected`` messages on the dead-letter topic (injected poison, which adds nothing to
        ``processed_events``: it does not carry producer.py's mark)."""
        where = f"seed={seed}\n" if seed is not None else ""
        assert self.producer.running(), f"the producer died:\n{self.logs()}"
        assert any(c.running() for c in self.consumers), f"no consumer left:\n{self.logs()}"
        result = verify(self.settings, wait=wait, events=True)
        assert result.ok, where + "\n".join(result.lines()) + "\n" + self.logs()
        assert result.rows is not None and result.rows.source_rows > 0
        outbox = scalar(
            self.settings.source_db_url,
            "SELECT (SELECT count(*) FROM emp_records_cdc) + (SELECT count(*) FROM cdc_outbox)",
        )
        assert self.decided() == outbox, f"{where}{self.decided()} decisions for {outbox} changes"
        assert dlq_count(self.settings) == dlq_expected, where + self.logs()


def restart(daemon: Daemon, ready: str) -> int:
    """kill -9 ``daemon`` and start it again; returns the new pid once the new process has logged
    ``ready`` (a regex), so the restart is one the daemon went through, not just a new pid."""
    old = daemon.pid
    daemon.kill()
    daemon.start()
    assert daemon.pid != old
    daemon.wait_for_log(ready)
    return daemon.pid


def pause(rng: random.Random, lo: float, hi: float) -> None:
    """Let the load run for a random while (pacing between faults, not a wait for anything)."""
    time.sleep(rng.uniform(lo, hi))
