"""Where a partition starts (``cdc.kafka.positions.decide``) and what a batch stores
(``cdc.sink.positions.write_params``): pure functions, no services."""

from __future__ import annotations

import logging

import pytest

from cdc.kafka.client import Received
from cdc.kafka.positions import Gap, Stored, decide
from cdc.sink.positions import write_params

ID, OTHER = "id-now", "id-before"


def start(stored, *, low=0, high=100, group=None, topic_id=ID):
    return decide("t", 3, stored=stored, topic_id=topic_id, low=low, high=high, group=group)


def test_the_destination_position_is_the_start_whatever_the_group_says():
    assert start(Stored(40, ID)).offset == 40
    ahead = start(Stored(40, ID), group=90)
    assert ahead.offset == 40
    assert ahead.notes == (
        (
            logging.WARNING,
            "t[3]: the group's offset 90 is ahead of the destination's 40: starting at 40 "
            "(Kafka's view would skip what the destination never applied)",
        ),
    )
    behind = start(Stored(40, ID), group=35)
    assert behind.offset == 40 and behind.notes[0][0] == logging.INFO and "is behind" in behind.notes[0][1]
    assert start(Stored(40, ID), group=40).notes == ()


def test_a_position_below_the_log_start_is_a_gap_never_a_start():
    held = start(Stored(40, ID), low=70, group=90)
    assert held.offset is None
    assert held.gap == Gap("t", 3, 40, 70)
    assert held.gap.missing == 30
    assert "t[3]: offsets 40..69 (30 messages) were removed" in held.gap.line()
    # Exactly at the log start: nothing is missing.
    assert start(Stored(70, ID), low=70).offset == 70


def test_no_position_means_from_offset_0_so_a_log_that_starts_later_is_a_gap():
    assert start(None).offset == 0
    assert start(None, low=0, high=0).offset == 0
    assert start(None, low=5).gap == Gap("t", 3, 0, 5)


def test_a_recreated_topic_starts_from_its_beginning_and_the_old_offsets_mean_nothing():
    new = start(Stored(400, OTHER), high=50, group=None)
    assert new.offset == 0 and new.recreated and not new.truncated
    assert "deleted and recreated" in new.notes[0][1]
    # Its log no longer starting at 0 is a gap of the new topic.
    assert start(Stored(400, OTHER), low=10).gap == Gap("t", 3, 0, 10)
    # A position without a topic id (kept before ids were) belongs to the topic there now.
    assert start(Stored(40, None)).offset == 40


def test_a_log_that_ends_below_the_position_starts_at_its_end():
    cut = start(Stored(120, ID), high=100)
    assert cut.offset == 100 and cut.truncated
    assert "the log ends at 100" in cut.notes[0][1]


@pytest.mark.parametrize("offsets", [[5, 6, 7], [7, 5, 6]])
def test_a_batch_stores_the_offset_after_its_last_message_per_partition(offsets):
    records = [Received("b", 1, o, b"k", b"v") for o in offsets]
    records += [Received("a", 0, 9, b"k", b"v"), Received("a", 2, 0, b"k", b"v")]
    params = write_params(records, {"a": "id-a"})
    assert params == {
        "pos_topic": ["a", "a", "b"],
        "pos_part": [0, 2, 1],
        "pos_next": [10, 1, 8],
        "pos_id": ["id-a", "id-a", None],
    }
