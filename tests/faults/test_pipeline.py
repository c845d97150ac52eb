"""The whole pipeline under faults: no change lost, none applied twice, destination = source.

Each test runs the real daemons (``producer.py``, ``consumer_final.py``) as subprocesses against
private services, as their least-privilege roles (``cdc_producer``, ``cdc_consumer``), drives the
workload generator (concurrent writers, long transactions that commit out of order, emp_id changes,
re-used ids), injects its faults while the load runs, then stops the load and checks, in the manner
of Kafka's transactions_test.py (``Pipeline.check``):

- the pipeline catches up (outbox fully published, consumer lag 0);
- ``verify``: the destination ``employees`` equals the source, row by row;
- every action_id of ``emp_records_cdc`` has exactly one ``processed_events`` row
  (applied, stale or dlq), and the sink decided on nothing else;
- nothing reached the dead-letter topic (except, in the poison test, exactly the poison);
- the daemons stop cleanly on SIGTERM (exit 0).

Each test also checks that its fault took effect: a new process or server pid, the daemons' log
lines of the outage and of its end, a rebalance, a re-read. Random choices use a seed printed at
the start of each test; set CDC_FAULT_SEED to replay one.
"""

from __future__ import annotations

import random
import re

import pytest
from confluent_kafka import Producer

from cdc.kafka.client import base_config
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings
from tests.support import dlq_count, rewind_to_earliest, scalar, wait_until, watermarks
from tests.support.pipeline import Pipeline, pause, restart

pytestmark = pytest.mark.daemon

LOAD = {"rate": 150, "writers": 4}  # changes per second, all writers together
PRODUCER_ACTIVE = "active: holding the producer lock"
CONSUMER_STARTED = "starting consumer"
ASSIGNED = "partitions assigned"
# What each daemon logs (librdkafka's lines) when the broker is gone, and the producer when the source is.
BROKER_DOWN = r"Connect to \S+ failed: Connection refused"
SOURCE_DOWN = r"no longer the active producer|batch not published|waiting for source PostgreSQL"


@pytest.fixture
def pipeline(make_pipeline, local_services: LocalServices, private_settings: Settings) -> Pipeline:
    return make_pipeline(local_services, private_settings)


def start(pipeline: Pipeline, seed: int, consumers: int = 1) -> None:
    """The daemons and the load; returns once changes flow end to end."""
    pipeline.start(consumers)
    pipeline.start_load(seed=seed, **LOAD)
    pipeline.producer.wait_for_log(PRODUCER_ACTIVE)
    pipeline.wait_for_progress()


def published(pipeline: Pipeline) -> int:
    return scalar(pipeline.settings.source_db_url, "SELECT published_total FROM cdc_producer_state")


def final_statistics(output: str) -> dict[str, int]:
    """The integer figures of a consumer's ``final statistics`` line."""
    line = re.search(r"final statistics: (.*)", output)
    assert line, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?=\s|$)", line.group(1))}


def test_consumer_killed_five_times_then_the_whole_topic_replayed_changes_nothing(
    pipeline: Pipeline, seed: int, rng: random.Random
):
    start(pipeline, seed)
    consumer = pipeline.consumers[0]
    pids = {consumer.pid}
    for _ in range(5):
        pause(rng, 1.5, 4.0)
        pids.add(restart(consumer, CONSUMER_STARTED))
    assert len(pids) == 6  # five kills, five new processes
    pause(rng, 1.0, 3.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)

    # Replay: the whole topic again from the start changes nothing; every message is re-read
    # and found a duplicate.
    decided = pipeline.decided()
    assert consumer.stop() == 0
    rewind_to_earliest(pipeline.settings)
    consumer.start()
    pipeline.check(seed=seed)
    assert pipeline.decided() == decided
    pipeline.stop_all()
    stats = final_statistics(consumer.output())
    messages = sum(high - low for low, high in watermarks(pipeline.settings).values())
    assert stats["consumed"] == stats["duplicates"] == messages, stats


