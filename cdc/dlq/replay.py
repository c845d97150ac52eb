"""Replaying dead letters: the one path behind ``python -m cdc dlq replay`` and
``consumer_final.py --replay-dlq``.

1. Plan: each letter is sent as it was (its original bytes), or with the operator's corrected
   value (``python -m cdc dlq replay --edit-file``), checked as a change event of the table.
2. Send: to the topic it was consumed from (``cdc.original.topic``) with its original headers plus
   ``cdc.replayed.from``, through the project's ``Publisher``; Kafka acknowledges each one.
3. Audit: every acknowledged message gets a log line, and a JSON line in the audit file when
   there is one, also when others failed.

Which letters: ``dlq replay`` takes a selection (filters, an edit file, ``--all``) read from the
beginning of the DLQ and keeps no progress; replaying a letter twice is harmless (the second copy
is a duplicate). ``--replay-dlq`` takes what is new since the last time (``Cursor``, kept in the destination beside the consumer's own
positions): the cursor moves past the letters only once Kafka acknowledged every replay, so a
crash replays a few twice, which the sink absorbs.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from cdc.dlq import queue as dlq
from cdc.dlq.letters import QUIET, Letter
from cdc.errors import ConfigError, DeliveryError, HaltError
from cdc.kafka.client import Headers, Publisher, admin_client, consumer_config, producer_config
from cdc.kafka.positions import REQUEST_TIMEOUT, PositionStore, log_range, starts
from cdc.model.change import ChangeCodec, guard_key, key_text
from cdc.model.event import Codec, InvalidEventError
from cdc.runtime.settings import Settings

log = logging.getLogger(__name__)

# The cursor's consumer group: <CONSUMER_GROUP_ID> + this.
CURSOR_GROUP_SUFFIX = ".dlq-replay"


# -- 1. the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between a dead letter and its correction: a JSON field, ``(key)`` or ``(value)``."""

    name: str
    old: Any
    new: Any

    def line(self) -> str:
        def show(v: Any) -> str:
            return "(absent)" if v is _ABSENT else json.dumps(v, ensure_ascii=False)

        return f"{self.name}: {show(self.old)} -> {show(self.new)}"


_ABSENT = object()


@dataclass(frozen=True)
class Planned:
    """What replaying one letter sends, and what can be said about it before it is sent."""

    letter: Letter
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    changes: tuple[Change, ...] = ()  # empty: the original bytes, as they were
    action_id: int | None = None
    row_key: int | str | None = None  # the changed row's primary key
    invalid: str | None = None  # why the consumer will dead-letter it again
    key_name: str = "key"  # the primary key column's name, where the table is known
    of_table: bool = False  # a change of another table than employees (``cdc tables``)
    guard: str | None = None  # its row's key in the destination's version guard, once decoded

    @property
    def edited(self) -> bool:
        return bool(self.changes)

    @property
    def version_key(self) -> int | str | None:
        """What the destination's version guard knows the changed row by (None: unknown)."""
        return self.guard if self.of_table else self.row_key


def plan(
    settings: Settings, letters: Sequence[Letter], edits: dict[tuple[int, int], Any], codec: Codec | None
) -> list[Planned]:
    """The messages to send. An edited value must be a valid change event of the table ``codec``
    describes (ConfigError if not). Without a codec (no edits then) nothing is checked: the ids
    are what the letter's JSON says."""
    out = []
    generic = ChangeCodec(settings.cdc_topic_prefix)
    for m in letters:
        key, value = m.key, m.value
        changes: tuple[Change, ...] = ()
        where = (m.partition, m.offset)
        topic = dlq.target_topic(m.headers, settings.cdc_topic)
        # A change of another table (its topic under CDC_TOPIC_PREFIX) is checked as such.
        of_table = topic.startswith(generic.prefix + ".")
        if where in edits and not _unchanged(m, edits[where]):
            if codec is None and not of_table:
                raise ConfigError(f"edit of {m.position}: no table to check the corrected value against")
            new = edits[where]
            if of_table:
                _check_edit(m, new, partial(generic.from_mapping, topic=topic))
                if isinstance(m.data, dict) and new.get("key") != m.data.get("key"):
                    raise ConfigError(
                        f"edit of {m.position}: the key of a change of another table must stay (its message "
                        "key, and so its partition, follows it; a key change is a DELETE and an INSERT)"
                    )
            else:
                assert codec is not None
                _check_edit(m, new, codec.from_mapping)
                key = str(new[codec.key_name]).encode()
            value = json.dumps(new, ensure_ascii=False, separators=(",", ":")).encode()
            changes = _diff(m, new) + (
                (Change("(key)", dlq.text_of(m.key), key.decode()),)
                if key != m.key and key is not None
                else ()
            )
        action_id, row_key, invalid, guard = m.action_id, m.row_key, None, None
        if of_table:
            try:
                change = generic.from_json(value, topic)
                action_id, row_key = change.action_id, key_text(change.key)
                guard = guard_key(change.schema, change.table, change.key)
            except InvalidEventError as exc:
                invalid = str(exc)
        elif codec is not None:
            try:
                event = codec.from_json(value)
                action_id, row_key = event.action_id, codec.key_of(event)
            except InvalidEventError as exc:
                invalid = str(exc)
        out.append(
            Planned(
                m,
                topic,
                key,
                value,
                dlq.replay_headers(m.headers, m.position),
                changes,
                action_id,
                row_key,
                invalid,
                codec.key_name if codec is not None and not of_table else "key",
                of_table,
                guard,
            )
        )
    return out


