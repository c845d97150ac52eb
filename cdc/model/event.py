"""The data model: an employee row and the change event that carries it through Kafka.

Parsing is strict: every field is checked for type, range and length (matching the columns of
``setup_db.sql``), and a problem raises ``InvalidEventError`` naming the field. Unknown JSON keys
are ignored, so a newer producer can add fields without breaking an older consumer.

Event JSON (topic ``bf_employee_cdc``, key = emp_id as UTF-8 text, header ``cdc.producer: 1``)::

    {"action_id": 1042, "action": "UPDATE", "emp_id": 7, "first_name": "Ada",
     "last_name": "Lovelace", "dob": "1815-12-10", "city": "London", "salary": 120000,
     "txid": 88123, "captured_at": "2026-11-24T10:00:00.123456+00:00"}

Every value the source columns can hold is carried exactly:

- ``emp_id``: any int4 (0 and negatives included); ``salary``: any int4 or null.
- names and ``city``: any text PostgreSQL stores, at most 100 characters (no NUL, no lone
  surrogate: neither can be UTF-8 text in PostgreSQL).
- ``dob``: PostgreSQL's ISO date text, kept as text: ``YYYY-MM-DD`` for years 1 to 9999, more
  year digits above (``12345-01-01``), a `` BC`` suffix (``0044-03-15 BC``), ``infinity`` or
  ``-infinity``. Only the shape is checked here; the destination casts it with ``::date``, so an
  impossible date of the right shape (``2023-02-30``) is a database data error, dead-lettered.
- A DELETE needs only ``action_id``, ``action`` and ``emp_id``: the rest of its old image is
  carried where it is valid and dropped where not, so an odd image never stops a delete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from cdc.errors import BadMessageError

ACTIONS = ("INSERT", "UPDATE", "DELETE", "SNAPSHOT")
TEXT_MAX = 100  # VARCHAR(100) in both schemas
INT4_MIN = -(2**31)
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
XID8_MAX = 2**64 - 1
# The shape of PostgreSQL's ISO date output (at most 7 year digits: the type ends in 5874897).
DATE_TEXT = re.compile(r"(?:[0-9]{4}|[1-9][0-9]{4,6})-[0-9]{2}-[0-9]{2}(?: BC)?|-?infinity")
# The Kafka header producer.py puts on every message: only such messages may record a
# dead-lettered action_id, so a stranger's message cannot take a real one.
MARK_HEADER = "cdc.producer"
MARK_VALUE = b"1"

# The keys producer.py writes, and the actions as a set, for the fast path of from_json.
_FIELDS = frozenset(
    (
        "action_id",
        "action",
        "emp_id",
        "first_name",
        "last_name",
        "dob",
        "city",
        "salary",
        "txid",
        "captured_at",
    )
)
_ACTION_SET = frozenset(ACTIONS)
_new_tuple = tuple.__new__


class InvalidEventError(BadMessageError):
    """A message that is not a valid change event. ``field`` names the culprit, if one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _int(data: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool) -> int | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidEventError(f"{name} is missing", name)
        return None
    # bool is an int subclass in Python; true/false is never a valid id or salary.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEventError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise InvalidEventError(f"{name}={value} is out of range {lo}..{hi}", name)
    return value


def _text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEventError(f"{name} must be a string, got {type(value).__name__}", name)
    if len(value) > TEXT_MAX:
        raise InvalidEventError(f"{name} is {len(value)} characters, at most {TEXT_MAX} allowed", name)
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


class Employee(NamedTuple):
    """One row of ``employees`` (source and destination have the same columns).

    Named tuples (Employee, ChangeEvent): immutable like the frozen dataclasses they were, and
    built in a third of the time (two per message).
    """

    emp_id: int
    first_name: str | None = None
    last_name: str | None = None
    dob: str | None = None  # PostgreSQL's ISO date text, see the module docstring
    city: str | None = None
    salary: int | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, lenient: bool = False) -> Employee:
        """Validate a row. ``lenient`` (a DELETE's old image): an invalid field other than
        emp_id is dropped instead of raising."""
        emp_id = _int(data, "emp_id", INT4_MIN, INT4_MAX, required=True)
        fields = {
            "first_name": _text,
            "last_name": _text,
            "dob": _date,
            "city": _text,
            "salary": lambda d, n: _int(d, n, INT4_MIN, INT4_MAX, required=False),
        }
        values = {}
        for name, parse in fields.items():
            try:
                values[name] = parse(data, name)
            except InvalidEventError:
                if not lenient:
                    raise
        return cls(emp_id, **values)  # type: ignore[arg-type]

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.emp_id, self.first_name, self.last_name, self.dob, self.city, self.salary)


