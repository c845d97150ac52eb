"""Where each assigned partition starts: the destination's position, never Kafka's alone.

On assignment (inside the rebalance callback) every new partition is assigned at the offset
``cdc.kafka.positions.decide`` picks from the destination's ``applied_offsets``, the topic's id
and log range, and the group's offset. A partition whose start cannot be decided yet (the
destination or a broker unreachable) is assigned paused and *waiting*; one whose stored position
lies below the log start is *held* by a ``Gap``: paused, named in a log line, a metric and
``/ready``, and nothing after the gap is applied. The loop retries both every PLACE_RETRY
seconds (``retry``, only while no transient error pauses the consumer): a waiting one starts
once the facts can be read, a held one once the operator accepted the gap (``python -m cdc offsets accept-gap`` moved the stored position).

While consuming, ``auto.offset.reset`` is ``error``: a fetch below the log start (retention
overtook a lagging consumer, or delete-records) reaches ``lost`` instead of a silent reset, and
the partition is placed again from the destination, which finds the gap.

Messages of a partition that is not placed are never applied (``placed``): it is re-read from
its start once placed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from cdc.errors import DeliveryError, TransientError
from cdc.kafka.positions import TP, Gap, PositionStore, Start, starts
from cdc.runtime.stats import (
    DRIFTED,
    GAP,
    HELD,
    POSITION_GAP,
    POSITION_GAP_ACCEPTED,
    POSITION_RECREATED,
    POSITION_TRUNCATED,
    Stats,
)

log = logging.getLogger("consumer.positions")

# Seconds between attempts to place waiting and held partitions.
PLACE_RETRY = 5.0


class Placement:
    """The start of every assigned partition; changed only by the consumer's thread."""

    def __init__(self, store: PositionStore, admin: AdminClient, stats: Stats) -> None:
        self.store = store
        self.admin = admin
        self.stats = stats
        self.topic_ids: dict[str, str] = {}  # of the topics placed: written with the positions
        self.waiting: set[TP] = set()  # start not decided yet
        self.held: dict[TP, Gap] = {}  # a gap: not consumed until the operator accepts it
        # A table whose destination differs from its changes: its topics' partitions are paused
        # until ``release``; then placed from the destination like waiting ones.
        self.drifted: dict[str, tuple[str, str]] = {}  # topic -> (table, why)
        self._next_try = 0.0
        self._drifted_partitions: set[TP] = set()
        self._update_stats()

    @property
    def unplaced(self) -> set[TP]:
        return self.waiting | set(self.held) | self._drifted_partitions

    def placed(self, key: TP) -> bool:
        return key not in self.waiting and key not in self.held and key[0] not in self.drifted

    def hold_table(self, consumer: Consumer, table: str, why: str, topics: set[str], owned: set[TP]) -> None:
        """Hold every owned partition of ``topics`` (one table's): paused, not applied, until
        ``release``. Nothing of them was applied past the destination's position, which is where
        they start again."""
        new = [t for t in topics if t not in self.drifted]
        for topic in topics:
            self.drifted[topic] = (table, why)
        pause = [TopicPartition(*key) for key in sorted(owned) if key[0] in topics]
        if pause:
            consumer.pause(pause)
        self._drifted_partitions.update((tp.topic, tp.partition) for tp in pause)
        if new:
            log.error(
                "holding table %s (topic %s): %s; its changes wait, the other tables flow on, and it "
                "resumes by itself once the destination is fixed",
                table,
                ",".join(sorted(new)),
                why,
            )
        self._update_stats()

    def drifted_tables(self) -> dict[str, tuple[str, set[str]]]:
        """table -> (why, its topics) of the tables held."""
        out: dict[str, tuple[str, set[str]]] = {}
        for topic, (table, why) in self.drifted.items():
            out.setdefault(table, (why, set()))[1].add(topic)
        return out

    def release(self, table: str, topics: set[str]) -> None:
        """``table``'s destination is fixed: its partitions are placed again from the destination
        (at the next ``retry``)."""
        for topic in topics:
            self.drifted.pop(topic, None)
        back = {k for k in self._drifted_partitions if k[0] in topics}
        self._drifted_partitions -= back
        self.waiting |= back
        self._next_try = 0.0
        log.warning(
            "table %s: the destination now takes its changes; resuming %d partitions", table, len(back)
        )
        self._update_stats()

    def assign(self, consumer: Consumer, partitions: Iterable[TopicPartition]) -> None:
        """Assign ``partitions`` (new to this consumer) at their starts; pause the ones that have
        none yet (``retry`` assigns them again at their start). In the rebalance callback: the
        library's own assignment is replaced by this one."""
        todo = [(tp.topic, tp.partition) for tp in partitions]
        decided = self._decide(consumer, todo)
        assign, pause = [], []
        for key in todo:
            start = decided.get(key)
            if start is not None and start.offset is not None:
                assign.append(TopicPartition(*key, start.offset))
            else:
                # Paused from the start: nothing is fetched until it is placed.
                offset = (
                    start.gap.first_lost if start is not None and start.gap is not None else OFFSET_BEGINNING
                )
                assign.append(TopicPartition(*key, offset))
                pause.append(TopicPartition(*key))
        for key in todo:
            if key[0] in self.drifted:  # its table is held: placed again once it is released
                self._drifted_partitions.add(key)
                pause.append(TopicPartition(*key))
        consumer.incremental_assign(assign)
        if pause:
            consumer.pause(pause)
        self._tell_group(consumer, decided)
        self._update_stats()

    def forget(self, gone: Iterable[TP]) -> None:
        """Partitions that left this consumer."""
        for key in gone:
            self.waiting.discard(key)
            self.held.pop(key, None)
            self._drifted_partitions.discard(key)
        self._update_stats()

    def lost(self, consumer: Consumer, key: TP, reason: str) -> None:
        """A fetch of ``key`` fell out of the log (librdkafka's auto.offset.reset=error): pause it
        and place it again from the destination at the next ``retry``."""
        if not self.placed(key):
            return
        log.warning("%s[%d]: %s; placing it again from the destination's position", *key, reason)
        consumer.pause([TopicPartition(*key)])
        self.waiting.add(key)
        self._next_try = 0.0  # at the next turn, once the batch in flight is settled
        self._update_stats()

    def due(self) -> bool:
        return bool(self.waiting or self.held or self.drifted) and time.monotonic() >= self._next_try

    def retry(self, consumer: Consumer, owned: set[TP]) -> None:
        """Place the waiting and held partitions that can be placed now, and start them.

        Assigned again at their start rather than sought: librdkafka refuses to seek a partition
        that never fetched (``_STATE``), and a new local assignment also clears the error state
        of a fetch that fell out of the log. The group's assignment is not touched.
        """
        self._next_try = time.monotonic() + PLACE_RETRY
        todo = sorted(k for k in self.waiting | set(self.held) if k in owned)
        decided = self._decide(consumer, todo)
        go = [
            TopicPartition(*key, start.offset) for key, start in decided.items() if start.offset is not None
        ]
        if go:
            consumer.incremental_unassign([TopicPartition(tp.topic, tp.partition) for tp in go])
            consumer.incremental_assign(go)
            consumer.resume(go)  # librdkafka keeps a partition's pause across assignments
        self._tell_group(consumer, decided)
        self._update_stats()

    def reason(self) -> str | None:
        """Why this consumer is not ready, for /ready (None: every partition is placed)."""
        if self.held:
            gap = min(self.held.values(), key=lambda g: (g.topic, g.partition))
            more = f" (and {len(self.held) - 1} more partitions)" if len(self.held) > 1 else ""
            return (
                f"holding {gap.where}: offsets {gap.first_lost}..{gap.next_kept - 1} were removed before "
                f"the destination applied them{more}; see USAGE.md, 'A gap in the topic'"
            )
        if self.drifted:
            tables = self.drifted_tables()
            table = min(tables)
            more = f" (and {len(tables) - 1} more tables)" if len(tables) > 1 else ""
            return f"holding table {table}: {tables[table][0]}{more}"
        if self.waiting:
            return f"waiting to read the start of {len(self.waiting)} partitions from the destination"
        return None

    # -- internals ------------------------------------------------------------------------------

    def _decide(self, consumer: Consumer, todo: list[TP]) -> dict[TP, Start]:
        """The starts of ``todo`` that can be decided now; the rest wait (logged once per try)."""
        if not todo:
            return {}
        try:
            decided, ids = starts(consumer, self.admin, self.store, todo)
        except (TransientError, DeliveryError) as exc:
            self.waiting.update(todo)
            self._next_try = time.monotonic() + PLACE_RETRY
            log.warning(
                "cannot decide where %d partitions start (%s): they wait, retrying in %.0fs",
                len(todo),
                exc,
                PLACE_RETRY,
            )
            return {}
        self.topic_ids.update(ids)
        started = []
        for key, start in decided.items():
            for level, text in start.notes:
                log.log(level, "%s", text)
            self.waiting.discard(key)
            before = self.held.pop(key, None)
            if start.gap is not None:
                if before != start.gap:
                    log.error("%s", start.gap.line())
                    self.stats.incr(POSITION_GAP)
                self.held[key] = start.gap
                continue
            if before is not None:
                log.warning(
                    "%s: the gap of offsets %d..%d is accepted (the destination's position moved past it): "
                    "resuming at %d",
                    before.where,
                    before.first_lost,
                    before.next_kept - 1,
                    start.offset,
                )
                self.stats.incr(POSITION_GAP_ACCEPTED)
            if start.recreated:
                self.stats.incr(POSITION_RECREATED)
            if start.truncated:
                self.stats.incr(POSITION_TRUNCATED)
            started.append(f"{key[0]}[{key[1]}]@{start.offset}")
        if started:
            log.info("starting at the destination's positions: %s", " ".join(started))
        return decided

    def _tell_group(self, consumer: Consumer, decided: dict[TP, Start]) -> None:
        """Commit the starts that differ from what the group knew (a note says so) as the group's
        offsets, so lag tools read the destination's truth before the first batch moves them.
        Asynchronous and best effort: the group's offset is never the record."""
        fix = [
            TopicPartition(*key, start.offset)
            for key, start in sorted(decided.items())
            if start.offset is not None and start.notes
        ]
        if not fix:
            return
        try:
            consumer.commit(offsets=fix, asynchronous=True)
        except KafkaException as exc:
            log.debug("group offsets not set to the starts: %s", exc)

    def _update_stats(self) -> None:
        self.stats.set(HELD, len(self.waiting) + len(self.held))  # drifted tables: DRIFTED
        self.stats.set(DRIFTED, {(table,): 1 for table in self.drifted_tables()})
        self.stats.set(GAP, {(g.topic, g.partition): g.missing for g in self.held.values()})
