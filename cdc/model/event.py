"""A change event: one captured change of one row, as it travels through Kafka.

Event JSON (key = the primary key's value as UTF-8 text)::

    {"action_id": 1042, "action": "UPDATE", <the row's written columns, in column order>,
     "txid": 88123, "captured_at": "2026-11-24T10:00:00.123456+00:00"}

``Codec(table)`` decodes and validates events of one table (``cdc.model.table``). Parsing is
strict: every value is checked against its column's kind, range and length, and a problem raises
``InvalidEventError`` naming the field. Unknown JSON keys are ignored, so a newer producer can
add fields without breaking an older consumer.

- an integer column: any value of its type (0 and negatives included) or null;
- a text column: any text PostgreSQL stores, within the column's length (no NUL, no lone
  surrogate: neither can be UTF-8 text in PostgreSQL);
- a date column: PostgreSQL's ISO date text, kept as text: ``YYYY-MM-DD`` for years 1 to 9999,
  more year digits above (``12345-01-01``), a `` BC`` suffix (``0044-03-15 BC``), ``infinity``
  or ``-infinity``. Only the shape is checked; the destination casts it, so an impossible date
  of the right shape (``2023-02-30``) is a database data error, dead-lettered.
- The key is required. A DELETE needs only ``action_id``, ``action`` and the key: the rest of
  its old image is carried where it is valid and dropped where not, so an odd image never stops
  a delete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from cdc.errors import BadMessageError, ConfigError
from cdc.model.table import DATE_TEXT, Column, Kind, Table

ACTIONS = ("INSERT", "UPDATE", "DELETE", "SNAPSHOT")
INT8_MAX = 2**63 - 1
XID8_MAX = 2**64 - 1

_ACTION_SET = frozenset(ACTIONS)
_META = ("action_id", "action", "txid", "captured_at")
_new_tuple = tuple.__new__


class InvalidEventError(BadMessageError):
    """A message that is not a valid change event. ``field`` names the culprit, if one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Event(NamedTuple):
    """One captured change: the action and the full row image (OLD for DELETE, NEW otherwise).

    ``row`` holds the table's written columns in column order. A named tuple: one is built per
    message, and code that takes an event apart unpacks it by position.
    """

    action_id: int
    action: str
    row: tuple[Any, ...]
    txid: int | None = None
    captured_at: datetime | None = None


def _int(data: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool) -> int | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidEventError(f"{name} is missing", name)
        return None
    # bool is an int subclass in Python; true/false is never a valid id or amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEventError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise InvalidEventError(f"{name}={value} is out of range {lo}..{hi}", name)
    return value


