"""Any bytes through the event decoder (hypothesis): an event or an InvalidEventError with a
printable one-line message, never anything else; the fast decoder accepts only what the checked
one accepts, and decodes it the same. The same messages through the batch decision on the real
destination: ``tests/integration/test_sink_batch.py``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings

from cdc.model.event import Codec
from employee import EMPLOYEES, ChangeEvent, InvalidEventError, _from_json_fast
from tests.support.hostile import EXAMPLES, FUZZ, values

DEEP = b"[" * 100_000 + b"]" * 100_000
salvage_ids = Codec(EMPLOYEES).salvage


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


def test_deeply_nested_json_is_invalid_not_a_crash():
    with pytest.raises(InvalidEventError, match="nested too deeply"):
        ChangeEvent.from_json(DEEP)
