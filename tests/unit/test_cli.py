"""``python -m cdc``: every flag reaches what it controls, checked without services."""

from __future__ import annotations

import logging

import pytest

from cdc.cli import main as cli
from cdc.local import demo


class _WorkloadBuilt(Exception):
    """Raised by the fake Workload once the demo has built it: nothing past that point runs."""


@pytest.fixture
def demo_workload(monkeypatch: pytest.MonkeyPatch) -> dict:
    """What ``python -m cdc demo`` builds its Workload with (the demo stops right there)."""
    seen: dict = {}

    def workload(url: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _WorkloadBuilt

    monkeypatch.setattr(demo, "Workload", workload)
    monkeypatch.setattr(demo, "ensure_topics", lambda settings: None)
    # main() would replace the root handlers (pytest's capture among them).
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    levels = {name: logging.getLogger(name).level for name in demo.QUIET_LOGGERS}
    yield seen
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def env_file(tmp_path, monkeypatch: pytest.MonkeyPatch):
    for name in ("SOURCE_DB_URL", "DEST_DB_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / ".env"
    path.write_text(
        "SOURCE_DB_URL=postgresql://u:p@127.0.0.1:5432/src\n"
        "DEST_DB_URL=postgresql://u:p@127.0.0.1:5433/dst\n"
        "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092\n"
    )
    return path


@pytest.mark.parametrize(("flags", "long_every_zero"), [([], False), (["--no-long-transactions"], True)])
def test_demo_passes_no_long_transactions_to_the_workload(
    demo_workload, env_file, tmp_path, flags, long_every_zero
):
    argv = ["--home", str(tmp_path / "home"), "--env-file", str(env_file), "demo", *flags]
    with pytest.raises(_WorkloadBuilt):
        cli.main(argv)
    assert (demo_workload["mix"].long_every == 0) is long_every_zero


def test_demo_keeps_the_daemons_logs_under_home(demo_workload, env_file, tmp_path):
    home = tmp_path / "home"
    with pytest.raises(_WorkloadBuilt):
        cli.main(["--home", str(home), "--env-file", str(env_file), "demo"])
    assert {p.name for p in (home / "logs").iterdir()} == {"demo-producer", "demo-consumer"}
