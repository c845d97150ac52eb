"""The destination's record of what it consumed: ``applied_offsets`` (and ``accepted_gaps``).

Per topic partition the offset after the last message decided, with Kafka's topic id, written in
the batch's own transaction (``write_sql``, sent with the batch's first statement: no extra
round trip), so the rows and the position commit together or not at all. Readers start each
partition there (``cdc.kafka.positions.decide``), whatever the group's committed offset says.

An operator who accepts a gap (``accept_gap``) moves the position past it; the record of that
stays in ``accepted_gaps``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from cdc.kafka.client import Received
from cdc.kafka.positions import TP, Gap, Stored
from cdc.runtime.db import Database

log = logging.getLogger("consumer.positions")

TABLE = "applied_offsets"
GAPS = "accepted_gaps"

# The next offsets of a batch: one row per partition, in (topic, partition) order so two
# transactions writing the same partitions take their locks in one order. The position never
# moves back for the same topic (a batch of a consumer that lost the partition can commit after
# the new owner's); a new topic id replaces the old one's position.
WRITE = """
INSERT INTO applied_offsets AS o (topic, "partition", next_offset, topic_id)
SELECT * FROM unnest(%(pos_topic)s::text[], %(pos_part)s::int[], %(pos_next)s::bigint[], %(pos_id)s::text[])
ON CONFLICT (topic, "partition") DO UPDATE
   SET next_offset = EXCLUDED.next_offset, topic_id = coalesce(EXCLUDED.topic_id, o.topic_id), updated_at = now()
 WHERE o.next_offset < EXCLUDED.next_offset OR o.topic_id IS DISTINCT FROM coalesce(EXCLUDED.topic_id, o.topic_id);
"""

_READ = 'SELECT topic, "partition", next_offset, topic_id FROM applied_offsets WHERE topic = ANY(%s)'

_ACCEPT = """
WITH moved AS (
    INSERT INTO applied_offsets AS o (topic, "partition", next_offset, topic_id)
    VALUES (%(topic)s, %(partition)s, %(next_kept)s, %(topic_id)s)
    ON CONFLICT (topic, "partition") DO UPDATE
       SET next_offset = EXCLUDED.next_offset, topic_id = EXCLUDED.topic_id, updated_at = now()
     WHERE o.next_offset = %(first_lost)s OR o.topic_id IS DISTINCT FROM EXCLUDED.topic_id
    RETURNING 1
)
INSERT INTO accepted_gaps (topic, "partition", topic_id, first_lost, next_kept, accepted_by)
SELECT %(topic)s, %(partition)s, %(topic_id)s, %(first_lost)s, %(next_kept)s, %(who)s
 WHERE EXISTS (SELECT FROM moved)
RETURNING accepted_at
"""


def write_params(records: Iterable[Received], topic_ids: Mapping[str, str]) -> dict[str, list[Any]]:
    """``WRITE``'s parameters for a batch: per partition, the offset after its last message."""
    last: dict[TP, int] = {}
    for r in records:
        key = (r.topic, r.partition)
        if r.offset >= last.get(key, -1):
            last[key] = r.offset
    return next_params({k: o + 1 for k, o in last.items()}, topic_ids)


def next_params(next_offsets: Mapping[TP, int], topic_ids: Mapping[str, str]) -> dict[str, list[Any]]:
    """``WRITE``'s parameters for these next offsets."""
    keys = sorted(next_offsets)
    return {
        "pos_topic": [t for t, _ in keys],
        "pos_part": [p for _, p in keys],
        "pos_next": [next_offsets[k] for k in keys],
        "pos_id": [topic_ids.get(t) for t, _ in keys],
    }


def read(cur: psycopg2.extensions.cursor, topics: Iterable[str]) -> dict[TP, Stored]:
    cur.execute(_READ, (sorted(set(topics)),))
    return {(t, p): Stored(o, i) for t, p, o, i in cur.fetchall()}


def read_all(cur: psycopg2.extensions.cursor) -> dict[TP, tuple[int, str | None, Any]]:
    """Every stored position: next offset, topic id, when it last moved."""
    cur.execute('SELECT topic, "partition", next_offset, topic_id, updated_at FROM applied_offsets')
    return {(t, p): (o, i, at) for t, p, o, i, at in cur.fetchall()}


@dataclass
class DestinationPositions:
    """``cdc.kafka.positions.PositionStore`` on the destination's pool."""

    db: Database

    def read(self, topics: Iterable[str]) -> dict[TP, Stored]:
        with self.db.connection() as conn, conn.cursor() as cur:
            return read(cur, topics)

    def write(self, next_offsets: Mapping[TP, int], topic_ids: Mapping[str, str]) -> None:
        if next_offsets:
            with self.db.connection() as conn, conn.cursor() as cur:
                cur.execute(WRITE, next_params(next_offsets, topic_ids))


def accept_gap(cur: psycopg2.extensions.cursor, gap: Gap, topic_id: str, who: str) -> bool:
    """Move the position of ``gap``'s partition past it and record who accepted it. False if the
    stored position is no longer the gap's start (another accept, or the consumer moved)."""
    cur.execute(
        _ACCEPT,
        {
            "topic": gap.topic,
            "partition": gap.partition,
            "topic_id": topic_id,
            "first_lost": gap.first_lost,
            "next_kept": gap.next_kept,
            "who": who,
        },
    )
    return cur.fetchone() is not None


def last_applied_before(cur: psycopg2.extensions.cursor, gap: Gap) -> tuple[int, Any] | None:
    """The action_id and captured_at of the last message decided from ``gap``'s partition before
    the gap, if ``processed_events`` still has it (a scan: for the operator's tools only)."""
    cur.execute(
        'SELECT action_id, captured_at FROM processed_events WHERE topic = %s AND "partition" = %s'
        ' AND "offset" < %s ORDER BY "offset" DESC LIMIT 1',
        (gap.topic, gap.partition, gap.first_lost),
    )
    row = cur.fetchone()
    return (row[0], row[1]) if row else None


def set_position(
    cur: psycopg2.extensions.cursor, topic: str, partition: int, offset: int, topic_id: str
) -> None:
    """Put the position of ``topic[partition]`` at ``offset`` (the operator's rewind)."""
    cur.execute(
        """
INSERT INTO applied_offsets AS o (topic, "partition", next_offset, topic_id)
VALUES (%s, %s, %s, %s)
ON CONFLICT (topic, "partition") DO UPDATE
   SET next_offset = EXCLUDED.next_offset, topic_id = EXCLUDED.topic_id, updated_at = now()
""",
        (topic, partition, offset, topic_id),
    )
