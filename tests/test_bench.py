"""``make bench`` in its smoke mode: the harness itself, on real private services.

Every contender that needs nothing but this machine (this pipeline, PostgreSQL logical
replication, the naive consumer) drains, runs at a steady rate and loads a table; each run must
end with the destination identical to the source, no change missing, and a report written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import report
from cdc.local.paths import PROJECT_DIR

pytestmark = pytest.mark.integration


def test_smoke_run_reports_every_contender_identical(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            "--contenders",
            "cdc,logical,naive",
            "--out",
            str(tmp_path),
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "report.json").read_text())
    assert results["failures"] == []
    drain = results["drain"]
    assert set(drain) == {"cdc", "cdc_producer_alone", "cdc_consumer_alone", "logical", "naive"}
    for key in ("cdc", "cdc_consumer_alone", "logical", "naive"):
        assert drain[key]["identical"] is True, key
        assert drain[key]["changes_per_s"] > 0
    assert drain["cdc"]["events_ok"] is True
    for name in ("cdc", "logical"):
        (run,) = results["latency"][name]
        assert run["missing"] == 0 and run["measured"] > 0
        assert results["load"][name]["identical"] is True
    assert results["ratios"]["drain_cdc_over_logical"] > 0
    assert [r["consumers"] for r in results["scaleout"]] == [1, 2, 3]
    assert all(r["identical"] is True for r in results["scaleout"])
    text = (tmp_path / "report.md").read_text()
    assert "## Backlog drain" in text and "## Steady latency" in text and "## Initial load" in text


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
