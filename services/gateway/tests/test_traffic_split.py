"""TrafficSplit (sticky arms, only loaded arms, shadows) and ShadowRunner
(one shadow path: best effort, recorded, never the caller's problem)."""

from __future__ import annotations

import asyncio

import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2
from mlmesh.registry.v1.model_pb2 import ModelVersion
from mlmesh_gateway.shadows import ShadowComparison, ShadowRunner
from mlmesh_gateway.traffic_split import Split, TrafficSplit
from mlmesh_serving import ServedVersions

ALIAS = ModelReference(model="digits", alias="champion")


def experiment(name: str, *arms: tuple[int, int], shadow: int = 0, sticky: str = ""):
    return model_pb2.Experiment(
        name=name,
        model="digits",
        stickiness_key=sticky,
        arms=[model_pb2.ExperimentArm(name=f"v{v}", version=v, weight=w) for v, w in arms],
        shadow=model_pb2.ShadowTraffic(version=shadow, percent=100) if shadow else None,
    )


class Directory:
    def __init__(self, *running: model_pb2.Experiment, served: int = 1) -> None:
        self.running, self.version = running, served
        self.asked: list[tuple[str, str]] = []

    async def served(self, model: str, alias: str = "") -> ServedVersions:
        self.asked.append((model, alias))
        return ServedVersions(
            ModelVersion(model=model, version=self.version), frozenset(), self.running
        )

    async def reread(self, model: str, alias: str = "") -> ServedVersions:
        self.version += 1
        return await self.served(model, alias)


def split(directory: Directory, loaded=frozenset({1, 2, 3}), pin_served=True) -> TrafficSplit:
    async def is_loaded(model: str, version: int) -> bool:
        return version in loaded

    return TrafficSplit(directory, is_loaded, pin_served=pin_served)  # type: ignore[arg-type]


async def test_a_version_goes_as_asked_and_no_experiment_pins_the_alias_for_triton():
    directory = Directory()
    triton = split(directory)
    pinned = ModelReference(model="digits", version=7)
    assert await triton.route(pinned, "key_a", {}) == Split(version=7)
    assert directory.asked == []  # nothing to look up
    assert await triton.route(ALIAS, "key_a", {}) == Split(version=1, resolved=True)
    assert await split(directory, pin_served=False).route(ALIAS, "key_a", {}) == Split()
    assert await triton.reresolve(ALIAS) == 2


async def test_arms_are_sticky_per_key_and_split_by_weight():
    triton = split(Directory(experiment("ab", (1, 50), (2, 50))))
    chosen = {}
    for i in range(200):
        first = await triton.route(ALIAS, f"key_{i}", {})
        again = await triton.route(ALIAS, f"key_{i}", {})
        assert first.version == again.version and first.experiment is not None
        chosen[i] = first.version
    share = sum(v == 2 for v in chosen.values()) / len(chosen)
    assert 0.35 < share < 0.65


async def test_a_stickiness_header_keeps_callers_of_one_key_apart():
    triton = split(Directory(experiment("ab", (1, 50), (2, 50), sticky="user_id")))
    versions = {
        (await triton.route(ALIAS, "key_a", {"x-mlmesh-user-id": f"u{i}"})).version
        for i in range(40)
    }
    assert versions == {1, 2}


async def test_only_arms_that_are_loaded_get_traffic():
    triton = split(Directory(experiment("ab", (3, 100))), loaded={1})
    assert await triton.route(ALIAS, "key_a", {}) == Split(version=1, resolved=True)
    llm = split(Directory(experiment("ab", (3, 100))), loaded={1}, pin_served=False)
    assert await llm.route(ALIAS, "key_a", {}) == Split()  # the reference as asked


async def test_every_running_experiment_gets_callers():
    triton = split(Directory(experiment("one", (2, 100)), experiment("two", (3, 100))))
    names = {(await triton.route(ALIAS, f"key_{i}", {})).experiment.name for i in range(40)}
    assert names == {"one", "two"}


async def test_the_shadow_is_mirrored_only_when_loaded_and_not_the_arm_itself():
    assert (
        await split(Directory(experiment("ab", (1, 100), shadow=2))).route(ALIAS, "k", {})
    ).shadow == 2
    not_loaded = split(Directory(experiment("ab", (1, 100), shadow=4)))
    assert (await not_loaded.route(ALIAS, "k", {})).shadow == 0
    itself = split(Directory(experiment("ab", (2, 100), shadow=2)))
    assert (await itself.route(ALIAS, "k", {})).shadow == 0


class Log:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    async def record(self, *row, comparison=None) -> None:
        self.rows.append(row)


async def test_a_shadow_is_recorded_with_its_agreement():
    log = Log()
    runner = ShadowRunner(log)  # type: ignore[arg-type]
    ab = experiment("ab", (1, 100), shadow=2)

    async def close() -> ShadowComparison:
        return ShadowComparison(1e-4)

    async def far() -> ShadowComparison:
        return ShadowComparison(0.5)

    runner.mirror("call-1", ab, "digits", (1, 2), close)
    runner.mirror("call-2", ab, "digits", (1, 2), far)
    await asyncio.gather(*runner._tasks)
    assert sorted(log.rows) == [
        ("call-1", "ab", "digits", 1, 2, 1e-4, True),
        ("call-2", "ab", "digits", 1, 2, 0.5, False),
    ]


async def test_shadows_never_queue_and_never_fail_the_caller(caplog: pytest.LogCaptureFixture):
    log = Log()
    runner = ShadowRunner(log, limit=1)  # type: ignore[arg-type]
    ab = experiment("ab", (1, 100), shadow=2)
    release = asyncio.Event()

    async def slow() -> ShadowComparison:
        await release.wait()
        raise RuntimeError("the shadow version broke")

    runner.mirror("call-1", ab, "digits", (1, 2), slow)
    await asyncio.sleep(0)
    runner.mirror("call-2", ab, "digits", (1, 2), slow)  # one runs: dropped
    assert len(runner._tasks) == 1
    release.set()
    await asyncio.gather(*runner._tasks)
    assert log.rows == [] and "the shadow version broke" in caplog.text
