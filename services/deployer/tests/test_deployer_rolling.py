"""The deployer's rolling and unload rules at its own boundaries: a Triton
double in explicit model-control mode (a load re-reads config.pbtxt and
serves exactly the versions its policy lists) and an artifact cache double;
then once with the real follower and cache against a real registry."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_deployer import deployer as deployer_module
from mlmesh_deployer.deployer import State, TritonDeployer, _install, _write_config
from mlmesh_registry.testing import start_test_registry
from mlmesh_sdk.registry import RegistryClient
from mlmesh_serving import ServedVersions

ARTIFACT_CONFIG = (
    'name: "what-the-trainer-called-it"\n'
    'backend: "python"\n'
    "max_batch_size: 8\n"
    "version_policy: { latest: { num_versions: 1 } }\n"
)
_VERSIONS = re.compile(r"version_policy: \{ specific: \{ versions: \[ ([\d, ]*) \] \} \}")


def triton_artifact(folder: Path, version: int) -> Path:
    """A folder as the registry holds a Triton model: config.pbtxt and payload/."""
    (folder / "payload").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(ARTIFACT_CONFIG)
    (folder / "payload" / "model.py").write_text(f"VERSION = {version}\n")
    return folder


class Triton:
    """What the deployer sees of Triton. ``load_model`` reads the model's
    config.pbtxt, needs a folder per listed version, and then serves those
    versions (less the ``broken`` ones) and no other; ``served`` is the
    versions after each load, ``configs`` each config read."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.live: dict[str, set[int]] = {}
        self.served: list[set[int]] = []
        self.configs: list[str] = []
        self.broken: set[int] = set()
        self.down = False

    async def load_model(self, model: str) -> None:
        if self.down:
            raise ConnectionError("triton is not reachable")
        config = (self.repository / model / "config.pbtxt").read_text()
        self.configs.append(config)
        [listed] = _VERSIONS.findall(config)
        versions = {int(v) for v in listed.split(",")}
        for version in versions:
            if not (self.repository / model / str(version) / "model.py").is_file():
                raise RuntimeError(f"{model}/{version} has no files in the repository")
        self.live[model] = versions - self.broken
        self.served.append(set(self.live[model]))

    async def model_ready(self, model: str, version: str = "") -> bool:
        return not self.down and int(version) in self.live.get(model, set())

    def restart(self) -> None:
        self.live.clear()


