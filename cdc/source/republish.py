"""``producer.py --republish-from ACTION_ID``: publish the outbox again, from one row up to the cursor,
then exit.

Why: to recover from a gap in the topic. When retention or delete-records removes messages from
the topic before the destination applied them, the consumer holds their partition: it will not
skip them (USAGE.md, 'A gap in the topic'). If the outbox still has those rows (CDC_PRUNE off, or
pruned less far), publishing them again from the last change the destination applied before the
gap (``python -m cdc offsets show`` names it) puts the lost changes back, and then the gap can be
accepted. A pruned row cannot be sent again. The command says so and points to
``producer.py --snapshot``, which queues every current row again instead.

Why re-publishing is safe, even with a producer running:

- The sink records every action_id it decided in ``processed_events``. A copy of a change the sink
  already has is a duplicate and changes nothing. A change it never got (lost in the gap) is
  applied, and the version guard never lets an older change overwrite a newer row.
- Each message is byte for byte the message the daemon sent: the same fetch statement, Publisher,
  topic (CDC_TOPIC, or the table's own for another captured table's row), key and mark header. So the sink takes a copy for a copy, never for another change under
  a reused action_id.
- It stops at the cursor as it finds it at the start, because rows after the cursor are the
  daemon's to publish. It takes no producer lock, never moves the cursor and never prunes.

It works one batch (PRODUCER_BATCH_SIZE) at a time. Each batch is read in its own transaction and
acknowledged by Kafka before the next one is read.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cdc.errors import ConfigError, DeliveryError
from cdc.kafka.client import (
    MARK_HEADER,
    MARK_VALUE,
    Headers,
    Publisher,
    admin_client,
    ensure_topics,
    producer_config,
)
from cdc.model.change import ChangeCodec
from cdc.model.event import Codec
from cdc.model.table import SOURCE_TABLE, Table
from cdc.runtime import exits
from cdc.runtime.db import Database
from cdc.runtime.settings import Settings
from cdc.runtime.signals import StopSignal
from cdc.source.outbox import Batch, Cursor, Outbox, Routes, fetch_published, fetch_statement

log = logging.getLogger("producer.republish")
kafka_log = logging.getLogger("producer.kafka")

APPLICATION_NAME = "cdc-producer-republish"
# Seconds to wait for Kafka: a one-shot command gives up instead of waiting for ever.
KAFKA_WAIT = 30.0

# The daemon's check of the rows the fetch cannot vouch for (``cdc.source.daemon.check_rows``),
# passed in because the daemon imports this module.
CheckRows = Callable[[Batch, Codec, ChangeCodec], int]


def action_id_arg(text: str) -> int:
    """The type of ``--republish-from``: an outbox action_id, or 0 for the first row."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an action_id (0 or more; 0: the first row)")
    return value


@dataclass
class Progress:
    """What has been re-published so far (acknowledged by Kafka)."""

    from_action_id: int
    rows: int = 0
    batches: int = 0
    invalid: int = 0
    first: int | None = None  # action_id of the first row re-published, in cursor order
    last: int | None = None  # and of the last
    stopped: bool = False  # by a signal, before the cursor

    def add(self, batch: Batch, invalid: int) -> None:
        if self.first is None:
            self.first = batch.first.action_id
        self.last = batch.last.action_id
        self.rows += len(batch.rows)
        self.batches += 1
        self.invalid += invalid

    @property
    def rest(self) -> str:
        """How to re-publish what is left: again from the last row acknowledged (sent twice, harmless)."""
        start = self.from_action_id if self.last is None else self.last
        return f"run `producer.py --republish-from {start}` for the rest"


