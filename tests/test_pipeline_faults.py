"""The whole pipeline under faults: no change lost, none applied twice, destination = source.

Each test runs the real daemons (``producer.py``, ``consumer_final.py``) as subprocesses against
private services, as their least-privilege roles (``cdc_producer``, ``cdc_consumer``), drives the workload generator (concurrent writers, long transactions that
commit out of order, emp_id changes, re-used ids), injects its faults while the load runs, then
stops the load and checks, in the manner of Kafka's transactions_test.py:

- the pipeline catches up (outbox fully published, consumer lag 0);
- ``verify``: the destination ``employees`` equals the source, row by row;
- every action_id of ``emp_records_cdc`` has exactly one ``processed_events`` row
  (applied, stale or dlq), and the sink decided on nothing else;
- nothing reached the dead-letter topic (except, in the poison test, exactly the poison);
- the daemons stop cleanly on SIGTERM (exit 0).

Random choices use a seed printed at the start of each test; set CDC_FAULT_SEED to replay one.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from support import clean_dest, clean_source, dlq_count, scalar, watermarks

from cdc.kafka.client import admin_client, base_config
from cdc.local.runner import Daemon
from cdc.local.services import LocalServices
from cdc.ops.verify import verify
from cdc.ops.workload import Workload
from cdc.runtime.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.daemon, pytest.mark.fault]

LOAD_RATE = 150  # changes per second, all writers together
LOAD_WRITERS = 4
CATCH_UP_TIMEOUT = 180.0
# Small consumer batches: an event that the topic carries after a newer one for the same emp_id
# (transactions interleaving) then usually lands in a later batch, where only the version guard
# stops it from overwriting newer state. With big batches most such pairs meet in one batch.
CONSUMER_BATCH = "5"


class Pipeline:
    """Producer, consumers, workload and checks for one test."""

    def __init__(self, services: LocalServices, settings: Settings, workdir: Path, seed: int) -> None:
        self.services = services
        self.settings = settings
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        # The daemons run as their least-privilege roles (setup_roles_*.sql), as in production.
        roles = services.role_env()
        self.as_roles = {"SOURCE_DB_URL": roles["SOURCE_DB_URL"], "DEST_DB_URL": roles["DEST_DB_URL"]}
        self.producer = Daemon("producer.py", settings, workdir / "producer", **self.as_roles)
        self.consumers: list[Daemon] = []
        self.workload: Workload | None = None

    def add_consumer(self) -> Daemon:
        daemon = Daemon(
            "consumer_final.py",
            self.settings,
            self.workdir / f"consumer{len(self.consumers) + 1}",
            CONSUMER_BATCH_SIZE=CONSUMER_BATCH,
            **self.as_roles,
        )
        self.consumers.append(daemon)
        return daemon.start()

    def start(self, consumers: int = 1) -> None:
        self.producer.start()
        for _ in range(consumers):
            self.add_consumer()
        self.workload = Workload(
            self.settings.source_db_url, rate=LOAD_RATE, writers=LOAD_WRITERS, seed=self.seed
        )
        self.workload.start()

    def pause(self, lo: float, hi: float) -> None:
        time.sleep(self.rng.uniform(lo, hi))

    def stop_load(self) -> dict:
        assert self.workload is not None
        self.workload.stop()
        stats = self.workload.stats.get_stats()
        assert stats.get("changes", 0) > 0, "the workload wrote nothing"
        return stats

    def daemons(self) -> list[Daemon]:
        return [self.producer, *self.consumers]

    def logs(self) -> str:
        return "\n".join(f"----- {d.logfile}\n{d.log()[-4000:]}" for d in self.daemons())

    def check(self, *, dlq_expected: int = 0) -> None:
        """Catch up, then every guarantee of the module docstring.

        ``dlq_expected`` messages must be on the DLQ (injected poison, which adds nothing to
        ``processed_events``: it does not carry producer.py's mark).
        """
        assert self.producer.running(), f"the producer died:\n{self.logs()}"
        assert any(c.running() for c in self.consumers), f"no consumer left:\n{self.logs()}"
        result = verify(self.settings, wait=CATCH_UP_TIMEOUT, events=True)
        assert result.ok, f"seed={self.seed}\n" + "\n".join(result.lines()) + "\n" + self.logs()
        assert result.rows is not None and result.rows.source_rows > 0
        outbox = scalar(self.settings.source_db_url, "SELECT count(*) FROM emp_records_cdc")
        decided = scalar(self.settings.dest_db_url, "SELECT count(*) FROM processed_events")
        assert decided == outbox, f"seed={self.seed}: {decided} decisions for {outbox} changes"
        assert dlq_count(self.settings) == dlq_expected, f"seed={self.seed}\n{self.logs()}"

    def stop_all(self) -> None:
        codes = {d.script + str(i): d.stop() for i, d in enumerate(self.daemons()) if d.running()}
        assert set(codes.values()) <= {0}, f"exit codes {codes}\n{self.logs()}"

    def kill_all(self) -> None:
        if self.workload is not None:
            self.workload.stop()
        for d in self.daemons():
            d.kill()


def reset_group_to_earliest(settings: Settings) -> None:
    """What `kafka-consumer-groups --reset-offsets --to-earliest` does, for a stopped group."""
    admin: AdminClient = admin_client(settings)
    earliest = [TopicPartition(settings.cdc_topic, p, lo) for p, (lo, _hi) in watermarks(settings).items()]
    request = ConsumerGroupTopicPartitions(settings.consumer_group_id, earliest)
    for future in admin.alter_consumer_group_offsets([request]).values():
        future.result(timeout=30)


@pytest.fixture
def pipeline(local_services: LocalServices, private_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    seed = int(os.environ.get("CDC_FAULT_SEED") or random.randrange(1_000_000))
    print(f"CDC_FAULT_SEED={seed}")
    settings = private_settings
    clean_source(settings.source_db_url)
    clean_dest(settings.dest_db_url)
    p = Pipeline(local_services, settings, tmp_path, seed)
    try:
        yield p
    finally:
        p.kill_all()
        # Whatever a test stopped comes back for the next one.
        local_services.up(apply_schema=False)


def test_consumer_sigkill_five_times_then_replay(pipeline: Pipeline):
    pipeline.start()
    consumer = pipeline.consumers[0]
    for _ in range(5):
        pipeline.pause(1.5, 4.0)
        consumer.kill()
        consumer.start()
    pipeline.pause(1.0, 3.0)
    pipeline.stop_load()
    pipeline.check()

    # Replay: the whole topic again from offset 0 changes nothing.
    decided = scalar(pipeline.settings.dest_db_url, "SELECT count(*) FROM processed_events")
    assert consumer.stop() == 0
    reset_group_to_earliest(pipeline.settings)
    consumer.start()
    pipeline.check()
    assert scalar(pipeline.settings.dest_db_url, "SELECT count(*) FROM processed_events") == decided
    pipeline.stop_all()


def test_producer_sigkill_five_times(pipeline: Pipeline):
    pipeline.start()
    for _ in range(5):
        pipeline.pause(1.5, 4.0)
        pipeline.producer.kill()
        pipeline.producer.start()
    pipeline.pause(1.0, 3.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


def test_broker_hard_kill_and_clean_restart(pipeline: Pipeline):
    kafka = pipeline.services.kafka
    pipeline.start()
    pipeline.pause(3.0, 6.0)
    kafka.stop(hard=True)
    pipeline.pause(3.0, 6.0)
    kafka.start()
    pipeline.pause(3.0, 6.0)
    kafka.stop()  # clean: SIGTERM, controlled shutdown
    pipeline.pause(1.0, 3.0)
    kafka.start()
    pipeline.pause(2.0, 4.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


def test_destination_immediate_stop_and_source_restart(pipeline: Pipeline):
    services = pipeline.services
    pipeline.start()
    pipeline.pause(3.0, 5.0)
    services.dest.stop(mode="immediate")  # a crash: no checkpoint, in-flight transactions lost
    pipeline.pause(5.0, 8.0)
    services.dest.start()
    pipeline.pause(3.0, 5.0)
    services.source.stop(mode="fast")
    pipeline.pause(1.0, 3.0)
    services.source.start()
    pipeline.pause(3.0, 5.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


def test_consumer_added_mid_stream_and_one_killed(pipeline: Pipeline):
    pipeline.start(consumers=1)
    pipeline.pause(2.0, 4.0)
    pipeline.add_consumer()
    pipeline.pause(3.0, 5.0)
    pipeline.consumers[0].kill()  # the survivor takes its partitions over
    pipeline.pause(3.0, 5.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


POISON = [
    b"\xff\xfe not utf-8",
    b"{not json",
    b"[1, 2, 3]",
    b'{"action": "INSERT", "emp_id": 1}',
    b'{"action_id": 990000001, "action": "UPSERT", "emp_id": 1}',
    b'{"action_id": 990000002, "action": "INSERT", "emp_id": "one"}',
    b'{"action_id": 990000003, "action": "INSERT", "emp_id": 1, "first_name": "' + b"x" * 101 + b'"}',
    b'{"action_id": 990000004, "action": "UPDATE", "emp_id": 1, "salary": 99999999999}',
    b'{"action_id": 990000005, "action": "INSERT", "emp_id": 1, "dob": "1990-02-30"}',
]


def test_poison_messages_mid_stream_go_to_the_dlq_and_nothing_else(pipeline: Pipeline):
    pipeline.start()
    pipeline.pause(2.0, 4.0)
    producer = Producer(base_config(pipeline.settings))
    for i, value in enumerate(POISON):
        producer.produce(pipeline.settings.cdc_topic, key=str(i).encode(), value=value)
        producer.poll(0)
    assert producer.flush(30) == 0
    pipeline.pause(2.0, 4.0)
    pipeline.stop_load()
    # Not from producer.py (no cdc.producer header): no action_id of theirs is recorded, even
    # where one could be read, so they can never take a real one.
    pipeline.check(dlq_expected=len(POISON))
    dlq_decided = scalar(
        pipeline.settings.dest_db_url, "SELECT count(*) FROM processed_events WHERE outcome = 'dlq'"
    )
    assert dlq_decided == 0
    pipeline.stop_all()
