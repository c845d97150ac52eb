"""Kafka client configuration and topic management shared by the producer and the consumer."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from cdc.errors import ServiceError
from cdc.settings import Settings

log = logging.getLogger(__name__)


def base_config(settings: Settings) -> dict[str, str]:
    """bootstrap.servers plus every KAFKA_* property (security, SASL, ...)."""
    return {"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.kafka_extra}


def producer_config(settings: Settings, **extra: object) -> dict[str, object]:
    """An idempotent producer: no duplicates or reordering from its own retries."""
    return {
        **base_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        **extra,
    }


def consumer_config(settings: Settings, **extra: object) -> dict[str, object]:
    """Offsets are committed by hand after the destination commit, never automatically."""
    return {
        **base_config(settings),
        "group.id": settings.consumer_group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        **extra,
    }


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(base_config(settings))


def wait_for_broker(admin: AdminClient, *, timeout: float, what: str = "Kafka") -> None:
    """Block until the cluster answers a metadata request, logging a 'waiting' line meanwhile."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise ServiceError(f"{what} unreachable after {timeout:.0f}s: {exc.args[0]}") from exc
            if not announced:
                log.warning("waiting for %s: %s", what, exc.args[0])
                announced = True
            time.sleep(1)


def ensure_topics(settings: Settings, admin: AdminClient | None = None, *, timeout: float = 30.0) -> None:
    """Create the CDC topic and its dead-letter topic if they do not exist yet."""
    admin = admin or admin_client(settings)
    wait_for_broker(admin, timeout=timeout)
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [
        NewTopic(
            t, num_partitions=settings.topic_partitions, replication_factor=settings.topic_replication_factor
        )
        for t in (settings.cdc_topic, settings.cdc_dlq_topic)
        if t not in existing
    ]
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result()
            log.info("created topic=%s partitions=%d", topic, settings.topic_partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ServiceError(f"could not create topic {topic}: {exc.args[0].str()}") from exc
