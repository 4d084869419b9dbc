"""Experiments in the domain store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from mlmesh_registry import db
from mlmesh_registry.store import RegistryStore
from registry_fixtures import add_version

Action = pb.ExperimentEvent.Action


def _experiment(
    name: str, model: str, *arms: tuple[str, int, int], **fields: object
) -> pb.Experiment:
    return pb.Experiment(
        name=name,
        model=model,
        arms=[pb.ExperimentArm(name=n, version=v, weight=w) for n, v, w in arms],
        **fields,  # type: ignore[arg-type]
    )


async def _model_with_versions(store: RegistryStore, model: str, count: int = 2) -> None:
    for i in range(count):
        await add_version(store, model, f"v{i}".encode())


async def _experiment_events(store: RegistryStore, model: str) -> list[pb.ExperimentEvent]:
    """The model's experiment events, as the log holds them."""
    e = db.events
    async with store.experiments.read() as c:
        bodies = await c.scalars(
            sa.select(e.c.body)
            .where(e.c.model == model, e.c.kind == "experiment")
            .order_by(e.c.sequence)
        )
        return [pb.ExperimentEvent.FromString(body) for body in bodies]


async def test_an_experiment_starts_running_with_the_default_stickiness(
    store: RegistryStore, unique: str
) -> None:
    await _model_with_versions(store, unique)
    created = await store.experiments.create(
        _experiment(unique, unique, ("control", 1, 90), ("candidate", 2, 10))
    )
    assert created.state == pb.EXPERIMENT_STATE_RUNNING
    assert created.stickiness_key == "api_key"
    assert created.create_time == created.update_time
    assert await store.experiments.get(unique) == created
    [event] = await _experiment_events(store, unique)
    assert (event.action, event.experiment) == (Action.ACTION_CREATED, created)


async def test_an_experiment_name_is_taken_once(store: RegistryStore, unique: str) -> None:
    await _model_with_versions(store, unique)
    await store.experiments.create(_experiment(unique, unique, ("a", 1, 100)))
    with pytest.raises(AlreadyExists):
        await store.experiments.create(_experiment(unique, unique, ("b", 2, 100)))
    assert [a.name for a in (await store.experiments.get(unique)).arms] == ["a"]


async def test_every_broken_rule_is_reported_at_once(store: RegistryStore, unique: str) -> None:
    """The contract's rules (protovalidate) and the weights' sum, in one error."""
    await _model_with_versions(store, unique)
    bad = _experiment(
        unique,
        unique,
        ("a", 1, 70),
        ("a", 2, 20),
        ("B", 1, 120),
        stickiness_key="x-bin",
        shadow=pb.ShadowTraffic(version=2, percent=101),
    )
    with pytest.raises(InvalidArgument) as caught:
        await store.experiments.create(bad)
    assert sorted(v.field for v in caught.value.violations) == sorted(
        [
            "experiment.arms",  # names not unique
            "experiment.arms[2].name",
            "experiment.arms[2].weight",
            "experiment.arms",  # weights sum to 210 (no rule of the contract can say it)
            "experiment.stickiness_key",
            "experiment.shadow.percent",
        ]
    )
    with pytest.raises(InvalidArgument) as caught:
        await store.experiments.create(_experiment(unique, unique))
    assert [v.field for v in caught.value.violations] == ["experiment.arms"]  # min_items
    with pytest.raises(NotFound):
        await store.experiments.get(unique)


async def test_an_experiment_routes_only_to_versions_that_exist(
    store: RegistryStore, unique: str
) -> None:
    await _model_with_versions(store, unique, 1)
    for experiment in (
        _experiment(unique, unique, ("a", 1, 50), ("b", 2, 50)),
        _experiment(unique, unique, ("a", 1, 100), shadow=pb.ShadowTraffic(version=3, percent=5)),
    ):
        with pytest.raises(NotFound) as caught:
            await store.experiments.create(experiment)
        assert caught.value.metadata["resource_type"] == "model version"
    with pytest.raises(NotFound) as caught:
        await store.experiments.create(_experiment(unique, f"{unique}-none", ("a", 1, 100)))
    assert caught.value.metadata == {"resource_type": "model", "name": f"{unique}-none"}


async def test_an_update_replaces_the_masked_fields_and_is_recorded(
    store: RegistryStore, unique: str
) -> None:
    await _model_with_versions(store, unique)
    await store.experiments.create(
        _experiment(unique, unique, ("a", 1, 100), shadow=pb.ShadowTraffic(version=2, percent=5))
    )
    change = _experiment(unique, unique, ("a", 1, 50), ("b", 2, 50), description="split")
    updated = await store.experiments.update(change, ["arms", "shadow"])
    assert [(a.name, a.weight) for a in updated.arms] == [("a", 50), ("b", 50)]
    assert not updated.HasField("shadow")
    assert updated.description == ""
    # a partial experiment (its name and the masked fields) is merged, then checked
    noted = await store.experiments.update(
        pb.Experiment(name=unique, description="n"), ["description"]
    )
    assert (noted.description, noted.arms, noted.model) == ("n", updated.arms, unique)
    updated = noted
    with pytest.raises(InvalidArgument) as caught:
        await store.experiments.update(change, ["model"])
    assert [v.field for v in caught.value.violations] == ["update_mask"]
    with pytest.raises(InvalidArgument) as caught:  # the result must keep the rules
        await store.experiments.update(_experiment(unique, unique, ("a", 1, 60)), ["arms"])
    assert [v.field for v in caught.value.violations] == ["experiment.arms"]
    assert await store.experiments.get(unique) == updated
    actions = [e.action for e in await _experiment_events(store, unique)]
    assert actions == [Action.ACTION_CREATED, Action.ACTION_UPDATED, Action.ACTION_UPDATED]


async def test_a_stopped_experiment_no_longer_changes(store: RegistryStore, unique: str) -> None:
    await _model_with_versions(store, unique)
    await store.experiments.create(_experiment(unique, unique, ("a", 1, 100)))
    stopped = await store.experiments.stop(unique)
    assert stopped.state == pb.EXPERIMENT_STATE_STOPPED
    assert await store.experiments.stop(unique) == stopped  # again: a no-op
    with pytest.raises(FailedPrecondition):
        await store.experiments.update(_experiment(unique, unique, ("b", 2, 100)), ["arms"])
    actions = [e.action for e in await _experiment_events(store, unique)]
    assert actions == [Action.ACTION_CREATED, Action.ACTION_STOPPED]


async def test_experiments_list_by_model_and_state(store: RegistryStore, unique: str) -> None:
    await _model_with_versions(store, unique)
    for i in range(3):
        await store.experiments.create(_experiment(f"{unique}-{i}", unique, ("a", 1, 100)))
    await store.experiments.stop(f"{unique}-1")
    running, _ = await store.experiments.list_page(unique, pb.EXPERIMENT_STATE_RUNNING, 0, "")
    assert [e.name for e in running] == [f"{unique}-0", f"{unique}-2"]
    first, token = await store.experiments.list_page(unique, 0, 2, "")
    rest, end = await store.experiments.list_page(unique, 0, 2, token)
    assert [e.name for e in first + rest] == [f"{unique}-{i}" for i in range(3)]
    assert end == ""