def _text(data: Mapping[str, Any], name: str, limit: int | None) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEventError(f"{name} must be a string, got {type(value).__name__}", name)
    if limit is not None and len(value) > limit:
        raise InvalidEventError(f"{name} is {len(value)} characters, at most {limit} allowed", name)
    if "\x00" in value:
        raise InvalidEventError(f"{name} contains a NUL character", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEventError(f"{name} contains a lone surrogate (not UTF-8 text)", name) from None
    return value


def _date(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEventError(f"{name} must be an ISO date string, got {type(value).__name__}", name)
    if not DATE_TEXT.fullmatch(value):
        raise InvalidEventError(f"{name}={value[:40]!r} is not an ISO date (YYYY-MM-DD)", name)
    return value


def _timestamp(data: Mapping[str, Any], name: str) -> datetime | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEventError(f"{name}={value[:40]!r} is not an ISO timestamp", name) from None
    else:
        raise InvalidEventError(f"{name} must be an ISO timestamp string, got {type(value).__name__}", name)
    if parsed.tzinfo is None:
        raise InvalidEventError(f"{name}={value!r} has no time zone", name)
    try:
        parsed.astimezone(UTC)  # 9999-12-31T23:00-05:00 is past the last datetime in UTC
    except OverflowError:
        raise InvalidEventError(f"{name}={value!r} is out of range in UTC", name) from None
    return parsed


def _checked(column: Column) -> Callable[[Mapping[str, Any]], Any]:
    """The checked parse of one column's value (wording every error)."""
    name = column.name
    if column.kind is Kind.INTEGER:
        assert column.range is not None
        lo, hi = column.range
        return lambda data: _int(data, name, lo, hi, required=False)
    if column.kind is Kind.TEXT:
        limit = column.length
        return lambda data: _text(data, name, limit)
    return lambda data: _date(data, name)


def _plain(column: Column) -> Callable[[Any], bool]:
    """Whether a non-null value is valid, without wording why not (the fast path)."""
    if column.kind is Kind.INTEGER:
        assert column.range is not None
        lo, hi = column.range
        return lambda v: type(v) is int and lo <= v <= hi
    if column.kind is Kind.TEXT:
        # orjson never yields a lone surrogate, so only length and NUL are left to check.
        limit = column.length if column.length is not None else INT8_MAX
        return lambda v: type(v) is str and len(v) <= limit and "\x00" not in v
    fullmatch = DATE_TEXT.fullmatch
    return lambda v: type(v) is str and fullmatch(v) is not None


def _row_check(columns: tuple[Column, ...], key_index: int) -> Callable[[tuple[Any, ...]], bool]:
    """Whether a row's values are all valid (the key present), as ``_plain`` says, in one call.

    The fast path runs this once per message, so it is compiled to one expression over the
    row's positions, as dataclasses and namedtuple build their methods. Only positions and the
    integer bounds of the columns' types go into the source, never a name from the catalog.
    """
    terms = []
    for i, column in enumerate(columns):
        v = f"v{i}"
        if column.kind is Kind.INTEGER:
            assert column.range is not None
            lo, hi = (int(b) for b in column.range)
            test = f"(type({v}) is int and {lo} <= {v} <= {hi})"
        elif column.kind is Kind.TEXT:
            # orjson never yields a lone surrogate, so only length and NUL are left to check.
            limit = f" and len({v}) <= {int(column.length)}" if column.length is not None else ""
            test = f"(type({v}) is str{limit} and '\\x00' not in {v})"
        else:
            test = f"(type({v}) is str and fullmatch({v}) is not None)"
        terms.append(test if i == key_index else f"({v} is None or {test})")
    unpack = ", ".join(f"v{i}" for i in range(len(columns)))
    source = (
        f"def check(row):\n    {unpack}, = row\n    return (\n        "
        + "\n        and ".join(terms)
        + "\n    )\n"
    )
    namespace: dict[str, Any] = {"fullmatch": DATE_TEXT.fullmatch}
    exec(compile(source, "<row check>", "exec"), namespace)
    return namespace["check"]


def salvage_id(value: bytes | None) -> tuple[dict[str, Any], int] | None:
    """An invalid message's JSON object and its action_id, when it has a usable one (what a dead
    letter of ours is recorded under)."""
    try:
        data = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    action_id = data.get("action_id")
    if not (type(action_id) is int and 1 <= action_id <= INT8_MAX):
        return None
    return data, action_id


class Codec:
    """Events of one table: decode, validate, encode.

    ``event_type`` and ``row_type`` are the named tuples built (``Event`` and a plain tuple by
    default; ``employee.py`` passes its typed ones). Both must have the shape of ``Event`` and of
    the table's written columns.
    """

    def __init__(
        self, table: Table, *, event_type: type[tuple] = Event, row_type: type[tuple] = tuple
    ) -> None:
        clash = [c.name for c in table.written if c.name in _META]
        if clash:
            raise ConfigError(
                f"{table.schema}.{table.name}.{clash[0]}: a column of this name cannot travel in an event "
                f"(the event's own fields are {', '.join(_META)})"
            )
        self.table = table
        self.event_type = event_type
        self.row_type = row_type
        self.columns = table.written
        self.names = tuple(c.name for c in self.columns)
        key = table.key
        self.key_name = key.name
        self.key_index = self.names.index(key.name)
        assert key.range is not None or key.kind is not Kind.INTEGER
        self._key_check = _plain(key)
        self._checked = tuple((c.name, _checked(c)) for c in self.columns)
        self._plain = tuple((c.name, _plain(c)) for c in self.columns if c.name != key.name)
        self._fields = frozenset((*_META, *self.names))
        self._fast = self._make_fast()

    def key_of(self, event: tuple) -> Any:
        """The event's primary key value."""
        return event[2][self.key_index]

    def key(self, event: tuple) -> bytes:
        """The Kafka key: the primary key as UTF-8 text, so every change of a row shares a partition."""
        return str(event[2][self.key_index]).encode("utf-8")

    def from_mapping(self, data: Any) -> Any:
        """Validate a dict (a decoded JSON object or a database row) into an event."""
        if not isinstance(data, Mapping):
            raise InvalidEventError(f"event must be a JSON object, got {type(data).__name__}")
        action_id = _int(data, "action_id", 1, INT8_MAX, required=True)
        action = data.get("action")
        if action is None:
            raise InvalidEventError("action is missing", "action")
        if action not in ACTIONS:
            raise InvalidEventError(f"action={action!r} is not one of {', '.join(ACTIONS)}", "action")
        if data.get(self.key_name) is None:
            raise InvalidEventError(f"{self.key_name} is missing", self.key_name)
        lenient = action == "DELETE"
        values = []
        for name, parse in self._checked:
            try:
                values.append(parse(data))
            except InvalidEventError:
                if not lenient or name == self.key_name:
                    raise
                values.append(None)
        return _new_tuple(
            self.event_type,
            (
                action_id,
                action,
                _new_tuple(self.row_type, values),
                _int(data, "txid", 0, XID8_MAX, required=False),
                _timestamp(data, "captured_at"),
            ),
        )

    def from_json(self, raw: bytes | str | None) -> Any:
        """Decode a Kafka message value. Raises InvalidEventError for anything that is not an event.

        A well-formed event takes the fast path (``fast``); anything else, valid or not, the
        checks of ``from_mapping``, which alone word the errors.
        """
        if type(raw) is bytes:
            event = self.fast(raw)
            if event is not None:
                return event
        return self._from_json_checked(raw)

    def _from_json_checked(self, raw: bytes | str | None) -> Any:
        if raw is None:
            raise InvalidEventError("message has no value (tombstone)")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidEventError(f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidEventError(f"value is not JSON: {exc}") from None
        except RecursionError:
            raise InvalidEventError("value is JSON nested too deeply to be an event") from None
        return self.from_mapping(data)

    def fast(self, raw: bytes) -> Any:
        """The event in ``raw`` if it is valid and plain, else None (``from_json`` then decides).

        It accepts only what the checks of ``from_mapping`` accept and gives the same event,
        faster: orjson instead of json (it refuses what json accepts beyond RFC 8259, such as
        NaN, lone surrogate escapes and integers above 64 bits, and validates UTF-8 itself), no
        worded errors, and no lenient DELETE. Nested JSON under unknown keys is left to json,
        whose nesting limit (a RecursionError) this must not step around.
        """
        return self._fast(raw)

    def _make_fast(self) -> Callable[[bytes], Any]:
        # One call per message: everything it needs is bound here, none looked up per call.
        fields, names = self._fields, self.names
        check = _row_check(self.columns, self.key_index)
        event_type, row_type = self.event_type, self.row_type
        loads, decode_error, new, fromisoformat = (
            orjson.loads,
            orjson.JSONDecodeError,
            _new_tuple,
            datetime.fromisoformat,
        )

        def fast(raw: bytes) -> Any:
            try:
                data = loads(raw)
            except decode_error:
                return None
            if type(data) is not dict:
                return None
            if not fields.issuperset(data) and (b"[" in raw or raw.count(b"{") != 1):
                return None
            get = data.get
            action_id = get("action_id")
            action = get("action")
            if not (
                type(action_id) is int
                and 1 <= action_id <= INT8_MAX
                and type(action) is str
                and action in _ACTION_SET
            ):
                return None
            row = new(row_type, map(get, names))
            if not check(row):
                return None
            txid = get("txid")
            if txid is not None and (type(txid) is not int or not 0 <= txid <= XID8_MAX):
                return None
            captured_at = get("captured_at")
            if captured_at is not None:
                if type(captured_at) is not str:
                    return None
                try:
                    captured_at = fromisoformat(captured_at)
                except ValueError:
                    return None
                if captured_at.tzinfo is None:
                    return None
                # Only the first and the last year can leave datetime's range in UTC.
                if not 1 < captured_at.year < 9999:
                    try:
                        captured_at.astimezone(UTC)
                    except OverflowError:
                        return None
            return new(event_type, (action_id, action, row, txid, captured_at))

        return fast

    def salvage(self, value: bytes | None) -> tuple[int, Any, str | None] | None:
        """(action_id, key, action) of an invalid message, when its action_id is usable."""
        found = salvage_id(value)
        if found is None:
            return None
        data, action_id = found
        key = data.get(self.key_name)
        action = data.get("action")
        return (
            action_id,
            key if key is not None and self._key_check(key) else None,
            action if isinstance(action, str) and action in _ACTION_SET else None,
        )

    def to_dict(self, event: tuple) -> dict[str, Any]:
        action_id, action, row, txid, captured_at = event
        return {
            "action_id": action_id,
            "action": action,
            **dict(zip(self.names, row, strict=True)),
            "txid": txid,
            "captured_at": captured_at.isoformat() if captured_at else None,
        }

    def to_json(self, event: tuple) -> bytes:
        """The event's JSON, byte for byte what the producer's SQL makes of the same row."""
        return json.dumps(self.to_dict(event), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
