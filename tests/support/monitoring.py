"""Helpers of the monitoring tests (unit, integration and faults): the files of monitoring/ and the
compose file, promtool, and a real Prometheus's HTTP API."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdc.local.paths import MONITORING_DIR, PROJECT_DIR
from cdc.local.prometheus import PrometheusServer

ALERT_RULES = MONITORING_DIR / "prometheus" / "alerts.yml"
ALERT_TESTS = MONITORING_DIR / "prometheus" / "alerts_test.yml"
COMPOSE_FILE = PROJECT_DIR / "docker-compose.monitoring.yml"
GRAFANA_DIR = MONITORING_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "cdc-pipeline.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "cdc.yml"

# What Grafana puts in for its own variables; with a 1 s scrape, $__rate_interval would be 4 s.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "5m"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(
            f"{name} not found: `make deps` installs Debian's prometheus package (prometheus, promtool)"
        )
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of the dashboard."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def api(server: PrometheusServer, path: str, **params: str) -> Any:
    url = f"{server.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def instant(server: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    data = api(server, "query", query=expr)
    assert data["resultType"] == "vector", (expr, data["resultType"])
    return data["result"]


def value(server: PrometheusServer, expr: str) -> float:
    """The first sample of ``expr``, NaN when there is none."""
    result = instant(server, expr)
    return float(result[0]["value"][1]) if result else math.nan


def alert_states(server: PrometheusServer) -> dict[str, set[str]]:
    states: dict[str, set[str]] = {}
    for alert in api(server, "alerts")["alerts"]:
        states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
    return states