def _unchanged(m: Letter, new: Any) -> bool:
    """The entry as ``show --edit-file`` wrote it (a value that was not JSON is written as null)."""
    return new == m.data if m.value_format == "json" else new is None


def _check_edit(m: Letter, new: Any, check: Callable[[Any], Any]) -> None:
    """An edited value the consumer would take (``check`` validates it), with its ids unchanged."""
    where = f"edit of {m.position}"
    if not isinstance(new, dict):
        raise ConfigError(f"{where}: the value must be a change event (a JSON object)")
    try:
        check(new)
    except InvalidEventError as exc:
        raise ConfigError(f"{where}: {exc}: the consumer would dead-letter it again") from None
    if m.action_id is not None and new.get("action_id") != m.action_id:
        raise ConfigError(
            f"{where}: action_id {m.action_id} must stay (processed_events tracks the change by it)"
        )
    old_stamp = m.data.get("captured_at") if isinstance(m.data, dict) else None
    if _valid_timestamp(old_stamp) and new.get("captured_at") != old_stamp:
        raise ConfigError(
            f"{where}: captured_at must stay {old_stamp}: the consumer takes an action_id that comes "
            "back with another captured_at for a source that went back in time, and stops"
        )


def _valid_timestamp(value: Any) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _diff(m: Letter, new: dict[str, Any]) -> tuple[Change, ...]:
    if not isinstance(m.data, dict) or m.value_format != "json":
        return (Change("(value)", m.value_text(), new),)
    names = [*m.data, *(k for k in new if k not in m.data)]
    return tuple(
        Change(k, m.data.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in names
        if m.data.get(k, _ABSENT) != new.get(k, _ABSENT)
    )


def dash(value: object) -> str:
    """A value for a line of text: ``-`` when there is none."""
    return "-" if value is None else str(value)


# -- 2. sending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A replayed message and where Kafka put it."""

    planned: Planned
    topic: str
    partition: int
    offset: int

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


def send(settings: Settings, plans: Sequence[Planned], audit: AuditLog) -> list[Sent]:
    """Produce every planned message; audit each one Kafka acknowledged, also when others failed.
    Raises DeliveryError unless Kafka acknowledged all."""
    publisher = Publisher(
        producer_config(
            settings, **{"client.id": f"{settings.consumer_group_id}{CURSOR_GROUP_SUFFIX}", **QUIET}
        ),
        logger=dlq.KAFKA_LOG,
        flush_timeout=dlq.FLUSH_TIMEOUT,
        report_successes=True,
    )
    acked: dict[int, Sent] = {}

    def delivered(i: int, msg: Message) -> None:
        acked[i] = Sent(plans[i], *dlq.position(msg))

    try:
        publisher.send(
            ((p.topic, p.key, p.value, p.headers) for p in plans),
            what=f"replay from {settings.cdc_dlq_topic}",
            on_delivered=delivered,
        )
    finally:
        for i in sorted(acked):
            audit.record(acked[i])
        publisher.close()
    return [acked[i] for i in sorted(acked)]


# -- 3. the audit -------------------------------------------------------------------------------


def operator() -> str:
    """Who runs the replay, for the audit: the login name, else the uid."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


class AuditLog:
    """One log line per replayed message, and a JSON line appended to ``path`` (None: no file).
    The file is opened here, before anything is sent."""

    def __init__(self, path: Path | None, *, note: str | None = None) -> None:
        self.path = path
        self.note = note
        self.user = operator()
        self.host = socket.gethostname()
        self._file: IO[str] | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot open the audit file {path}: {exc.strerror}") from None

    def record(self, s: Sent) -> None:
        p = s.planned
        changed = [c.name for c in p.changes]
        log.info(
            "replayed dlq=%s to=%s action_id=%s key=%s edited=%s by=%s",
            p.letter.position,
            s.position,
            dash(p.action_id),
            dash(p.row_key),
            ",".join(changed) or "no",
            self.user,
        )
        if self._file is None:
            return
        entry = {
            "at": datetime.now(UTC).isoformat(),
            "user": self.user,
            "host": self.host,
            "dlq": p.letter.position,
            "to": s.position,
            "action_id": p.action_id,
            "key": p.row_key,
            "error_class": p.letter.error_class,
            "edited": p.edited,
            "changed": {c.name: [_jsonable(c.old), _jsonable(c.new)] for c in p.changes},
            "note": self.note,
        }
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _jsonable(value: Any) -> Any:
    return None if value is _ABSENT else value


# -- 4. the cursor of --replay-dlq ------------------------------------------------------------


class Cursor:
    """Where the last ``--replay-dlq`` stopped.

    With ``store`` (the destination's applied offsets, rows of the DLQ topic): the position the
    destination stored, checked against the topic (``cdc.kafka.positions.decide``): letters
    removed before they were replayed stop the replay with a line naming them, never skipped; a
    recreated DLQ topic is read from its beginning. The group ``<CONSUMER_GROUP_ID>.dlq-replay``
    is committed too (for lag tools). Without a store (no DEST_DB_URL), the group's offsets alone.
    """

    def __init__(self, settings: Settings, store: PositionStore | None = None) -> None:
        self.settings = settings
        self.topic = settings.cdc_dlq_topic
        self.group = f"{settings.consumer_group_id}{CURSOR_GROUP_SUFFIX}"
        self.store = store
        self._consumer = Consumer(consumer_config(settings, **{"group.id": self.group, **QUIET}))
        self._next: dict[int, int] = {}  # per DLQ partition, the offset after the last letter read
        self._ids: dict[str, str] = {}

    def letters(self, limit: int | None = None) -> list[Letter]:
        """The letters after the cursor up to the end of the DLQ now (at most ``limit``), in
        the order they were read."""
        found = []
        try:
            ends = self._assign()
            for msg in dlq.read_until(self._consumer, ends, limit):
                _, partition, offset = dlq.position(msg)
                self._next[partition] = offset + 1
                found.append(Letter.of(msg))
        except KafkaException as exc:
            raise DeliveryError(f"replay of {self.topic}: {exc.args[0].str()}") from exc
        return found

    def _assign(self) -> dict[int, int]:
        """Assign the DLQ's partitions at the cursor; the end offset of each with letters to read."""
        if self.store is None:
            log.warning("DEST_DB_URL is not set: --replay-dlq starts where its consumer group says")
            return dlq.assign_topic(self._consumer, self.topic, from_committed=True)
        meta = self._consumer.list_topics(self.topic, timeout=REQUEST_TIMEOUT).topics[self.topic]
        if meta.error is not None:
            raise DeliveryError(f"topic {self.topic}: {meta.error.str()}")
        decided, self._ids = starts(
            self._consumer,
            admin_client(self.settings),
            self.store,
            [(self.topic, p) for p in meta.partitions],
        )
        gaps = [start.gap for start in decided.values() if start.gap is not None]
        for gap in gaps:
            log.error("dead letters lost: %s", gap.line())
        if gaps:
            raise HaltError(
                f"{len(gaps)} partition(s) of {self.topic} lost dead letters before they were replayed: "
                f"nothing replayed (`python -m cdc offsets accept-gap --topic {self.topic}` accepts the loss)"
            )
        parts, ends = [], {}
        for (_, partition), start in sorted(decided.items()):
            for level, text in start.notes:
                log.log(level, "%s", text)
            assert start.offset is not None
            parts.append(TopicPartition(self.topic, partition, start.offset))
            _, high = log_range(self._consumer, self.topic, partition)
            if start.offset < high:
                ends[partition] = high
        self._consumer.assign(parts)
        return ends

    def advance(self) -> None:
        """Move the cursor past the letters read: call it once their replays are acknowledged."""
        if not self._next:
            return
        if self.store is not None:
            self.store.write({(self.topic, p): o for p, o in self._next.items()}, self._ids)
        offsets = [TopicPartition(self.topic, p, o) for p, o in self._next.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise DeliveryError(f"replay of {self.topic}: {exc.args[0].str()}") from exc

    def close(self) -> None:
        self._consumer.close()


def replay_pending(
    settings: Settings,
    *,
    limit: int | None = None,
    audit_file: Path | None = None,
    store: PositionStore | None = None,
) -> int:
    """``consumer_final.py --replay-dlq``: replay, as they are, the letters after the cursor (at
    most ``limit``), then move the cursor past them. Returns how many were replayed."""
    audit = AuditLog(audit_file)
    cursor = Cursor(settings, store)
    try:
        plans = plan(settings, cursor.letters(limit), {}, None)
        sent = send(settings, plans, audit) if plans else []
        cursor.advance()
    finally:
        cursor.close()
        audit.close()
    log.info("replayed %d message(s) from %s", len(sent), settings.cdc_dlq_topic)
    return len(sent)
