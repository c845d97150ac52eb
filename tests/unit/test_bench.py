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


def test_the_three_table_target_is_judged_from_the_tables_ratio():
    def judged(results):
        return {t["target"]: t for t in report.targets(results)}[
            "backlog drain, three tables over employees alone"
        ]

    assert judged({"drain": {}, "latency": {}, "load": {}})["met"] is None
    assert judged({"tables": {"ratio": 0.79}})["met"] is False
    assert judged({"tables": {"ratio": 0.8}}) == {
        "target": "backlog drain, three tables over employees alone",
        "measured": 0.8,
        "goal": ">= 0.8",
        "met": True,
    }
