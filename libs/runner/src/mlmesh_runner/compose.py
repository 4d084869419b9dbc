"""`python -m mlmesh_runner.compose [--check]`: the mesh under Docker Compose.

Writes deploy/compose/docker-compose.yml (host networking: every container on
127.0.0.1, each on a fixed port), deploy/compose/docker-compose.bridge.yml
(an override: Compose's normal networks, each service reached by its name,
only Envoy's listener published) and deploy/compose/envoy.yaml (Envoy's
config for the fixed ports). ``--check`` compares instead and fails when a
committed file is stale.

Everything comes from the services' registrations, as for the local runner:
each service's command, environment (``catalog.service_env``), key settings
(``keys.key_env``), start order (``after``) and prepare step. Host paths
become the images' paths (/opt/mlmesh/...), the state directory becomes the
container's /state. Over the runner's defaults, the Compose mesh keeps its
databases in PostgreSQL and its token limits in Redis.

No secret is in the files: an init step (``keys``, ``python -m
mlmesh_runner.keys``) makes them on first start, each into a volume of its
own that only ``keys`` (and the root step ``volumes-init``, which hands the
volumes to the services' user) mounts writable: the bootstrap keys into
``secrets``, the admin key into ``admin``, the database password into
``dbsecret`` (PostgreSQL is initialised with it, clients read libpq's
``pgpass``), Ray's token into ``raytoken``, vLLM's API key into ``vllmkey``
and the batch service's key (which its Ray nodes read too) into
``batchkey``. Every other container mounts read-only only the ones its
command or settings name a path in (the prepare steps: ``admin``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlmesh_runner.catalog import (
    CATALOG,
    KEY_DIRECTORY_SERVICE,
    RunContext,
    ServiceSpec,
    service_env,
)
from mlmesh_runner.envoy import RUN_FLAGS, Upstream, render
from mlmesh_runner.keys import key_env

ROOT = Path(__file__).resolve().parents[4]
OUT = ROOT / "deploy" / "compose"
STATE = Path("/state")
SECRETS = STATE / "secrets"
ADMIN_DIR = STATE / "admin"
ADMIN_KEY = ADMIN_DIR / "admin.key"
USER = "10001:10001"
# The writable /tmp (RAM, used only as written): vLLM's and torch's compile
# caches and Ray's session go there.
TMPFS_SIZE = "2g"
# Ray's object store, Triton's python backend and vLLM use /dev/shm
# (Docker's default is 64 MiB).
SHM_SIZE = "1g"
SHM_USERS = ("triton", "llm", "vllmopenai")
IMAGE_TAG = "${MLMESH_IMAGE_TAG:-dev}"
LOOPBACK = "127.0.0.1"
PROJECT = "mlmesh"

# Fixed ports on the host's loopback, clear of the engines this machine
# already runs (6379, 5432, 3306, 5672, 4222, 1883), of 8080-8099 and 9901
# (the process runner's defaults).
ENVOY_PORT = 18080
ENVOY_ADMIN_PORT = 19901
REDIS_PORT = 16379
POSTGRES_PORT = 15432
# Service i of the catalog (start order): gRPC on BASE + STEP*i, its plain
# HTTP port (if any) one above, its Prometheus port two above.
SERVICE_BASE_PORT = 18100
SERVICE_PORT_STEP = 10

# Flink's jobmanager and taskmanager, and the Ray head and worker batch runs
# its jobs on: containers of their own (not services of the catalog), on the
# ports helper "streams" fixed (mlmesh_features.streaming.cluster, Ray's
# `ray start`), clear of the services' range.
FLINK_ENV = "/opt/mlmesh/flink"
FLINK_REST_PORT = 18081
FLINK_RPC_PORT = 18082
FLINK_BLOB_PORT = 18083
FLINK_TM_RPC_PORT = 18084
FLINK_TM_DATA_PORT = 18085
RAY_PORT = 16380
# The head's session folder: the batch service's drivers reach its raylet
# and object store over the Unix sockets in it (and find the raylet in the
# head's process table: batch shares its PID namespace).
RAY_TEMP = STATE / "ray"
# Ray's token: a volume of its own (the Ray nodes and batch read it).
RAY_TOKEN_DIR = STATE / "raytoken"
RAY_TOKEN = RAY_TOKEN_DIR / "ray-token"
RAY_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN_PATH": str(RAY_TOKEN),
    "RAY_USAGE_STATS_ENABLED": "0",
    # A raylet waits this long for its agents (a head starting beside the
    # whole mesh on 2 cores was seen to miss a shorter wait).
    "RAY_agent_register_timeout_ms": "180000",
    "RAY_raylet_start_wait_time_s": "180",
}

# The image of a service (default: its own name).
IMAGE_OF = {"vllmopenai": "llm"}
# Databases: the services whose settings take a SQLAlchemy URL
# (postgresql+psycopg://...) get a database of their own.
DATABASE_SERVICES = ("registry", "gateway", "review", "monitor", "batch")
DB_USER = "mlmesh"
# The database password: made by the keys step into its own volume; the
# server is initialised with db.password, clients read pgpass (PGPASSFILE).
DB_SECRETS = STATE / "dbsecret"
PGPASS = DB_SECRETS / "pgpass"
PGBIN = "/usr/local/lib/pgbin"  # the postgres image's PostgreSQL binaries
# vLLM's OpenAI server's API key: its registration (and the gateway's, for
# the upstream's credential) names it in the secrets folder; here it is in a
# volume of its own, made by the keys step, so that vLLM mounts neither the
# services' keys nor anything it could write a key into.
VLLM_KEY_NAME = "vllmopenai-api.key"
VLLM_KEY_DIR = STATE / "vllmkey"
VLLM_KEY = VLLM_KEY_DIR / VLLM_KEY_NAME
# The batch service's key: its Ray nodes read it too (its drivers' actors
# fetch models from the registry as batch), so it is in a volume of its own
# that they mount, not in ``secrets``: as the service-key Secret the
# KubeRay pods mount (deploy/kuberay/raycluster.yaml).
BATCH_KEY_DIR = STATE / "batchkey"
BATCH_KEY = BATCH_KEY_DIR / "batch.key"
RELOCATED = {
    str(SECRETS / VLLM_KEY_NAME): str(VLLM_KEY),
    str(SECRETS / BATCH_KEY.name): str(BATCH_KEY),
}
# Secrets' volumes (written by the keys step alone) and their folders: a
# container mounts one read-only when its command or settings name a path
# in it. The admin key's volume is the prepare steps' (read-only).
SECRET_VOLUMES = {
    "secrets": SECRETS,
    "dbsecret": DB_SECRETS,
    "raytoken": RAY_TOKEN_DIR,
    "vllmkey": VLLM_KEY_DIR,
    "batchkey": BATCH_KEY_DIR,
}
# Folders mounted from volumes of their own (never shared by path).
OWN_MOUNTS = (*SECRET_VOLUMES.values(), ADMIN_DIR)

HEADER = """\
# Generated by `python -m mlmesh_runner.compose`; do not edit by hand
# (`python -m mlmesh_runner.compose --check` fails when this file is stale).
# {what}
"""


def image(name: str) -> str:
    return f"mlmesh/{name}:{IMAGE_TAG}"


@dataclass(frozen=True)
class PortPlan:
    """Each service's fixed ports."""

    grpc: dict[str, int]
    http: dict[str, int]
    metrics: dict[str, int]

    @classmethod
    def of(cls, catalog: Sequence[ServiceSpec]) -> PortPlan:
        grpc, http, metrics = {}, {}, {}
        for index, spec in enumerate(catalog):
            port = SERVICE_BASE_PORT + SERVICE_PORT_STEP * index
            grpc[spec.name] = port
            if spec.http_routes:
                http[spec.name] = port + 1
            if spec.port_discovery == "port-file":
                metrics[spec.name] = port + 2
        return cls(grpc, http, metrics)