class Cache:
    """Artifact folders (triton_artifact); records what the deployer keeps."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.retained: list[set[int]] = []

    async def folder(self, model: str, version: int) -> Path:
        return triton_artifact(self.root / model / str(version), version)

    async def retain(self, model: str, keep: Iterable[int]) -> list[int]:
        self.retained.append(set(keep))
        return []


def wanted(version: int, *experiments: int) -> ServedVersions:
    return ServedVersions(ModelVersion(model="digits", version=version), frozenset(experiments))


@pytest.fixture
def triton(tmp_path: Path) -> Triton:
    return Triton(tmp_path / "repo")


@pytest.fixture
def deployer(tmp_path: Path, triton: Triton) -> TritonDeployer:
    deployer = TritonDeployer(
        ["digits@champion"],
        "127.0.0.1:1",
        triton=triton,  # type: ignore[arg-type]
        repository=tmp_path / "repo",
        cache_dir=tmp_path / "unused",
        load_timeout_s=0.3,
        reconcile_seconds=0.01,
    )
    deployer.cache = Cache(tmp_path / "cache")  # type: ignore[assignment]
    return deployer


def version_folders(deployer: TritonDeployer) -> list[str]:
    return sorted(p.name for p in (deployer.repository / "digits").iterdir() if p.is_dir())


async def test_the_first_version_loads_alone_named_after_the_registry_model(
    deployer: TritonDeployer, triton: Triton
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(1))
    assert triton.served == [{1}]
    assert (deployment.live_version, deployment.state) == (1, State.READY)
    assert triton.configs[0] == (
        'name: "digits"\nbackend: "python"\nmax_batch_size: 8\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
    )
    assert version_folders(deployer) == ["1"]
    assert deployer.cache.retained == [{1}]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 1)])
async def test_a_move_loads_the_new_beside_the_old_then_unloads_the_old(
    deployer: TritonDeployer, triton: Triton, old: int, new: int
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(old))
    await deployer._roll(deployment, wanted(new))
    # never a moment without the live version: both, then the new one alone
    assert triton.served == [{old}, {old, new}, {new}]
    assert deployment.live_version == new
    assert version_folders(deployer) == [str(new)]
    assert deployer.cache.retained[-1] == {new}  # type: ignore[attr-defined]


async def test_experiment_arms_load_beside_the_served_version_and_go_with_it(
    deployer: TritonDeployer, triton: Triton
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(2))
    await deployer._roll(deployment, wanted(2, 3, 4))  # an A/B arm and a shadow
    assert triton.live["digits"] == {2, 3, 4}
    assert deployment.experiment_versions == {3, 4}
    assert version_folders(deployer) == ["2", "3", "4"]
    await deployer._roll(deployment, wanted(2, 4))  # one arm removed
    assert triton.live["digits"] == {2, 4}
    assert version_folders(deployer) == ["2", "4"]
    await deployer._roll(deployment, wanted(5))  # the experiment ends as the alias moves
    assert triton.served[-2:] == [{2, 4, 5}, {5}]
    assert (deployment.live_version, deployment.experiment_versions) == (5, set())
    assert version_folders(deployer) == ["5"]
    assert deployer.cache.retained[-1] == {5}  # type: ignore[attr-defined]


async def test_the_same_versions_again_load_nothing(
    deployer: TritonDeployer, triton: Triton
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(1, 2))
    loads = len(triton.served)
    await deployer._roll(deployment, wanted(1, 2))
    assert len(triton.served) == loads
    assert deployment.state is State.READY


async def test_a_version_that_never_gets_ready_leaves_the_old_one_serving(
    deployer: TritonDeployer, triton: Triton
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(1))
    triton.broken = {2}
    with pytest.raises(TimeoutError, match="digits/2 not ready on Triton"):
        await deployer._roll(deployment, wanted(2))
    assert deployment.live_version == 1
    assert triton.live["digits"] == {1}  # still served; no config lists 2 alone
    assert all("[ 2 ]" not in config for config in triton.configs)
    assert deployer.cache.retained == [{1}]  # type: ignore[attr-defined]


async def test_a_failed_roll_is_retried_until_the_version_is_live(
    deployer: TritonDeployer, triton: Triton, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def moves(*_: Any) -> AsyncIterator[ServedVersions]:
        yield wanted(1)
        yield wanted(2)

    monkeypatch.setattr(deployer_module, "follow_served", moves)
    states: list[tuple[State, int]] = []
    deployment = deployer.deployments[0]

    async def sleep(_: float) -> None:  # the retry's wait: Triton recovers meanwhile
        states.append((deployment.state, deployment.live_version))
        triton.broken.clear()

    deployer._sleep = sleep  # type: ignore[assignment]
    triton.broken = {2}
    await deployer._follow(deployment)
    assert states == [(State.FAILED, 1)]
    assert (deployment.live_version, deployment.target_version) == (2, 2)
    assert deployment.state is State.READY and deployer.ready.is_set()
    assert triton.live["digits"] == {2}


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_reconcile_reloads_what_a_restarted_triton_lost(
    deployer: TritonDeployer, triton: Triton
) -> None:
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(3, 4))
    reconcile = asyncio.create_task(deployer._reconcile())
    try:
        triton.down = True
        triton.restart()
        await until(lambda: deployment.state is State.FAILED)
        triton.down = False
        await until(lambda: deployment.state is State.READY)
        assert triton.live["digits"] == {3, 4}  # the experiment's version too
        assert deployment.live_version == 3
    finally:
        reconcile.cancel()


async def test_reconcile_leaves_a_roll_in_progress_alone(
    deployer: TritonDeployer, triton: Triton
) -> None:
    """Triton loses everything just as the alias moves: the reconcile must not
    wait, under the model's lock, for the version the roll just dropped."""
    deployment = deployer.deployments[0]
    await deployer._roll(deployment, wanted(1))
    triton.restart()
    rolled = asyncio.Event()
    ready = triton.model_ready

    async def model_ready(model: str, version: str = "") -> bool:
        answer = await ready(model, version)
        if not rolled.is_set():  # the reconcile asked about 1: the move happens now
            rolled.set()
            await deployer._roll(deployment, wanted(2))
        return answer

    triton.model_ready = model_ready  # type: ignore[method-assign]
    states: list[tuple[State, str]] = []
    record = deployment.set
    deployment.set = lambda state, message="": (  # type: ignore[method-assign]
        states.append((state, message)),
        record(state, message),
    )
    reconcile = asyncio.create_task(deployer._reconcile())
    try:
        await until(lambda: rolled.is_set() and deployment.live_version == 2)
        await asyncio.sleep(deployer.load_timeout_s + 0.2)
        assert [s for s in states if s[0] is State.FAILED] == []
        assert deployment.state is State.READY
        assert triton.live["digits"] == {2}
    finally:
        reconcile.cancel()


