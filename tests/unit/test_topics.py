"""Topic names of generic tables: Kafka's characters only, never shared, read back."""

from __future__ import annotations

import itertools

import pytest

from cdc.model.topics import MAX_TOPIC, collision_key, escape, parse_topic, topic_for

NAMES = ["employees", "Order Items", "a.b", "a-b", "a_b", "a-2eb", "select", "Ünï", "x" * 63, "日本", ""]


@pytest.mark.parametrize("name", NAMES)
def test_an_escaped_name_uses_kafkas_characters_and_reads_back(name):
    topic = topic_for("cdc", "public", name)
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in topic)
    assert parse_topic("cdc", topic) == ("public", name)


def test_two_tables_never_share_a_topic():
    parts = ["a", "b", "a.b", "a_b", "a-b", "b.c", "a-2eb", "A"]
    topics = {topic_for("cdc", s, t) for s, t in itertools.product(parts, parts)}
    assert len(topics) == len(parts) ** 2


def test_examples():
    assert topic_for("cdc", "public", "Order Items") == "cdc.public.Order-20Items"
    assert topic_for("prod.cdc", "my.schema", "t") == "prod.cdc.my-2eschema.t"
    assert parse_topic("prod.cdc", "prod.cdc.my-2eschema.t") == ("my.schema", "t")
    assert parse_topic("cdc", "other.public.t") is None
    assert parse_topic("cdc", "cdc.public.bad-zz") is None


def test_a_name_too_long_for_kafka_ends_in_a_hash_of_the_whole():
    long_a, long_b = "ä" * 31 + "a", "ä" * 31 + "b"  # 63 bytes each, 185 topic characters
    a, b = topic_for("cdc", long_a, long_a), topic_for("cdc", long_a, long_b)
    assert len(a) == len(b) == MAX_TOPIC and a != b
    assert "-h" in a and parse_topic("cdc", a) is None


def test_the_collision_key_reads_dot_and_underscore_alike():
    assert collision_key(topic_for("cdc", "public_a", "b")) == collision_key(
        topic_for("cdc", "public", "a_b")
    )
    assert escape("a.b") != escape("a_b")
