"""Consumer pieces that need no services: the circuit breaker, id salvage, the command line."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from cdc.dlq.queue import CircuitBreaker
from cdc.errors import ConfigError, HaltError, TransientError
from cdc.kafka.client import Received
from cdc.model.event import Codec
from cdc.runtime.settings import load_settings
from cdc.sink.batch import Decoded
from cdc.sink.inflight import Flight as _InFlight
from consumer_final import ProductionCDCConsumer, parse_args
from employee import EMPLOYEES

salvage_ids = Codec(EMPLOYEES).salvage


def test_breaker_trips_only_on_a_full_window_of_mostly_failures():
    breaker = CircuitBreaker(window=10, ratio=0.9)
    breaker.check(failed=9, total=9)  # not a full window yet
    breaker.record(failed=1, total=10)
    breaker.check(failed=5, total=5)  # 5 + half of the earlier batch's 1: 5.5 of 10, below 90 %
    breaker.record(failed=0, total=1)
    with pytest.raises(HaltError, match="circuit breaker open: 9 of the last 10"):
        breaker.check(failed=9, total=9)


@pytest.mark.parametrize(("failed", "trips"), [(449, False), (450, True)])
def test_a_batch_larger_than_the_window_is_judged_on_its_own_ratio(failed, trips):
    breaker = CircuitBreaker(window=100, ratio=0.9)
    breaker.record(failed=100, total=100)  # a bad burst before: does not count against a big batch
    if trips:
        with pytest.raises(HaltError, match="450 of the last 500"):
            breaker.check(failed=failed, total=500)
    else:
        breaker.check(failed=failed, total=500)


@pytest.mark.parametrize(("earlier_failed", "trips"), [(43, False), (44, True)])
def test_small_batches_fill_the_window_from_the_newest_back_pro_rata(earlier_failed, trips):
    breaker = CircuitBreaker(window=100, ratio=0.9)
    breaker.record(failed=100, total=100)  # pushed out of the window by the two below
    breaker.record(failed=earlier_failed * 2, total=98)  # its newest half (49) is in the window
    breaker.record(failed=45, total=50)
    # 1 + 45 + earlier_failed of the last 100: 89 stays below 90 %, 90 trips.
    if trips:
        with pytest.raises(HaltError, match="90 of the last 100"):
            breaker.check(failed=1, total=1)
    else:
        breaker.check(failed=1, total=1)


def test_after_a_restart_nothing_trips_before_a_full_window():
    breaker = CircuitBreaker(window=100, ratio=0.9)
    breaker.check(failed=99, total=99)
    breaker.record(failed=99, total=99)
    with pytest.raises(HaltError):
        breaker.check(failed=1, total=1)


class _RefusingConsumer:
    """Stands in for confluent_kafka.Consumer.commit: refuses once with ``code``, then accepts."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    def commit(self, *, offsets, asynchronous):
        self.calls += 1
        if self.calls == 1:
            raise KafkaException(KafkaError(self.code))
        return offsets


@pytest.mark.parametrize(
    "code", [KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID]
)
def test_offsets_refused_during_a_rebalance_stay_pending_until_the_partitions_leave(code):
    consumer = ProductionCDCConsumer(
        settings=load_settings(env={"DEST_DB_URL": "postgresql://x@h/db"}, dotenv_path=None)
    )
    consumer._consumer = _RefusingConsumer(code)
    consumer.offsets.owned = {("t", 0), ("t", 1)}
    consumer.offsets.uncommitted = {("t", 0): 10, ("t", 1): 20}
    consumer._commit_pending()
    assert consumer.offsets.uncommitted == {("t", 0): 10, ("t", 1): 20}  # still ours: kept
    consumer._commit_pending()
    assert consumer.offsets.uncommitted == {}

    consumer._consumer = _RefusingConsumer(code)
    consumer.offsets.uncommitted = {("t", 0): 11, ("t", 1): 21}
    consumer._on_revoke(consumer._consumer, [TopicPartition("t", 1)])  # the refused commit of t[1]
    assert consumer.offsets.uncommitted == {("t", 0): 11}  # t[1] left: its new owner re-reads


