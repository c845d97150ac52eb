"""The producer daemon (``producer.py``): publish every change captured in the outboxes to Kafka, missing none.

Employees' changes (``emp_records_cdc``) go to CDC_TOPIC; every other captured table's
(``cdc_outbox``, ``python -m cdc tables add``) to its own topic, created the first time the table
is seen. The two outboxes are one stream in commit order under one cursor. One batch at a time:

1. read the next rows after the cursor, behind the xid horizon, each already a change event keyed
   by its primary key: PostgreSQL builds the JSON (``cdc.source.outbox``), and the event models
   check only the rows the schema cannot vouch for;
2. produce each to its topic, ``poll(0)`` after each;
3. flush: every message must be acknowledged (no failed delivery report), otherwise the batch is
   read and sent again;
4. store the new cursor in the source database (and prune behind it), on the session that holds
   the advisory lock.

Then sleep until a NOTIFY from the trigger, a signal, or the poll interval, and start the next
batch no sooner than PRODUCER_BATCH_INTERVAL_MS after the last one. A crash between 2 and 4
re-publishes that one batch; the sink absorbs the duplicates.

Run ``python producer.py --help`` for the flags; settings come from the environment and ``.env``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import time

from cdc.errors import (
    CDCError,
    ConfigError,
    DeliveryError,
    LeadershipLost,
    SchemaMissingError,
    ServiceError,
    TransientError,
)
from cdc.kafka.client import (
    MARK_HEADER,
    MARK_VALUE,
    Headers,
    Publisher,
    admin_client,
    ensure_topics,
    producer_config,
    wait_for_broker,
)
from cdc.model.change import ChangeCodec
from cdc.model.event import Codec, InvalidEventError
from cdc.runtime import exits
from cdc.runtime.db import Database
from cdc.runtime.logs import configure_logging, quiet_repeats
from cdc.runtime.metrics import PRODUCER, MetricsServer, Probe, histograms
from cdc.runtime.settings import Settings, load_settings
from cdc.runtime.signals import StopSignal, backoff_delay
from cdc.runtime.stats import (
    ACTIVE,
    BACKLOG,
    BATCH_DURATION,
    BATCHES,
    CAPTURE_TO_ACK,
    CURSOR_ACTION_ID,
    CURSOR_TXID,
    DELIVERY_ERRORS,
    HELD_BACK,
    HELD_BACK_S,
    INVALID,
    OLDEST_XACT_S,
    PRUNED,
    PUBLISHED,
    RETRIES,
    Stats,
)
from cdc.source.outbox import Batch, Cursor, Outbox, ProducerSession, Routes
from cdc.source.republish import action_id_arg, republish

log = logging.getLogger("producer")
kafka_log = logging.getLogger("producer.kafka")

quiet_repeats(kafka_log)

# Seconds per attempt to reach Kafka at start-up (a "waiting for Kafka" line each time).
KAFKA_WAIT_STEP = 5.0
# Seconds between attempts of a standby to take the lock.
STANDBY_RETRY = 1.0
# Rows per batch whose capture-to-acknowledgement time feeds the latency percentiles.
LATENCY_SAMPLES = 100
STATS_KEYS = [
    PUBLISHED,
    BATCHES,
    INVALID,
    RETRIES,
    CURSOR_TXID,
    CURSOR_ACTION_ID,
    BACKLOG,
    HELD_BACK,
    HELD_BACK_S,
]
FINAL_KEYS = [PUBLISHED, BATCHES, INVALID, RETRIES, PRUNED, CURSOR_TXID, CURSOR_ACTION_ID]


def check_rows(batch: Batch, codec: Codec, changes: ChangeCodec) -> int:
    """Check the rows the fetch could not vouch for (see ``cdc.source.outbox``): an employees row
    with ``codec``, another table's with ``changes``. Returns how many are invalid. Each is logged
    and published as it is, so the consumer dead-letters it: one bad row never blocks the changes
    behind it."""
    invalid = 0
    for _, value, _, checked, schema, table in batch.rows:
        if checked:
            continue
        try:
            if schema is None:
                codec.from_json(value)
            else:
                changes.from_json(value)
        except InvalidEventError as exc:
            invalid += 1
            log.warning(
                "invalid source row action_id=%s%s field=%s: %s; published as is for the consumer to dead-letter",
                json.loads(value).get("action_id"),
                "" if schema is None else f" table={schema}.{table}",
                exc.field,
                exc,
            )
    return invalid


class ChangeProducer:
    """The producer daemon: leadership, the batch loop, stats, and an orderly shutdown."""

    def __init__(
        self, settings: Settings, *, stop: StopSignal, snapshot: bool = False, once: bool = False
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.snapshot = snapshot
        self.once = once
        self.stats = Stats("producer", histograms(PRODUCER))
        for gauge in (CURSOR_TXID, CURSOR_ACTION_ID, BACKLOG, HELD_BACK, HELD_BACK_S, OLDEST_XACT_S, ACTIVE):
            self.stats.set(gauge, 0)
        self.probe = Probe()
        self.db = Database(
            settings.source_db_url,
            minconn=settings.db_pool_min,
            maxconn=settings.db_pool_max,
            statement_timeout_ms=settings.statement_timeout_ms,
            application_name="cdc-producer",
        )
        self.outbox = Outbox(self.db)
        self.session = ProducerSession(
            settings.source_db_url,
            settings.notify_channel,
            statement_timeout_ms=settings.statement_timeout_ms,
        )
        self.publisher: Publisher | None = None
        self.routes: Routes | None = None  # where each row goes (known once Kafka answered)
        self.metrics: MetricsServer | None = None
        self.cursor = Cursor()
        self._wakeup_fd: int | None = None
        self._next_tick = 0.0
        self._fetched_at = 0.0
        self._next_horizon_warning = 0.0
        self._once_target: Cursor | None = None  # --once: the last row to publish before stopping

    # -- start-up ---------------------------------------------------------------------------

    def _wait_for_source(self) -> bool:
        """Check the schema, retrying while the server is unreachable. False if stopped meanwhile."""
        attempt = 0
        while self.stop.running:
            self.probe.beat()
            try:
                self.outbox.check_schema()
                return True
            except TransientError as exc:
                attempt += 1
                self.probe.set_ready(f"source PostgreSQL unreachable: {exc}")
                self._wait_after_source_error(exc, attempt)
        return False

    def _wait_after_source_error(self, exc: TransientError, attempt: int) -> None:
        """Log and back off. (Errors no wait can fix arrive as ConfigError: see cdc.db.classify.)"""
        delay = backoff_delay(attempt, self.settings.retry_backoff_max)
        log.warning("waiting for source PostgreSQL at %s: %s (retry in %.1fs)", self.db.url, exc, delay)
        self.stop.wait(delay)

    def _wait_for_kafka(self) -> bool:
        admin = admin_client(self.settings, logger=kafka_log)
        self.probe.set_ready(f"waiting for Kafka at {self.settings.kafka_bootstrap_servers}")
        while self.stop.running:
            self.probe.beat()
            try:
                # It logs one "waiting for Kafka at ..." line per call.
                wait_for_broker(
                    admin, timeout=KAFKA_WAIT_STEP, what=f"Kafka at {self.settings.kafka_bootstrap_servers}"
                )
            except ServiceError:
                continue
            self.routes = Routes(self.settings, ensure_topics(self.settings, admin))
            return True
        return False

    def _take_snapshot(self) -> None:
        count, first, last = self.outbox.snapshot(self.settings.notify_channel)
        log.info("snapshot queued rows=%d action_ids=%s..%s", count, first, last)

    def _install_wakeup(self) -> None:
        """Let a signal wake the idle select() at once (the handler itself only flips a flag)."""
        r, w = os.pipe()
        for fd in (r, w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wakeup_fd = r

    # -- leadership ---------------------------------------------------------------------------

    def _lead(self) -> bool:
        """Become the active producer (waiting as a standby if needed). False if stopped first."""
        announced = False
        attempt = 0
        while self.stop.running:
            self.probe.beat()
            try:
                if self.session.try_acquire():
                    self.cursor = self.outbox.load_cursor()
                    self.outbox.check_horizon(self.cursor)
                    self._set_cursor_stats()
                    self.stats.set(ACTIVE, 1)
                    self.probe.set_ready(None)
                    log.info(
                        "active: holding the producer lock; cursor txid=%d action_id=%d",
                        self.cursor.txid,
                        self.cursor.action_id,
                    )
                    return True
            except TransientError as exc:
                attempt += 1
                self.probe.set_ready(f"source PostgreSQL unreachable: {exc}")
                self._wait_after_source_error(exc, attempt)
                continue
            self.probe.set_ready(None)  # a standby is healthy: it takes over when the active one goes
            if not announced:
                log.info("standby: another producer holds the lock; taking over when it goes")
                announced = True
            self.stats.set(ACTIVE, 0)
            self.stop.wait(STANDBY_RETRY)
        return False

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.stop.install()
        self._install_wakeup()
        port = self.settings.metrics_port_of("producer")
        if port:
            self.metrics = MetricsServer(
                "producer", self.stats, PRODUCER, port=port, host=self.settings.metrics_host, probe=self.probe
            )
            self.metrics.start()
        if not self._wait_for_source():
            return self._finish()
        if self.snapshot:
            self._take_snapshot()
        if not self._wait_for_kafka():
            return self._finish()
        self.publisher = Publisher(producer_config(self.settings), logger=kafka_log)
        attempt = 0
        while self.stop.running:
            self.probe.beat()
            if not self.session.held and not self._lead():
                break
            try:
                published = self._step()
                if attempt:
                    self.probe.set_ready(None)
                attempt = 0
                self._tick()
                if published >= self.settings.producer_batch_size:
                    continue
                if self.once and self._once_done():
                    log.info("caught up (--once): stopping")
                    break
                self.session.wait(self.settings.poll_interval, self._wakeup_fd)
                self._tick()
                self._pace()
            except (TransientError, DeliveryError) as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.settings.retry_backoff_max)
                self.stats.incr(RETRIES)
                if isinstance(exc, DeliveryError):
                    self.stats.incr(DELIVERY_ERRORS)
                self.probe.set_ready(f"batches failing: {exc}")
                log.warning("batch not published: %s; retrying in %.1fs", exc, delay)
                self._check_leadership()
                self.stop.wait(delay)
            except LeadershipLost as exc:
                self._lose_leadership(exc)
        return self._finish()

    def _pace(self) -> None:
        """After a batch that was not full, the next starts no sooner than PRODUCER_BATCH_INTERVAL_MS
        after it did: at a steady rate of changes, each round of queries and each Kafka request
        carries the several changes that arrived meanwhile, not one or two. Idle, nothing waits."""
        remaining = self._fetched_at + self.settings.producer_batch_interval_ms / 1000 - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)  # a signal only flips a flag: at most a second more

    def _once_done(self) -> bool:
        """--once stops when every row committed before it first caught up is published: rows held
        back by an open transaction are waited for (the horizon warning names it), later rows not."""
        if self._once_target is None:
            self._once_target = self.outbox.last_committed(self.cursor) or self.cursor
            held = self.outbox.backlog(self.cursor).held_back if self._once_target > self.cursor else 0
            if held:
                log.info(
                    "--once: %d rows committed but held back by an open transaction; waiting for it to end",
                    held,
                )
        return self.cursor >= self._once_target

    def _step(self) -> int:
        """Publish one batch and store the cursor. Returns the number of rows published."""
        self._fetched_at = time.monotonic()
        batch = self.session.fetch(self.cursor, self.settings.producer_batch_size)
        rows = batch.rows
        if not rows:
            return 0
        assert self.publisher is not None and self.routes is not None
        invalid = check_rows(batch, self.session.codec, self.routes.codec)
        self.routes.prepare(rows)
        # The mark tells the consumer an invalid message is ours, so its action_id is real.
        mark: Headers = [(MARK_HEADER, MARK_VALUE)]
        self.publisher.send(self.routes.messages(rows, mark))
        acked_at = time.time()
        new = batch.last
        pruned = self.session.advance(new, len(rows), prune=self.settings.prune)
        self.cursor = new
        self.stats.incr(PUBLISHED, len(rows))
        self.stats.incr(BATCHES)
        self.stats.incr(PRUNED, pruned)
        self.stats.incr(INVALID, invalid)
        self.stats.observe(BATCH_DURATION, time.monotonic() - self._fetched_at)
        # Every row of a small batch, an even sample of a large one: enough for the percentiles.
        sample = rows[:: max(1, len(rows) // LATENCY_SAMPLES)]
        self.stats.observe_many(
            CAPTURE_TO_ACK, [acked_at - c for _, _, c, _, _, _ in sample if c is not None]
        )
        self._set_cursor_stats()
        log.debug("batch rows=%d cursor txid=%d action_id=%d", len(rows), new.txid, new.action_id)
        return len(rows)

    def _check_leadership(self) -> None:
        """After a failed batch: if the lock connection died too, the lock must be taken again."""
        try:
            self.session.check()
        except LeadershipLost as exc:
            self._lose_leadership(exc)

    def _lose_leadership(self, exc: LeadershipLost) -> None:
        log.warning("no longer the active producer: %s; trying to take the lock again", exc)
        self.session.close()
        self.stats.set(ACTIVE, 0)

    def _set_cursor_stats(self) -> None:
        self.stats.set(CURSOR_TXID, self.cursor.txid)
        self.stats.set(CURSOR_ACTION_ID, self.cursor.action_id)

    def _tick(self) -> None:
        """Every STATS_INTERVAL: refresh backlog gauges, warn about a held horizon, log the stats line."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self.settings.stats_interval
        try:
            self.outbox.check_horizon(self.cursor)
            backlog = self.outbox.backlog(self.cursor)
        except TransientError as exc:
            log.debug("backlog not measured: %s", exc)
            return
        self.stats.set(BACKLOG, backlog.rows)
        self.stats.set(HELD_BACK, backlog.held_back)
        self.stats.set(HELD_BACK_S, round(backlog.held_for, 1))
        self.stats.set(OLDEST_XACT_S, round(backlog.oldest_xact_age, 1))
        warn_after = self.settings.horizon_warn_seconds
        if backlog.held_back and backlog.held_for > warn_after and now >= self._next_horizon_warning:
            self._next_horizon_warning = now + max(warn_after, self.settings.stats_interval)
            self._warn_horizon(backlog.held_back, backlog.held_for)
        self.stats.log_if_due(log, 0, STATS_KEYS, PUBLISHED)

    def _warn_horizon(self, held: int, held_for: float) -> None:
        try:
            holder = self.outbox.horizon_holder()
        except TransientError:
            holder = None
        if holder is None:
            log.warning("delivery held back %.0fs rows=%d by an open transaction", held_for, held)
            return
        if holder["gid"] is not None:
            log.warning(
                "delivery held back %.0fs rows=%d by a prepared transaction: gid=%r xid=%s prepared=%s"
                " age=%.0fs owner=%s database=%s; end it with COMMIT PREPARED or ROLLBACK PREPARED",
                held_for,
                held,
                holder["gid"],
                holder["xid"],
                holder["prepared"].isoformat(timespec="seconds"),
                holder["age_s"] or 0.0,
                holder["owner"],
                holder["database"],
            )
            return
        log.warning(
            "delivery held back %.0fs rows=%d by an open transaction: pid=%s xid=%s age=%.0fs state=%s query=%r",
            held_for,
            held,
            holder["pid"],
            holder["xid"],
            holder["age_s"] or 0.0,
            holder["state"],
            holder["query"],
        )

    def _finish(self) -> int:
        """Shutdown in a fixed order: the batch is done and its cursor stored; flush, unlock, report."""
        self.probe.set_ready("stopping")
        if self.publisher is not None:
            self.publisher.close()
        self.session.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.db.close()
        log.info("final %s uptime_s=%s", self.stats.line(FINAL_KEYS), self.stats.get_stats()["uptime_s"])
        return exits.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="producer.py",
        description="Publish every change captured in the outboxes (emp_records_cdc, cdc_outbox) to Kafka "
        "(gap-safe, at least once).",
        epilog="Settings come from the environment and .env (see .env.example); flags override them. "
        "Exit codes: 0 stopped cleanly, 1 error, 2 bad settings, missing schema or a cursor from another "
        "cluster, 3 forced by a second signal.",
    )
    parser.add_argument(
        "--env-file", default=".env", metavar="PATH", help="dotenv file to read (default: .env)"
    )
    # (flag, settings field, type, metavar, help): each flag overrides one setting.
    for flag, field, kind, metavar, text in (
        ("--bootstrap-servers", "kafka_bootstrap_servers", str, "HOST:PORT", "KAFKA_BOOTSTRAP_SERVERS"),
        ("--topic", "cdc_topic", str, "NAME", "CDC_TOPIC (default bf_employee_cdc)"),
        ("--dlq-topic", "cdc_dlq_topic", str, "NAME", "CDC_DLQ_TOPIC, created if missing"),
        ("--partitions", "topic_partitions", int, "N", "CDC_TOPIC_PARTITIONS for topics it creates (6)"),
        ("--batch-size", "producer_batch_size", int, "N", "PRODUCER_BATCH_SIZE: rows per batch (5000)"),
        (
            "--batch-interval-ms",
            "producer_batch_interval_ms",
            int,
            "MS",
            "PRODUCER_BATCH_INTERVAL_MS: least time between the starts of batches that are not full (10)",
        ),
        ("--poll-interval", "poll_interval", float, "SECONDS", "POLL_INTERVAL: poll without NOTIFY (1.0)"),
        ("--stats-interval", "stats_interval", float, "SECONDS", "STATS_INTERVAL: between stats lines (10)"),
        (
            "--horizon-warn-seconds",
            "horizon_warn_seconds",
            float,
            "SECONDS",
            "HORIZON_WARN_SECONDS: warn when an open transaction holds delivery this long (30)",
        ),
        (
            "--metrics-port",
            "producer_metrics_port",
            int,
            "PORT",
            "PRODUCER_METRICS_PORT (else METRICS_PORT): serve /metrics, /live, /ready, /health (0 = off)",
        ),
        ("--log-level", "log_level", str.upper, "LEVEL", "LOG_LEVEL: DEBUG, INFO, WARNING, ERROR"),
        ("--log-format", "log_format", str.lower, "FORMAT", "LOG_FORMAT: text or json"),
    ):
        parser.add_argument(flag, dest=field, type=kind, metavar=metavar, help=text)
    parser.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CDC_PRUNE: delete published outbox rows (emp_records_cdc, cdc_outbox)",
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="first queue every current employees row as a SNAPSHOT event (backfill), then run",
    )
    parser.add_argument(
        "--once", action="store_true", help="stop when everything committed so far is published"
    )
    parser.add_argument(
        "--reset-cursor",
        choices=("beginning", "end"),
        help="one-shot recovery (e.g. after a restore into another cluster), then exit: move the cursor "
        "to the beginning (re-publish the whole outbox) or to the end (skip it); see USAGE.md",
    )
    parser.add_argument(
        "--republish-from",
        type=action_id_arg,
        metavar="ACTION_ID",
        help="one-shot recovery of a gap in the topic, then exit: publish the outbox rows again from the "
        "row ACTION_ID (0: the first row) up to the cursor, which does not move; beside a running "
        "producer too; see USAGE.md",
    )
    return parser


