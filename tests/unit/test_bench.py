"""``make bench``'s report without running anything: the targets it judges from the figures."""

from __future__ import annotations

from bench import report


def test_targets_say_not_run_rather_than_met_when_a_figure_is_missing():
    results = {"drain": {"cdc": {"changes_per_s": 10.0}}, "latency": {}, "load": {}}
    targets = {t["target"]: t for t in report.targets(results)}
    assert targets["backlog drain, logical ratio"]["met"] is None
    assert targets["p99 latency at 1000/s (single-statement)"]["met"] is None


def test_targets_judge_the_ratios_and_latency():
    lat = {
        "rate": 1000.0,
        "statements_per_txn": 1,
        "p99_ms": 60.0,
        "missing": 0,
        "cpu_percent": {"producer": 4.0},
    }
    results = {
        "drain": {
            "cdc": {"changes_per_s": 50.0},
            "logical": {"changes_per_s": 100.0},
            "naive": {"changes_per_s": 2.0},
        },
        "latency": {"cdc": [lat]},
        "load": {},
    }
    targets = {t["target"]: t for t in report.targets(results)}
    assert targets["backlog drain, logical ratio"] == {
        "target": "backlog drain, logical ratio",
        "measured": 0.5,
        "goal": ">= 0.25",
        "met": True,
    }
    assert targets["backlog drain, naive ratio"]["met"] is False  # 25x < 30x
    assert targets["p99 latency at 1000/s (single-statement)"]["met"] is False
    assert targets["producer CPU at 1,000 changes/s"]["met"] is True
