"""Three tables under faults: employees and the demo's ``customers`` and ``order_lines`` (a foreign
key to ``customers``, a composite key) change together while each daemon is killed and restarted,
and the destination crashes once; foreign keys are on at the destination and the consumer applies
as its least-privilege role (which may set ``session_replication_role``). At the end ``verify`` is
identical for every table and every action_id of both outboxes was decided exactly once.
"""

from __future__ import annotations

import contextlib
import random

import pytest

from cdc.errors import CDCError
from cdc.local import shop
from cdc.local.services import LocalServices
from cdc.ops import tables
from cdc.runtime.settings import Settings
from tests.support import execute, scalar, wait_until
from tests.support.pipeline import Pipeline, pause, restart

pytestmark = pytest.mark.daemon

LOAD = {"rate": 100, "writers": 3}
SHOP_RATE = 25.0  # transactions per second on the two other tables
PRODUCER_ACTIVE = "active: holding the producer lock"
CONSUMER_STARTED = "starting consumer"


def shop_decided(pipeline: Pipeline) -> int:
    return scalar(
        pipeline.settings.dest_db_url, "SELECT count(*) FROM processed_events WHERE table_name IS NOT NULL"
    )


def test_three_tables_with_a_foreign_key_survive_kills_of_each_daemon_and_a_destination_crash(
    make_pipeline, local_services: LocalServices, private_settings: Settings, seed: int, rng: random.Random
):
    settings = private_settings
    pipeline = make_pipeline(local_services, settings)
    shop.create(settings.source_db_url, settings.dest_db_url)
    writer = shop.ShopWriter(settings.source_db_url, rate=SHOP_RATE, seed=seed)
    try:
        tables.add(settings, shop.TABLES)
        pipeline.start(consumers=2)
        pipeline.start_load(seed=seed, **LOAD)
        writer.start()
        pipeline.producer.wait_for_log(PRODUCER_ACTIVE)
        wait_until(lambda: shop_decided(pipeline) > 20, 120, "the other tables' changes applied")
        for round_ in range(3):
            pause(rng, 1.5, 3.5)
            restart(pipeline.consumers[round_ % 2], CONSUMER_STARTED)
            pause(rng, 1.0, 3.0)
            restart(pipeline.producer, PRODUCER_ACTIVE)
            before = shop_decided(pipeline)
            wait_until(lambda b=before: shop_decided(pipeline) > b, 90, "the other tables flowing again")
        dest = local_services.dest
        old = dest.pid()
        dest.stop(mode="immediate")  # a crash: in-flight transactions lost
        pause(rng, 1.0, 3.0)
        dest.start()
        assert dest.pid() != old
        before = shop_decided(pipeline)
        wait_until(lambda: shop_decided(pipeline) > before, 90, "the other tables flowing after the crash")
        pause(rng, 2.0, 4.0)
        writer.stop()
        pipeline.stop_load()
        assert writer.changes > 100, writer.changes
        pipeline.check(seed=seed)
        # Foreign keys hold at the end, whatever the order of arrival was.
        assert (
            scalar(
                settings.dest_db_url,
                "SELECT count(*) FROM order_lines l LEFT JOIN customers c ON c.id = l.customer_id WHERE c.id IS NULL",
            )
            == 0
        )
        assert scalar(settings.dest_db_url, "SELECT count(*) FROM order_lines") > 0
        pipeline.stop_all()
    finally:
        writer.stop()
        pipeline.kill_all()
        local_services.up(apply_schema=False)
        with contextlib.suppress(CDCError):
            tables.remove(settings, shop.TABLES)
        for url in (settings.source_db_url, settings.dest_db_url):
            execute(url, "DROP TABLE IF EXISTS order_lines, customers")
