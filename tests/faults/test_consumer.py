"""consumer_final.py as a subprocess under faults: kill -9 (between the database commit and the
offset commit, and at random points), a destination outage longer than the poll interval, and
one of two consumers killed mid-stream. Every event is decided exactly once, and each fault is
seen to happen: the re-read duplicates, the transient errors and the resume, the rebalance."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from cdc.local.runner import Daemon
from tests.support import end_offsets, query, wait_until
from tests.support.consumer import (
    committed_offsets,
    consumer_env,
    count_processed,
    dest_rows,
    expected_state,
    new_publisher,
    outcomes,
    produce,
    workload,
)

F_SETPIPE_SZ = 1031  # Linux fcntl: resize a pipe

pytestmark = pytest.mark.daemon


def _decided(url: str) -> int:
    """How many events were decided, each applied or stale (a newer one in its batch), none dlq."""
    counts = Counter(outcomes(url).values())
    assert set(counts) <= {"applied", "stale"}, counts
    return counts.total()


class GatedDaemon(Daemon):
    """consumer_final.py at DEBUG with its output in a 4 KiB pipe the test can stop draining."""

    def start(self) -> GatedDaemon:
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, 4096)
        try:
            self.spawn(write_fd, LOG_LEVEL="DEBUG", STATS_INTERVAL="3600")
        finally:
            os.close(write_fd)
        self._open = threading.Event()
        self._open.set()
        self._reader = threading.Thread(target=self._drain, args=(os.fdopen(read_fd, "rb"),), daemon=True)
        self._reader.start()
        return self

    def _drain(self, pipe) -> None:
        with pipe:
            while self._open.wait() and pipe.read1(1024):
                pass

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()


def test_kill_9_during_a_20k_stream_applies_every_event_exactly_once(private, consumers):
    s = private
    events = workload(20_000, emps=3000, seed=11)
    produce(s, events)
    env = consumer_env(s, CONSUMER_BATCH_SIZE="100", KAFKA_GROUP_INSTANCE_ID="kill-test")
    url = s.dest_db_url
    rnd = random.Random(5)

    # 1. Between the database commit and the offset commit. At DEBUG the consumer logs one line
    #    per batch, after the database commit and before the offset commit; its stderr is a small
    #    pipe that the test stops draining, so the consumer blocks on exactly that line. kill -9.
    first = consumers.start(env, kind=GatedDaemon)
    wait_until(lambda: count_processed(url) >= 2000, 120, "2000 events decided")
    first.hold()
    stable = [-1]

    def settled() -> bool:
        n = count_processed(url)
        done, stable[0] = n == stable[0], n
        return done

    wait_until(settled, 60, "the consumer to block on its log line", step=1.0)
    first.proc.kill()
    first.release()
    first.proc.wait(30)
    committed = committed_offsets(s)
    applied_to = dict(query(url, 'SELECT "partition", max("offset") + 1 FROM processed_events GROUP BY 1'))
    assert any(applied_to.get(p, 0) > max(o, 0) for p, o in committed.items()), (applied_to, committed)

    # 2. The restart starts where the destination says it applied, not at the group's older
    #    offset: nothing is read twice, and it says which position it used.
    second = consumers.start(env)
    second.wait_for_log(r"the group's offset \d+ is behind the destination's \d+: starting at \d+")

    # 3. At random points, while there is still work.
    for i in range(3):
        d = second if i == 0 else consumers.start(env)
        before = count_processed(url)
        wait_until(lambda b=before: count_processed(url) > b or b == 20_000, 120, "progress after a restart")
        time.sleep(rnd.uniform(0.0, 0.5))
        d.proc.kill()
        d.wait()

    # 4. To the end, then a clean stop.
    last = consumers.start(env)
    last.wait_for_log("starting consumer")  # its signal handler is in place: SIGTERM is a clean stop
    wait_until(lambda: count_processed(url) == 20_000, 180, "all 20k events decided")
    # The killed consumer may have decided the last events without committing their offsets:
    # this one re-reads them as duplicates and commits them (the count above cannot tell).
    wait_until(lambda: committed_offsets(s) == end_offsets(s), 120, "every offset committed")
    last.signal(signal.SIGTERM)
    assert last.wait() == 0

    assert dest_rows(url) == expected_state(events)
    assert _decided(url) == 20_000
    assert committed_offsets(s) == end_offsets(s)  # the clean stop kept them


def test_destination_down_for_30s_nothing_dead_lettered_and_the_consumer_stays(
    private, local_services, consumers
):
    s = private
    events = workload(4000, emps=500, seed=3)
    url = s.dest_db_url
    stop = threading.Event()

    def trickle() -> None:
        publisher = new_publisher(s)
        for i in range(0, len(events), 100):
            if stop.is_set():
                return
            produce(s, events[i : i + 100], publisher)
            time.sleep(0.25)

    feeder = threading.Thread(target=trickle, daemon=True)
    # A consumer that stopped polling for 10 s would be thrown out of the group.
    d = consumers.start(consumer_env(s, KAFKA_MAX_POLL_INTERVAL_MS="10000", RETRY_BACKOFF_MAX="4"))
    feeder.start()
    try:
        wait_until(lambda: count_processed(url) >= 300, 60, "300 events decided")
        old, mark = local_services.dest.pid(), len(d.output())
        local_services.dest.stop(mode="immediate")
        down_at = time.monotonic()
        try:
            d.wait_for_log("transient error", start=mark)  # its batch rolled back, to be retried
            # Three poll intervals down: the consumer must stay in the group all along.
            while time.monotonic() - down_at < 30:
                assert d.running(), d.output()[-3000:]
                time.sleep(0.5)
        finally:
            local_services.dest.start()
        assert local_services.dest.pid() != old
        d.wait_for_log(r"destination back after \d+ retries, partitions resumed", start=mark)
        wait_until(lambda: count_processed(url) == len(events), 120, "every event decided")
    finally:
        stop.set()
        feeder.join(60)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0

    out = d.output()
    # One assignment, and no revoke until the shutdown: the group never rebalanced.
    running = out.split("SIGTERM received")[0]
    assert running.count("partitions assigned") == 1
    assert "partitions revoked" not in running and "partitions lost" not in running
    assert end_offsets(s, s.cdc_dlq_topic) == {0: 0, 1: 0, 2: 0}
    assert dest_rows(url) == expected_state(events)
    assert _decided(url) == len(events)


def test_two_consumers_one_killed_mid_stream_nothing_lost_or_double_applied(settings, clean_dest, consumers):
    s = settings
    events = workload(10_000, emps=2000, seed=9)
    url = clean_dest

    def feed() -> None:
        publisher = new_publisher(s)
        for i in range(0, len(events), 500):
            produce(s, events[i : i + 500], publisher)
            time.sleep(0.5)

    feeder = threading.Thread(target=feed, daemon=True)
    env = consumer_env(s, CONSUMER_BATCH_SIZE="200")
    a = consumers.start(env)
    feeder.start()
    a.wait_for_log("partitions assigned")
    wait_until(lambda: count_processed(url) >= 1000, 60, "1000 events decided")
    b = consumers.start(env)
    b.wait_for_log("partitions assigned")
    a.wait_for_log("partitions revoked")  # a gave some partitions to b, committing first
    assert feeder.is_alive()  # mid-stream
    mark = len(b.output())
    a.proc.kill()
    a.wait()
    b.wait_for_log("partitions assigned", start=mark)  # b took a's partitions over
    feeder.join(120)
    wait_until(lambda: count_processed(url) == len(events), 120, "every event decided")
    b.signal(signal.SIGTERM)
    assert b.wait() == 0

    assert dest_rows(url) == expected_state(events)
    assert _decided(url) == len(events)
    assert committed_offsets(s) == end_offsets(s)
