"""The consumer's offset state: the partitions it owns, how often each left it, and the offsets of
applied batches not yet committed to Kafka.

An offset moves only past messages whose destination transaction committed, and only for a
partition that stayed with this consumer since those messages were read: what another owner did
meanwhile is unknown, and this batch's offsets could skip it. Commits are synchronous; what Kafka
refuses stays pending and is retried, until the partition leaves (revoked: committed first, lost:
dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from cdc.kafka.client import Received
from cdc.runtime.stats import TRANSIENT_OFFSET_COMMIT, Stats
from cdc.sink.batch import Decoded

log = logging.getLogger("consumer.offsets")

TP = tuple[str, int]


class Offsets:
    """Owned partitions, their epochs and pending offsets; changed only by the consumer's thread
    (its loop and the rebalance callbacks, which run inside ``consume()``)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        # The partitions assigned to this consumer now.
        self.owned: set[TP] = set()
        # Per partition, how often it left this consumer: a message read before it left must not
        # move the offset after it came back (what it missed in between is not applied).
        self.epochs: dict[TP, int] = {}
        # Per partition, the next offset to commit: applied in the database, not yet committed.
        self.uncommitted: dict[TP, int] = {}

    def assign(self, partitions: Iterable[TP]) -> None:
        self.owned.update(partitions)

    def forget(self, gone: set[TP]) -> None:
        """The partitions ``gone`` left: drop their pending offsets, start a new epoch for each."""
        self.owned -= gone
        for tp in gone:
            self.uncommitted.pop(tp, None)
            self.epochs[tp] = self.epochs.get(tp, 0) + 1

    def stayed(self, key: TP, epochs: dict[TP, int]) -> bool:
        """Whether partition ``key``, read in ``epochs``, has stayed with this consumer since."""
        return key in self.owned and self.epochs.get(key, 0) == epochs.get(key, 0)

    def kept(self, epochs: dict[TP, int]) -> Callable[[Received], bool]:
        """Whether a message read in ``epochs`` is from a partition that stayed (asked when called)."""
        return lambda msg: self.stayed((msg.topic, msg.partition), epochs)

    def note(self, batch: Decoded, epochs: dict[TP, int]) -> None:
        """``batch``, read in ``epochs``, committed: its offsets are to be committed next."""
        last: dict[TP, int] = {}
        for msg in batch.records:
            key = (msg.topic, msg.partition)
            if msg.offset >= last.get(key, -1):
                last[key] = msg.offset
        for key, offset in last.items():
            # A partition that left during the batch is its new owner's to commit.
            if self.stayed(key, epochs):
                self.uncommitted[key] = max(self.uncommitted.get(key, 0), offset + 1)
        log.debug("batch applied messages=%d, offsets to commit %s", len(batch.records), self.uncommitted)

    def commit(self, consumer: Consumer, only: set[TP] | None = None) -> None:
        """Commit the pending offsets (of ``only``'s partitions) synchronously; what is refused
        stays pending and is retried.

        A refusal during a rebalance (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION, ...) does not
        mean the partitions moved: cooperative rebalancing keeps most of them here. Only
        ``forget``, for the partitions that really left, drops pending offsets.
        """
        todo = {tp: o for tp, o in self.uncommitted.items() if only is None or tp in only}
        if not todo:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in todo.items()]
        try:
            committed = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.stats.incr(TRANSIENT_OFFSET_COMMIT)
            log.warning("offset commit refused (%s); kept pending, will retry", exc.args[0].str())
            return
        for tp in committed or []:
            key = (tp.topic, tp.partition)
            if tp.error is None and self.uncommitted.get(key) == tp.offset:
                del self.uncommitted[key]
            elif tp.error is not None:
                log.warning(
                    "offset commit of %s[%d] failed (%s), will retry", tp.topic, tp.partition, tp.error.str()
                )
