"""Envoy's configuration: valid for the real binary, retries only where safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlmesh.registry.v1 import registry_service_pb2
from mlmesh_runner.envoy import Upstream, read_only_methods, render
from mlmesh_runner.render_envoy import deployment_config

ROOT = Path(__file__).resolve().parents[1]
ENVOY = str(Path(sys.executable).with_name("envoy"))
REGISTRY = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]


def validate(config: dict, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_config_validates_with_and_without_tracing(tmp_path):
    upstreams = [Upstream("registry", [REGISTRY], [("127.0.0.1", 50051)])]
    validate(render(upstreams), tmp_path)
    validate(render(upstreams, otlp_endpoint=("127.0.0.1", 4317)), tmp_path)


def test_only_no_side_effects_methods_are_retried():
    config = render([Upstream("registry", [REGISTRY], [("127.0.0.1", 50051)])])
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    retried = {r["match"]["path"] for r in routes if "retry_policy" in r["route"]}
    assert retried == set(read_only_methods(REGISTRY))
    assert "/mlmesh.registry.v1.RegistryService/ResolveModelReference" in retried
    for mutation in ("UploadModelVersion", "SetAlias", "CreateModel", "RollbackAlias"):
        assert f"/mlmesh.registry.v1.RegistryService/{mutation}" not in retried
    # everything else of the service goes to its cluster without retries
    prefix = next(
        r for r in routes if r["match"].get("prefix") == "/mlmesh.registry.v1.RegistryService/"
    )
    assert prefix["route"]["cluster"] == "registry" and "retry_policy" not in prefix["route"]


def test_committed_deployment_config_is_current_and_valid(tmp_path):
    committed = (ROOT / "deploy/envoy/envoy.yaml").read_text()
    assert committed == deployment_config(), (
        "deploy/envoy/envoy.yaml is stale: run `python -m mlmesh_runner.render_envoy`"
    )
    validate(yaml.safe_load(committed), tmp_path)


def test_ext_authz_guards_every_route_but_the_self_authenticating_ones():
    from mlmesh.gateway.v1 import gateway_service_pb2

    gateway = gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    config = render(
        [
            Upstream("registry", [REGISTRY], [("127.0.0.1", 1)]),
            Upstream("gateway", [gateway], [("127.0.0.1", 2)], frozenset({gateway.full_name})),
        ],
        authz_cluster="gateway",
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    assert manager["http_filters"][0]["name"] == "envoy.filters.http.ext_authz"
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    skipped = {r["name"] for r in routes if "typed_per_filter_config" in r}
    assert skipped and all(
        name.startswith(("/mlmesh.gateway.v1.GatewayService", "mlmesh.gateway.v1.GatewayService"))
        for name in skipped
    )
