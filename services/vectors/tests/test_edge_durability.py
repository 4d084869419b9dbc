"""The edge engine's disk: what a killed process leaves, index builds that
run beside writes, and snapshot files moved between instances."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from mlmesh_vectors.engine.base import (
    Batch,
    CollectionSpec,
    Distance,
    Query,
    SearchOptions,
    spec_to_json,
)
from mlmesh_vectors.engine.edge import EdgeBackend

# A process that writes until it is killed, printing what was acknowledged.
UPSERTS = """
import sys
from pathlib import Path
import numpy as np
from mlmesh_vectors.engine.base import Batch, CollectionSpec, Distance
from mlmesh_vectors.engine.edge import EdgeBackend

backend = EdgeBackend(Path(sys.argv[1]))
backend.create_collection(CollectionSpec("durable", 8, Distance.DOT))
rng = np.random.default_rng(0)
for n in range(1_000_000):
    ids = [f"b{n}-{j}" for j in range(50)]
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    backend.upsert("durable", Batch(ids, vectors, [{"n": n}] * 50))
    print(n, flush=True)
"""

CREATES = """
import sys
from pathlib import Path
from mlmesh_vectors.engine.base import CollectionSpec, Distance
from mlmesh_vectors.engine.edge import EdgeBackend

backend = EdgeBackend(Path(sys.argv[1]))
for n in range(1_000_000):
    indexes = (("k", "keyword"), ("n", "integer"))
    backend.create_collection(CollectionSpec(f"c{n}", 8, Distance.DOT, payload_indexes=indexes))
    print(n, flush=True)
"""


def kill_after(program: str, root: Path, acknowledged: int) -> list[int]:
    """Runs ``program`` on ``root``, SIGKILLs it once it has acknowledged
    that many operations, and returns every number it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, "-c", program, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    seen: list[int] = []
    try:
        for line in process.stdout:
            seen.append(int(line))
            if len(seen) >= acknowledged:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        rest, stderr = process.communicate(timeout=30)
    assert len(seen) >= acknowledged, stderr
    # A line cut by the kill was not acknowledged.
    return seen + [int(line) for line in rest.splitlines() if line.strip().isdigit()]