@dataclass
class Layout:
    """How one network layout reaches things: the host of each service
    (``127.0.0.1`` on the host network, the service's name on bridge
    networks) and the address each server binds."""

    bridge: bool
    hosts: dict[str, str] = field(default_factory=dict)

    def host(self, name: str) -> str:
        return name if self.bridge else LOOPBACK

    @property
    def bind(self) -> str:
        return "0.0.0.0" if self.bridge else LOOPBACK


def image_paths() -> list[tuple[str, str]]:
    """Host paths (this checkout's environments) and their places in the
    images, longest first."""
    envs = ROOT / ".envs"
    pairs = [
        (str(envs / "triton-models"), "/opt/mlmesh/triton-models"),
        (str(envs / "triton"), "/opt/mlmesh/triton"),
        (str(envs / "llm"), "/opt/mlmesh/llm"),
        (str(envs / "flink"), "/opt/mlmesh/flink"),
        (str(ROOT / ".venv" / "bin" / "python"), "python"),
        (sys.executable, "python"),
        (str(ROOT / ".venv"), "/opt/mlmesh/venv"),
    ]
    return sorted(set(pairs), key=lambda pair: -len(pair[0]))


class Mapper:
    """Rewrites host paths in commands and settings into the container's."""

    def __init__(self, state: Path) -> None:
        self.state = str(state)
        self.pairs = [(str(state), str(STATE)), *image_paths()]

    def __call__(self, value: str) -> str:
        for host, inside in self.pairs:
            value = value.replace(host, inside)
        return value

    def check(self, value: str) -> str:
        """``value`` mapped; an error when a host path is left in it."""
        mapped = self(value)
        if str(ROOT) in mapped or self.state in mapped:
            raise ValueError(f"a host path is left in {mapped[:200]!r}")
        return mapped


def database_url(name: str, layout: Layout) -> str:
    return f"postgresql+psycopg://{DB_USER}@{layout.host('postgres')}:{POSTGRES_PORT}/{name}"


