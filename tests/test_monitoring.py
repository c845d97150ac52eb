"""The monitoring stack (monitoring/, docker-compose.monitoring.yml, `make monitor`), checked
with the real Prometheus and promtool of Debian's prometheus package.

- promtool: the compose scrape config and `make monitor`'s local one (`check config`), the
  alert rules (`check rules`) and their unit tests (`test rules`: every alert firing and not);
- the compose file (no Docker here: parsed, and every file and volume it names exists) and the
  Grafana provisioning;
- the dashboard JSON against Grafana's dashboard schema at its schemaVersion (36: the classic
  model in grafana/grafana kinds/dashboard/dashboard_kind.cue);
- `python -m cdc monitor` / `status` / `down`: Prometheus started, shown, stopped;
- end to end: the real daemons under a workload with a dead letter and a destination outage,
  scraped every second by a real Prometheus; every PromQL expression of the dashboard, sent to
  its HTTP API, returns data, and the alerts that should be pending are.

Tests marked ``prometheus`` need promtool and prometheus. `make test` installs the package first
(`make deps`), so a missing one fails them rather than skipping them; `make test-unit` leaves
them out.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from support import clean_dest, clean_source, dlq_count, wait_until

from cdc.errors import CDCError
from cdc.kafka.client import base_config
from cdc.local.env import METRICS_PORTS, metrics_ports
from cdc.local.paths import MONITORING_DIR, PROJECT_DIR, PROMETHEUS_CONFIG
from cdc.local.prometheus import JOB_PORTS, PrometheusServer, local_config
from cdc.local.runner import Daemon
from cdc.local.services import LocalServices
from cdc.ops.workload import Workload
from cdc.runtime.settings import Settings

ALERT_RULES = MONITORING_DIR / "prometheus" / "alerts.yml"
ALERT_TESTS = MONITORING_DIR / "prometheus" / "alerts_test.yml"
COMPOSE_FILE = PROJECT_DIR / "docker-compose.monitoring.yml"
GRAFANA_DIR = MONITORING_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "cdc-pipeline.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "cdc.yml"

# What Grafana puts in for its own variables; with a 1 s scrape, $__rate_interval would be 4 s.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "5m"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(
            f"{name} not found: `make deps` installs Debian's prometheus package (prometheus, promtool)"
        )
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


# --- promtool ---------------------------------------------------------------------------------


@pytest.mark.prometheus
def test_the_compose_scrape_config_is_valid():
    out = promtool("check", "config", PROMETHEUS_CONFIG).stdout
    assert "SUCCESS" in out and "1 rule files found" in out, out
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(JOB_PORTS)
    # The daemons run on the host: host.docker.internal at `make up`'s ports.
    for job, var in JOB_PORTS.items():
        assert jobs[job]["static_configs"] == [{"targets": [f"host.docker.internal:{METRICS_PORTS[var]}"]}]


@pytest.mark.prometheus
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


@pytest.mark.prometheus
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
    }
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


@pytest.mark.prometheus
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


# --- the compose file and Grafana's provisioning ----------------------------------------------


def test_the_compose_file_names_only_what_exists():
    compose = load_yaml(COMPOSE_FILE)
    assert set(compose) <= {"name", "services", "volumes"}
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, str] = {}
    for name, service in services.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), f"{name}: image not pinned"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
        for volume in service.get("volumes", []):
            source, target, *_mode = volume.split(":")
            if source.startswith("."):
                assert (PROJECT_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            mounts[target] = source
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    # Prometheus reads the config file mounted from monitoring/prometheus, rules beside it.
    config_arg = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_in_container = Path(config_arg.split("=", 1)[1])
    source = mounts[str(config_in_container.parent)]
    assert (PROJECT_DIR / source / config_in_container.name).resolve() == PROMETHEUS_CONFIG
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert (PROJECT_DIR / source / rule_file).is_file()
    # Grafana's provisioning and the dashboard folder the provider reads.
    assert (PROJECT_DIR / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_DIR / "provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert (PROJECT_DIR / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_the_datasource_is_the_one_the_dashboard_uses():
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels(dashboard):
        for ref in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel.get("title")


# --- the dashboard against Grafana's schema ----------------------------------------------------

# The classic dashboard model of grafana/grafana kinds/dashboard/dashboard_kind.cue, lineage
# schema 0.0, whose schemaVersion is 36. Fields without "?" there are required here; panels,
# rows and field configs are CUE definitions, so closed: no other keys.
SCHEMA_VERSION = 36
DASHBOARD_FIELDS = {
    "id", "uid", "title", "description", "revision", "gnetId", "tags", "style", "timezone",
    "editable", "graphTooltip", "time", "timepicker", "fiscalYearStartMonth", "liveNow",
    "weekStart", "refresh", "schemaVersion", "version", "panels", "templating", "annotations",
    "links", "snapshot",
}  # fmt: skip
DASHBOARD_REQUIRED = {"style", "editable", "graphTooltip", "schemaVersion"}
PANEL_FIELDS = {
    "type", "id", "pluginVersion", "tags", "targets", "title", "description", "transparent",
    "datasource", "gridPos", "links", "repeat", "repeatDirection", "repeatPanelId",
    "maxDataPoints", "thresholds", "timeRegions", "transformations", "interval", "timeFrom",
    "timeShift", "libraryPanel", "options", "fieldConfig",
}  # fmt: skip
PANEL_REQUIRED = {"type", "transparent", "repeatDirection", "transformations", "options", "fieldConfig"}
ROW_FIELDS = {"type", "collapsed", "title", "datasource", "gridPos", "id", "panels", "repeat"}
ROW_REQUIRED = {"type", "collapsed", "id", "panels"}
FIELD_CONFIG_FIELDS = {
    "displayName", "displayNameFromDS", "description", "path", "writeable", "filterable", "unit",
    "decimals", "min", "max", "mappings", "thresholds", "color", "links", "noValue", "custom",
}  # fmt: skip
GRID_POS_FIELDS = {"h", "w", "x", "y", "static"}


def dashboard_schema_errors(d: dict[str, Any]) -> list[str]:
    errors = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    def is_int(v: Any, lo: int = 0, hi: int = 2**32 - 1) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    check(set(d) <= DASHBOARD_FIELDS, f"unknown dashboard fields {set(d) - DASHBOARD_FIELDS}")
    check(set(d) >= DASHBOARD_REQUIRED, f"missing dashboard fields {DASHBOARD_REQUIRED - set(d)}")
    check(d.get("schemaVersion") == SCHEMA_VERSION, f"schemaVersion {d.get('schemaVersion')}")
    check(d.get("style") in ("dark", "light"), "style")
    check(isinstance(d.get("editable"), bool), "editable")
    check(d.get("graphTooltip") in (0, 1, 2), "graphTooltip")
    for key in ("uid", "title", "description", "timezone"):
        check(isinstance(d.get(key, ""), str), key)
    check(isinstance(d.get("refresh", ""), str) or d.get("refresh") is False, "refresh")
    check(all(isinstance(t, str) for t in d.get("tags", [])), "tags")
    time_range = d.get("time", {"from": "", "to": ""})
    check(set(time_range) == {"from", "to"} and all(isinstance(v, str) for v in time_range.values()), "time")
    check(isinstance(d.get("templating", {}).get("list", []), list), "templating.list")
    check(isinstance(d.get("annotations", {}).get("list", []), list), "annotations.list")

    def check_grid(where: str, pos: dict[str, Any]) -> None:
        check(set(pos) <= GRID_POS_FIELDS, f"{where}: gridPos fields {set(pos)}")
        check(is_int(pos.get("h"), 1), f"{where}: gridPos.h")
        check(is_int(pos.get("w"), 1, 24), f"{where}: gridPos.w")
        check(is_int(pos.get("x"), 0, 23), f"{where}: gridPos.x")
        check(is_int(pos.get("y")), f"{where}: gridPos.y")
        check(pos.get("x", 0) + pos.get("w", 0) <= 24, f"{where}: wider than the 24-column grid")

    def check_field_config(where: str, fc: dict[str, Any]) -> None:
        check(set(fc) == {"defaults", "overrides"}, f"{where}: fieldConfig needs defaults and overrides")
        defaults = fc.get("defaults", {})
        check(
            set(defaults) <= FIELD_CONFIG_FIELDS,
            f"{where}: unknown field config {set(defaults) - FIELD_CONFIG_FIELDS}",
        )
        for step in defaults.get("thresholds", {}).get("steps", []):
            check(isinstance(step.get("color"), str), f"{where}: threshold step without color")
            check(isinstance(step.get("value", 0), int | float), f"{where}: threshold value")
        if "thresholds" in defaults:
            check(
                defaults["thresholds"].get("mode") in ("absolute", "percentage"), f"{where}: thresholds.mode"
            )
        if "color" in defaults:
            check(isinstance(defaults["color"].get("mode"), str), f"{where}: color.mode")
        for mapping in defaults.get("mappings", []):
            check(mapping.get("type") in ("value", "range", "regex", "special"), f"{where}: mapping type")
            if mapping.get("type") == "value":
                for result in mapping["options"].values():
                    check(set(result) <= {"text", "color", "icon", "index"}, f"{where}: mapping result")
        for override in fc.get("overrides", []):
            check("matcher" in override and "properties" in override, f"{where}: override")

    ids = []
    rows_and_panels = list(d.get("panels", []))
    for panel in dashboard_panels(d):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        ids.append(panel.get("id"))
        if panel.get("type") == "row":
            check(set(panel) <= ROW_FIELDS, f"{where}: unknown row fields {set(panel) - ROW_FIELDS}")
            check(set(panel) >= ROW_REQUIRED, f"{where}: missing row fields {ROW_REQUIRED - set(panel)}")
            check(isinstance(panel.get("collapsed"), bool), f"{where}: collapsed")
            check(isinstance(panel.get("panels"), list), f"{where}: panels")
            check(panel.get("collapsed") or not panel.get("panels"), f"{where}: an open row holds no panels")
        else:
            check(set(panel) <= PANEL_FIELDS, f"{where}: unknown panel fields {set(panel) - PANEL_FIELDS}")
            check(
                set(panel) >= PANEL_REQUIRED, f"{where}: missing panel fields {PANEL_REQUIRED - set(panel)}"
            )
            check(isinstance(panel.get("type"), str) and bool(panel.get("type")), f"{where}: type")
            check(isinstance(panel.get("transparent"), bool), f"{where}: transparent")
            check(panel.get("repeatDirection") in ("h", "v"), f"{where}: repeatDirection")
            check(isinstance(panel.get("options"), dict), f"{where}: options")
            check(isinstance(panel.get("transformations"), list), f"{where}: transformations")
            check_field_config(where, panel.get("fieldConfig", {}))
            refs = [t.get("refId") for t in panel.get("targets", [])]
            check(bool(refs) and len(set(refs)) == len(refs), f"{where}: targets need distinct refIds")
            for target in panel.get("targets", []):
                check(isinstance(target.get("expr"), str) and bool(target["expr"]), f"{where}: expr")
        check(is_int(panel.get("id"), 1), f"{where}: id")
        if "datasource" in panel:
            check(set(panel["datasource"]) <= {"type", "uid"}, f"{where}: datasource")
        check("gridPos" in panel, f"{where}: no gridPos")
        check_grid(where, panel.get("gridPos", {}))
    check(len(ids) == len(set(ids)), "panel ids are not unique")
    # No two panels of the top level share a grid cell.
    cells: dict[tuple[int, int], Any] = {}
    for panel in rows_and_panels:
        pos = panel.get("gridPos", {})
        for x in range(pos.get("x", 0), pos.get("x", 0) + pos.get("w", 0)):
            for y in range(pos.get("y", 0), pos.get("y", 0) + pos.get("h", 0)):
                check((x, y) not in cells, f"panels {cells.get((x, y))} and {panel.get('id')} overlap")
                cells[(x, y)] = panel.get("id")
    return errors


def test_the_dashboard_follows_grafanas_schema_at_its_schema_version():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard_schema_errors(dashboard) == []
    # And the checker does catch what the schema forbids.
    broken = json.loads(DASHBOARD.read_text())
    del broken["graphTooltip"]
    broken["panels"][1]["gridPos"]["w"] = 25
    broken["panels"][2]["legend"] = {}
    del broken["panels"][3]["fieldConfig"]
    assert len(dashboard_schema_errors(broken)) >= 4


def test_the_dashboard_shows_what_the_issue_asks_for():
    exprs = " ".join(expr for _title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())))
    for needed in (
        "rate(cdc_producer_events_published_total",  # throughput
        "rate(cdc_consumer_events_total",
        "cdc_consumer_lag_messages",  # lag per partition
        "histogram_quantile(0.99, sum by (le) (rate(cdc_consumer_end_to_end_seconds_bucket",  # latency
        "cdc_producer_capture_to_ack_seconds_bucket",
        "cdc_consumer_batch_duration_seconds_bucket",
        'outcome="dlq"',  # dead letters
        "cdc_consumer_retries_total",  # retries
        "cdc_producer_retries_total",
        "cdc_producer_held_back_rows",  # horizon hold-back
        "cdc_producer_held_back_seconds",
        "cdc_consumer_db_connections_in_use",  # pool use
        "cdc_producer_active",  # active / standby
    ):
        assert needed in exprs, needed


# --- make up's .env and python -m cdc monitor / status / down ---------------------------------


def test_make_up_writes_distinct_metrics_ports_and_keeps_the_users():
    assert metrics_ports({}) == {"PRODUCER_METRICS_PORT": "9101", "CONSUMER_METRICS_PORT": "9102"}
    assert metrics_ports({"PRODUCER_METRICS_PORT": "9200"})["PRODUCER_METRICS_PORT"] == "9200"
    # .env.example's 0 (off) is not a choice to keep.
    assert metrics_ports({"PRODUCER_METRICS_PORT": "0", "CONSUMER_METRICS_PORT": ""}) == {
        "PRODUCER_METRICS_PORT": "9101",
        "CONSUMER_METRICS_PORT": "9102",
    }


@pytest.mark.prometheus
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

    _tool("prometheus")
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


# --- end to end: the dashboard's queries against a real Prometheus scraping the real daemons ---


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


POISON = [b"not json at all", b'{"action_id": "x"}']


@pytest.mark.prometheus
@pytest.mark.integration
@pytest.mark.daemon
@pytest.mark.fault
def test_every_dashboard_query_returns_data_from_the_running_pipeline(
    local_services: LocalServices, private_settings: Settings, tmp_path: Path
):
    settings = private_settings
    clean_source(settings.source_db_url)
    clean_dest(settings.dest_db_url)
    prometheus_port, producer_port, consumer_port = free_ports(3)
    server = PrometheusServer(
        home=tmp_path,
        port=prometheus_port,
        targets={
            "cdc-producer": [f"127.0.0.1:{producer_port}"],
            "cdc-consumer": [f"127.0.0.1:{consumer_port}"],
        },
        scrape_interval="1s",
    )
    # Each daemon finds its port as `make up`'s .env gives it.
    producer = Daemon("producer.py", settings, tmp_path / "producer", PRODUCER_METRICS_PORT=producer_port)
    consumer = Daemon(
        "consumer_final.py", settings, tmp_path / "consumer", CONSUMER_METRICS_PORT=consumer_port
    )
    workload = Workload(settings.source_db_url, rate=150, writers=2, seed=9)
    try:
        server.start()
        producer.start()
        consumer.start()
        workload.start()
        wait_until(
            lambda: value(server, 'count(up{job=~"cdc-producer|cdc-consumer"} == 1)') == 2,
            60,
            "Prometheus scraping both daemons",
        )
        wait_until(lambda: value(server, "sum(cdc_consumer_events_total)") > 0, 60, "events applied")

        # A dead letter: messages no decoder accepts.
        kafka = Producer(base_config(settings))
        for i, poison in enumerate(POISON):
            kafka.produce(settings.cdc_topic, key=str(i).encode(), value=poison)
        assert kafka.flush(30) == 0
        wait_until(lambda: dlq_count(settings) == len(POISON), 60, "the poison on the DLQ")
        wait_until(
            lambda: value(server, 'sum(cdc_consumer_events_total{outcome="dlq"})') == len(POISON),
            30,
            "the dead letters in Prometheus",
        )
        wait_until(lambda: "CDCDeadLetters" in alert_states(server), 30, "CDCDeadLetters pending")

        # A destination outage: the consumer pauses, retries, counts transient errors.
        local_services.dest.stop("fast")
        try:
            wait_until(lambda: value(server, "max(cdc_consumer_paused)") == 1, 60, "the consumer paused")
            wait_until(lambda: "CDCConsumerPaused" in alert_states(server), 30, "CDCConsumerPaused pending")
        finally:
            local_services.dest.start()
        wait_until(lambda: value(server, "max(cdc_consumer_paused)") == 0, 90, "the consumer resumed")
        wait_until(
            lambda: value(server, "sum(rate(cdc_consumer_events_total[10s]))") > 0, 60, "events applied again"
        )

        # Every query of the dashboard, as Grafana would send it, while the load runs.
        queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
        empty = []
        for title, expr in queries:
            for name, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, replacement)
            assert "$" not in expr, f"{title}: a variable Grafana would not fill: {expr}"
            result = instant(server, expr)
            numbers = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(n) for n in numbers):
                empty.append(f"{title}: {expr} -> {numbers or 'no series'}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The rules run on the real series; nothing is wrong with the producer or the daemons.
        rules = [r for g in api(server, "rules")["groups"] for r in g["rules"]]
        assert {r["health"] for r in rules} == {"ok"}, rules
        states = alert_states(server)
        assert "CDCNoActiveProducer" not in states and "CDCDaemonDown" not in states, states
        workload.stop()
        assert producer.stop() == 0 and consumer.stop() == 0
    finally:
        with contextlib.suppress(CDCError):  # already stopped, or the failure being reported
            workload.stop()
        producer.kill()
        consumer.kill()
        server.stop()
        if not local_services.dest.running():
            local_services.dest.start()