def test_install_is_atomic_and_keeps_a_complete_version(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    (artifact / "payload").mkdir(parents=True)
    (artifact / "payload" / "model.py").write_text("new\n")
    model_dir = tmp_path / "repo" / "digits"
    (model_dir / ".7.partial").mkdir(parents=True)  # a crashed copy
    (model_dir / ".7.partial" / "junk").write_text("half\n")
    _install(artifact, model_dir, 7)
    assert sorted(p.name for p in model_dir.iterdir()) == ["7"]
    assert sorted(p.name for p in (model_dir / "7").iterdir()) == ["model.py"]
    (artifact / "payload" / "model.py").write_text("changed\n")
    _install(artifact, model_dir, 7)  # already complete: untouched
    assert (model_dir / "7" / "model.py").read_text() == "new\n"


def test_the_config_gets_our_name_and_version_policy(tmp_path: Path) -> None:
    (tmp_path / "config.pbtxt").write_text(
        '  name : "x"\nplatform: "onnxruntime_onnx"\n  version_policy: { all: {} }\n'
    )
    model_dir = tmp_path / "repo"
    model_dir.mkdir()
    _write_config(tmp_path, model_dir, "digits", [2, 5])
    assert (model_dir / "config.pbtxt").read_text() == (
        'name: "digits"\nplatform: "onnxruntime_onnx"\n'
        "version_policy: { specific: { versions: [ 2, 5 ] } }\n"
    )
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.pbtxt"]  # no .tmp left


async def test_it_follows_a_real_registry_with_the_real_cache(
    tmp_path: Path, triton: Triton, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "registry").mkdir()
    host, secret = await start_test_registry(tmp_path / "registry")
    monkeypatch.setenv("MLMESH_API_KEY", secret)
    target = f"127.0.0.1:{host.port}"
    deployer = TritonDeployer(
        ["digits@champion"],
        target,
        triton=triton,  # type: ignore[arg-type]
        repository=tmp_path / "repo",
        cache_dir=tmp_path / "cache",
        retry_seconds=0.05,
    )
    deployment = deployer.deployments[0]
    try:
        async with RegistryClient(target) as registry:
            for version in (1, 2):
                await registry.upload_folder("digits", triton_artifact(tmp_path / "a", version))
            await registry.set_alias("digits", "champion", 1)
            await deployer.start()
            await asyncio.wait_for(deployer.ready.wait(), 10)
            assert triton.live["digits"] == {1}
            await registry.set_alias("digits", "champion", 2)
            await until(lambda: deployment.live_version == 2 and triton.live["digits"] == {2})
        assert triton.served == [{1}, {1, 2}, {2}]
        assert (tmp_path / "repo" / "digits" / "2" / "model.py").read_text() == "VERSION = 2\n"
        # the cache keeps only what is served
        await until(
            lambda: sorted(p.name for p in (tmp_path / "cache" / "digits").iterdir()) == ["2"]
        )
    finally:
        await deployer.stop()
        await host.shutdown()