def engine_env(spec: ServiceSpec, layout: Layout) -> dict[str, str]:
    """The Compose mesh's engines in a service's settings: its database in
    PostgreSQL, the gateway's token limits in Redis."""
    env = {}
    prefix = spec.env_prefix
    if spec.name in DATABASE_SERVICES:
        env[f"{prefix}DATABASE_URL"] = database_url(spec.name, layout)
        env["PGPASSFILE"] = str(PGPASS)
    if spec.name == KEY_DIRECTORY_SERVICE:
        env[f"{prefix}REDIS_URL"] = f"redis://{layout.host('redis')}:{REDIS_PORT}/0"
    # The features keep their file online store: the demo's prepare step
    # (mlmesh_features.demo) materializes into the store's default, not into
    # MLMESH_FEATURES_ONLINE_STORE (see docs/deploy.md).
    return env


def healthcheck(test: list[str], start_period: str = "30s", timeout: str = "10s") -> dict[str, Any]:
    """Every 3 s; a check may take ``timeout`` (a Python probe starting on a
    busy 2-core machine takes seconds); unhealthy after 5 failures in a row
    once ``start_period`` is over."""
    return {
        "test": ["CMD", *test],
        "interval": "3s",
        "timeout": timeout,
        "retries": 5,
        "start_period": start_period,
    }


def python_of(argv: Sequence[str]) -> str:
    """The interpreter a command runs on (the image's services venv when
    the command is no Python)."""
    return argv[0] if argv and argv[0].endswith("python") else "python"


# Programs without grpc.health whose readiness is an HTTP GET (their
# registrations' ``ready``): vLLM's OpenAI server, the Flink job's supervisor.
HTTP_READY = {"vllmopenai": "/health", "flink": "/"}


def probe(argv: Sequence[str], spec: ServiceSpec, port: int) -> dict[str, Any]:
    """The container's health check: gRPC health of its first service (the
    runner's readiness), or the program's own readiness."""
    if spec.name in HTTP_READY:  # the registration's readiness: GET a path, 200
        script = (
            "import sys,urllib.request;"
            f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{port}{HTTP_READY[spec.name]}'"
            ",timeout=4).status!=200)"
        )
        return healthcheck(
            [python_of(argv), "-c", script], start_period=f"{int(spec.start_timeout) * 3}s"
        )
    if spec.port_discovery != "port-file":
        # No grpc.health.v1 (tritonserver) and no gRPC client in the image:
        # the port accepts.
        return healthcheck(
            ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
            start_period=f"{int(spec.start_timeout) * 3}s",
        )
    service = spec.services()[0].full_name
    return healthcheck(
        [
            python_of(argv),
            "-m",
            "mlmesh_chassis.healthprobe",
            "--target",
            f"127.0.0.1:{port}",
            "--service",
            service,
        ],
        start_period=f"{int(spec.start_timeout) * 3}s",
    )


def state_paths(values: Iterable[str]) -> set[str]:
    """Paths under /state named in commands and settings (JSON included)."""
    found = set()
    for value in values:
        for match in re.findall(r"/state/[A-Za-z0-9._/-]+", value):
            found.add(match.rstrip("/"))
    return found


def shared_mounts(named: dict[str, set[str]]) -> dict[str, str]:
    """Paths under /state that two services name (the deployer's and
    Triton's model repository, the features' root the Flink job writes):
    each becomes a named volume of its own, mounted in both."""
    users: dict[str, set[str]] = {}
    for service, paths in named.items():
        for path in paths:
            if any(path == str(d) or path.startswith(f"{d}/") for d in OWN_MOUNTS):
                continue
            users.setdefault(path, set()).add(service)
    shared = sorted(path for path, who in users.items() if len(who) > 1)
    # Only the outermost of nested shared paths.
    outer = [p for p in shared if not any(p.startswith(f"{o}/") for o in shared if o != p)]
    return {path: volume_name(path) for path in outer}


def secret_mounts(values: Iterable[str]) -> list[str]:
    """The secrets' volumes whose folders ``values`` name a path in, each
    mounted read-only."""
    named = state_paths(values)
    return [
        f"{volume}:{folder}:ro"
        for volume, folder in SECRET_VOLUMES.items()
        if any(p.startswith(f"{folder}/") for p in named)
    ]


def relocate(value: str) -> str:
    """``value`` with the files that Compose keeps elsewhere (vLLM's key) at
    their places here."""
    for old, new in RELOCATED.items():
        value = value.replace(old, new)
    return value


def volume_name(path: str) -> str:
    return "shared-" + path.removeprefix(f"{STATE}/").replace("/", "-").replace(".", "-")


@dataclass
class Rendered:
    """One service as the generator sees it."""

    spec: ServiceSpec
    argv: list[str]
    env: dict[str, str]
    prepare: list[str] | None
    paths: set[str]


