"""``make bench`` in its smoke mode: the harness itself, on real private services.

Every contender that needs nothing but this machine (this pipeline, PostgreSQL logical
replication, the naive consumer) drains, runs at a steady rate and loads a table; each run must
end with the destination identical to the source, no change missing, and a report written.
"""

from __future__ import annotations

import json
import subprocess
import sys

from cdc.local.paths import PROJECT_DIR


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
    tables = results["tables"]  # each drain checked every change applied and each table's rows
    assert set(tables["rounds"]) == {"employees only", "mix of three tables"}
    assert all(len(rates) == 1 and rates[0] > 0 for rates in tables["rounds"].values())
    assert tables["ratio"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## Backlog drain" in text and "## Steady latency" in text and "## Initial load" in text
    assert "## Three tables against employees alone" in text
