"""The pipeline on a replicated 3-node KRaft cluster (``CDC_KAFKA_BROKERS=3``) under broker faults.

The cluster runs in combined mode (every node a broker and a controller voter); topics have
replication factor 3 and ``min.insync.replicas=2``; the producer writes with ``acks=all`` and
idempotence. Each fault test runs the real daemons under the concurrent workload and ends with the
checks of the fault suite (``Pipeline.check``): destination identical, every action_id decided
exactly once, nothing on the DLQ; and that each fault took effect (leadership moved, a new
controller, a new broker pid, the consumers' rebalance).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from cdc.kafka.client import admin_client
from cdc.local.ports import Ports
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings
from tests.support import fresh_settings, wait_until
from tests.support.pipeline import Pipeline, pause

pytestmark = pytest.mark.daemon

LOAD = {"rate": 150, "writers": 4}
ASSIGNED = "partitions assigned"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    services = LocalServices(home=tmp_path_factory.mktemp("cluster"), ports=Ports.free(brokers=3), brokers=3)
    try:
        services.up()
        yield services
    finally:
        services.down()


@pytest.fixture
def cluster_settings(cluster: LocalServices) -> Settings:
    cluster.up()  # whatever a test left stopped
    admin = AdminClient({"bootstrap.servers": cluster.kafka.bootstrap})
    wait_until(lambda: len(admin.list_topics(timeout=5).brokers) == 3, 60, "3 brokers")
    return fresh_settings(cluster.env(), prefix="cdc_cluster", topic_partitions=6)


@pytest.fixture
def cluster_pipeline(make_pipeline, cluster: LocalServices, cluster_settings: Settings) -> Pipeline:
    return make_pipeline(cluster, cluster_settings)


def start(pipeline: Pipeline, seed: int, consumers: int = 1) -> None:
    """The daemons and the load; returns once changes flow end to end."""
    pipeline.start(consumers)
    pipeline.start_load(seed=seed, **LOAD)
    pipeline.wait_for_progress()


def leaders(settings: Settings) -> dict[int, int]:
    """partition -> node id of its leader, for the CDC topic."""
    meta = admin_client(settings).list_topics(settings.cdc_topic, timeout=10).topics[settings.cdc_topic]
    return {p: m.leader for p, m in meta.partitions.items()}


def active_controller(services: LocalServices) -> int | None:
    """The node id leading the KRaft controller quorum, as the running nodes last recorded it
    (``quorum-state`` of ``__cluster_metadata``, the newest epoch wins); None while unknown."""
    best: tuple[int, int] | None = None
    for broker in services.kafka.brokers:
        if not broker.running():
            continue
        path = broker.datadir / "__cluster_metadata-0" / "quorum-state"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("leaderId", -1) >= 0 and (best is None or state["leaderEpoch"] > best[0]):
            best = (state["leaderEpoch"], state["leaderId"])
    return best[1] if best else None


def test_topics_are_replicated_three_ways_with_two_in_sync_required(cluster_settings: Settings):
    admin = admin_client(cluster_settings)

    def partitions() -> dict:
        return (
            admin.list_topics(cluster_settings.cdc_topic, timeout=10)
            .topics[cluster_settings.cdc_topic]
            .partitions
        )

    # A new topic reaches each broker's metadata a moment after the controller made it: the
    # broker asked may not list its partitions yet.
    wait_until(lambda: len(partitions()) == cluster_settings.topic_partitions, 30, "the topic's partitions")
    assert {len(p.replicas) for p in partitions().values()} == {3}
    resource = ConfigResource(ConfigResource.Type.TOPIC, cluster_settings.cdc_topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    assert configs["min.insync.replicas"].value == "2"
    assert cluster_settings.topic_replication_factor == 3


def test_leader_broker_killed_restarted_then_another_killed(
    cluster_pipeline: Pipeline, cluster: LocalServices, seed: int, rng: random.Random
):
    pipeline, kafka = cluster_pipeline, cluster.kafka
    start(pipeline, seed)
    pause(rng, 3.0, 5.0)
    first = leaders(pipeline.settings)[0]  # leads busy partitions: every partition gets writes
    old = kafka.broker(first).pid()
    kafka.broker(first).stop(hard=True)
    wait_until(
        lambda: first not in leaders(pipeline.settings).values(), 60, f"leadership to leave node {first}"
    )
    pipeline.wait_for_progress()  # on the two brokers left
    pause(rng, 2.0, 4.0)
    kafka.start()
    assert kafka.broker(first).pid() not in (None, old)
    pause(rng, 4.0, 6.0)
    second = next(n for n in sorted(set(leaders(pipeline.settings).values())) if n != first)
    kafka.broker(second).stop(hard=True)
    wait_until(
        lambda: second not in leaders(pipeline.settings).values(), 60, f"leadership to leave node {second}"
    )
    pipeline.wait_for_progress()
    pause(rng, 2.0, 4.0)
    kafka.start()
    pause(rng, 2.0, 4.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    pipeline.stop_all()


def test_active_controller_killed(
    cluster_pipeline: Pipeline, cluster: LocalServices, seed: int, rng: random.Random
):
    pipeline, kafka = cluster_pipeline, cluster.kafka
    start(pipeline, seed)
    pause(rng, 3.0, 5.0)
    controller = wait_until(lambda: active_controller(cluster), 30, "the active controller")
    kafka.broker(controller).stop(hard=True)
    wait_until(lambda: active_controller(cluster) not in (None, controller), 60, "a new controller")
    pipeline.wait_for_progress()
    pause(rng, 2.0, 4.0)
    kafka.start()
    pause(rng, 2.0, 4.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    pipeline.stop_all()


def test_three_consumers_one_killed_one_added_mid_stream(
    cluster_pipeline: Pipeline, seed: int, rng: random.Random
):
    """Scale-out: one group, six partitions, cooperative rebalancing while the load runs."""
    pipeline = cluster_pipeline
    start(pipeline, seed, consumers=3)
    first, killed, third = pipeline.consumers
    for consumer in pipeline.consumers:
        consumer.wait_for_log(ASSIGNED)
    pause(rng, 3.0, 5.0)
    marks = {c: len(c.output()) for c in (first, third)}
    killed.kill()  # -9: its partitions move to the others, uncommitted work is redone
    # Once its session has expired, the survivors are given its partitions.
    wait_until(
        lambda: any(ASSIGNED in s.output()[marks[s] :] for s in (first, third)),
        90,
        "the killed consumer's partitions assigned to a survivor",
    )
    pipeline.wait_for_progress()
    added = pipeline.add_consumer()
    added.wait_for_log(ASSIGNED)
    pause(rng, 3.0, 5.0)
    pipeline.stop_load()
    pipeline.check(seed=seed)
    assert sum(c.running() for c in pipeline.consumers) == 3
    pipeline.stop_all()
