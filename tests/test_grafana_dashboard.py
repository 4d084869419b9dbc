"""The Grafana dashboard (deploy/grafana) and the Prometheus rules
(deploy/prometheus/rules) checked offline: every panel's PromQL parses
(promtool, each expression written as a recording rule), and every metric
name a panel or a rule reads is one a service exports (``EXPORTED``, kept
true by a search of the sources), one Envoy or Prometheus exports, or a
recorded series. Grafana itself is not installed here; the Compose stack
of a later issue provisions these files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/mlmesh.json"
RULES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))

# Metric families the services export, as Prometheus names them (a counter
# ``x`` is scraped as ``x_total``; a histogram as ``x_bucket``, ``x_count``,
# ``x_sum``). Each must be a metric name string in the services' sources.
EXPORTED = {
    # chassis (every service)
    "mlmesh_rpc_requests": "counter",
    "mlmesh_rpc_duration_seconds": "histogram",
    "mlmesh_rpc_in_flight": "gauge",
    # gateway
    "mlmesh_gateway_requests": "counter",
    "mlmesh_gateway_tokens": "counter",
    "mlmesh_gateway_rejections": "counter",
    "mlmesh_gateway_time_to_first_token_seconds": "histogram",
    "mlmesh_gateway_backend_picks": "counter",
    "mlmesh_gateway_predictions_logged": "counter",
    "mlmesh_gateway_predictions_queued": "gauge",
    # metering (every metered service)
    "mlmesh_throttle_rejections": "counter",
    "mlmesh_usage_events_dropped": "counter",
    "mlmesh_usage_events_written": "counter",
    "mlmesh_usage_events_pending": "gauge",
    "mlmesh_usage_flush_lag_seconds": "gauge",
    # llm
    "mlmesh_llm_requests_waiting": "gauge",
    "mlmesh_llm_requests_running": "gauge",
    "mlmesh_llm_batch_slots": "gauge",
    "mlmesh_llm_kv_cache_usage": "gauge",
    # deployer (Triton's statistics)
    "mlmesh_triton_stats_up": "gauge",
    "mlmesh_triton_queue_seconds": "counter",
    "mlmesh_triton_queued_requests": "counter",
    "mlmesh_triton_compute_seconds": "counter",
    "mlmesh_triton_requests_succeeded": "counter",
    "mlmesh_triton_requests_failed": "counter",
    # features
    "mlmesh_features_online_read_seconds": "histogram",
    "mlmesh_features_newest_event_timestamp_seconds": "gauge",
    "mlmesh_features_view_step_seconds": "gauge",
    # monitor
    "mlmesh_monitor_predictions_logged": "counter",
    "mlmesh_monitor_accuracy": "gauge",
    "mlmesh_monitor_precision_macro": "gauge",
    "mlmesh_monitor_recall_macro": "gauge",
    "mlmesh_monitor_error_rate": "gauge",
    "mlmesh_monitor_feature_psi": "gauge",
    "mlmesh_monitor_drift_status": "gauge",
    "mlmesh_monitor_labelled_predictions": "gauge",
    "mlmesh_monitor_window_predictions": "gauge",
    "mlmesh_monitor_feedback_unknown_ids": "counter",
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
# Envoy's /stats/prometheus and Prometheus' own series.
OTHERS = {
    "envoy_cluster_upstream_rq_total",
    "envoy_cluster_upstream_rq_xx",
    "ALERTS",
}
KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def scraped_names() -> set[str]:
    return {
        family + suffix for family, kind in EXPORTED.items() for suffix in SUFFIXES[kind]
    } | OTHERS


def rule_groups() -> list[dict]:
    return [group for path in RULES for group in yaml.safe_load(path.read_text())["groups"]]


def recorded_names() -> set[str]:
    return {
        rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
    }


def panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy]|e[+-]?\d+)?\b", " ", text)  # numbers, durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_are_read_from_expressions():
    expr = (
        'sum by (model, le) (rate(a_bucket{code=~"X|Y"}[5m])) / on (model) group_left () '
        "(b:c:d > 0) and time() - max(c) offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "c"}


def test_every_exported_name_is_in_a_service_source():
    sources = "\n".join(
        path.read_text()
        for pattern in ("libs/*/src/**/*.py", "services/*/src/**/*.py")
        for path in ROOT.glob(pattern)
    )
    missing = [name for name in EXPORTED if f'"{name}"' not in sources]
    assert not missing, f"not exported by any service (update EXPORTED): {missing}"


def test_the_dashboard_has_the_three_areas_and_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert {"Gateway", "Models", "Feature store"} <= set(rows)
    assert dashboard["uid"] == "mlmesh-slo"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    titles = " ".join(title for title, _ in panel_exprs()).lower()
    for topic in ("error", "latency", "first token", "throttle", "saturation", "triton"):
        assert topic in titles, topic
    for topic in ("freshness", "p99"):
        assert topic in titles.lower(), topic
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert variables["datasource"]["current"]["value"] == provisioned["datasources"][0]["uid"]
    providers = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/mlmesh.yml").read_text()
    )
    assert providers["providers"][0]["type"] == "file"


def test_every_name_the_dashboard_and_the_rules_read_exists():
    known = scraped_names() | recorded_names()
    unknown = {}
    for title, expr in panel_exprs():
        for name in metric_names(expr) - known:
            unknown[name] = f"panel {title!r}"
    for group in rule_groups():
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]) - known:
                unknown[name] = f"rule {rule.get('record') or rule.get('alert')!r}"
    assert not unknown, f"metric names nothing exports or records: {unknown}"


def test_every_panel_expression_parses(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run scripts/setup-observe.sh (make setup)")
    exprs = panel_exprs()
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
