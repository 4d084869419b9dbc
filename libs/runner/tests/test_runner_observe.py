"""--observe: Prometheus' configuration and targets as the runner writes them,
checked by Prometheus' own promtool, and everything on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlmesh_runner import __main__ as runner_cli
from mlmesh_runner.observe import RULES, Observer, Target


def test_observe_is_a_flag_and_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["mlmesh-run"])
    assert runner_cli._parse().observe is False
    monkeypatch.setattr(sys, "argv", ["mlmesh-run", "--observe", "--prometheus-port", "9091"])
    args = runner_cli._parse()
    assert args.observe is True and args.prometheus_port == 9091


def test_config_scrapes_file_sd_targets_on_loopback(tmp_path: Path) -> None:
    observer = Observer(tmp_path, phoenix_port=16006, otlp_port=14317, prometheus_port=19090)
    config = observer.prometheus_config()
    assert config["rule_files"] == [str(RULES / "*.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["mlmesh"]["file_sd_configs"][0]["files"] == [
        str(tmp_path / "observe" / "targets" / "services.json")
    ]
    assert observer.otlp_url == "http://127.0.0.1:14317"
    assert observer.service_env("MLMESH_GATEWAY_") == {
        "MLMESH_GATEWAY_OTEL_EXPORTER": "http://127.0.0.1:14317"
    }
    described = observer.describe()
    assert described["phoenix"]["url"] == "http://127.0.0.1:16006"
    assert described["prometheus"]["url"] == "http://127.0.0.1:19090"


def test_targets_are_rewritten_whole(tmp_path: Path) -> None:
    observer = Observer(tmp_path)
    (tmp_path / "observe" / "targets").mkdir(parents=True)
    observer.write_targets(
        [
            Target("gateway", "gateway", "127.0.0.1:4001"),
            Target("gateway", "gateway.1", "127.0.0.1:4002"),
            Target("envoy", "envoy", "127.0.0.1:9901"),
        ]
    )
    targets = tmp_path / "observe" / "targets"
    services = json.loads((targets / "services.json").read_text())
    assert services == [
        {"targets": ["127.0.0.1:4001"], "labels": {"job": "gateway", "mlmesh_instance": "gateway"}},
        {
            "targets": ["127.0.0.1:4002"],
            "labels": {"job": "gateway", "mlmesh_instance": "gateway.1"},
        },
    ]
    assert json.loads((targets / "envoy.json").read_text())[0]["targets"] == ["127.0.0.1:9901"]
    # A restart: the instance's new metrics port replaces the old one.
    observer.write_targets([Target("gateway", "gateway", "127.0.0.1:4005")])
    assert json.loads((targets / "services.json").read_text())[0]["targets"] == ["127.0.0.1:4005"]
    assert json.loads((targets / "envoy.json").read_text()) == []


def test_promtool_accepts_the_config(tmp_path: Path) -> None:
    """Prometheus' own checker on the generated config, the rules it names
    included (deploy/prometheus/rules)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is required: run scripts/setup-observe.sh")
    observer = Observer(tmp_path)
    (tmp_path / "observe" / "targets").mkdir(parents=True)
    observer.write_targets([Target("registry", "registry", "127.0.0.1:4001")])
    path = tmp_path / "observe" / "prometheus.yml"
    path.write_text(yaml.safe_dump(observer.prometheus_config()))
    checked = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