class _CommittingConsumer:
    """Stands in for confluent_kafka.Consumer.commit: accepts, and keeps what it was given."""

    def __init__(self) -> None:
        self.committed: list[tuple[str, int, int]] = []

    def commit(self, *, offsets, asynchronous):
        self.committed += [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        return offsets


def _consumer_owning(*partitions: int) -> ProductionCDCConsumer:
    consumer = ProductionCDCConsumer(
        settings=load_settings(env={"DEST_DB_URL": "postgresql://x@h/db"}, dotenv_path=None)
    )
    consumer._consumer = _CommittingConsumer()
    consumer.offsets.owned = {("t", p) for p in partitions}
    return consumer


def _batch(partition: int, offsets: range) -> Decoded:
    return Decoded([Received("t", partition, o, None, None) for o in offsets], [], [])


def _in_flight(consumer: ProductionCDCConsumer, batch: Decoded, *, error: BaseException | None = None):
    done: Future = Future()
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
    consumer.in_flight.flight = _InFlight(batch, dict(consumer.offsets.epochs), done, time.monotonic())


def test_a_revoke_waits_for_the_batch_in_flight_and_commits_it_first():
    consumer = _consumer_owning(0, 1)
    _in_flight(consumer, Decoded([*_batch(0, range(5, 10)).records, *_batch(1, range(3)).records], [], []))
    consumer._on_revoke(consumer._consumer, [TopicPartition("t", 0)])
    assert consumer._consumer.committed == [("t", 0, 10)]
    assert consumer.in_flight.flight is None and consumer.offsets.uncommitted == {("t", 1): 3}


def test_a_revoke_leaves_a_failed_batch_in_flight_for_the_loop_to_retry():
    consumer = _consumer_owning(0)
    _in_flight(consumer, _batch(0, range(5, 10)), error=TransientError("database restarting"))
    consumer._on_revoke(consumer._consumer, [TopicPartition("t", 0)])
    assert consumer._consumer.committed == [] and consumer.offsets.uncommitted == {}
    assert consumer.in_flight.flight is not None


def test_a_batch_read_before_its_partition_was_lost_moves_no_offset_after_it_came_back():
    # What the partition's other owner did meanwhile is unknown: this batch's offsets could skip it.
    consumer = _consumer_owning(0)
    _in_flight(consumer, _batch(0, range(5, 10)))
    consumer._on_lost(consumer._consumer, [TopicPartition("t", 0)])
    consumer._on_assign(consumer._consumer, [TopicPartition("t", 0)])
    consumer._await_in_flight()
    assert consumer.in_flight.flight is None and consumer.offsets.uncommitted == {}
    # A batch read after it came back counts.
    _in_flight(consumer, _batch(0, range(2, 4)))
    consumer._await_in_flight()
    assert consumer.offsets.uncommitted == {("t", 0): 4}


def test_breaker_window_zero_never_trips():
    CircuitBreaker(window=0, ratio=0.9).check(failed=1000, total=1000)


def test_breaker_settings_are_validated():
    with pytest.raises(ConfigError, match="DLQ_BREAKER_RATIO"):
        load_settings(env={"DLQ_BREAKER_RATIO": "1.5"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="DLQ_BREAKER_WINDOW"):
        load_settings(env={"DLQ_BREAKER_WINDOW": "-1"}, dotenv_path=None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (json.dumps({"action_id": 7, "emp_id": 3, "action": "INSERT", "dob": "bad"}), (7, 3, "INSERT")),
        (json.dumps({"action_id": 7, "emp_id": "x", "action": "UPSERT"}), (7, None, None)),
        (json.dumps({"action_id": 7, "emp_id": -(2**31), "action": "DELETE"}), (7, -(2**31), "DELETE")),
        (json.dumps({"action_id": 7, "emp_id": 0, "action": ["INSERT"]}), (7, 0, None)),
        (json.dumps({"action_id": 7, "emp_id": 2**31}), (7, None, None)),
        (json.dumps({"action_id": True, "emp_id": 3}), None),
        (json.dumps({"action_id": 0}), None),
        (json.dumps([1, 2]), None),
        ("{not json", None),
    ],
)
def test_salvage_ids_takes_only_usable_ids(value, expected):
    assert salvage_ids(value.encode()) == expected


def test_salvage_ids_of_binary_or_empty_values():
    assert salvage_ids(b"\xff\xfe") is None
    assert salvage_ids(None) is None


def test_cli_flags():
    args = parse_args(["--group-id", "g", "--no-dlq", "--no-idempotency", "--batch-size", "50"])
    assert (args.group_id, args.no_dlq, args.no_idempotency, args.batch_size) == ("g", True, True, 50)
    with pytest.raises(SystemExit):
        parse_args(["--replay-dlq", "--show-dlq"])