class ChangeEvent(NamedTuple):
    """One captured change: the action and the full row image (OLD for DELETE, NEW otherwise)."""

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
        if not isinstance(data, Mapping):
            raise InvalidEventError(f"event must be a JSON object, got {type(data).__name__}")
        action_id = _int(data, "action_id", 1, INT8_MAX, required=True)
        action = data.get("action")
        if action is None:
            raise InvalidEventError("action is missing", "action")
        if action not in ACTIONS:
            raise InvalidEventError(f"action={action!r} is not one of {', '.join(ACTIONS)}", "action")
        return cls(
            action_id=action_id,  # type: ignore[arg-type]
            action=action,
            employee=Employee.from_mapping(data, lenient=action == "DELETE"),
            txid=_int(data, "txid", 0, XID8_MAX, required=False),
            captured_at=_timestamp(data, "captured_at"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> ChangeEvent:
        """Decode a Kafka message value. Raises InvalidEventError for anything that is not an event.

        A well-formed event takes the fast path (``_from_json_fast``); anything else, valid or
        not, the checks above, which alone word the errors.
        """
        if type(raw) is bytes:
            event = _from_json_fast(raw)
            if event is not None:
                return event
        return cls._from_json_checked(raw)

    @classmethod
    def _from_json_checked(cls, raw: bytes | str | None) -> ChangeEvent:
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
        return cls.from_mapping(data)

    def to_dict(self) -> dict[str, Any]:
        e = self.employee
        return {
            "action_id": self.action_id,
            "action": self.action,
            "emp_id": e.emp_id,
            "first_name": e.first_name,
            "last_name": e.last_name,
            "dob": e.dob,
            "city": e.city,
            "salary": e.salary,
            "txid": self.txid,
            "captured_at": self.captured_at.isoformat() if self.captured_at else None,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def key(self) -> bytes:
        """The Kafka key: emp_id as UTF-8 text, so every change of one employee shares a partition."""
        return str(self.employee.emp_id).encode("ascii")


def _from_json_fast(raw: bytes) -> ChangeEvent | None:
    """The event in ``raw`` if it is valid and plain, else None (``from_json`` then decides).

    It accepts only what the checks above accept and gives the same event, faster: orjson
    instead of json (it refuses what json accepts beyond RFC 8259, such as NaN, lone surrogate
    escapes and integers above 64 bits, and validates UTF-8 itself), type and range checks
    inlined, and no lenient DELETE. Nested JSON under unknown keys is left to json, whose
    nesting limit (a RecursionError) this must not step around.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    if not _FIELDS.issuperset(data) and (b"[" in raw or raw.count(b"{") != 1):
        return None
    get = data.get
    action_id = get("action_id")
    action = get("action")
    emp_id = get("emp_id")
    if not (
        type(action_id) is int
        and 1 <= action_id <= INT8_MAX
        and type(action) is str
        and action in _ACTION_SET
        and type(emp_id) is int
        and INT4_MIN <= emp_id <= INT4_MAX
    ):
        return None
    first_name = get("first_name")
    last_name = get("last_name")
    city = get("city")
    for text in (first_name, last_name, city):
        # orjson never yields a lone surrogate, so only length and NUL are left to check.
        if text is not None and (type(text) is not str or len(text) > TEXT_MAX or "\x00" in text):
            return None
    dob = get("dob")
    if dob is not None and (type(dob) is not str or not DATE_TEXT.fullmatch(dob)):
        return None
    salary = get("salary")
    if salary is not None and (type(salary) is not int or not INT4_MIN <= salary <= INT4_MAX):
        return None
    txid = get("txid")
    if txid is not None and (type(txid) is not int or not 0 <= txid <= XID8_MAX):
        return None
    captured_at = get("captured_at")
    if captured_at is not None:
        if type(captured_at) is not str:
            return None
        try:
            captured_at = datetime.fromisoformat(captured_at)
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
    return _new_tuple(
        ChangeEvent,
        (
            action_id,
            action,
            _new_tuple(Employee, (emp_id, first_name, last_name, dob, city, salary)),
            txid,
            captured_at,
        ),
    )
