"""The monitoring stack's files, checked without services: the compose file (no Docker here: parsed,
and every file and volume it names exists), the Grafana provisioning, the dashboard JSON against
Grafana's dashboard schema at its schemaVersion (36: the classic model in grafana/grafana
kinds/dashboard/dashboard_kind.cue) and what it shows, and `make up`'s metrics ports. With promtool
and a real Prometheus: ``tests/integration/test_monitoring.py``; the dashboard on the running
pipeline: ``tests/faults/test_monitoring.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cdc.local.env import metrics_ports
from cdc.local.paths import PROJECT_DIR, PROMETHEUS_CONFIG
from tests.support.monitoring import (
    COMPOSE_FILE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    GRAFANA_DIR,
    dashboard_panels,
    dashboard_queries,
    load_yaml,
)

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


def test_the_dashboard_shows_throughput_lag_latency_dead_letters_retries_hold_back_pool_and_roles():
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
