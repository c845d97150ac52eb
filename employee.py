"""employee.py: the seed's typed contract for the ``employees`` table and its change events.

The table as ``setup_db.sql`` creates it, written out once here for code that wants typed rows
(tests, benchmarks, a user's own scripts); the pipeline itself reads the table from the
database catalog (``cdc.model.table``) and checks it against this contract at start-up.

Event JSON (topic ``bf_employee_cdc``, key = emp_id as UTF-8 text, header ``cdc.producer: 1``)::

    {"action_id": 1042, "action": "UPDATE", "emp_id": 7, "first_name": "Ada",
     "last_name": "Lovelace", "dob": "1815-12-10", "city": "London", "salary": 120000,
     "txid": 88123, "captured_at": "2026-11-24T10:00:00.123456+00:00"}

Validation is the model's (``cdc.model.event``): ``emp_id`` any int4, ``salary`` any int4 or
null, names and ``city`` at most 100 characters, ``dob`` PostgreSQL's ISO date text.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from cdc.model.event import ACTIONS, INT8_MAX, XID8_MAX, Codec, InvalidEventError
from cdc.model.table import DATE_TEXT, INT4, Column, Kind, Table

__all__ = [
    "ACTIONS",
    "DATE_TEXT",
    "EMPLOYEES",
    "INT4_MAX",
    "INT4_MIN",
    "INT8_MAX",
    "TEXT_MAX",
    "XID8_MAX",
    "ChangeEvent",
    "Employee",
    "InvalidEventError",
]

INT4_MIN, INT4_MAX = INT4
TEXT_MAX = 100  # VARCHAR(100) in both schemas
# The columns' own types without modifiers, as Table.load reads them (what a value's text is cast to).
INT4_TYPE, VARCHAR = "pg_catalog.int4", 'pg_catalog."varchar"'

EMPLOYEES = Table(
    schema="public",
    name="employees",
    columns=(
        Column("emp_id", "integer", Kind.INTEGER, INT4, not_null=True, cast_type=INT4_TYPE),
        Column("first_name", "character varying(100)", Kind.TEXT, length=TEXT_MAX, cast_type=VARCHAR),
        Column("last_name", "character varying(100)", Kind.TEXT, length=TEXT_MAX, cast_type=VARCHAR),
        Column("dob", "date", Kind.DATE, cast_type="pg_catalog.date"),
        Column("city", "character varying(100)", Kind.TEXT, length=TEXT_MAX, cast_type=VARCHAR),
        Column("salary", "integer", Kind.INTEGER, INT4, cast_type=INT4_TYPE),
    ),
    primary_key=("emp_id",),
)


class Employee(NamedTuple):
    """One row of ``employees`` (source and destination have the same columns)."""

    emp_id: int
    first_name: str | None = None
    last_name: str | None = None
    dob: str | None = None  # PostgreSQL's ISO date text
    city: str | None = None
    salary: int | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, lenient: bool = False) -> Employee:
        """Validate a row. ``lenient`` (a DELETE's old image): an invalid field other than
        emp_id is dropped instead of raising."""
        event = _CODEC.from_mapping({**data, "action_id": 1, "action": "DELETE" if lenient else "INSERT"})
        return event.employee

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self)


class ChangeEvent(NamedTuple):
    """One captured change of an employee: the model's ``Event`` with a typed row."""

    action_id: int
    action: str
    employee: Employee
    txid: int | None = None
    captured_at: datetime | None = None

    @property
    def emp_id(self) -> int:
        return self.employee.emp_id

    @property
    def is_delete(self) -> bool:
        return self.action == "DELETE"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ChangeEvent:
        """Validate a dict (a decoded JSON object or a database row) into an event."""
        return _CODEC.from_mapping(data)

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> ChangeEvent:
        """Decode a Kafka message value. Raises InvalidEventError for anything that is not an event."""
        return _CODEC.from_json(raw)

    @classmethod
    def _from_json_checked(cls, raw: bytes | str | None) -> ChangeEvent:
        """Decode without the fast path: the checks that word every error."""
        return _CODEC._from_json_checked(raw)

    def to_dict(self) -> dict[str, Any]:
        return _CODEC.to_dict(self)

    def to_json(self) -> bytes:
        return _CODEC.to_json(self)

    def key(self) -> bytes:
        """The Kafka key: emp_id as UTF-8 text, so every change of one employee shares a partition."""
        return _CODEC.key(self)


_CODEC = Codec(EMPLOYEES, event_type=ChangeEvent, row_type=Employee)


def _from_json_fast(raw: bytes) -> ChangeEvent | None:
    """The model's fast path for an employees event (``Codec.fast``)."""
    return _CODEC.fast(raw)
