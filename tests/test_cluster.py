"""The pipeline on a replicated 3-node KRaft cluster (``CDC_KAFKA_BROKERS=3``) under broker faults.

The cluster runs in combined mode (every node a broker and a controller voter); topics have
replication factor 3 and ``min.insync.replicas=2``; the producer writes with ``acks=all`` and
idempotence. Each fault test runs the real daemons under the concurrent workload and ends with the
checks of ``test_pipeline_faults.py``: destination identical, every action_id decided exactly
once, nothing on the DLQ.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import ConfigResource
from support import clean_dest, clean_source, fresh_settings, wait_until
from test_pipeline_faults import Pipeline

from cdc.kafka.client import admin_client
from cdc.local.ports import Ports
from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.daemon, pytest.mark.fault]


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
    wait_until(lambda: len(admin_client_for(cluster).list_topics(timeout=5).brokers) == 3, 60, "3 brokers")
    return fresh_settings(cluster.env(), prefix="cdc_cluster", topic_partitions=6)


def admin_client_for(services: LocalServices):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": services.kafka.bootstrap})


@pytest.fixture
def pipeline(cluster: LocalServices, cluster_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    seed = int(os.environ.get("CDC_FAULT_SEED") or random.randrange(1_000_000))
    print(f"CDC_FAULT_SEED={seed}")
    clean_source(cluster_settings.source_db_url)
    clean_dest(cluster_settings.dest_db_url)
    p = Pipeline(cluster, cluster_settings, tmp_path, seed)
    try:
        yield p
    finally:
        p.kill_all()
        cluster.up(apply_schema=False)


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


def test_leader_broker_killed_restarted_then_another_killed(pipeline: Pipeline):
    kafka = pipeline.services.kafka
    pipeline.start()
    pipeline.pause(3.0, 5.0)
    first = leaders(pipeline.settings)[0]  # leads busy partitions: every partition gets writes
    kafka.broker(first).stop(hard=True)
    pipeline.pause(4.0, 6.0)
    kafka.start()
    pipeline.pause(4.0, 6.0)
    second = next(n for n in sorted(set(leaders(pipeline.settings).values())) if n != first)
    kafka.broker(second).stop(hard=True)
    pipeline.pause(4.0, 6.0)
    kafka.start()
    pipeline.pause(2.0, 4.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


def test_active_controller_killed(pipeline: Pipeline):
    kafka = pipeline.services.kafka
    pipeline.start()
    pipeline.pause(3.0, 5.0)
    controller = wait_until(lambda: active_controller(pipeline.services), 30, "the active controller")
    kafka.broker(controller).stop(hard=True)
    wait_until(lambda: active_controller(pipeline.services) not in (None, controller), 60, "a new controller")
    pipeline.pause(2.0, 4.0)
    kafka.start()
    pipeline.pause(2.0, 4.0)
    pipeline.stop_load()
    pipeline.check()
    pipeline.stop_all()


def test_three_consumers_one_killed_one_added_mid_stream(pipeline: Pipeline):
    """Scale-out: one group, six partitions, cooperative rebalancing while the load runs."""
    pipeline.start(consumers=3)
    pipeline.pause(3.0, 5.0)
    pipeline.consumers[1].kill()  # -9: its partitions move to the others, uncommitted work is redone
    pipeline.pause(3.0, 5.0)
    pipeline.add_consumer()
    pipeline.pause(3.0, 5.0)
    pipeline.stop_load()
    pipeline.check()
    assert sum(c.running() for c in pipeline.consumers) == 3
    pipeline.stop_all()
