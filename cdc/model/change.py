"""A change of any captured table (``python -m cdc tables add``), as it travels through Kafka.

Event JSON (Kafka key = the ``key`` object's JSON text, so every change of a row lands in one
partition)::

    {"action_id": 1043, "action": "UPDATE", "schema": "public", "table": "Order Items",
     "key": {"order_id": "7", "line": "2"},
     "row": {"order_id": "7", "line": "2", "note": null, "price": "12.50"},
     "txid": 88123, "captured_at": "2026-11-24T10:00:00.123456+00:00"}

``row`` is the whole row by column name (OLD for a DELETE, NEW otherwise; generated columns left
out), each value the column's text output on the source under pinned settings, JSON null for
SQL NULL. ``key`` is the primary key's part of it. The destination types each value from its
text with the column's own type (``cdc.sink.generic``), which is exact for every type PostgreSQL
can print.

``ChangeCodec`` validates strictly and raises ``InvalidEventError`` naming the field: a bad
message is dead-lettered, never guessed at. A change must also arrive on its table's topic: a
message on one table's topic can never write another table.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from cdc.model.event import ACTIONS, INT8_MAX, XID8_MAX, InvalidEventError, salvage_id
from cdc.model.topics import topic_for

_ACTION_SET = frozenset(ACTIONS)


def key_text(key: Mapping[str, str]) -> str:
    """A key's canonical text: its members sorted, compact JSON. The same row always gives the
    same text, whatever order its members arrived in."""
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


def quoted(schema: str, table: str) -> str:
    """``schema.table`` as SQL writes it with each part double-quoted (as to_regclass reads it)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))


def guard_key(schema: str, table: str, key: Mapping[str, str]) -> str:
    """The row's key in the destination's version guard (``cdc_versions.key``): the table's
    quoted name, then the key's canonical text."""
    return quoted(schema, table) + key_text(key)


class Change(NamedTuple):
    """One captured change of a generic table. The first five fields are ``Event``'s."""

    action_id: int
    action: str
    row: dict[str, str | None]
    txid: int | None
    captured_at: datetime | None
    schema: str
    table: str
    key: dict[str, str]

    @property
    def qualified(self) -> tuple[str, str]:
        return (self.schema, self.table)


def _name(data: Mapping[str, Any], field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidEventError(f"{field} must be a non-empty string", field)
    if "\x00" in value:
        raise InvalidEventError(f"{field} contains a NUL character", field)
    return value


def _values(data: Mapping[str, Any], field: str, *, nulls: bool) -> dict[str, str | None]:
    value = data.get(field)
    if not isinstance(value, dict) or not value:
        raise InvalidEventError(f"{field} must be a non-empty JSON object of column values", field)
    for name, text in value.items():
        if "\x00" in name:
            raise InvalidEventError(f"{field} has a column name with a NUL character", field)
        if text is None:
            if nulls:
                continue
            raise InvalidEventError(f"{field}.{name} is null", field)
        if type(text) is not str:
            raise InvalidEventError(
                f"{field}.{name} must be the column's text (a JSON string), got {type(text).__name__}", field
            )
        if "\x00" in text:
            raise InvalidEventError(f"{field}.{name} contains a NUL character", field)
    return value


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidEventError("captured_at must be an ISO timestamp string", "captured_at")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEventError(
            f"captured_at={value[:40]!r} is not an ISO timestamp", "captured_at"
        ) from None
    if parsed.tzinfo is None:
        raise InvalidEventError(f"captured_at={value!r} has no time zone", "captured_at")
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidEventError(f"captured_at={value!r} is out of range in UTC", "captured_at") from None
    return parsed


class ChangeCodec:
    """Decodes and validates changes of generic tables; topics under ``prefix`` (CDC_TOPIC_PREFIX)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._topics: dict[tuple[str, str], str] = {}

    def topic(self, schema: str, table: str) -> str:
        """The topic of ``schema.table`` (cached: asked once per message)."""
        found = self._topics.get((schema, table))
        if found is None:
            found = self._topics[(schema, table)] = topic_for(self.prefix, schema, table)
        return found

    def from_json(self, raw: bytes | str | None, topic: str | None = None) -> Change:
        """Decode a Kafka message value that arrived on ``topic`` (None: not checked)."""
        if raw is None:
            raise InvalidEventError("message has no value (tombstone)")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEventError(f"value is not JSON: {exc}") from None
        return self.from_mapping(data, topic)

    def from_mapping(self, data: Any, topic: str | None = None) -> Change:
        if not isinstance(data, dict):
            raise InvalidEventError(f"event must be a JSON object, got {type(data).__name__}")
        action_id = data.get("action_id")
        if type(action_id) is not int:
            raise InvalidEventError("action_id must be an integer", "action_id")
        if not 1 <= action_id <= INT8_MAX:
            raise InvalidEventError(f"action_id={action_id} is out of range 1..{INT8_MAX}", "action_id")
        action = data.get("action")
        if action not in _ACTION_SET:
            raise InvalidEventError(f"action={action!r} is not one of {', '.join(ACTIONS)}", "action")
        schema, table = _name(data, "schema"), _name(data, "table")
        if topic is not None and topic != (expected := self.topic(schema, table)):
            raise InvalidEventError(
                f"a change of {schema}.{table} arrived on topic {topic}, not on its own topic {expected}",
                "table",
            )
        key = _values(data, "key", nulls=False)
        row = _values(data, "row", nulls=True)
        for name, text in key.items():
            if row.get(name) != text:
                raise InvalidEventError(f"key.{name} is not the row's {name}", "key")
        txid = data.get("txid")
        if txid is not None and (type(txid) is not int or not 0 <= txid <= XID8_MAX):
            raise InvalidEventError(f"txid must be an integer in 0..{XID8_MAX}", "txid")
        captured_at = _timestamp(data.get("captured_at"))
        return Change(action_id, action, row, txid, captured_at, schema, table, key)  # type: ignore[arg-type]

    @staticmethod
    def salvage(value: bytes | None) -> tuple[int, str | None, str | None, Any, str | None] | None:
        """(action_id, schema, table, key, action) of an invalid message, when its action_id is usable."""
        found = salvage_id(value)
        if found is None:
            return None
        data, action_id = found
        schema, table, key, action = (data.get(f) for f in ("schema", "table", "key", "action"))
        return (
            action_id,
            schema if isinstance(schema, str) and "\x00" not in schema else None,
            table if isinstance(table, str) and "\x00" not in table else None,
            key if isinstance(key, dict) else None,
            action if action in _ACTION_SET else None,
        )
