"""What is on the dead-letter topic, and which of it: the reading half of ``python -m cdc dlq``.

1. Read the topic from the beginning up to its end now (``dlq.read``). Each message becomes a
   ``Letter``, parsed leniently: a value that is not UTF-8 or not JSON still lists, with what
   can be shown (text, or ``base64:``).
2. Select: a ``Selection`` holds the filters. Different filters must all match; the values of one
   filter are alternatives. A letter without the field (no action_id in a non-JSON value) never
   matches a filter on it.
3. ``list_lines`` / ``show_lines``: one aligned line per letter, or the whole message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Message

from cdc.dlq import queue as dlq
from cdc.errors import ConfigError
from cdc.kafka.client import Headers
from cdc.model.table import SOURCE_TABLE
from cdc.runtime.settings import Settings

ERROR_SHORT = 60  # characters of the error message in a list line
# librdkafka's own connection lines stay quiet: a failure reaches the operator as one error line.
QUIET = {"log_level": 0}


# -- 1. letters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One dead letter as found on the DLQ topic, with what could be parsed out of it."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime | None  # the Kafka message time (when it was dead-lettered)
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    value_format: str = "none"  # json, text (UTF-8, not JSON), binary (not UTF-8), none (no value)
    data: Any = None  # the decoded JSON when value_format is json

    @classmethod
    def parse(
        cls,
        where: tuple[str, int, int],
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        timestamp: datetime | None = None,
    ) -> Letter:
        """A letter at ``where`` (topic, partition, offset), its value decoded as far as it goes."""
        value_format, data = _decode(value)
        return cls(*where, timestamp, key, value, headers, value_format, data)

    @classmethod
    def of(cls, msg: Message) -> Letter:
        kind, ms = msg.timestamp()
        stamp = datetime.fromtimestamp(ms / 1000, UTC) if kind and ms >= 0 else None
        return cls.parse(dlq.position(msg), msg.key(), msg.value(), dlq.message_headers(msg), stamp)

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return None if v is None else dlq.header_text(v)
        return None

    @property
    def error_class(self) -> str | None:
        return self.header(dlq.H_ERROR_CLASS)

    @property
    def error(self) -> str | None:
        return self.header(dlq.H_ERROR_MESSAGE)

    @property
    def original_topic(self) -> str | None:
        return self.header(dlq.H_TOPIC)

    @property
    def original_partition(self) -> int | None:
        return _int_or_none(self.header(dlq.H_PARTITION))

    @property
    def original_offset(self) -> int | None:
        return _int_or_none(self.header(dlq.H_OFFSET))

    @property
    def original(self) -> str | None:
        parts = (self.original_topic, self.original_partition, self.original_offset)
        return None if None in parts else "/".join(map(str, parts))

    @property
    def failed_at(self) -> datetime | None:
        """``cdc.failed.at``, else the Kafka time of the dead letter (a stranger's message)."""
        text = self.header(dlq.H_FAILED_AT)
        if text:
            try:
                stamp = datetime.fromisoformat(text)
                return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
            except ValueError:
                pass
        return self.timestamp

    def _field(self, name: str) -> Any:
        return self.data.get(name) if isinstance(self.data, dict) else None

    @property
    def action_id(self) -> int | None:
        return _as_int(self._field("action_id"))

    @property
    def row_key(self) -> int | str | None:
        """The changed row's primary key: the message key (an event's key is the key's text),
        as an integer where it is one."""
        if self.key is None:
            return None
        try:
            text = self.key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return int(text) if _INTEGER.fullmatch(text) else text

    @property
    def action(self) -> str | None:
        action = self._field("action")
        return action if isinstance(action, str) else None

    @property
    def table(self) -> str | None:
        """The replicated table (``employees`` or ``schema.table``): the ``cdc.table`` header, else
        the change's own schema and table, when it names them."""
        named = self.header(dlq.H_TABLE)
        if named:
            return named
        schema, table = self._field("schema"), self._field("table")
        return f"{schema}.{table}" if isinstance(schema, str) and isinstance(table, str) else None

    def notes(self) -> list[str]:
        """What a list line adds after the error: an odd value, a replay that failed again."""
        notes = [] if self.value_format == "json" else [f"value: {self.value_format}"]
        replayed = self.header(dlq.H_REPLAYED_FROM)
        if replayed:
            notes.append("replay of " + "/".join(replayed.rsplit("/", 2)[-2:]))
        return notes

    def value_text(self, *, pretty: bool = False) -> str | None:
        """The value as a human reads it: JSON (indented if ``pretty``), text, or base64."""
        if self.value_format == "json":
            return json.dumps(self.data, ensure_ascii=False, indent=2 if pretty else None)
        return dlq.text_of(self.value)

    def summary(self) -> dict[str, Any]:
        """The ``list --json`` record."""
        failed = self.failed_at
        return {
            "dlq": self.position,
            "partition": self.partition,
            "offset": self.offset,
            "failed_at": failed.isoformat() if failed else None,
            "error_class": self.error_class,
            "error": self.error,
            "attempts": _int_or_none(self.header(dlq.H_ATTEMPTS)),
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "action_id": self.action_id,
            "key": self.row_key,
            "action": self.action,
            "table": self.table,
            "value_format": self.value_format,
            "replayed_from": self.header(dlq.H_REPLAYED_FROM),
        }

    def full(self) -> dict[str, Any]:
        """The ``show --json`` record: every header, the key, the value (decoded JSON if it is)."""
        return {
            "dlq": self.position,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "headers": {k: dlq.text_of(v) for k, v in self.headers},
            "key": dlq.text_of(self.key),
            "value_format": self.value_format,
            "value": self.data if self.value_format == "json" else dlq.text_of(self.value),
        }


def _decode(value: bytes | None) -> tuple[str, Any]:
    if value is None:
        return "none", None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", None
    try:
        return "json", json.loads(text)
    except (ValueError, RecursionError):
        return "text", None


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_letters(
    settings: Settings, keep: Callable[[Letter], bool], *, limit: int | None = None
) -> list[Letter]:
    """The letters ``keep`` accepts (at most ``limit``), in DLQ order (partition, offset)."""
    found: list[Letter] = []
    with closing(dlq.read(settings, **QUIET)) as messages:
        for msg in messages:
            letter = Letter.of(msg)
            if keep(letter):
                found.append(letter)
                if limit is not None and len(found) >= limit:
                    break
    return sorted(found, key=lambda m: (m.partition, m.offset))


# -- 2. the selection ---------------------------------------------------------------------------

Range = tuple[int | None, int | None]  # inclusive; None: open


@dataclass(frozen=True)
class Selection:
    """The filters of ``list``, ``show`` and ``replay``; an empty one selects every letter."""

    action_ids: tuple[Range, ...] = ()
    keys: tuple[Range, ...] = ()  # integer keys
    error_classes: frozenset[str] = frozenset()  # lower case
    partitions: frozenset[int] = frozenset()  # original partitions
    offsets: tuple[Range, ...] = ()  # original offsets
    since: datetime | None = None
    until: datetime | None = None
    positions: frozenset[tuple[int, int]] = frozenset()  # (DLQ partition, DLQ offset)
    tables: frozenset[str] = frozenset()  # employees, schema.table

    def is_everything(self) -> bool:
        return self == Selection()

    def matches(self, m: Letter) -> bool:
        if self.positions and (m.partition, m.offset) not in self.positions:
            return False
        if self.action_ids and not _in(m.action_id, self.action_ids):
            return False
        if self.keys and not _in(m.row_key if isinstance(m.row_key, int) else None, self.keys):
            return False
        if self.error_classes and (m.error_class or "").lower() not in self.error_classes:
            return False
        if self.tables and _table_name(m.table or "") not in self.tables:
            return False
        if self.partitions and m.original_partition not in self.partitions:
            return False
        if self.offsets and not _in(m.original_offset, self.offsets):
            return False
        if self.since or self.until:
            at = m.failed_at
            if at is None or (self.since and at < self.since) or (self.until and at >= self.until):
                return False
        return True


def _table_name(text: str) -> str:
    """A table as ``--table`` and the header compare it: ``public.employees`` is ``employees``."""
    text = text.strip()
    return SOURCE_TABLE if text in (SOURCE_TABLE, f"public.{SOURCE_TABLE}") else text


def _in(value: int | None, ranges: Iterable[Range]) -> bool:
    return value is not None and any(
        (lo is None or value >= lo) and (hi is None or value <= hi) for lo, hi in ranges
    )


_INTEGER = re.compile(r"-?[0-9]{1,19}")
_RANGE = re.compile(r"(-?\d+)?\.\.(-?\d+)?")
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_ranges(flag: str, values: Sequence[str], *, signed: bool = False) -> tuple[Range, ...]:
    """``42``, ``40..50``, ``40..``, ``..50``, comma-separated, the option repeated: any of them."""
    out: list[Range] = []
    for item in (part.strip() for value in values for part in value.split(",")):
        try:
            if ".." in item:
                match = _RANGE.fullmatch(item)
                if match is None or match.group(0) == "..":
                    raise ValueError
                lo, hi = (int(g) if g is not None else None for g in match.groups())
                if lo is not None and hi is not None and lo > hi:
                    raise ConfigError(f"{flag} {item!r} is an empty range")
            else:
                lo = hi = int(item)
        except ValueError:
            raise ConfigError(f"{flag} {item!r} is not a number or a range like 10..20") from None
        if not signed and any(v is not None and v < 0 for v in (lo, hi)):
            raise ConfigError(f"{flag} {item!r} is negative")
        out.append((lo, hi))
    return tuple(out)


def parse_time(flag: str, text: str | None, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time (UTC unless it says otherwise) or an age: ``90s``, ``30m``, ``2h``, ``7d``."""
    if text is None:
        return None
    age = _AGE.fullmatch(text.strip())
    try:
        if age:
            return (now or datetime.now(UTC)) - timedelta(**{_AGE_UNITS[age.group(2)]: float(age.group(1))})
        stamp = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise ConfigError(
            f"{flag} {text!r} is neither an ISO 8601 time (2026-11-28T09:00, UTC unless it says "
            "otherwise) nor an age like 30m, 2h, 7d"
        ) from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def parse_position(text: str, dlq_topic: str, what: str = "--dlq") -> tuple[int, int]:
    """A DLQ position as ``list`` prints it: ``PARTITION/OFFSET`` or ``TOPIC/PARTITION/OFFSET``."""
    parts = text.strip().rsplit("/", 2)
    topic = parts[0] if len(parts) == 3 else dlq_topic
    try:
        if len(parts) < 2:
            raise ValueError
        partition, offset = int(parts[-2]), int(parts[-1])
        if partition < 0 or offset < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a DLQ position like 0/12 or {dlq_topic}/0/12") from None
    if topic != dlq_topic:
        raise ConfigError(f"{what} {text!r} is not on the dead-letter topic {dlq_topic} (CDC_DLQ_TOPIC)")
    return partition, offset


def selection(
    settings: Settings,
    *,
    action_ids: Sequence[str] = (),
    keys: Sequence[str] = (),
    error_classes: Sequence[str] = (),
    partitions: Sequence[str] = (),
    offsets: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    positions: Sequence[str] = (),
    tables: Sequence[str] = (),
) -> Selection:
    """The selection from the command-line texts; a bad value raises ConfigError naming it."""
    parts: set[int] = set()
    for lo, hi in parse_ranges("--partition", partitions):
        if lo is None or hi is None or hi - lo > 100_000:
            raise ConfigError("--partition takes partition numbers (0,1 or 0..5), not an open range")
        parts.update(range(lo, hi + 1))
    now = datetime.now(UTC)
    start, end = parse_time("--since", since, now), parse_time("--until", until, now)
    if start and end and start >= end:
        raise ConfigError(f"--since {since!r} is not before --until {until!r}")
    return Selection(
        action_ids=parse_ranges("--action-id", action_ids),
        keys=parse_ranges("--key", keys, signed=True),
        error_classes=frozenset(c.strip().lower() for v in error_classes for c in v.split(",") if c.strip()),
        partitions=frozenset(parts),
        offsets=parse_ranges("--offset", offsets),
        since=start,
        until=end,
        positions=frozenset(
            parse_position(p, settings.cdc_dlq_topic) for v in positions for p in v.split(",") if p.strip()
        ),
        tables=frozenset(_table_name(t) for v in tables for t in v.split(",") if t.strip()),
    )


# -- 3. list and show --------------------------------------------------------------------------


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at else "-"


def _short(text: str | None, width: int = ERROR_SHORT) -> str:
    line = " ".join((text or "-").split())
    return line if len(line) <= width else line[: width - 3] + "..."


def list_lines(letters: Sequence[Letter]) -> list[str]:
    """One aligned line per letter, under a header line."""
    rows = [("DLQ", "FAILED_AT", "ERROR_CLASS", "ORIGINAL", "TABLE", "ACTION_ID", "KEY", "ACTION", "ERROR")]
    for m in letters:
        rows.append(
            (
                f"{m.partition}/{m.offset}",
                _when(m.failed_at),
                m.error_class or "-",
                m.original or "-",
                m.table or "-",
                str(m.action_id) if m.action_id is not None else "-",
                str(m.row_key) if m.row_key is not None else "-",
                m.action or "-",
                _short(m.error) + "".join(f" [{note}]" for note in m.notes()),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


def show_lines(m: Letter) -> list[str]:
    """The whole message: position, headers, key, value (pretty-printed when it is JSON)."""
    lines = [f"=== {m.position}  (dead-lettered {_when(m.timestamp)})", "headers:"]
    lines += [f"  {k}: {dlq.text_of(v)}" for k, v in m.headers] or ["  (none)"]
    lines.append(f"key: {dlq.text_of(m.key)}")
    kinds = {"json": "JSON", "text": "not JSON", "binary": "not UTF-8, base64", "none": "no value"}
    lines.append(f"value ({kinds[m.value_format]}):")
    lines += (m.value_text(pretty=True) or "").splitlines()
    return [*lines, ""]
