"""Fixtures of the fault suite: the random seed of a test, and its pipeline on given services."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdc.local.services import LocalServices
from cdc.runtime.settings import Settings
from tests.support import clean_dest, clean_source
from tests.support.pipeline import Pipeline

# Small consumer batches: an event that the topic carries after a newer one for the same emp_id
# (transactions interleaving) then usually lands in a later batch, where only the version guard
# stops it from overwriting newer state. With big batches most such pairs meet in one batch.
CONSUMER_BATCH = "5"


@pytest.fixture
def seed() -> int:
    """The test's random seed, printed; CDC_FAULT_SEED replays one."""
    value = int(os.environ.get("CDC_FAULT_SEED") or random.randrange(1_000_000))
    print(f"CDC_FAULT_SEED={value}")
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def make_pipeline(tmp_path: Path) -> Iterator[Callable[[LocalServices, Settings], Pipeline]]:
    """``make_pipeline(services, settings)``: the pipeline on emptied databases, its daemons as their
    least-privilege roles (setup_roles_*.sql), as in production. At the end every daemon is killed
    and whatever the test stopped is started again."""
    made: list[tuple[LocalServices, Pipeline]] = []

    def make(services: LocalServices, settings: Settings) -> Pipeline:
        clean_source(settings.source_db_url)
        clean_dest(settings.dest_db_url)
        roles = services.role_env()
        pipeline = Pipeline(
            settings,
            tmp_path / f"pipeline{len(made)}",
            consumer_variables={"CONSUMER_BATCH_SIZE": CONSUMER_BATCH},
            SOURCE_DB_URL=roles["SOURCE_DB_URL"],
            DEST_DB_URL=roles["DEST_DB_URL"],
        )
        made.append((services, pipeline))
        return pipeline

    yield make
    for services, pipeline in made:
        pipeline.kill_all()
        services.up(apply_schema=False)
