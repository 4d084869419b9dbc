"""Offline checks of deploy/docker/Dockerfile against the runner catalog and the repository.

Every chassis service of the catalog and every engine image has a target; every image
target runs as a non-root user with a health check (the gRPC probe for chassis services,
another check or HEALTHCHECK NONE with the reason written beside it for the others); the
base image is a build argument defaulting to python:3.11-slim; the dependency layer copies
exactly the workspace members' pyproject.toml files. Each check is also run on a broken
copy of the Dockerfile, so none can pass vacuously.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlmesh_runner.catalog import CATALOG

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
ENGINES = ("llm", "triton", "flink", "ray", "envoy", "redis", "postgres")
NON_ROOT_USER = "10001:10001"


@dataclass
class Stage:
    name: str
    parent: str
    # (instruction, arguments, comment lines just above it)
    instructions: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def last(self, keyword: str) -> tuple[str, list[str]] | None:
        found = [(args, notes) for key, args, notes in self.instructions if key == keyword]
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and its ancestors (nearest first), within this file."""
        out = []
        while name in self.stages:
            out.append(self.stages[name])
            name = self.stages[name].parent
        return out

    def effective(self, name: str, keyword: str) -> tuple[str, list[str]] | None:
        for stage in self.chain(name):
            found = stage.last(keyword)
            if found is not None:
                return found
        return None

    def env(self, name: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in reversed(self.chain(name)):
            for key, args, _ in stage.instructions:
                if key == "ENV":
                    for item in shlex.split(args):
                        k, _, v = item.partition("=")
                        env[k] = v
        return env


def parse(text: str) -> Dockerfile:
    """A Dockerfile's stages and instructions (line continuations joined, comments kept
    as the notes of the instruction that follows them)."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    notes: list[str] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            notes = [*notes, line.lstrip("# ")] if line else []
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        logical += " " + line
        if logical.endswith("\\"):
            logical = logical[:-1]
            continue
        keyword, _, args = logical.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        logical = ""
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = Stage(match.group(2), match.group(1))
            stages[current.name] = current
        elif current is None:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
        else:
            current.instructions.append((keyword, args, notes))
        notes = []
    return Dockerfile(global_args, stages)


def image_targets() -> list[str]:
    """The targets scripts/build-images.sh builds (its ALL_TARGETS)."""
    match = re.search(r"^ALL_TARGETS=\(([^)]*)\)", BUILD_SCRIPT.read_text(), re.M)
    assert match, "scripts/build-images.sh has no ALL_TARGETS=(...)"
    return match.group(1).split()


def chassis_services() -> list[tuple[str, str, str]]:
    """(name, env prefix, first gRPC service) of every chassis service in the catalog."""
    return [
        (spec.name, spec.env_prefix, spec.services()[0].full_name)
        for spec in CATALOG
        if spec.port_discovery == "port-file"
    ]


def workspace_members() -> set[str]:
    return {
        f"{group}/{path.name}"
        for group in ("libs", "services")
        for path in (ROOT / group).iterdir()
        if path.is_dir() and not path.name.startswith((".", "__"))
    }


def problems(text: str, targets: list[str]) -> list[str]:
    """Everything wrong with a Dockerfile's text for the given image targets."""
    found: list[str] = []
    docker = parse(text)
    if docker.global_args.get("BASE_IMAGE") != "python:3.11-slim":
        found.append("no global `ARG BASE_IMAGE=python:3.11-slim`")
    roots = {stage.parent for stage in docker.stages.values() if stage.parent not in docker.stages}
    if roots != {"${BASE_IMAGE}"}:
        found.append(f"stages not built on ${{BASE_IMAGE}}: {sorted(roots)}")
    chassis = chassis_services()
    for name in [*(c[0] for c in chassis), *ENGINES, "services"]:
        if name not in targets:
            found.append(f"{name}: not built by scripts/build-images.sh")
    for target in targets:
        if target not in docker.stages:
            found.append(f"{target}: no such stage")
            continue
        user = docker.effective(target, "USER")
        if user is None or user[0] != NON_ROOT_USER:
            found.append(f"{target}: USER is {user and user[0]!r}, not {NON_ROOT_USER}")
        ancestry = {stage.name for stage in docker.chain(target)}
        for stage in docker.chain(target):
            for key, args, _ in stage.instructions:
                if key == "COPY" and re.search(r"(^|\s)wheels/", args):
                    found.append(f"{target}: copies wheels/ into a final image ({stage.name})")
                if key == "RUN" and re.search(r"\buv\b", args):
                    found.append(f"{target}: runs uv in a final image ({stage.name})")
        build_stages = {"deps", "builder", "llm-deps", "llm-builder", "triton-builder"}
        if ancestry & {*build_stages, "flink-builder", "envoy-builder", "uv"}:
            found.append(f"{target}: built FROM a build stage")
        health = docker.effective(target, "HEALTHCHECK")
        if health is None:
            found.append(f"{target}: no HEALTHCHECK (nor HEALTHCHECK NONE with a reason)")
        elif health[0] == "NONE" and not any(note.strip() for note in health[1]):
            found.append(f"{target}: HEALTHCHECK NONE without a comment saying why")
    for name, prefix, grpc_service in [
        *chassis,
        ("llm", "MLMESH_LLM_", "mlmesh.llm.v1.LlmService"),
    ]:
        if name not in docker.stages:
            continue
        health = docker.effective(name, "HEALTHCHECK")
        if health is None or "mlmesh_chassis.healthprobe" not in health[0]:
            found.append(f"{name}: HEALTHCHECK is not the gRPC health probe")
        env = docker.env(name)
        if env.get("MLMESH_HEALTH_SERVICE") != grpc_service:
            found.append(f"{name}: MLMESH_HEALTH_SERVICE is not {grpc_service}")
        port_file = env.get(f"{prefix}PORT_FILE")
        if not port_file or env.get("MLMESH_HEALTH_PORT_FILE") != port_file:
            found.append(f"{name}: the probe's port file is not the one {prefix}PORT_FILE names")
        elif not port_file.startswith("/tmp/"):
            found.append(f"{name}: its port file is not on the tmpfs")
        cmd = docker.effective(name, "CMD")
        if name != "llm" and (
            cmd is None or json.loads(cmd[0]) != ["python", "-m", f"mlmesh_{name}"]
        ):
            found.append(f"{name}: CMD is not python -m mlmesh_{name}")
    # The dependency layer: exactly every workspace member's pyproject.toml.
    builder = docker.stages.get("deps")
    copied = set()
    for key, args, _ in builder.instructions if builder else []:
        match = re.fullmatch(r"((?:libs|services)/[^/\s]+)/pyproject\.toml\s+\S+", args)
        if key == "COPY" and match:
            copied.add(match.group(1))
    if copied != workspace_members():
        found.append(
            "the deps stage copies pyproject.toml of "
            f"{sorted(copied ^ workspace_members())} (missing or extra)"
        )
    return found


def test_the_dockerfile_has_no_problems() -> None:
    assert problems(DOCKERFILE.read_text(), image_targets()) == []


def test_the_checks_see_something() -> None:
    docker = parse(DOCKERFILE.read_text())
    assert len(chassis_services()) >= 8
    assert len(workspace_members()) >= 15
    assert set(image_targets()) <= set(docker.stages)
    assert docker.env("registry")["PATH"].startswith("/opt/mlmesh/venv/bin:")


def _without(text: str, pattern: str, count: int = 1) -> str:
    changed = re.sub(pattern, "", text, count=count, flags=re.M)
    assert changed != text, pattern
    return changed


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"^COPY services/vectors/pyproject\.toml.*\n", "deps stage copies pyproject.toml"),
        (r"^FROM services AS review\n", "review: no such stage"),
        (r"^ARG BASE_IMAGE=python:3\.11-slim\n", "ARG BASE_IMAGE"),
        (r"^USER 10001:10001\n(?=# No gRPC service of its own; envoy)", "envoy: USER"),
        (
            r"^    MLMESH_HEALTH_SERVICE=mlmesh\.gateway\.v1\.KeyService \\\n",
            "gateway: MLMESH_HEALTH",
        ),
        (r"^# No gRPC service of its own; envoy.*\n^# lives in.*\n", "envoy: HEALTHCHECK NONE"),
        (r"^CMD \[\"python\", \"-m\", \"mlmesh_batch\"\]\n", "batch: CMD"),
    ],
)
def test_a_broken_dockerfile_is_caught(pattern: str, expected: str) -> None:
    broken = _without(DOCKERFILE.read_text(), pattern)
    assert any(expected in problem for problem in problems(broken, image_targets()))


def test_a_final_image_with_build_tools_is_caught() -> None:
    text = DOCKERFILE.read_text().replace(
        "FROM services AS registry\n", "FROM services AS registry\nCOPY wheels/ /src/wheels/\n"
    )
    assert any("registry: copies wheels/" in p for p in problems(text, image_targets()))


def test_a_missing_target_is_caught() -> None:
    assert any("redis: not built" in p for p in problems(DOCKERFILE.read_text(), ["services"]))
