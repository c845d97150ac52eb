"""The monitoring stack with the real Prometheus and promtool of Debian's prometheus package:

- promtool: the compose scrape config and `make monitor`'s local one (`check config`), the
  alert rules (`check rules`) and their unit tests (`test rules`: every alert firing and not);
- `python -m cdc monitor` / `status` / `down`: Prometheus started, shown, stopped.

Tests marked ``prometheus`` need promtool and prometheus. `make test` installs the package first
(`make deps`), so a missing one fails them rather than skipping them; `make test-unit` leaves
them out.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdc.local.env import METRICS_PORTS
from cdc.local.paths import PROJECT_DIR, PROMETHEUS_CONFIG
from cdc.local.prometheus import JOB_PORTS, PrometheusServer, local_config
from tests.support import free_ports, wait_until
from tests.support.monitoring import (
    ALERT_RULES,
    ALERT_TESTS,
    alert_rules,
    api,
    load_yaml,
    promtool,
    tool,
)

pytestmark = pytest.mark.prometheus


def test_the_compose_scrape_config_is_valid():
    out = promtool("check", "config", PROMETHEUS_CONFIG).stdout
    assert "SUCCESS" in out and "1 rule files found" in out, out
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(JOB_PORTS)
    # The daemons run on the host: host.docker.internal at `make up`'s ports.
    for job, var in JOB_PORTS.items():
        assert jobs[job]["static_configs"] == [{"targets": [f"host.docker.internal:{METRICS_PORTS[var]}"]}]


def test_the_local_config_differs_only_in_targets(tmp_path: Path):
    server = PrometheusServer(
        home=tmp_path, port=19090, targets={"cdc-producer": ["127.0.0.1:1"], "cdc-consumer": ["127.0.0.1:2"]}
    )
    promtool("check", "config", server.write_config())
    compose, local = load_yaml(PROMETHEUS_CONFIG), load_yaml(server.config)
    assert local["global"] == compose["global"]
    assert local["rule_files"] == [str(ALERT_RULES)]
    assert [j["job_name"] for j in local["scrape_configs"]] == [
        j["job_name"] for j in compose["scrape_configs"]
    ]
    for job in local["scrape_configs"]:
        job.pop("static_configs")
    for job in compose["scrape_configs"]:
        job.pop("static_configs")
    assert local == {**compose, "rule_files": [str(ALERT_RULES)]}
    fast = local_config({"cdc-producer": [], "cdc-consumer": []}, scrape_interval="1s")["global"]
    assert fast == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}


def test_the_alert_rules_are_valid_and_complete():
    out = promtool("check", "rules", ALERT_RULES).stdout
    rules = alert_rules()
    assert f"SUCCESS: {len(rules)} rules found" in out, out
    assert {r["alert"] for r in rules} == {
        "CDCDaemonDown",
        "CDCNoActiveProducer",
        "CDCConsumerLagGrowing",
        "CDCDeadLetters",
        "CDCDeliveryHeldBack",
        "CDCConsumerPaused",
        "CDCTopicGap",
        "CDCPartitionsWaiting",
        "CDCTableHeld",
        "CDCTopicRecreatedOrTruncated",
    }
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_alert_is_unit_tested_firing_and_not_firing():
    assert "SUCCESS" in promtool("test", "rules", ALERT_TESTS).stdout
    checks = [check for test in load_yaml(ALERT_TESTS)["tests"] for check in test["alert_rule_test"]]
    for rule in alert_rules():
        own = [c for c in checks if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in own), f"{rule['alert']} is never expected to fire"
        assert any(not c["exp_alerts"] for c in own), f"{rule['alert']} is never expected not to fire"
        # Each firing expectation spells out the annotations, so their templates are checked too.
        for check in own:
            for alert in check["exp_alerts"]:
                assert set(alert["exp_annotations"]) == {"summary", "description"}, rule["alert"]


def test_monitor_starts_prometheus_status_shows_it_and_down_stops_it(tmp_path: Path):
    prometheus_port, producer_port, consumer_port = free_ports(3)
    env_file = tmp_path / ".env"
    env_file.write_text(f"PRODUCER_METRICS_PORT={producer_port}\nCONSUMER_METRICS_PORT={consumer_port}\n")

    def cdc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cdc", "--home", str(tmp_path), "--env-file", str(env_file), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=PROJECT_DIR,
            env={"PATH": "/usr/bin:/bin", "PROMETHEUS_PORT": str(prometheus_port)},
        )

    tool("prometheus")
    started = cdc("monitor")
    assert started.returncode == 0, started.stderr
    server = PrometheusServer(home=tmp_path, port=prometheus_port)
    try:
        assert server.running(), started.stdout
        assert f"127.0.0.1:{producer_port}" in started.stdout
        expected = {
            ("cdc-producer", f"http://127.0.0.1:{producer_port}/metrics"),
            ("cdc-consumer", f"http://127.0.0.1:{consumer_port}/metrics"),
        }
        wait_until(
            lambda: (
                {(t["labels"]["job"], t["scrapeUrl"]) for t in api(server, "targets")["activeTargets"]}
                == expected
            ),
            30,
            f"the targets {expected}",
        )
        groups = api(server, "rules")["groups"]
        assert {r["name"] for g in groups for r in g["rules"]} == {r["alert"] for r in alert_rules()}
        status = cdc("status")
        assert re.search(
            rf"prometheus +running pid={server.pid()} .*127\.0\.0\.1:{prometheus_port}", status.stdout
        )
        stopped = cdc("down")
        assert stopped.returncode == 0, stopped.stderr
        assert not server.running()
        assert re.search(r"prometheus +stopped", cdc("status").stdout)
    finally:
        server.stop()
