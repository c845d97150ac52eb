"""What every contender of ``make bench`` implements, and what the harness hands it.

The harness starts fresh private services for each scenario (``BenchEnv``), creates the tables,
then drives a contender through::

    prepare()                      once per bench run, untimed (resolve jars, build config)
    setup(env, initial_load=...)   capture position fixed, nothing applied yet
    ... the harness writes the change set to the source (drain) ...
    resume()                       the clock starts here
    ... the harness polls the destination until it equals the source, then verifies ...
    processes()                    sampled for CPU seconds and peak RSS while it runs
    stop()                         always called, also after a failure
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class BenchEnv:
    """One scenario's private services (all on 127.0.0.1, started by the harness).

    Both PostgreSQL servers run with ``wal_level=logical`` and ``track_commit_timestamp=on``. On
    the source, ``public.employees`` exists (with the project's outbox trigger only when the
    contender is this pipeline); on the destination, ``public.employees`` exists and is empty.
    """

    home: Path  # this scenario's private folder: put logs and generated config here
    source_url: str  # postgresql://user:password@127.0.0.1:port/db
    dest_url: str
    bootstrap: str  # Kafka bootstrap servers, 127.0.0.1:port (KRaft; automatic topic creation is off)
    env: dict[str, str]  # SOURCE_DB_URL, DEST_DB_URL, KAFKA_BOOTSTRAP_SERVERS for the project's daemons


class Contender(Protocol):
    name: str  # short, used in the report: "cdc", "logical", "debezium", "naive"
    uses_kafka: bool
    needs_outbox: bool  # True only for this project's pipeline (the trigger on the source)

    def prepare(self) -> None:
        """Once per bench run, untimed: resolve jars, check tools. Raise RuntimeError with one line."""

    def setup(self, env: BenchEnv, *, initial_load: bool) -> None:
        """Become ready without applying anything yet.

        ``initial_load=False``: capture must start at the source's current position: every change
        committed after ``setup`` returns reaches the destination after ``resume``.
        ``initial_load=True``: the source already holds its rows; after ``resume`` the contender
        copies them (its snapshot) and then follows changes.
        """

    def resume(self) -> None:
        """Start applying. Returns as soon as that has been set going (the clock runs from here)."""

    def processes(self) -> dict[str, int]:
        """The daemons doing the work, name -> pid (e.g. {"connect": 1234}); sampled for cost."""

    def stop(self) -> None:
        """Stop everything this contender started and free its resources. Idempotent."""