def render_services(
    catalog: Sequence[ServiceSpec], plan: PortPlan, layout: Layout
) -> list[Rendered]:
    with tempfile.TemporaryDirectory(prefix="mlmesh-compose-") as tmp:
        state = Path(tmp)
        mapper = Mapper(state)
        ctx = RunContext(
            state,
            dict(plan.grpc),
            {},
            {name: layout.host(name) for name in plan.grpc},
        )
        key_directory = (
            KEY_DIRECTORY_SERVICE if any(s.name == KEY_DIRECTORY_SERVICE for s in catalog) else None
        )
        rendered = []
        for spec in catalog:
            port = plan.grpc[spec.name]
            if spec.port_discovery == "port-file":
                keys = key_env(
                    spec,
                    SECRETS,
                    key_directory,
                    {"TARGET": f"{layout.host(key_directory)}:{plan.grpc[key_directory]}"}
                    if key_directory
                    else {},
                )
            else:
                keys = {}
            defaults, fixed = service_env(
                spec,
                ctx,
                instance=spec.name,
                port=port,
                # The images' convention (their own health check reads it).
                port_file=Path(f"/tmp/mlmesh-{spec.name}.port"),
                http_port=plan.http.get(spec.name, 0),
                key_env=keys,
            )
            env = {**defaults, **engine_env(spec, layout), **fixed}
            # The image's PATH (the runner's PATH settings are about the host's).
            env.pop("PATH", None)
            if spec.port_discovery == "port-file":
                env[f"{spec.env_prefix}HOST"] = layout.bind
                env[f"{spec.env_prefix}METRICS_PORT"] = str(plan.metrics[spec.name])
            argv = [mapper.check(a) for a in spec.command(ctx, port)]
            extra_paths: set[str] = set()
            if spec.name == "flink":
                # The supervisor submits to the jobmanager's container and
                # serves its readiness on the planned port.
                argv += [
                    "--env",
                    FLINK_ENV,
                    "--jobmanager",
                    f"http://{layout.host('flink-jobmanager')}:{FLINK_REST_PORT}",
                    "--ready-port",
                    str(port),
                ]
            # vLLM in eager mode: its compiled graphs need a C++ compiler at
            # run time (torch inductor), which the images do not carry; eager
            # also starts much sooner on CPU.
            if spec.name == "llm":
                env["MLMESH_LLM_VLLM_OPTIONS"] = json.dumps({"enforce_eager": True})
            if spec.name == "vllmopenai":
                env["MLMESH_VLLMOPENAI_VLLM_ARGS"] = "--enforce-eager"
            if spec.name == "batch":
                # Its jobs run on the Ray head's cluster (127.0.0.1 also on
                # bridge networks: it shares the head's network namespace).
                env.update(RAY_ENV)
                env[f"{spec.env_prefix}RAY_ADDRESS"] = f"{LOOPBACK}:{RAY_PORT}"
                env[f"{spec.env_prefix}RAY_TOKEN_FILE"] = str(RAY_TOKEN)
                extra_paths.add(str(RAY_TEMP))
            if layout.bridge:
                argv = [bind_anywhere(a) for a in argv]
                if spec.name == "vllmopenai":
                    env["MLMESH_VLLMOPENAI_VLLM_ARGS"] += " --host 0.0.0.0"
            argv = [relocate(a) for a in argv]
            env = {k: relocate(mapper.check(v)) for k, v in env.items()}
            prepare = (
                [relocate(mapper.check(a)) for a in spec.prepare(ctx)]
                if spec.prepare is not None
                else None
            )
            named = state_paths([*argv, *env.values(), *(prepare or [])]) | extra_paths
            rendered.append(Rendered(spec, argv, env, prepare, named))
        return rendered


def bind_anywhere(arg: str) -> str:
    """A program's loopback bind flag, for a container on a bridge network."""
    for flag in ("--grpc-address=", "--host="):
        if arg == f"{flag}{LOOPBACK}":
            return f"{flag}0.0.0.0"
    return arg