def republish(settings: Settings, from_action_id: int, *, stop: StopSignal, check: CheckRows) -> int:
    """Publish the outbox rows from ``from_action_id`` (0: the first row) up to the stored cursor
    again, and return the exit code. Raises ConfigError (exit 2, nothing sent) if that row is not
    in the outbox any more."""
    db = Database(
        settings.source_db_url,
        maxconn=1,
        statement_timeout_ms=settings.statement_timeout_ms,
        application_name=APPLICATION_NAME,
    )
    outbox = Outbox(db)
    publisher: Publisher | None = None
    try:
        outbox.check_schema()
        upto = outbox.load_cursor()
        outbox.check_horizon(upto)  # a cursor from another cluster: refused as the daemon refuses it
        after = _start(outbox, from_action_id, upto)
        if after is None:
            return exits.OK
        count = outbox.count_between(after, upto)
        if count == 0:
            raise ConfigError(
                f"nothing to re-publish: the outboxes (emp_records_cdc, cdc_outbox) have no row up to the "
                f"cursor txid={upto.txid} "
                f"action_id={upto.action_id} (pruned, or nothing published yet); to send every current "
                "row again, run `producer.py --snapshot` (employees) or `python -m cdc tables add --snapshot TABLE`"
            )
        start = (
            f"from action_id={from_action_id} txid={after.txid}" if from_action_id else "from the first row"
        )
        log.info(
            "re-publishing rows=%d %s up to the cursor txid=%d action_id=%d topic=%s"
            " (another captured table's rows: its own topic)",
            count,
            start,
            upto.txid,
            upto.action_id,
            settings.cdc_topic,
        )
        admin = admin_client(settings, logger=kafka_log)
        routes = Routes(settings, ensure_topics(settings, admin, timeout=KAFKA_WAIT))
        publisher = Publisher(producer_config(settings), logger=kafka_log)
        done = _send(db, publisher, routes, after, upto, Progress(from_action_id), stop, check, settings)
    finally:
        if publisher is not None:
            publisher.close()
        db.close()
    log.info(
        "re-published %d rows action_ids %s..%s batches=%d invalid=%d",
        done.rows,
        done.first,
        done.last,
        done.batches,
        done.invalid,
    )
    if done.stopped:
        log.warning("stopped by a signal before the cursor: %s", done.rest)
    elif done.rows < count:
        log.warning(
            "%d of the %d rows counted at the start were gone when read (pruned meanwhile by a producer "
            "with CDC_PRUNE?): they were not re-published; to send every current row again, run "
            "`producer.py --snapshot`",
            count - done.rows,
            count,
        )
    return exits.OK


def _start(outbox: Outbox, from_action_id: int, upto: Cursor) -> Cursor | None:
    """The position just before the first row to re-publish (``fetch`` reads after it), or None
    when there is nothing to do."""
    if from_action_id == 0:
        return Cursor()
    at = outbox.position(from_action_id)
    if at is None:
        raise ConfigError(
            f"action_id={from_action_id} is not in emp_records_cdc: it was pruned after it was published "
            "(CDC_PRUNE), or never written (cdc_outbox, the other tables' outbox, has no such row either), "
            "so the changes from it cannot be re-published; to send every current row again, run "
            "`producer.py --snapshot` (employees) or `python -m cdc tables add --snapshot TABLE`"
        )
    if at > upto:
        log.info(
            "nothing to re-publish: action_id=%d txid=%d is after the cursor txid=%d action_id=%d, so it "
            "has not been published yet; the producer publishes it",
            at.action_id,
            at.txid,
            upto.txid,
            upto.action_id,
        )
        return None
    # Action ids are integers: the rows after (txid, action_id - 1) start with this one.
    return Cursor(at.txid, at.action_id - 1)


def _send(
    db: Database,
    publisher: Publisher,
    routes: Routes,
    after: Cursor,
    upto: Cursor,
    progress: Progress,
    stop: StopSignal,
    check: CheckRows,
    settings: Settings,
) -> Progress:
    """Read and publish batch by batch, as ``ChangeProducer._step`` does, up to ``upto``."""
    mark: Headers = [(MARK_HEADER, MARK_VALUE)]
    with db.connection() as conn, conn.cursor() as cur:
        table = Table.load(cur, SOURCE_TABLE)
        codec = Codec(table)
        fetch = fetch_statement(cur, table)
        cur.execute(fetch.prepare)
        while after < upto:
            if not stop.running:
                progress.stopped = True
                break
            batch = fetch_published(cur, fetch, after, upto, settings.producer_batch_size)
            conn.commit()  # no transaction stays open while Kafka acknowledges
            if not batch.rows:
                break
            invalid = check(batch, codec, routes.codec)
            try:
                routes.prepare(batch.rows)
                publisher.send(routes.messages(batch.rows, mark))
            except DeliveryError as exc:
                raise DeliveryError(
                    f"{exc}; {progress.rows} rows re-published before it; {progress.rest}"
                ) from exc
            progress.add(batch, invalid)
            after = batch.last
    return progress
