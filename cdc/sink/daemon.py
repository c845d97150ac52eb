"""The sink daemon: apply CDC events from Kafka to the destination PostgreSQL, exactly once.

    python consumer_final.py                  # run until SIGINT/SIGTERM
    python consumer_final.py --replay-dlq     # republish the dead-letter topic, then exit
    python consumer_final.py --show-dlq       # print the dead-letter topic with its headers

Each turn of the group loop (``ProductionCDCConsumer.run``):

1. Take up to CONSUMER_BATCH_SIZE messages (see ``_next_messages``) and decode them
   (``cdc.sink.batch``), while the batch before is applied in the worker thread
   (``cdc.sink.inflight``).
2. Wait for that batch before, count it and note its offsets (``cdc.sink.offsets``); hand this
   one to the worker, which decides it in one destination transaction (``cdc.sink.batch``): apply
   set-based (``cdc.sink.statements``), isolate a bad message (halves in savepoints), dead-letter
   what cannot be applied (produced to the DLQ and acknowledged before the commit: a crash in
   between re-sends a dead letter at worst, never loses one).
3. Commit the noted offsets (last + 1 per partition) synchronously: only batches whose
   transaction committed have offsets to commit. A partition revoked meanwhile first waits for
   the batch in flight, then commits what is applied; a lost partition drops its offsets.

The Kafka commit is for lag tools and the group's view: where a partition starts is the
destination's own record, the offsets each batch stores in its transaction
(``cdc.sink.positions``), checked against the topic on assignment (``cdc.sink.placement``): a
reset group changes nothing, a recreated topic starts from its beginning, and messages removed
before they were applied hold their partition (a gap is never skipped silently).

A transient error (database down, deadlock, DLQ unreachable) rolls the batch back; the
partitions are paused and the consumer keeps polling, so it stays in its group while it waits
with capped exponential backoff, then retries the same batch (``cdc.sink.retry``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from cdc.dlq import queue as dlq_module
from cdc.dlq.queue import CircuitBreaker, DeadLetterQueue
from cdc.dlq.replay import replay_pending
from cdc.errors import (
    CDCError,
    ConfigError,
    DeliveryError,
    HaltError,
    SchemaMissingError,
    TransientError,
)
from cdc.kafka.client import Received, admin_client, consumer_config, ensure_topics
from cdc.kafka.lag import LagWatch
from cdc.model.event import ACTIONS
from cdc.runtime import exits
from cdc.runtime.db import Database
from cdc.runtime.logs import configure_logging, quiet_repeats
from cdc.runtime.metrics import CONSUMER, MetricsServer, Probe, histograms
from cdc.runtime.settings import Settings, load_settings, validate
from cdc.runtime.signals import StopSignal, backoff_delay
from cdc.runtime.stats import (
    APPLIED,
    ASSIGNED,
    BATCH_LATENCY,
    BATCHES,
    CONSUMED,
    DB_IN_USE,
    DB_MAX,
    DLQ,
    DUPLICATES,
    E2E_LATENCY,
    PAUSED,
    REBALANCE_ASSIGNED,
    REBALANCE_LOST,
    REBALANCE_REVOKED,
    RETRIES,
    STALE,
    Stats,
    p50,
    p99,
)
from cdc.sink import statements as sink
from cdc.sink.batch import BatchApplier, Decoded
from cdc.sink.generic import Shape, TableName
from cdc.sink.inflight import InFlight
from cdc.sink.offsets import TP, Offsets
from cdc.sink.placement import Placement
from cdc.sink.positions import DestinationPositions
from cdc.sink.retry import PausedRetry

log = logging.getLogger("consumer")
KAFKA_LOG = logging.getLogger("consumer.kafka")
quiet_repeats(KAFKA_LOG)

STATS_KEYS = [
    CONSUMED,
    *(APPLIED + a.lower() for a in ACTIONS),
    DUPLICATES,
    STALE,
    DLQ,
    RETRIES,
    BATCHES,
    p50(BATCH_LATENCY),
    p99(BATCH_LATENCY),
    p50(E2E_LATENCY),
    p99(E2E_LATENCY),
]
# The cyclic garbage collector's thresholds for the daemon (see tune_gc).
GC_THRESHOLDS = (20_000, 20, 20)
# With a batch in flight, wait this long at most for the next message, so a finished batch's
# offsets are committed soon after it (consume() cannot also wait for the worker).
IN_FLIGHT_POLL = 0.005
# Milliseconds between metadata refreshes: a new table's topic is consumed within this time.
TOPIC_REFRESH_MS = 30_000


class ProductionCDCConsumer:
    """Consume ``CDC_TOPIC`` and apply it to ``DEST_DB_URL``; see the module docstring.

    ``enable_dlq=False``: a message that cannot be applied stops the consumer (HaltError)
    instead of going to the DLQ; its offset is not committed. ``enable_idempotency=False``:
    no ``processed_events`` bookkeeping; the version guard still keeps state correct.
    """

    def __init__(
        self,
        *,
        group_id: str | None = None,
        enable_dlq: bool = True,
        enable_idempotency: bool = True,
        settings: Settings | None = None,
        batch_size: int | None = None,
        stop_signal: StopSignal | None = None,
    ) -> None:
        base = settings if settings is not None else load_settings()
        overrides: dict[str, Any] = {"consumer_group_id": group_id, "consumer_batch_size": batch_size}
        self.settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        validate(self.settings)
        self.enable_dlq = enable_dlq
        self.enable_idempotency = enable_idempotency
        self.stats = Stats("consumer", histograms(CONSUMER))
        self.probe = Probe()
        self.signal = stop_signal if stop_signal is not None else StopSignal()
        s = self.settings
        self.db = Database(
            s.dest_db_url,
            minconn=s.db_pool_min,
            maxconn=s.db_pool_max,
            statement_timeout_ms=s.statement_timeout_ms,
            application_name=f"cdc-consumer {s.consumer_group_id}",
        )
        self.breaker = CircuitBreaker(s.dlq_breaker_window, s.dlq_breaker_ratio)
        self._consumer: Consumer | None = None
        self._dlq: DeadLetterQueue | None = None
        self._metrics: MetricsServer | None = None
        self._lag: LagWatch | None = None
        self._placement: Placement | None = None
        for gauge in (ASSIGNED, PAUSED):
            self.stats.set(gauge, 0)
        self.stats.set(DB_IN_USE, self.db.in_use)
        self.stats.set(DB_MAX, s.db_pool_max)
        self.applier = BatchApplier(
            self.db,
            dlq=None,
            breaker=self.breaker,
            stats=self.stats,
            max_attempts=s.max_attempts,
            idempotency=enable_idempotency,
            topic_prefix=s.cdc_topic_prefix,
            fk_wait=s.fk_wait_seconds,
        )
        # Tables held for drift (``_hold_drift``): table -> the shape of its changes.
        self._drift_shapes: dict[str, tuple[TableName, Shape]] = {}
        self.offsets = Offsets(self.stats)
        self.in_flight = InFlight(self.applier, self.stats)
        self.retry = PausedRetry(
            backoff_max=s.retry_backoff_max,
            stats=self.stats,
            probe=self.probe,
            signal=self.signal,
            on_resume=self._set_readiness,
            unplaced=self._unplaced,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to finish the current batch, commit and return."""
        self.signal.stop()

    @property
    def running(self) -> bool:
        return self.signal.running

    def run(self) -> None:
        """Consume until stopped. Raises HaltError / SchemaMissingError / CDCError on a fatal problem."""
        if threading.current_thread() is threading.main_thread():
            self.signal.install()
        s = self.settings
        log.info(
            "starting consumer dlq=%s idempotency=%s %s",
            self.enable_dlq,
            self.enable_idempotency,
            s.describe(),
        )
        try:
            consumer = self._open()
            if consumer is not None:  # else stopped while waiting for the database
                self._loop(consumer)
        except BaseException as exc:
            self.probe.set_ready(f"stopped: {type(exc).__name__}")
            raise
        finally:
            self.probe.set_ready("stopping")
            self._close()

    def _loop(self, consumer: Consumer) -> None:
        """The group loop (see the module docstring), until stopped; then the batch in flight
        is finished (``_close`` commits its offsets)."""
        s = self.settings
        offsets, in_flight, decode = self.offsets, self.in_flight, self.applier.decode
        placement = self._placement
        assert placement is not None
        while self.running:
            self.probe.beat()
            if placement.due():
                self._settle(consumer)  # the positions it stores count
                self._recheck_drift()
                placement.retry(consumer, offsets.owned)
                self._set_readiness()
            offsets.commit(consumer)
            epochs = dict(offsets.epochs)  # the assignment the next messages are read in
            batch = self._usable(self._next_messages(consumer))
            if batch:
                decoded = self._hold_drift(consumer, decode(batch))  # while the batch before applies
                self._settle(consumer)
                if self.running:  # else the batch before may not be applied: nothing after it is
                    self._start(decoded, epochs)
            elif in_flight.finished():
                self._settle(consumer)
            self.stats.log_if_due(log, s.stats_interval, STATS_KEYS, CONSUMED)
            if self._dlq is not None:
                self._dlq.serve()  # an idle publisher's queue grows with every broker outage
        self._settle(consumer)

    def _next_messages(self, consumer: Consumer) -> list[Message]:
        """Wait up to CONSUME_TIMEOUT (IN_FLIGHT_POLL while a batch is in flight) for one
        message, then take what is already fetched.

        ``consume(n, timeout)`` waits until n messages or the timeout, which at a low rate
        delays every change by the whole timeout; the fetched queue fills full batches under load.
        """
        s = self.settings
        idle = self.in_flight.flight is None
        timeout = s.consume_timeout if idle else min(s.consume_timeout, IN_FLIGHT_POLL)
        messages = consumer.consume(1, timeout)
        if messages and s.consumer_batch_size > 1:
            messages += consumer.consume(s.consumer_batch_size - 1, 0)
        return messages

    def _open(self) -> Consumer | None:
        """Start everything the loop needs; the consumer subscribed, or None if stopped while
        waiting for the database."""
        s = self.settings
        port = s.metrics_port_of("consumer")
        if port:
            self._metrics = MetricsServer(
                "consumer", self.stats, CONSUMER, port=port, host=s.metrics_host, probe=self.probe
            )
            self._metrics.start()
        if not self._check_schema():
            return None
        self.probe.set_ready("joining the consumer group")
        admin = admin_client(s)
        ensure_topics(s, admin)
        self._placement = Placement(DestinationPositions(self.db), admin, self.stats)
        self.applier.topic_ids = self._placement.topic_ids
        if self.enable_dlq:
            self._dlq = self.applier.dlq = DeadLetterQueue(s)
        self._lag = LagWatch(s, self.stats, lambda: set(self.offsets.owned))
        self._lag.start()
        self.in_flight.open()
        self._consumer = consumer = Consumer(
            consumer_config(
                s,
                **{
                    "client.id": f"cdc-consumer-{s.consumer_group_id}",
                    # Every partition starts where the destination says (cdc.sink.placement); a
                    # fetch that falls out of the log is an error to handle, never a silent reset.
                    "auto.offset.reset": "error",
                    # The topic of a table added while running is matched within this time.
                    "topic.metadata.refresh.interval.ms": TOPIC_REFRESH_MS,
                },
            ),
            logger=KAFKA_LOG,
        )
        consumer.subscribe(
            [s.cdc_topic, table_topics(s.cdc_topic_prefix)],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _check_schema(self) -> bool:
        """Wait for the database if it is down (False if stopped meanwhile); raise if the schema is missing."""
        attempt = 0
        while True:
            self.probe.beat()
            try:
                with self.db.connection() as conn, conn.cursor() as cur:
                    missing = sink.missing_tables(cur)
                if not missing:
                    self.applier.load_table()  # the statements and event checks, from the catalog
                break
            except TransientError as exc:
                self.probe.set_ready(f"destination unreachable: {exc}")
                attempt += 1
                delay = backoff_delay(attempt, self.settings.retry_backoff_max)
                log.warning("destination %s not reachable (%s), retrying in %.1fs", self.db.url, exc, delay)
                if self.signal.wait(delay):
                    return False
        if missing:
            raise SchemaMissingError(
                f"destination {self.db.url} lacks {', '.join(missing)}: "
                "apply setup_db_with_idempotency.sql (or run `make up`)"
            )
        return True

    def _close(self) -> None:
        """Fixed order: wait for the batch in flight, commit what was applied, leave the group,
        flush the DLQ, close the pool."""
        self._await_in_flight()
        if self._lag is not None:
            self._lag.stop()
            self._lag = None
        self.in_flight.close()
        if self._consumer is not None:
            self._commit_pending()
            self._consumer.close()  # leaves the group; revoke callbacks commit nothing new
            self._consumer = None
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = self.applier.dlq = None
        self.db.close()
        if self._metrics is not None:
            self._metrics.stop()
        uptime = time.monotonic() - self.stats.started
        rate = self.stats.get(CONSUMED) / uptime if uptime > 0 else 0.0
        log.info(
            "final statistics: %s",
            self.stats.line(STATS_KEYS, {"uptime_s": round(uptime, 1), "rate": f"{rate:.1f}/s"}),
        )

    # -- rebalance callbacks (run inside consume()) ----------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _names(partitions))
        self.offsets.assign((tp.topic, tp.partition) for tp in partitions)
        if self._placement is not None:
            self._placement.assign(consumer, partitions)
        self._rebalanced(REBALANCE_ASSIGNED)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # Everything applied so far is committed before another consumer takes over, the batch
        # in flight included once it has committed.
        self._await_in_flight()
        self._commit_pending(only=gone)
        self.offsets.forget(gone)
        if self._placement is not None:
            self._placement.forget(gone)
        self._rebalanced(REBALANCE_REVOKED)
        log.info("partitions revoked: %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The partitions already belong to someone else: committing now could move their offsets.
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.offsets.forget(gone)
        if self._placement is not None:
            self._placement.forget(gone)
        self._rebalanced(REBALANCE_LOST)
        log.warning("partitions lost (not committed; the new owner re-reads them): %s", _names(partitions))

    def _rebalanced(self, event: str) -> None:
        self.stats.incr(event)
        self.stats.set(ASSIGNED, len(self.offsets.owned))
        if self._lag is not None:
            self._lag.poke()
        self._set_readiness()

    def _set_readiness(self) -> None:
        if self.retry.paused:
            return  # the outage's reason stays until the partitions resume
        held = self._placement.reason() if self._placement is not None else None
        self.probe.set_ready(held or (None if self.offsets.owned else "no partitions assigned"))

    def _unplaced(self) -> set[TP]:
        return self._placement.unplaced if self._placement is not None else set()

    # -- the batch -------------------------------------------------------------------------

    def _usable(self, messages: Sequence[Message]) -> list[Received]:
        """The messages to apply: not errors, and only of partitions placed at their start."""
        batch = []
        placement = self._placement
        for msg in messages:
            err = msg.error()
            if err is None:
                received = Received.of(msg)
                if placement is None or placement.placed((received.topic, received.partition)):
                    batch.append(received)
            elif err.fatal():
                raise HaltError(f"kafka fatal error: {err.str()}")
            elif err.code() == KafkaError._AUTO_OFFSET_RESET and placement is not None and self._consumer:
                topic, partition = msg.topic(), msg.partition()
                if topic is not None and partition is not None:
                    placement.lost(self._consumer, (topic, partition), f"offset {msg.offset()}: {err.str()}")
                    self._set_readiness()
            else:
                log.warning("kafka: %s", err.str())
        return batch

    def _hold_drift(self, consumer: Consumer, batch: Decoded) -> Decoded:
        """``batch`` without the changes of tables whose destination differs from them (missing,
        a column missing, another primary key...): those tables' partitions are held, nothing of
        them is applied, and they start again at the destination's position once it is fixed."""
        try:
            held = self.applier.drifted(batch)
        except TransientError as exc:
            # The catalog cannot be read now (the destination is down): the batch's own
            # transaction checks again, and a transient error there is retried as any other.
            log.debug("drift not checked before the batch: %s", exc)
            return batch
        if not held:
            return batch
        assert self._placement is not None
        topics: set[str] = set()
        for (schema, name), (why, shape, table_topics) in held.items():
            table = f"{schema}.{name}"
            self._drift_shapes[table] = ((schema, name), shape)
            self._placement.hold_table(consumer, table, why, table_topics, self.offsets.owned)
            topics |= table_topics
        self._set_readiness()
        return batch.only(lambda r: r.topic not in topics)

    def _recheck_drift(self) -> None:
        """Release each held table whose destination now takes its changes (nothing in flight)."""
        assert self._placement is not None
        for table, (why, topics) in self._placement.drifted_tables().items():
            known = self._drift_shapes.get(table)
            try:
                still = self.applier.recheck(*known) if known is not None else None
            except TransientError as exc:
                log.debug("drift of %s not checked: %s", table, exc)
                continue
            if still is None:
                self._drift_shapes.pop(table, None)
                self._placement.release(table, topics)
            elif still != why:
                log.error("table %s is still held: %s", table, still)

    def _start(self, batch: Decoded, epochs: dict[TP, int]) -> None:
        """Hand ``batch``, read in ``epochs``, to the worker thread (nothing is in flight)."""
        if epochs != self.offsets.epochs:
            batch = batch.only(self.offsets.kept(epochs))  # a partition left while the batch before applied
            if not batch.records:
                return
        self.in_flight.start(batch, epochs)

    def _await_in_flight(self) -> None:
        """Wait for the batch in flight; if it committed, count it and note its offsets.

        A failed one stays in flight for ``_settle``.
        """
        flight = self.in_flight.take_committed()
        if flight is not None:
            self._applied(flight.batch, flight.epochs)

    def _settle(self, consumer: Consumer) -> None:
        """Wait for the batch in flight and note its offsets; after a transient error wait
        (in the group) and retry it until it commits. Raises what cannot be retried."""
        self._await_in_flight()
        flight = self.in_flight.take()
        if flight is None:
            return
        try:
            flight.done.result()
        except (TransientError, DeliveryError) as exc:
            started = flight.started
            done = self.retry.until_applied(
                consumer,
                flight.batch,
                self.offsets.kept(flight.epochs),
                lambda batch: self.in_flight.apply(batch, started),
                exc,
            )
            if done is not None:
                self._applied(done, flight.epochs)

    def _applied(self, batch: Decoded, epochs: dict[TP, int]) -> None:
        """The batch committed: count it and note its offsets for the next commit."""
        self.stats.incr(BATCHES)
        self.offsets.note(batch, epochs)

    def _commit_pending(self, only: set[TP] | None = None) -> None:
        """Commit applied offsets (see ``Offsets.commit``)."""
        if self._consumer is not None:
            self.offsets.commit(self._consumer, only)


def table_topics(prefix: str) -> str:
    """The subscription pattern of every table's topic under ``prefix`` (librdkafka's regex)."""
    return "^" + prefix.replace(".", "\\.") + "\\..+"


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="consumer_final.py",
        description="Apply CDC events from Kafka to the destination PostgreSQL (see USAGE.md).",
    )
    p.add_argument("--group-id", help="consumer group (CONSUMER_GROUP_ID)")
    p.add_argument("--topic", help="topic to consume (CDC_TOPIC)")
    p.add_argument("--dlq-topic", help="dead-letter topic (CDC_DLQ_TOPIC)")
    p.add_argument("--no-dlq", action="store_true", help="stop on a message that cannot be applied")
    p.add_argument("--no-idempotency", action="store_true", help="no processed_events bookkeeping")
    p.add_argument("--batch-size", type=int, help="messages per transaction (CONSUMER_BATCH_SIZE)")
    p.add_argument("--consume-timeout", type=float, help="seconds to wait for a batch (CONSUME_TIMEOUT)")
    p.add_argument("--max-attempts", type=int, help="tries before a message is dead-lettered (MAX_ATTEMPTS)")
    p.add_argument("--retry-backoff-max", type=float, help="longest transient retry wait (RETRY_BACKOFF_MAX)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /live, /ready, /health (CONSUMER_METRICS_PORT, else METRICS_PORT; 0 = off)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (LOG_LEVEL)")
    p.add_argument("--env-file", default=".env", help="dotenv file to read (default: .env)")
    tools = p.add_mutually_exclusive_group()
    tools.add_argument(
        "--replay-dlq",
        action="store_true",
        help="republish the dead letters not replayed yet to their original topic, then exit",
    )
    tools.add_argument(
        "--show-dlq", action="store_true", help="print DLQ messages with headers as JSON lines, then exit"
    )
    p.add_argument("--limit", type=int, help="with --replay-dlq / --show-dlq: at most this many messages")
    p.add_argument(
        "--audit-file", help="with --replay-dlq: also append a JSON line per replayed message to this file"
    )
    return p.parse_args(argv)


def tune_gc() -> None:
    """Collect cyclic garbage rarely, and never look at what start-up allocated.

    The consumer makes a dozen short-lived objects per message and keeps a batch or two alive:
    with CPython's defaults (a collection every 700 allocations) the collector took a fifth of
    the decoding time. Nothing here makes reference cycles in the steady state. For a process
    whose main job is the consumer (its entry points call it), not for a library user.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopSignal()
    if not (args.replay_dlq or args.show_dlq):  # those two stay interruptible by Ctrl-C
        stop.install()  # before any slow start-up step: a SIGTERM while starting is a clean stop too
    try:
        settings = load_settings(
            dotenv_path=args.env_file,
            consumer_group_id=args.group_id,
            cdc_topic=args.topic,
            cdc_dlq_topic=args.dlq_topic,
            consumer_batch_size=args.batch_size,
            consume_timeout=args.consume_timeout,
            max_attempts=args.max_attempts,
            retry_backoff_max=args.retry_backoff_max,
            consumer_metrics_port=args.metrics_port,
            log_level=args.log_level.upper() if args.log_level else None,
        )
        if not settings.dest_db_url and not (args.replay_dlq or args.show_dlq):
            raise ConfigError("DEST_DB_URL is not set (put it in .env or the environment, or run `make up`)")
    except ConfigError as exc:
        print(f"consumer_final.py: {exc}", file=sys.stderr)
        return exits.CONFIG
    configure_logging(settings.log_level, settings.log_format)
    tune_gc()
    try:
        if args.replay_dlq:
            audit = Path(args.audit_file) if args.audit_file else None
            if settings.dest_db_url:
                with Database(settings.dest_db_url, application_name="cdc-replay-dlq") as db:
                    replay_pending(
                        settings, limit=args.limit, audit_file=audit, store=DestinationPositions(db)
                    )
            else:
                replay_pending(settings, limit=args.limit, audit_file=audit)
            return exits.OK
        if args.show_dlq:
            for record in dlq_module.show(settings, limit=args.limit):
                print(json.dumps(record, ensure_ascii=False), flush=True)
            return exits.OK
        ProductionCDCConsumer(
            settings=settings,
            enable_dlq=not args.no_dlq,
            enable_idempotency=not args.no_idempotency,
            stop_signal=stop,
        ).run()
    except (ConfigError, SchemaMissingError) as exc:
        log.error("%s", exc)
        return exits.CONFIG
    except CDCError as exc:  # HaltError, ServiceError, ...
        log.error("stopping: %s", exc)
        return exits.FAILED
    except psycopg2.Error as exc:
        # Neither transient nor a data error: a bug or a broken destination. Offsets of the
        # failed batch were not committed, so nothing is lost by stopping.
        first = str(exc).strip().splitlines()
        log.error(
            "stopping on a destination error nothing here can handle: %s: %s",
            type(exc).__name__,
            first[0] if first else "",
        )
        return exits.FAILED
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