def leftovers(root: Path) -> list[str]:
    """Names starting with '.' anywhere in the layout (unfinished work)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_acknowledged_upserts_survive_sigkill(tmp_path):
    root = tmp_path / "edge"
    acknowledged = kill_after(UPSERTS, root, 40)
    backend = EdgeBackend(root)
    try:
        ids = [f"b{n}-{j}" for n in acknowledged for j in range(50)]
        found = backend.retrieve("durable", ids, with_payload=True, with_vector=False)
        assert len(found) == len(ids)
        assert all(r.payload == {"n": int(r.id[1:].split("-")[0])} for r in found)
        # Nothing but whole batches (each is one WAL entry).
        assert backend.count("durable") % 50 == 0
        assert backend.count("durable") >= len(ids)
        backend.upsert("durable", Batch(["after"], np.ones((1, 8), np.float32)))
    finally:
        backend.close()


def test_a_killed_create_leaves_whole_collections_or_none(tmp_path):
    root = tmp_path / "edge"
    acknowledged = kill_after(CREATES, root, 15)
    backend = EdgeBackend(root)
    try:
        names = [spec.name for spec in backend.list_collections()]
        assert {f"c{n}" for n in acknowledged} <= set(names)
        for name in names:
            state = backend.get_collection(name)
            assert state.spec.payload_indexes == (("k", "keyword"), ("n", "integer"))
            assert state.point_count == 0
        assert leftovers(root) == []
    finally:
        backend.close()


def test_opening_finishes_or_clears_what_a_killed_process_left(tmp_path):
    root = tmp_path / "edge"
    backend = EdgeBackend(root)
    for name in ("alpha", "beta"):
        backend.create_collection(CollectionSpec(name, 2, Distance.EUCLID))
        backend.upsert(name, Batch(["a", "b", "c"], np.eye(3, 2, dtype=np.float32)))
    backend.close()
    collections = root / "collections"
    # A whole collection installed up to its last rename...
    shutil.copytree(collections / "alpha", collections / ".incoming-gamma")
    spec_file = collections / ".incoming-gamma" / "collection.json"
    spec = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**spec, "name": "gamma"}))
    # ... a create cut short ...
    (collections / ".create-1234" / "shard").mkdir(parents=True)
    # ... a shard swap cut between its two renames ...
    (collections / "beta" / "shard").rename(collections / "beta" / ".shard-new")
    # ... and an index build, a swap not begun and a snapshot being written.
    shutil.copytree(collections / "alpha" / "shard", collections / "alpha" / ".build-1234")
    shutil.copytree(collections / "alpha" / "shard", collections / "alpha" / ".shard-new")
    (collections / "alpha" / "snapshots" / ".20250101T000000000000-abcdef.tar").write_bytes(b"x")

    backend = EdgeBackend(root)
    try:
        assert [s.name for s in backend.list_collections()] == ["alpha", "beta", "gamma"]
        for name in ("alpha", "beta", "gamma"):
            assert backend.count(name) == 3
        assert backend.list_snapshots("alpha") == []
        assert leftovers(root) == []
    finally:
        backend.close()


def test_writes_made_while_an_index_is_built_are_kept(tmp_path):
    backend = EdgeBackend(tmp_path / "edge", indexing_threshold_kb=64)
    try:
        backend.create_collection(CollectionSpec("busy", 32, Distance.COSINE))
        rng = np.random.default_rng(5)
        vectors = rng.standard_normal((3000, 32)).astype(np.float32)
        rounds = 0
        # A build takes a few hundred ms (a child process): keep writing
        # through at least one, then a while longer.
        while rounds < 20 or backend.get_collection("busy").indexed_point_count == 0:
            start = (rounds * 100) % 3000
            ids = [f"v{i}" for i in range(start, start + 100)]
            payloads = [{"round": rounds}] * 100
            backend.upsert("busy", Batch(ids, vectors[start : start + 100], payloads))
            rounds += 1
            assert rounds < 2000, "no index build finished"
        last = {f"v{(r * 100) % 3000 + j}": r for r in range(rounds) for j in range(100)}
        state = backend.wait_for_indexing("busy")
        assert state.indexed_point_count > 0
        assert state.point_count == len(last)
        found = backend.retrieve("busy", list(last), with_payload=True, with_vector=False)
        assert {r.id: r.payload["round"] for r in found} == last
        [hits] = backend.search("busy", [Query(vectors[7], k=1)], SearchOptions())
        assert hits[0].id == "v7"
        assert leftovers(tmp_path / "edge") == []
    finally:
        backend.close()


def test_a_snapshot_file_creates_or_replaces_a_collection_elsewhere(tmp_path):
    primary = EdgeBackend(tmp_path / "primary")
    replica = EdgeBackend(tmp_path / "replica")
    try:
        spec = primary.create_collection(
            CollectionSpec("docs", 3, Distance.DOT, payload_indexes=(("k", "keyword"),))
        )
        vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
        primary.upsert("docs", Batch(list("abcd"), vectors, [{"k": c} for c in "abcd"]))
        snapshot = primary.create_snapshot("docs")
        tar = primary.snapshot_path("docs", snapshot.name)

        state = replica.install_snapshot_file(tar)
        assert (state.spec, state.point_count) == (spec, 4)
        assert replica.install_snapshot_file(tar, "docs_copy").spec.name == "docs_copy"
        # Replacing: a different collection of that name goes, wholesale.
        replica.create_collection(CollectionSpec("other", 7, Distance.EUCLID))
        replica.create_snapshot("other")
        state = replica.install_snapshot_file(tar, "other")
        assert (state.spec.dimension, state.point_count) == (3, 4)
        assert replica.list_snapshots("other") == []
        found = replica.retrieve("other", ["c"], with_payload=True, with_vector=True)
        assert found[0].payload == {"k": "c"}
        np.testing.assert_array_equal(found[0].vector, vectors[2])
    finally:
        primary.close()
        replica.close()

    # Installed collections open again.
    replica = EdgeBackend(tmp_path / "replica")
    try:
        assert [s.name for s in replica.list_collections()] == ["docs", "docs_copy", "other"]
        assert replica.count("other") == 4
    finally:
        replica.close()


SPEC_JSON = json.dumps(spec_to_json(CollectionSpec("evil", 2, Distance.DOT))).encode()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


@pytest.mark.parametrize(
    "members",
    [
        [_member("../escape")],
        [_member("collection.json"), _member("shard", tarfile.DIRTYPE), _member("shard/../../x")],
        [_member("collection.json"), _member("shard", tarfile.SYMTYPE, "/etc")],
        [_member("collection.json"), _member("shard", tarfile.DIRTYPE), _member("/abs")],
        [_member("collection.json"), _member("shard/wal", tarfile.SYMTYPE, "../../..")],
        [_member("collection.json")],  # no shard
        [_member("notes.txt")],
    ],
    ids=["parent", "dotdot", "symlink", "absolute", "link-out", "no-shard", "other"],
)
def test_a_hostile_snapshot_file_is_refused(tmp_path, members):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for member in members:
            data = (
                (SPEC_JSON if member.name == "collection.json" else b"x")
                if member.isfile()
                else b""
            )
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    backend = EdgeBackend(tmp_path / "edge")
    try:
        with pytest.raises(ValueError):
            backend.install_snapshot_file(path)
        assert backend.list_collections() == []
        assert leftovers(tmp_path / "edge") == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["edge", "evil.tar"]
    finally:
        backend.close()


def test_a_file_that_is_not_a_tar_is_refused(tmp_path):
    backend = EdgeBackend(tmp_path / "edge")
    try:
        path = tmp_path / "junk.tar"
        path.write_bytes(b"not a tar at all" * 100)
        with pytest.raises(ValueError):
            backend.install_snapshot_file(path)
    finally:
        backend.close()
