"""The Kafka topic of a replicated table: ``PREFIX.schema.table``, one topic per table, never shared.

Kafka allows ``[a-zA-Z0-9._-]`` in a topic name, up to 249 characters. A PostgreSQL name allows
anything. Each name part keeps its letters, digits and ``_``; every other character, ``.`` and
``-`` included, becomes ``-`` and the two hex digits of each of its UTF-8 bytes. ``-`` therefore
always starts an escape and ``.`` only ever separates the parts, so two different tables cannot
be given one name: the mapping can be read back (``parse_topic``).

A name longer than Kafka allows keeps its first characters and ends in ``-h`` and 16 hex digits of
a hash of the whole (``h`` never follows ``-`` in an escape); such a name is not read back, the
registry (``cdc_tables``) keeps which table it belongs to.

Kafka also refuses a topic whose name differs from an existing one only by ``.`` against ``_``
(their metrics would share names): ``collision_key`` gives the form it compares, so that a clash
is found before the topic is created.
"""

from __future__ import annotations

import hashlib
import re

MAX_TOPIC = 249
_KEPT = re.compile(r"[A-Za-z0-9_]")
_HASHED = 16


def escape(part: str) -> str:
    """One name part (a schema or a table name, unquoted) in topic characters."""
    return "".join(ch if _KEPT.fullmatch(ch) else "".join(f"-{b:02x}" for b in ch.encode()) for ch in part)


def unescape(part: str) -> str:
    """``escape``'s inverse. ValueError if ``part`` is not an escaped name."""
    out = bytearray()
    i = 0
    while i < len(part):
        ch = part[i]
        if ch == "-":
            pair = part[i + 1 : i + 3]
            if len(pair) != 2 or not re.fullmatch(r"[0-9a-f]{2}", pair):
                raise ValueError(f"{part!r} is not an escaped name")
            out.append(int(pair, 16))
            i += 3
        elif _KEPT.fullmatch(ch):
            out += ch.encode()
            i += 1
        else:
            raise ValueError(f"{part!r} is not an escaped name")
    return out.decode()


def topic_for(prefix: str, schema: str, table: str) -> str:
    """The topic of ``schema.table`` under ``prefix`` (CDC_TOPIC_PREFIX)."""
    name = f"{prefix}.{escape(schema)}.{escape(table)}"
    if len(name) <= MAX_TOPIC:
        return name
    digest = hashlib.sha256(f"{schema}\0{table}".encode()).hexdigest()[:_HASHED]
    return f"{name[: MAX_TOPIC - _HASHED - 2]}-h{digest}"


def parse_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """The (schema, table) ``topic_for`` made ``topic`` from, or None if it did not (another
    prefix, a hashed long name, or not a table topic)."""
    if not topic.startswith(prefix + "."):
        return None
    parts = topic[len(prefix) + 1 :].split(".")
    if len(parts) != 2:
        return None
    try:
        return unescape(parts[0]), unescape(parts[1])
    except ValueError:
        return None


def collision_key(topic: str) -> str:
    """The form in which Kafka compares topic names for a clash: ``.`` read as ``_``."""
    return topic.replace(".", "_")