def test_producer_killed_five_times(pipeline: Pipeline, seed: int, rng: random.Random):
    start(pipeline, seed)
    producer = pipeline.producer
    pids = {producer.pid}
    for _ in range(5):
        pause(rng, 1.5, 4.0)
        before = published(pipeline)
        # The new process takes the lock over once the killed one's session is gone.
        pids.add(restart(producer, PRODUCER_ACTIVE))
        wait_until(lambda b=before: published(pipeline) > b, 60, "the restarted producer publishing")
    assert len(pids) == 6
    pause(rng, 1.0, 3.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    pipeline.stop_all()


def test_broker_hard_kill_and_clean_restart(
    pipeline: Pipeline, local_services: LocalServices, seed: int, rng: random.Random
):
    kafka = local_services.kafka
    start(pipeline, seed)
    consumer = pipeline.consumers[0]
    for hard in (True, False):  # kill -9, then SIGTERM (a controlled shutdown)
        pause(rng, 3.0, 6.0)
        old = kafka.pid()
        marks = {d: len(d.output()) for d in pipeline.daemons()}
        kafka.stop(hard=hard)
        # Both daemons see the broker gone.
        pipeline.producer.wait_for_log(BROKER_DOWN, start=marks[pipeline.producer])
        consumer.wait_for_log(BROKER_DOWN, start=marks[consumer])
        pause(rng, 1.0, 4.0)
        kafka.start()
        assert kafka.pid() != old
        pipeline.wait_for_progress()
    pause(rng, 2.0, 4.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    pipeline.stop_all()


def test_destination_crash_and_source_restart(
    pipeline: Pipeline, local_services: LocalServices, seed: int, rng: random.Random
):
    dest, source = local_services.dest, local_services.source
    start(pipeline, seed)
    consumer, producer = pipeline.consumers[0], pipeline.producer

    pause(rng, 3.0, 5.0)
    old, mark = dest.pid(), len(consumer.output())
    dest.stop(mode="immediate")  # a crash: no checkpoint, in-flight transactions lost
    consumer.wait_for_log("transient error", start=mark)  # the batch rolled back, retried
    pause(rng, 2.0, 5.0)
    dest.start()
    assert dest.pid() != old
    consumer.wait_for_log(r"destination back after \d+ retries, partitions resumed", timeout=90, start=mark)
    pipeline.wait_for_progress()

    pause(rng, 3.0, 5.0)
    old, mark = source.pid(), len(producer.output())
    source.stop(mode="fast")
    producer.wait_for_log(SOURCE_DOWN, start=mark)
    pause(rng, 1.0, 3.0)
    source.start()
    assert source.pid() != old
    # The lock went with the session: the producer takes it again on a new one.
    producer.wait_for_log(PRODUCER_ACTIVE, start=mark)
    pipeline.wait_for_progress()

    pause(rng, 3.0, 5.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    pipeline.stop_all()


def test_consumer_added_mid_stream_then_one_killed(pipeline: Pipeline, seed: int, rng: random.Random):
    start(pipeline, seed, consumers=1)
    first = pipeline.consumers[0]
    pause(rng, 2.0, 4.0)
    mark = len(first.output())
    second = pipeline.add_consumer()
    second.wait_for_log(ASSIGNED)
    first.wait_for_log("partitions revoked", start=mark)  # it gave the newcomer its share
    pause(rng, 3.0, 5.0)
    mark = len(second.output())
    first.kill()
    # The survivor takes the killed one's partitions over once its session has expired.
    second.wait_for_log(ASSIGNED, timeout=90, start=mark)
    pipeline.wait_for_progress()
    pause(rng, 1.0, 3.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
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


def test_poison_messages_mid_stream_go_to_the_dlq_and_nothing_else(pipeline: Pipeline, seed: int, rng):
    start(pipeline, seed)
    pause(rng, 2.0, 4.0)
    producer = Producer(base_config(pipeline.settings))
    for i, value in enumerate(POISON):
        producer.produce(pipeline.settings.cdc_topic, key=str(i).encode(), value=value)
        producer.poll(0)
    assert producer.flush(30) == 0
    wait_until(lambda: dlq_count(pipeline.settings) == len(POISON), 60, "the poison on the DLQ")
    pause(rng, 1.0, 3.0)
    pipeline.stop_load()
    # Not from producer.py (no cdc.producer header): no action_id of theirs is recorded, even
    # where one could be read, so they can never take a real one.
    pipeline.check(seed=seed, dlq_expected=len(POISON))
    dlq_decided = scalar(
        pipeline.settings.dest_db_url, "SELECT count(*) FROM processed_events WHERE outcome = 'dlq'"
    )
    assert dlq_decided == 0
    pipeline.stop_all()
