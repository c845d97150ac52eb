"""The workload generator through a source crash: every writer reconnects and goes on."""

from __future__ import annotations

from cdc.ops.workload import Workload
from tests.support import wait_until


def test_survives_a_source_restart(private, local_services):
    url = private.source_db_url
    workload = Workload(url, rate=300, writers=3, seed=4)
    workload.start()
    try:
        wait_until(lambda: workload.stats.get("changes") >= 300, 30, "300 changes written")
        old = local_services.source.pid()
        local_services.source.stop(mode="immediate")
        before = workload.stats.get("changes")
        local_services.source.start()
        assert local_services.source.pid() != old
        # Writers retry with backoff (up to 5 s apart), so each comes back in its own time.
        wait_until(
            lambda: workload.stats.get("changes") >= before + 100 and workload.stats.get("reconnects") >= 3,
            30,
            "every writer back and 100 more changes",
        )
    finally:
        stats = workload.stop()
    assert stats["changes"] >= before + 100, stats
    assert stats.get("reconnects", 0) >= 3, stats  # every writer came back
    assert stats.get("rolled_back_connection", 0) > 0, stats
