"""Generated messages for the fuzz tests (hypothesis strategies): any bytes at all, hostile JSON,
mutated events, and plausible events whose text and date fields take any value.

``CDC_FUZZ_EXAMPLES`` sets the number of generated batches (default 200; single messages get ten
times as many).
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from cdc.dlq import queue as dlq
from cdc.kafka.client import MARK_HEADER
from employee import ACTIONS, INT4_MAX, INT4_MIN
from tests.support.consumer import OURS

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


def dump(data: object, ascii_only: bool) -> bytes:
    # ensure_ascii writes a lone surrogate as "\ud800"; otherwise its raw bytes (not UTF-8).
    return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(dump(draw(events), True))
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
    st.builds(dump, json_values, st.booleans()),
    st.builds(dump, events, st.booleans()),
    mutated(),
)
# About half valid, so the database path gets its share.
values = st.booleans().flatmap(lambda valid: st.builds(dump, plausible, st.booleans()) if valid else hostile)
# For batches: a valid event stays a dict until its batch gives its fresh action_id a range.
batch_values = st.booleans().flatmap(lambda valid: st.tuples(plausible, st.booleans()) if valid else hostile)
REPLAYED = (dlq.H_REPLAYED_FROM, b"dlq/0/0")
headers = st.sampled_from([[], OURS, [*OURS, REPLAYED], [REPLAYED], [(MARK_HEADER, b"2")]])