def hardened(service: dict[str, Any]) -> dict[str, Any]:
    """Non-root, read-only root filesystem, a tmpfs /tmp, no capabilities."""
    return {
        **service,
        "user": USER,
        "read_only": True,
        "tmpfs": [f"/tmp:size={TMPFS_SIZE},mode=1777"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
    }


@dataclass
class Extra:
    """A container beside the catalog's services (a Flink or Ray process)."""

    name: str
    image: str
    command: list[str]
    # /state paths it shares with the services (the same volume, the same path).
    paths: set[str]
    depends_on: dict[str, str]
    healthcheck: dict[str, Any]
    environment: dict[str, str] = field(default_factory=dict)
    # Secrets' files it reads that its command and settings do not name.
    reads: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


def cluster_containers(names: set[str], layout: Layout) -> list[Extra]:
    """Flink's jobmanager and taskmanager (for the flink service) and a Ray
    head and worker (for batch), as helper "streams" specified them."""
    extras: list[Extra] = []
    if "flink" in names:
        cluster = ["python", "-m", "mlmesh_features.streaming.cluster"]
        flink_paths = {str(STATE / "flink"), str(STATE / "features")}
        jobmanager = [
            *cluster,
            "jobmanager",
            "--home",
            str(STATE / "flink"),
            "--env",
            FLINK_ENV,
            "--rest-port",
            str(FLINK_REST_PORT),
            "--rpc-port",
            str(FLINK_RPC_PORT),
            "--blob-port",
            str(FLINK_BLOB_PORT),
            "--tmp",
            "/tmp/flink",
        ]
        taskmanager = [
            *cluster,
            "taskmanager",
            "--home",
            str(STATE / "flink"),
            "--env",
            FLINK_ENV,
            "--jobmanager",
            layout.host("flink-jobmanager"),
            "--rpc-port",
            str(FLINK_RPC_PORT),
            "--taskmanager-rpc-port",
            str(FLINK_TM_RPC_PORT),
            "--data-port",
            str(FLINK_TM_DATA_PORT),
            "--tmp",
            "/tmp/flink",
        ]
        if layout.bridge:
            jobmanager += ["--host", "flink-jobmanager", "--bind-host", "0.0.0.0"]
            taskmanager += ["--host", "flink-taskmanager", "--bind-host", "0.0.0.0"]
        check = [
            *cluster,
            "check",
            "--jobmanager",
            f"http://127.0.0.1:{FLINK_REST_PORT}",
            "--taskmanagers",
        ]
        extras += [
            Extra(
                "flink-jobmanager",
                "flink",
                jobmanager,
                flink_paths,
                {"keys": "service_completed_successfully"},
                healthcheck([*check, "0"], "120s"),
                options={"mem_limit": "1g"},
            ),
            Extra(
                "flink-taskmanager",
                "flink",
                taskmanager,
                flink_paths,
                {"flink-jobmanager": "service_healthy"},
                healthcheck([*check, "1"], "120s"),
                options={"mem_limit": "1536m"},
            ),
        ]
    if "batch" in names:
        ray = ["ray", "start", "--block", "--disable-usage-stats", "--num-cpus=2"]
        # `ray health-check` imports Ray: seconds on a busy machine.
        ray_health = healthcheck(
            ["ray", "health-check", "--address", f"{LOOPBACK}:{RAY_PORT}"], "300s", "30s"
        )
        store = "--object-store-memory=536870912"
        extras += [
            Extra(
                "ray-head",
                "ray",
                [
                    *ray,
                    "--head",
                    f"--node-ip-address={LOOPBACK}",
                    f"--port={RAY_PORT}",
                    store,
                    "--include-dashboard=false",
                    f"--temp-dir={RAY_TEMP}",
                    "--node-manager-port=16381",
                    "--object-manager-port=16382",
                    "--ray-client-server-port=16383",
                    "--dashboard-agent-listen-port=16384",
                    "--dashboard-agent-grpc-port=16385",
                    "--metrics-export-port=16386",
                    "--runtime-env-agent-port=16387",
                    "--min-worker-port=16400",
                    "--max-worker-port=16499",
                ],
                {str(RAY_TEMP), str(STATE / "batch")},
                {"keys": "service_completed_successfully"},
                ray_health,
                dict(RAY_ENV),
                # Batch's drivers' actors run here, as batch (driver.json
                # names its key).
                reads=(str(BATCH_KEY),),
                options={"shm_size": SHM_SIZE},
            ),
            Extra(
                "ray-worker",
                "ray",
                [
                    *ray,
                    f"--address={LOOPBACK}:{RAY_PORT}",
                    f"--node-ip-address={LOOPBACK}",
                    store,
                    "--temp-dir=/tmp/ray",
                    "--node-manager-port=16391",
                    "--object-manager-port=16392",
                    "--dashboard-agent-listen-port=16394",
                    "--dashboard-agent-grpc-port=16395",
                    "--metrics-export-port=16396",
                    "--runtime-env-agent-port=16397",
                    "--min-worker-port=16500",
                    "--max-worker-port=16599",
                ],
                {str(STATE / "batch")},
                {"ray-head": "service_healthy"},
                ray_health,
                dict(RAY_ENV),
                # Batch's drivers' actors run here, as batch (driver.json
                # names its key).
                reads=(str(BATCH_KEY),),
                options={"shm_size": SHM_SIZE},
            ),
        ]
    return extras


def compose_file(catalog: Sequence[ServiceSpec]) -> dict[str, Any]:
    """docker-compose.yml: the whole mesh on the host network."""
    plan = PortPlan.of(catalog)
    layout = Layout(bridge=False)
    rendered = render_services(catalog, plan, layout)
    names = {r.spec.name for r in rendered}
    extras = cluster_containers(names, layout)
    shared = shared_mounts(
        {**{r.spec.name: r.paths for r in rendered}, **{e.name: e.paths for e in extras}}
    )
    volumes: dict[str, Any] = {
        "secrets": {},
        "admin": {},
        "dbsecret": {},
        **({"raytoken": {}, "batchkey": {}} if "batch" in names else {}),
        **({"vllmkey": {}} if "vllmopenai" in names else {}),
        "redis": {},
        "postgres": {},
        **{f"{r.spec.name}-state": {} for r in rendered},
        **{v: {} for v in shared.values()},
    }
    services: dict[str, Any] = {}
    base = {"network_mode": "host"}
    completed = {"condition": "service_completed_successfully"}
    healthy = {"condition": "service_healthy"}

    # Docker makes a volume owned by root when the image has nothing at its
    # mount point: one root step hands every volume to the services' user
    # before anything else runs (it changes only the volumes' top folders).
    services["volumes-init"] = {
        **base,
        "image": image("services"),
        "user": "0:0",
        "read_only": True,
        "cap_drop": ["ALL"],
        "cap_add": ["CHOWN", "FOWNER"],
        "security_opt": ["no-new-privileges:true"],
        "entrypoint": ["/bin/sh", "-c"],
        "command": ["chown 10001:10001 /v/* && chmod 0700 /v/*"],
        "volumes": [f"{v}:/v/{v}" for v in volumes],
        "restart": "no",
        "healthcheck": {"disable": True},
    }
    services["keys"] = hardened(
        {
            **base,
            "image": image("services"),
            "command": [
                "python",
                "-m",
                "mlmesh_runner.keys",
                "--state",
                str(STATE),
                "--admin-file",
                str(ADMIN_KEY),
                "--database-dir",
                str(DB_SECRETS),
                "--database-user",
                DB_USER,
                *(["--key-file", f"batch={BATCH_KEY}"] if "batch" in names else []),
                *(["--token-file", str(RAY_TOKEN)] if "batch" in names else []),
                *(["--token-file", str(VLLM_KEY)] if "vllmopenai" in names else []),
            ],
            "volumes": [
                f"secrets:{SECRETS}",
                f"admin:{ADMIN_DIR}",
                f"dbsecret:{DB_SECRETS}",
                *(
                    [f"raytoken:{RAY_TOKEN_DIR}", f"batchkey:{BATCH_KEY_DIR}"]
                    if "batch" in names
                    else []
                ),
                *([f"vllmkey:{VLLM_KEY_DIR}"] if "vllmopenai" in names else []),
            ],
            "depends_on": {"volumes-init": completed},
            "restart": "no",
            "healthcheck": {"disable": True},
        }
    )
    services["redis"] = hardened(
        {
            **base,
            "image": image("redis"),
            # The image's command: redis-server on 127.0.0.1:$MLMESH_REDIS_PORT,
            # append-only file in /state.
            "environment": {"MLMESH_REDIS_PORT": str(REDIS_PORT)},
            "volumes": [f"redis:{STATE}"],
            "depends_on": {"volumes-init": completed},
            "healthcheck": healthcheck(
                ["redis-cli", "-h", LOOPBACK, "-p", str(REDIS_PORT), "ping"], "10s"
            ),
            "restart": "unless-stopped",
        }
    )
    databases = [n for n in DATABASE_SERVICES if n in names]
    services["postgres"] = hardened(
        {
            **base,
            "image": image("postgres"),
            # The image's entrypoint initialises the cluster in /state/pgdata
            # on first start, with the password from the keys step.
            "environment": {
                "PGPORT": str(POSTGRES_PORT),
                "MLMESH_POSTGRES_LISTEN": LOOPBACK,
                "MLMESH_POSTGRES_USER": DB_USER,
                "MLMESH_POSTGRES_DB": DB_USER,
                "MLMESH_POSTGRES_PASSWORD_FILE": str(DB_SECRETS / "db.password"),
            },
            "volumes": [f"postgres:{STATE}", f"dbsecret:{DB_SECRETS}:ro"],
            "depends_on": {"keys": completed},
            "healthcheck": healthcheck(
                [f"{PGBIN}/pg_isready", "-h", LOOPBACK, "-p", str(POSTGRES_PORT), "-q"], "30s"
            ),
            "restart": "unless-stopped",
            "stop_grace_period": "30s",
        }
    )
    # One database per service (their migrations each keep a version table).
    create = " && ".join(
        f"{{ {PGBIN}/psql -tAc \"SELECT 1 FROM pg_database WHERE datname = '{db}'\" "
        f"| grep -q 1 || {PGBIN}/createdb {db}; }}"
        for db in databases
    )
    services["postgres-init"] = hardened(
        {
            **base,
            "image": image("postgres"),
            "entrypoint": ["/bin/sh", "-c", create],
            "environment": {
                "PGHOST": LOOPBACK,
                "PGPORT": str(POSTGRES_PORT),
                "PGUSER": DB_USER,
                "PGDATABASE": DB_USER,
                "PGPASSFILE": str(PGPASS),
            },
            "volumes": [f"dbsecret:{DB_SECRETS}:ro"],
            "depends_on": {"postgres": healthy},
            "restart": "no",
            "healthcheck": {"disable": True},
        }
    )

    for extra in extras:
        services[extra.name] = hardened(
            {
                **base,
                "image": image(extra.image),
                "command": extra.command,
                **({"environment": extra.environment} if extra.environment else {}),
                "volumes": [
                    *secret_mounts([*extra.command, *extra.environment.values(), *extra.reads]),
                    *(f"{volume}:{path}" for path, volume in shared.items() if path in extra.paths),
                ],
                "depends_on": {n: {"condition": c} for n, c in extra.depends_on.items()},
                "healthcheck": extra.healthcheck,
                "restart": "unless-stopped",
                "stop_grace_period": "15s",
                **extra.options,
            }
        )
    for r in rendered:
        spec = r.spec
        name = spec.name
        # Its own state, the secrets' volumes it names (read-only: its key
        # and the bootstrap keys for a chassis service), the shared folders.
        own = [f"{name}-state:{STATE}"]
        shares = [f"{volume}:{path}" for path, volume in shared.items() if path in r.paths]
        mounts = [*own, *secret_mounts([*r.argv, *r.env.values()]), *shares]
        depends: dict[str, Any] = {"keys": completed}
        if name == "batch":
            depends["ray-head"] = healthy
        if name in DATABASE_SERVICES:
            depends["postgres-init"] = completed
        if name == KEY_DIRECTORY_SERVICE:
            depends["redis"] = healthy
        for other in spec.after:
            if other in names:
                depends[other] = healthy
        if name == "flink":
            depends["flink-jobmanager"] = healthy
            depends["flink-taskmanager"] = healthy
        if r.prepare is not None:
            prepare_name = f"{name}-prepare"
            prepare_depends = {k: v for k, v in depends.items()}
            services[prepare_name] = hardened(
                {
                    **base,
                    "image": image(IMAGE_OF.get(name, name)),
                    # The operator's act, with the admin key (read from its
                    # file in the container, never written here).
                    "entrypoint": [
                        "/bin/sh",
                        "-c",
                        f'MLMESH_API_KEY="$$(cat {ADMIN_KEY})" PYTHONUNBUFFERED=1 exec "$$@"',
                        "prepare",
                    ],
                    "command": r.prepare,
                    "volumes": [
                        *own,
                        *secret_mounts(r.prepare),
                        *shares,
                        f"admin:{ADMIN_DIR}:ro",
                    ],
                    "depends_on": prepare_depends,
                    "restart": "no",
                    # Not the image's health check: it serves nothing.
                    "healthcheck": {"disable": True},
                }
            )
            depends[prepare_name] = completed
        port = plan.grpc[name]
        services[name] = hardened(
            {
                **base,
                "image": image(IMAGE_OF.get(name, name)),
                "command": r.argv,
                "environment": dict(sorted(r.env.items())),
                "volumes": mounts,
                "depends_on": depends,
                "healthcheck": probe(r.argv, spec, port),
                "restart": "unless-stopped",
                "stop_grace_period": "15s",
                # Its drivers find the Ray head's raylet in the head's processes.
                **({"pid": "service:ray-head"} if name == "batch" else {}),
                # Triton's python backend and vLLM pass tensors through /dev/shm.
                **({"shm_size": SHM_SIZE} if name in SHM_USERS else {}),
            }
        )
    routed = [r.spec for r in rendered if r.spec.routed]
    services["envoy"] = hardened(
        {
            **base,
            "image": image("envoy"),
            "command": [  # the image's entrypoint is envoy
                "-c",
                "/etc/envoy/envoy.yaml",
                "--concurrency",
                "2",
                *RUN_FLAGS,
                # On the host's network its hot-restart sockets would meet
                # another Envoy's (`make run`'s); a container restarts whole.
                "--disable-hot-restart",
            ],
            "volumes": ["./envoy.yaml:/etc/envoy/envoy.yaml:ro"],
            "depends_on": {spec.name: healthy for spec in routed},
            # Admin's /ready answers LIVE once Envoy serves (no Python in
            # the image: bash speaks the HTTP).
            "healthcheck": healthcheck(
                [
                    "bash",
                    "-c",
                    f"exec 3<>/dev/tcp/127.0.0.1/{ENVOY_ADMIN_PORT} && "
                    "printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q LIVE <&3",
                ],
                "10s",
            ),
            "restart": "unless-stopped",
        }
    )
    return {"services": services, "volumes": volumes}


def bridge_override(catalog: Sequence[ServiceSpec]) -> dict[str, Any]:
    """docker-compose.bridge.yml: Compose's normal networks instead of the
    host's; services reach each other by name; only Envoy is published."""
    plan = PortPlan.of(catalog)
    layout = Layout(bridge=True)
    rendered = render_services(catalog, plan, layout)
    net = {"network_mode": "", "networks": ["mesh"]}
    services: dict[str, Any] = {
        "volumes-init": {"network_mode": "none"},
        "keys": {"network_mode": "none"},
        "redis": {
            **net,
            # Reached on the mesh network only (never published).
            "command": [
                "sh",
                "-c",
                f"exec redis-server --port {REDIS_PORT} --bind 0.0.0.0 --dir {STATE} "
                "--appendonly yes --protected-mode no",
            ],
        },
        # Note: the image's entrypoint writes pg_hba.conf entries for loopback
        # (and initdb's defaults); clients on the mesh network need a `host`
        # line for it (see docs/deploy.md).
        "postgres": {**net, "environment": {"MLMESH_POSTGRES_LISTEN": "*"}},
        "postgres-init": {**net, "environment": {"PGHOST": "postgres"}},
    }
    names = {r.spec.name for r in rendered}
    for extra in cluster_containers(names, layout):
        services[extra.name] = {**net, "command": extra.command}
    if "batch" in names:
        # Batch's drivers use the Ray head's raylet as a local one: batch and
        # the Ray worker share the head's network namespace (and batch its
        # PID namespace), and the head answers to "batch" on the mesh.
        services["ray-head"] = {
            "network_mode": "",
            "networks": {"mesh": {"aliases": ["batch"]}},
        }
        services["ray-worker"] = {"network_mode": "service:ray-head"}
    for r in rendered:
        name = r.spec.name
        services[name] = {
            **(net if name != "batch" else {"network_mode": "service:ray-head"}),
            "command": r.argv,
            "environment": dict(sorted(r.env.items())),
        }
        if r.prepare is not None:
            services[f"{name}-prepare"] = {**net, "command": r.prepare}
    services["envoy"] = {
        **net,
        "volumes": ["./envoy.bridge.yaml:/etc/envoy/envoy.yaml:ro"],
        "ports": [f"127.0.0.1:{ENVOY_PORT}:{ENVOY_PORT}"],
    }
    return {"services": services, "networks": {"mesh": {}}}


def envoy_config(catalog: Sequence[ServiceSpec], layout: Layout) -> dict[str, Any]:
    plan = PortPlan.of(catalog)
    upstreams = [
        Upstream(
            spec.name,
            spec.services(),
            [(layout.host(spec.name), plan.grpc[spec.name])],
            (layout.host(spec.name), plan.grpc[spec.name]) if spec.single_writer else None,
            http_prefixes=spec.http_routes,
            http_endpoints=[(layout.host(spec.name), plan.http[spec.name])]
            if spec.http_routes
            else [],
        )
        for spec in catalog
        if spec.routed
    ]
    return render(
        upstreams,
        listen_host=layout.bind,
        listen_port=ENVOY_PORT,
        admin_port=ENVOY_ADMIN_PORT,
    )


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors for repeated values."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(data: dict[str, Any], what: str) -> str:
    return HEADER.format(what=what) + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


def files(catalog: Sequence[ServiceSpec] | None = None) -> dict[Path, str]:
    """Every generated file and its text."""
    catalog = list(CATALOG if catalog is None else catalog)
    return {
        OUT / "docker-compose.yml": dump(
            compose_file(catalog),
            "The whole mesh on the host network (127.0.0.1; fixed ports, see docs/deploy.md).",
        ),
        OUT / "docker-compose.bridge.yml": dump(
            bridge_override(catalog),
            "Override: Compose's normal networks (services by name; Envoy published only).",
        ),
        OUT / "envoy.yaml": dump(
            envoy_config(catalog, Layout(bridge=False)),
            "Envoy for docker-compose.yml (host network, fixed ports).",
        ),
        # Compose reads it from the project folder: the project's name (its
        # containers' and volumes' prefix) whatever folder it is run from.
        OUT / ".env": (
            f"# Generated by `python -m mlmesh_runner.compose`.\nCOMPOSE_PROJECT_NAME={PROJECT}\n"
        ),
        OUT / "envoy.bridge.yaml": dump(
            envoy_config(catalog, Layout(bridge=True)),
            "Envoy for the bridge override (services by name).",
        ),
    }


def ports(catalog: Sequence[ServiceSpec] | None = None) -> dict[str, Any]:
    """The port plan (for the smoke test and the docs)."""
    plan = PortPlan.of(list(CATALOG if catalog is None else catalog))
    return {
        "envoy": ENVOY_PORT,
        "envoy_admin": ENVOY_ADMIN_PORT,
        "redis": REDIS_PORT,
        "postgres": POSTGRES_PORT,
        "grpc": plan.grpc,
        "http": plan.http,
        "metrics": plan.metrics,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlmesh_runner.compose", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when a file is stale")
    parser.add_argument("--ports", action="store_true", help="print the port plan (JSON)")
    args = parser.parse_args(argv)
    if args.ports:
        print(json.dumps(ports(), indent=2))
        return
    stale = []
    for path, text in files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        raise SystemExit(
            "stale: "
            + ", ".join(str(p.relative_to(ROOT)) for p in stale)
            + " (run `python -m mlmesh_runner.compose`)"
        )


if __name__ == "__main__":
    main()
