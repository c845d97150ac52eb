"""The batch decision: every consumed message ends applied, stale, duplicate or dead-lettered.

``BatchApplier.apply(records)``:

1. Decode and validate each record against the destination table (``decode``, the table model's
   ``Codec``). An invalid one is a dead letter at once. No database needed: ``apply_decoded`` takes the result, the rest happens in one
   destination transaction.
2. Apply the rest set-based (``cdc.sink.statements``) in a savepoint.
3. A bad message in the batch (a database data error, SQLSTATE class 22 or 23, or a value that
   cannot be put into the statement): roll back to the savepoint and apply the batch in halves,
   each in a savepoint, halving what fails down to one message per savepoint; a failing message
   is retried up to ``max_attempts`` times, then it is a dead letter.
4. Dead letters: the circuit breaker is asked, their action_ids are recorded as ``dlq`` (only
   for messages that carry producer.py's mark, so a stranger cannot take a real id), and they are
   produced to the DLQ and acknowledged, all before the transaction commits.
5. Commit. Anything else (transient, a bug) rolls the whole batch back and leaves this module.

Works on plain records (``cdc.kafka.client.Received``), so it runs the same with or without a consumer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from cdc.dlq.queue import CircuitBreaker, DeadLetter, DeadLetterQueue, is_replayed
from cdc.errors import BadMessageError, HaltError
from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Received
from cdc.model.change import Change, ChangeCodec
from cdc.model.event import Codec, Event, InvalidEventError
from cdc.model.table import SOURCE_TABLE, Table
from cdc.model.topics import parse_topic
from cdc.runtime.db import Database, classify
from cdc.runtime.stats import APPLIED, CONSUMED, DLQ, DUPLICATES, RETRIES, STALE, Stats, table_events_key
from cdc.sink import positions
from cdc.sink import statements as sink
from cdc.sink.generic import DeadRecord, GenericSink, Shape, TableName, record_dead, shape_of

log = logging.getLogger("consumer.batch")
_new_tuple = tuple.__new__  # a named tuple without its __new__: one is built per message


@dataclass
class BatchResult:
    """Where every record of a batch ended: each is in exactly one list."""

    applied: list[sink.Delivered] = field(default_factory=list)
    stale: list[sink.Delivered] = field(default_factory=list)
    duplicates: list[Received] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)

    def decided_events(self) -> list[Event]:
        return [i.event for i in self.applied + self.stale]


@dataclass
class Decoded:
    """A batch decoded and validated (``decode``): its events, and its invalid messages as dead
    letters. Decoding needs no database, so the consumer does it while the batch before applies."""

    records: list[Received]
    items: list[sink.Delivered]
    invalid: list[DeadLetter]
    generic: bool = True  # False: every item is an employees event (nothing to split by table)

    def only(self, keep: Callable[[Received], bool]) -> Decoded:
        """The part of the batch whose messages ``keep`` accepts (e.g. the partitions still owned)."""
        return Decoded(
            [r for r in self.records if keep(r)],
            [i for i in self.items if keep(i.record)],
            [d for d in self.invalid if keep(d.record)],
            self.generic,
        )


def decode(batch: Sequence[Received], codec: Codec, changes: ChangeCodec | None = None) -> Decoded:
    """Step 1: decode and validate each message; an invalid one is a dead letter at once.

    A message on a topic under ``changes.prefix`` is a change of a generic table; any other one
    an employees event."""
    items: list[sink.Delivered] = []
    invalid: list[DeadLetter] = []
    from_json, delivered = codec.from_json, sink.Delivered
    prefix = changes.prefix + "." if changes is not None else None
    generic = False
    for record in batch:
        try:
            if prefix is not None and record.topic.startswith(prefix):
                assert changes is not None
                generic = True
                event = changes.from_json(record.value, record.topic)
            else:
                event = from_json(record.value)
        except InvalidEventError as exc:
            invalid.append(DeadLetter(record, type(exc).__name__, str(exc), attempts=1))
            continue
        items.append(_new_tuple(delivered, (event, record, is_replayed(record))))
    return Decoded(list(batch), items, invalid, generic)


class BatchApplier:
    """Decides batches on ``db``. ``dlq`` None: a message that cannot be applied raises HaltError."""

    def __init__(
        self,
        db: Database,
        *,
        dlq: DeadLetterQueue | None,
        breaker: CircuitBreaker,
        stats: Stats,
        max_attempts: int,
        idempotency: bool,
        topic_prefix: str = "cdc",
        fk_wait: float = 30.0,
    ) -> None:
        self.db = db
        self.changes = ChangeCodec(topic_prefix)
        self._tables: dict[str, str] = {}  # topic -> table (``table_of``)
        self._mixed = True  # the batch being applied may hold changes of generic tables
        self.generic = GenericSink(fk_wait=fk_wait)
        self.dlq = dlq
        self.breaker = breaker
        self.stats = stats
        self.max_attempts = max_attempts
        self.idempotency = idempotency
        self._statements: sink.Statements | None = None
        self._codec: Codec | None = None
        # The ids of the topics read (``cdc.sink.placement``): set, each batch also stores the
        # offsets it consumed in its transaction (``cdc.sink.positions``); None: a batch without
        # a consumer (tests, tools) stores none.
        self.topic_ids: Mapping[str, str] | None = None

    def load_table(self) -> None:
        """Read the destination table from its catalog and build the statements and the event
        checks from it (done once, at the first batch if not before)."""
        with self.db.connection() as conn, conn.cursor() as cur:
            statements = sink.Statements.build(cur, Table.load(cur, SOURCE_TABLE))
            self.generic.probe(cur)
        self._statements, self._codec = statements, Codec(statements.table)

    @property
    def statements(self) -> sink.Statements:
        if self._statements is None:
            self.load_table()
        assert self._statements is not None
        return self._statements

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            self.load_table()
        assert self._codec is not None
        return self._codec

    def decode(self, batch: Sequence[Received]) -> Decoded:
        """Step 1 for this destination's table (no database call once the table is known)."""
        return decode(batch, self.codec, self.changes)

    def drifted(self, batch: Decoded) -> dict[TableName, tuple[str, Shape, set[str]]]:
        """The generic tables of ``batch`` whose destination differs from their changes: per
        table, why, the shape of its changes and its topics. Their changes must not be applied
        (the caller holds them); the catalog is read once per table, then cached."""
        if not batch.generic:
            return {}
        shapes: dict[TableName, tuple[Shape, set[str]]] = {}
        for item in batch.items:
            event = item.event
            if type(event) is Change:
                name = (event.schema, event.table)
                if name not in shapes:
                    shapes[name] = (shape_of([item]), set())
                shapes[name][1].add(item.record.topic)
        held = {}
        unknown = []
        for name, (shape, topics) in shapes.items():
            known, why = self.generic.known(name, shape)
            if not known:
                unknown.append(name)
            elif why is not None:
                held[name] = (why, shape, topics)
        if unknown:  # read from the catalog once per table (and after a fix)
            with self.db.connection() as conn, conn.cursor() as cur:
                for name in unknown:
                    shape, topics = shapes[name]
                    why = self.generic.check(cur, name, shape)
                    if why is not None:
                        held[name] = (why, shape, topics)
        return held

    def recheck(self, name: TableName, shape: Shape) -> str | None:
        """``name``'s drift read afresh from the destination's catalog (None: fixed)."""
        self.generic.forget(name)
        with self.db.connection() as conn, conn.cursor() as cur:
            return self.generic.check(cur, name, shape)

    def _apply_items(self, cur: psycopg2.extensions.cursor, items: list[sink.Delivered]) -> sink.ApplyResult:
        """Apply employees events and changes of generic tables, each set-based, in ``cur``'s transaction."""
        if not self._mixed:
            return sink.apply_events(cur, items, idempotency=self.idempotency, statements=self.statements)
        plain = [i for i in items if type(i.event) is not Change]
        if len(plain) == len(items):
            return sink.apply_events(cur, items, idempotency=self.idempotency, statements=self.statements)
        result = sink.ApplyResult()
        if plain:
            result.add(
                sink.apply_events(cur, plain, idempotency=self.idempotency, statements=self.statements)
            )
        generic = [i for i in items if type(i.event) is Change]
        result.add(self.generic.apply(cur, generic, idempotency=self.idempotency))
        return result

    def apply(self, batch: Sequence[Received]) -> BatchResult:
        """Decode, decide and commit ``batch``; count it in the stats. Raises TransientError and bugs."""
        return self.apply_decoded(self.decode(batch))

    def apply_decoded(self, batch: Decoded) -> BatchResult:
        """Decide and commit a decoded batch; count it in the stats. Raises TransientError and bugs."""
        items = batch.items
        dead = list(batch.invalid)
        self._mixed = batch.generic
        with self.db.connection() as conn, conn.cursor() as cur:
            # Offsets move once this commit returns, so it must survive a server crash even
            # where the server is configured with synchronous_commit = off. The batch's positions
            # go with the same round trip, outside the savepoint: they commit with the batch.
            begin = "SET LOCAL synchronous_commit = on; SAVEPOINT batch"
            if self.topic_ids is not None and batch.records:
                cur.execute(positions.WRITE + begin, positions.write_params(batch.records, self.topic_ids))
            else:
                cur.execute(begin)
            try:
                done = self._apply_items(cur, items)
            except (psycopg2.Error, BadMessageError) as exc:
                if not isinstance(classify(exc), BadMessageError):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT batch")
                log.warning(
                    "batch of %d hit a data error (%s): finding the bad messages in halves",
                    len(items),
                    _text(exc),
                )
                done, rejected = self._isolate(cur, items)
                dead += rejected
            result = BatchResult(done.applied, done.stale, [i.record for i in done.duplicates])
            if dead:
                result.dead, copies = self._dead_letter(cur, dead, len(batch.records))
                result.duplicates += copies
        # Committed: from here on the batch counts.
        self.breaker.record(len(result.dead), len(batch.records))
        self.stats.incr(CONSUMED, len(batch.records))
        for action, n in done.applied_by_action().items():
            self.stats.incr(APPLIED + action.lower(), n)
        self.stats.incr(DUPLICATES, len(result.duplicates))
        self.stats.incr(STALE, len(result.stale))
        self.stats.incr(DLQ, len(result.dead))
        self._count_tables(result)
        return result

    def _count_tables(self, result: BatchResult) -> None:
        """The batch's outcomes per table (``cdc_consumer_table_events_total``)."""
        if not self._mixed:  # employees events only: no need to look at each message
            for outcome, n in (
                ("applied", len(result.applied)),
                ("stale", len(result.stale)),
                ("duplicate", len(result.duplicates)),
                ("dlq", len(result.dead)),
            ):
                if n:
                    self.stats.incr(table_events_key(outcome, SOURCE_TABLE), n)
            return
        for outcome, records in (
            ("applied", [i.record for i in result.applied]),
            ("stale", [i.record for i in result.stale]),
            ("duplicate", result.duplicates),
            ("dlq", [d.record for d in result.dead]),
        ):
            if records:
                for topic, n in Counter(r.topic for r in records).items():
                    self.stats.incr(table_events_key(outcome, self.table_of(topic)), n)

    def table_of(self, topic: str) -> str:
        """The table whose changes ``topic`` carries, as metrics and logs name it."""
        name = self._tables.get(topic)
        if name is None:
            parsed = parse_topic(self.changes.prefix, topic)
            name = self._tables[topic] = (
                f"{parsed[0]}.{parsed[1]}"
                if parsed
                else topic
                if topic.startswith(self.changes.prefix + ".")
                else SOURCE_TABLE
            )
        return name

    def _isolate(
        self, cur: psycopg2.extensions.cursor, items: list[sink.Delivered]
    ) -> tuple[sink.ApplyResult, list[DeadLetter]]:
        """Find the messages behind a data error: halves of the batch in savepoints, down to
        one message per savepoint for the failing ones; a failing one is retried, then rejected.

        Halving costs about 2 log2(n) statements per bad message, where one statement per
        message cost seconds for a batch of thousands (each statement carries fixed costs).
        """
        fresh, copies = sink.dedupe(items)  # the replayed copy of an id wins here too
        result = sink.ApplyResult(duplicates=copies)
        rejected: list[DeadLetter] = []
        todo = list(fresh.values())
        self._halve(cur, todo[: len(todo) // 2], result, rejected)
        self._halve(cur, todo[len(todo) // 2 :], result, rejected)
        return result, rejected

    def _halve(
        self,
        cur: psycopg2.extensions.cursor,
        items: list[sink.Delivered],
        result: sink.ApplyResult,
        rejected: list[DeadLetter],
    ) -> None:
        if len(items) == 1:
            self._one(cur, items[0], result, rejected)
        elif items:
            try:
                result.add(self._in_savepoint(cur, items))
            except BadMessageError as exc:
                log.debug("%d messages hit a data error (%s): halving", len(items), exc)
                self._halve(cur, items[: len(items) // 2], result, rejected)
                self._halve(cur, items[len(items) // 2 :], result, rejected)

    def _one(
        self,
        cur: psycopg2.extensions.cursor,
        item: sink.Delivered,
        result: sink.ApplyResult,
        rejected: list[DeadLetter],
    ) -> None:
        """Apply one message in its own savepoint; a failing one is retried, then rejected."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                result.add(self._in_savepoint(cur, [item]))
                return
            except BadMessageError as exc:
                error = exc.__cause__ or exc
                log.warning(
                    "action_id=%d %s attempt %d/%d failed: %s",
                    item.event.action_id,
                    item.record.where(),
                    attempt,
                    self.max_attempts,
                    _text(error),
                )
                if attempt == self.max_attempts:
                    rejected.append(DeadLetter(item.record, type(error).__name__, _text(error), attempt))
                else:
                    # At once: a pause per attempt could hold a batch with many bad rows
                    # past max.poll.interval.ms.
                    self.stats.incr(RETRIES)

    def _in_savepoint(self, cur: psycopg2.extensions.cursor, items: list[sink.Delivered]) -> sink.ApplyResult:
        """Apply ``items`` in a savepoint, released after; rolled back on a data error, which is
        raised as BadMessageError caused by the original one. Other errors leave as they are."""
        cur.execute("SAVEPOINT part")
        try:
            done = self._apply_items(cur, items)
        except (psycopg2.Error, BadMessageError) as exc:
            if not isinstance(classify(exc), BadMessageError):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT part; RELEASE SAVEPOINT part")
            raise BadMessageError(_text(exc)) from exc
        cur.execute("RELEASE SAVEPOINT part")
        return done

    def _dead_letter(
        self, cur: psycopg2.extensions.cursor, dead: list[DeadLetter], batch_size: int
    ) -> tuple[list[DeadLetter], list[Received]]:
        """Record and produce dead letters inside the open transaction.

        Returns the letters sent and the records not sent because their action_id was already
        decided (another copy in this batch, or a dead letter sent before a crash).
        """
        first = dead[0]
        if self.dlq is None:
            raise HaltError(
                f"message {first.where()} cannot be applied after {first.attempts} attempt(s) "
                f"({first.error_class}: {first.error}) and the DLQ is off (--no-dlq): stopping "
                "without committing its offset"
            )
        self.breaker.check(len(dead), batch_size)
        copies: list[Received] = []
        if self.idempotency:
            dead = self._record_dead(cur, dead, copies)
        for letter in dead:
            log.warning(
                "dead letter %s error=%s attempts=%d: %s",
                letter.where(),
                letter.error_class,
                letter.attempts,
                letter.error,
            )
        if dead:
            self.dlq.send(dead, table_of=self.table_of)
        return dead, copies

    def _record_dead(
        self, cur: psycopg2.extensions.cursor, dead: list[DeadLetter], copies: list[Received]
    ) -> list[DeadLetter]:
        """Record each dead letter of ours with a usable action_id as ``dlq`` (an employees event
        by its emp_id, a change of another table by its table and key), one per id: the
        operator's replayed copy wins. Returns the letters to send; a copy of an id decided
        before (in this batch, or sent before a crash) goes to ``copies`` instead. A letter
        without the mark or a usable id is sent, not recorded: a stranger cannot take a real id."""
        prefix = self.changes.prefix + "."
        unknown: list[DeadLetter] = []
        by_id: dict[int, tuple[DeadLetter, sink.EventRecord | DeadRecord]] = {}
        for letter in dead:
            m = letter.record
            ours = m.has_header(MARK_HEADER, MARK_VALUE)
            record: sink.EventRecord | DeadRecord | None = None
            if m.topic.startswith(prefix):
                ids = self.changes.salvage(m.value) if ours else None
                if ids is not None:
                    record = DeadRecord(*ids, m.topic, m.partition, m.offset, is_replayed(m))
            else:
                plain = self.codec.salvage(m.value) if ours else None
                if plain is not None:
                    record = sink.EventRecord(*plain, m.topic, m.partition, m.offset, is_replayed(m))
            if record is None:
                unknown.append(letter)
                continue
            kept = by_id.get(record.action_id)
            if kept is None or (record.replayed and not kept[1].replayed):
                by_id[record.action_id] = (letter, record)
                if kept is not None:
                    copies.append(kept[0].record)
            else:
                copies.append(m)
        records = [r for _, r in by_id.values()]
        new = sink.record_dead(
            cur, [r for r in records if isinstance(r, sink.EventRecord)], statements=self.statements
        ) | record_dead(cur, [r for r in records if isinstance(r, DeadRecord)])
        copies += [letter.record for letter, r in by_id.values() if r.action_id not in new]
        return unknown + [letter for letter, r in by_id.values() if r.action_id in new]


def _text(exc: BaseException) -> str:
    return (getattr(exc, "pgerror", None) or str(exc)).strip()
