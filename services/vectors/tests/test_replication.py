"""The change log and its follower (read replicas), on the embedded engine:
a follower equals its primary after every step; it takes the primary's
newer bases (with their index) and re-applies what came after; records
pruned under it make it start again from the bases."""

from __future__ import annotations

import numpy as np
import pytest
from mlmesh_vectors import replication
from mlmesh_vectors.engine.base import Batch, CollectionSpec, Distance, spec_to_json
from mlmesh_vectors.engine.edge import EdgeBackend
from mlmesh_vectors.replication import Change, ChangeLog, Follower

DIM = 4


def spec(name: str = "c") -> CollectionSpec:
    return CollectionSpec(name=name, dimension=DIM, distance=Distance.EUCLID)


def batch(start: int, n: int = 10) -> Batch:
    rng = np.random.default_rng(start)
    return Batch(
        [f"p{i}" for i in range(start, start + n)],
        rng.normal(size=(n, DIM)).astype(np.float32),
        [{"n": i} for i in range(start, start + n)],
    )


@pytest.fixture
def pair(tmp_path):
    primary = EdgeBackend(tmp_path / "primary")
    log = ChangeLog(tmp_path / "replication", primary)
    log.start()
    replica = EdgeBackend(tmp_path / "replica", auto_index=False)
    follower = Follower(tmp_path / "replication", replica)
    yield primary, log, replica, follower
    replica.close()
    primary.close()


def create(log: ChangeLog, primary: EdgeBackend, name: str = "c") -> int:
    def apply() -> Change:
        made = primary.create_collection(spec(name))
        return Change(0, "create", name, spec=spec_to_json(made))

    return log.write(name, apply)[0]


def upsert(log: ChangeLog, primary: EdgeBackend, start: int, name: str = "c") -> int:
    data = batch(start)

    def apply() -> Change:
        primary.upsert(name, data)
        return Change(0, "upsert", name, ids=data.ids, payloads=data.payloads, vectors=data.vectors)

    return log.write(name, apply)[0]


def ids(backend: EdgeBackend, name: str = "c") -> set[str]:
    records, _ = backend.scroll(name, None, 1000, None, False, False)
    return {r.id for r in records}


def test_a_follower_applies_every_write_in_order(pair):
    primary, log, replica, follower = pair
    follower.step()  # the epoch: nothing yet
    assert create(log, primary) == 1
    for start in range(0, 50, 10):
        upsert(log, primary, start)

    def delete() -> Change:
        primary.delete_ids("c", ["p3", "p4"])
        return Change(0, "delete_ids", "c", ids=["p3", "p4"])

    last = log.write("c", delete)[0]
    follower.step()
    assert follower.applied == last == 7
    assert ids(replica) == ids(primary) and len(ids(replica)) == 48
    got = replica.retrieve("c", ["p10"], True, True)[0]
    assert got.payload == {"n": 10}
    assert np.allclose(got.vector, batch(10).vectors[0])
    assert follower.wait_applied(7, 0.01) and not follower.wait_applied(8, 0.05)


def test_a_newer_base_is_taken_and_later_writes_reapplied(pair, monkeypatch):
    primary, log, replica, follower = pair
    monkeypatch.setattr(replication, "QUIET_S", 0.0)
    monkeypatch.setattr(replication, "BASE_EVERY_S", 0.0)
    follower.step()
    create(log, primary)
    upsert(log, primary, 0)
    follower.step()
    log.maintain()  # a base of "c" at seq 2
    based = upsert(log, primary, 10)
    follower.step()  # installs the base, re-applies nothing older, applies seq 3
    assert follower.applied == based and ids(replica) == ids(primary)
    assert len(list((log.dir / "bases" / "c").glob("*.tar"))) == 1


def test_pruned_records_make_the_follower_start_over(pair, monkeypatch):
    primary, log, replica, follower = pair
    monkeypatch.setattr(replication, "QUIET_S", 0.0)
    monkeypatch.setattr(replication, "BASE_EVERY_S", 0.0)
    monkeypatch.setattr(replication, "KEEP_CHANGES_S", -1.0)
    follower.step()
    create(log, primary)
    upsert(log, primary, 0)
    log.maintain()  # base at 2; records 1-2 pruned (every base covers them)
    assert not list((log.dir / "changes").glob("*.npz"))
    upsert(log, primary, 10)
    # The follower had applied nothing: seq 1 is gone, seq 3 is there.
    with pytest.raises(replication._Gap):
        follower.step()
    follower.epoch = None  # what run_forever does on a gap
    follower.step()  # bootstrap: the base (seq 2) ...
    follower.step()  # ... then seq 3
    assert follower.applied == 3 and ids(replica) == ids(primary)


def test_a_restarted_primary_starts_a_new_epoch(tmp_path):
    primary = EdgeBackend(tmp_path / "primary")
    log = ChangeLog(tmp_path / "replication", primary)
    log.start()
    create(log, primary)
    upsert(log, primary, 0)
    replica = EdgeBackend(tmp_path / "replica", auto_index=False)
    follower = Follower(tmp_path / "replication", replica)
    follower.step()
    follower.step()
    first = follower.epoch
    primary.close()
    primary = EdgeBackend(tmp_path / "primary")
    log = ChangeLog(tmp_path / "replication", primary)
    log.start()  # numbers go on from the last epoch's
    assert upsert(log, primary, 10) == 3
    follower.step()  # the new epoch: from its bases
    follower.step()
    assert follower.epoch != first and follower.applied == 3
    assert ids(replica) == ids(primary) and len(ids(replica)) == 20
    replica.close()
    primary.close()
