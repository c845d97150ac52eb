"""Any bytes in, a decision out: generated hostile messages through decoding, then in batches
through the real batch decision (cdc/batch.py) on the real destination and the real DLQ topic.

Every message must end applied, stale, duplicate or dead-lettered, exactly once, with
``processed_events`` saying the same; no exception may escape. ``CDC_FUZZ_EXAMPLES`` sets the
number of generated batches (default 200; decoding gets ten times as many single messages).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import pytest
from consumer_helpers import OURS
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from support import dlq_count, query

from cdc.dlq import queue as dlq
from cdc.dlq.queue import CircuitBreaker, DeadLetterQueue
from cdc.kafka.client import MARK_HEADER, MARK_VALUE, Received
from cdc.model.event import Codec
from cdc.runtime.db import Database
from cdc.runtime.stats import Stats
from cdc.sink.batch import BatchApplier, BatchResult
from employee import ACTIONS, EMPLOYEES, INT4_MAX, INT4_MIN, ChangeEvent, InvalidEventError, _from_json_fast

salvage_ids = Codec(EMPLOYEES).salvage

EXAMPLES = int(os.environ.get("CDC_FUZZ_EXAMPLES", "200"))
FUZZ = hsettings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

ANY_CHAR = st.characters(exclude_categories=())  # surrogates and NUL included
TEXT_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
EXTREME = [0, -1, INT4_MIN, INT4_MAX, INT4_MIN - 1, INT4_MAX + 1, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30]
ODD_DATES = [
    "infinity", "-infinity", "0044-03-15 BC", "4713-01-01 BC", "4714-11-24 BC", "12345-01-01",
    "5874897-12-31", "5874898-01-01", "2023-02-30", "0000-01-01", "1999-13-01", "2024-02-29", "",
]  # fmt: skip

POOL, FRESH = 40, 10**6
ints = st.one_of(st.integers(-3, 40), st.sampled_from(EXTREME), st.integers())
texts = st.one_of(
    st.none(),
    st.text(TEXT_CHAR, max_size=100),
    st.text(ANY_CHAR, max_size=120),
    st.builds(lambda c, n: c * n, ANY_CHAR, st.sampled_from([100, 101, 10_000])),
    st.sampled_from(["\ud800", "a\x00b", "👩🏽‍🔬", "e\u0301", 'O\'Brien \\ "x"', "שלום", ""]),
)
dates = st.one_of(
    st.none(),
    st.sampled_from(ODD_DATES),
    st.builds("{:04d}-{:02d}-{:02d}".format, st.integers(0, 99_999), st.integers(0, 13), st.integers(0, 32)),
    st.text(ANY_CHAR, max_size=16),
)
timestamps = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "2026-11-24T10:00:00+00:00",
            "9999-12-31T23:00:00-05:00",
            "0001-01-01T00:00:00+05:00",
            "2026-11-24T10:00:00",
            "2026-02-30T00:00:00+00:00",
        ]
    ),
    st.text(ANY_CHAR, max_size=30),
)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(ANY_CHAR, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# Mostly plausible values from small pools (duplicates and superseded events within and across
# batches), mixed with anything at all.
events = st.fixed_dictionaries(
    {
        "action_id": st.one_of(st.integers(1, 60), st.integers(1, 60), ints),
        "action": st.one_of(st.sampled_from(ACTIONS), st.sampled_from(ACTIONS), json_values),
        "emp_id": st.one_of(st.integers(-3, 10), st.integers(-3, 10), ints),
        "first_name": texts,
        "last_name": texts,
        "dob": dates,
        "city": texts,
        "salary": st.one_of(st.none(), ints),
        "txid": st.one_of(st.none(), ints),
        "captured_at": timestamps,
    },
    optional={"extra": json_values},
)

# Events valid but for a text or date field at most, for the database path: any text at all
# (PostgreSQL's, or surrogates, NUL, 10k characters), dates of every form and shape.
names = st.one_of(st.none(), st.text(TEXT_CHAR, max_size=100), st.text(TEXT_CHAR, max_size=100), texts)
plausible = st.fixed_dictionaries(
    {
        # 1..POOL: shared by every batch; above: new in each batch (see ``decide``).
        "action_id": st.one_of(st.integers(1, POOL), st.integers(POOL + 1, FRESH)),
        "action": st.sampled_from(ACTIONS),
        "emp_id": st.one_of(st.integers(-3, 10), st.sampled_from([INT4_MIN, INT4_MAX])),
        "first_name": names,
        "last_name": names,
        "dob": st.one_of(st.none(), st.sampled_from(["1815-12-10", *ODD_DATES]), dates),
        "city": names,
        "salary": st.none() | st.integers(INT4_MIN, INT4_MAX),
        "captured_at": st.just("2026-11-24T10:00:00+00:00"),
    }
)


def _dump(data: object, ascii_only: bool) -> bytes:
    # ensure_ascii writes a lone surrogate as "\ud800"; otherwise its raw bytes (not UTF-8).
    return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(_dump(draw(events), True))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            raw[i] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del raw[i]
    return bytes(raw)


hostile = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.builds(_dump, json_values, st.booleans()),
    st.builds(_dump, events, st.booleans()),
    mutated(),
)
# About half valid, so the database path gets its share.
values = st.booleans().flatmap(lambda valid: st.builds(_dump, plausible, st.booleans()) if valid else hostile)
# For batches: a valid event stays a dict until its batch gives its fresh action_id a range.
batch_values = st.booleans().flatmap(lambda valid: st.tuples(plausible, st.booleans()) if valid else hostile)
REPLAYED = (dlq.H_REPLAYED_FROM, b"dlq/0/0")
headers = st.sampled_from([[], OURS, [*OURS, REPLAYED], [REPLAYED], [(MARK_HEADER, b"2")]])


@hsettings(FUZZ, max_examples=EXAMPLES * 10)
@given(value=values)
def test_decoding_any_bytes_gives_an_event_or_an_invalid_event_error(value):
    salvage_ids(value)  # never raises either
    try:
        event = ChangeEvent.from_json(value)
    except InvalidEventError as exc:
        assert "\n" not in str(exc)
        str(exc).encode("utf-8")  # printable in a log line and a header
        return
    assert ChangeEvent.from_json(event.to_json()) == event


@hsettings(FUZZ, max_examples=EXAMPLES * 10)
@given(value=values)
def test_the_fast_decoder_accepts_only_valid_events_and_agrees_with_the_checks(value):
    fast = _from_json_fast(value) if isinstance(value, bytes) else None
    try:
        checked = ChangeEvent._from_json_checked(value)
    except InvalidEventError:
        assert fast is None
        return
    assert fast is None or fast == checked


def _value(generated: bytes | tuple | None, base: int) -> bytes | None:
    if not isinstance(generated, tuple):
        return generated
    event, ascii_only = generated
    if event["action_id"] > POOL:
        event = {**event, "action_id": event["action_id"] + base}
    return _dump(event, ascii_only)


def _processed(url: str) -> dict[int, tuple]:
    rows = query(
        url, 'SELECT action_id, outcome, topic, "partition", "offset", processed_at FROM processed_events'
    )
    return {r[0]: r[1:] for r in rows}


def _ours(record: Received) -> bool:
    return record.has_header(MARK_HEADER, MARK_VALUE)


def _check_accounting(batch: list[Received], result: BatchResult, before: dict, after: dict) -> None:
    where = lambda r: (r.topic, r.partition, r.offset)  # noqa: E731
    decided = (
        [where(i.record) for i in result.applied + result.stale]
        + [where(r) for r in result.duplicates]
        + [where(letter.record) for letter in result.dead]
    )
    assert Counter(decided) == Counter(where(r) for r in batch), "a message decided twice or never"

    expected: dict[int, tuple] = {}
    for outcome, items in (("applied", result.applied), ("stale", result.stale)):
        for i in items:
            expected[i.event.action_id] = (outcome, *where(i.record))
    for letter in result.dead:
        ids = salvage_ids(letter.record.value) if _ours(letter.record) else None
        if ids is not None:
            expected[ids[0]] = ("dlq", *where(letter.record))
    recorded = len(result.applied) + len(result.stale) + sum(1 for v in expected.values() if v[0] == "dlq")
    assert len(expected) == recorded, "one action_id decided twice in a batch"
    changed = {a: row[:4] for a, row in after.items() if before.get(a) != row}
    assert changed == expected, "processed_events disagrees with the batch's decisions"


@pytest.mark.integration
# About 0.1 s per batch: a large CDC_FUZZ_EXAMPLES run outlasts the suite's 600 s per test.
@pytest.mark.timeout(600 + EXAMPLES // 5)
@pytest.mark.parametrize("path", ["as_generated", "one_by_one"])
def test_any_batch_is_decided_exactly_once_on_the_real_destination(settings, clean_dest, path):
    db = Database(clean_dest)
    queue = DeadLetterQueue(settings)
    # Breaker off: a stream of garbage is exactly what this test sends on purpose.
    applier = BatchApplier(
        db, dlq=queue, breaker=CircuitBreaker(0, 0.9), stats=Stats("fuzz"), max_attempts=2, idempotency=True
    )
    offsets = itertools.count()
    totals: Counter[str] = Counter()

    @FUZZ
    @given(parts=st.lists(st.tuples(st.integers(0, 2), st.none() | st.binary(max_size=8), batch_values, headers),
                          min_size=5, max_size=50))  # fmt: skip
    def decide(parts):
        base = next(offsets) * FRESH
        batch = [
            Received(settings.cdc_topic, p, next(offsets), k, _value(v, base), h) for p, k, v, h in parts
        ]
        if path == "one_by_one":
            # An event the database rejects (no 30 February) sends the batch down the isolation path.
            n = next(offsets)
            bad = {"action_id": 10**12 + n, "action": "INSERT", "emp_id": -999_999, "dob": "2023-02-30"}
            batch.append(Received(settings.cdc_topic, 0, n, None, json.dumps(bad).encode(), OURS))
        before = _processed(clean_dest)
        result = applier.apply(batch)
        _check_accounting(batch, result, before, _processed(clean_dest))
        if path == "one_by_one":
            assert result.dead[-1].record is batch[-1] and result.dead[-1].attempts == 2
        totals.update(
            applied=len(result.applied), stale=len(result.stale), duplicates=len(result.duplicates),
            dead=len(result.dead), messages=len(batch),
        )  # fmt: skip

    try:
        decide()
    finally:
        queue.close()
        db.close()
    print(f"fuzz {path}: {dict(totals)}")
    assert dlq_count(settings) == totals["dead"]  # every dead letter reached the real DLQ
    assert totals["applied"] and totals["stale"] and totals["duplicates"] and totals["dead"]