def reset_cursor(settings: Settings, mode: str) -> int:
    """``--reset-cursor``: under the producer lock, so no active producer can race it."""
    db = Database(settings.source_db_url, application_name="cdc-producer-reset")
    session = ProducerSession(
        settings.source_db_url,
        settings.notify_channel,
        application_name="cdc-producer-reset",
        statement_timeout_ms=settings.statement_timeout_ms,
    )
    outbox = Outbox(db)
    try:
        outbox.check_schema()
        if not session.try_acquire():
            raise CDCError(
                "another producer is active (it holds the producer lock): stop every producer first"
            )
        assert session.pid is not None
        done = outbox.reset_cursor(mode == "end", lock_pid=session.pid)
    finally:
        session.close()
        db.close()
    log.info(
        "cursor reset to the %s: was txid=%d action_id=%d, now txid=%d action_id=%d;"
        " %d outbox rows with txids from another cluster moved to txid=%d;"
        " %d outbox rows to publish, %d at or behind the cursor",
        mode,
        done.old.txid,
        done.old.action_id,
        done.new.txid,
        done.new.action_id,
        done.restamped,
        done.restamped_to,
        done.ahead,
        done.behind,
    )
    if mode == "end":
        log.warning(
            "changes in the outbox that were not published yet are skipped: the destination may miss some;"
            " run `python -m cdc verify` and, if it differs, `producer.py --snapshot`"
        )
    return exits.OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env_file, snapshot, once = args.pop("env_file"), args.pop("snapshot"), args.pop("once")
    reset, republish_from = args.pop("reset_cursor"), args.pop("republish_from")
    if republish_from is not None and (reset or snapshot or once):
        parser.error("--republish-from runs alone, then exits: not with --reset-cursor, --snapshot or --once")
    stop = StopSignal()
    stop.install()  # before any slow start-up step: a SIGTERM while starting is a clean stop too
    try:
        settings = load_settings(dotenv_path=env_file, **args)
        configure_logging(settings.log_level, settings.log_format)
        daemon = ChangeProducer(settings, stop=stop, snapshot=snapshot, once=once)
    except ConfigError as exc:
        print(f"producer: error: {exc}", file=sys.stderr)
        return exits.CONFIG
    try:
        if reset:
            return reset_cursor(settings, reset)
        if republish_from is not None:
            return republish(settings, republish_from, stop=stop, check=check_rows)
        log.info("starting %s", settings.describe())
        return daemon.run()
    except (ConfigError, SchemaMissingError) as exc:
        log.error("%s", exc)
        return exits.CONFIG
    except CDCError as exc:
        log.error("stopped: %s", exc)
        return exits.FAILED


if __name__ == "__main__":
    sys.exit(main())
