"""One contract suite for both storage engines (``backend`` runs each test
on the edge engine and on qdrant-client's local mode)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from mlmesh_vectors.engine.base import (
    FULL_SCAN_THRESHOLD_KB,
    ID_KEY,
    Batch,
    CollectionExists,
    CollectionNotFound,
    CollectionSpec,
    Condition,
    Distance,
    EngineUnavailable,
    Filter,
    PointNotFound,
    Query,
    SearchOptions,
    SnapshotNotFound,
    Unsupported,
    VectorBackend,
    engine_id,
)
from mlmesh_vectors.engine.edge import EdgeBackend
from mlmesh_vectors.engine.remote import CATALOG, RemoteBackend
from qdrant_client import models

THINGS = CollectionSpec(
    name="things",
    dimension=4,
    distance=Distance.EUCLID,
    description="points on a line",
    hnsw_m=8,
    hnsw_ef_construct=64,
    quantization="scalar_int8",
    payload_indexes=(
        ("color", "keyword"),
        ("size", "integer"),
        ("weight", "float"),
        ("fresh", "bool"),
        ("meta.lang", "keyword"),
        ("tags", "keyword"),
    ),
)
N = 20


def payload_of(i: int) -> dict[str, Any]:
    return {
        "color": "red" if i % 2 else "blue",
        "size": i,
        "weight": i / 2,
        "fresh": i % 3 == 0,
        "meta": {"lang": "en" if i < 10 else "fr"},
        "tags": ["a", "b"] if i % 4 == 0 else ["c"],
    }


def vector_of(i: int) -> np.ndarray:
    """Point i lies on the x axis at i: its euclid distance to 0 is i."""
    return np.array([i, 0, 0, 0], np.float32)


def make_batch(indexes: range | list[int], **extra: Any) -> Batch:
    return Batch(
        ids=[f"p{i}" for i in indexes],
        vectors=np.stack([vector_of(i) for i in indexes]),
        payloads=[{**payload_of(i), **extra} for i in indexes],
    )


def things(backend: VectorBackend, n: int = N) -> CollectionSpec:
    spec = backend.create_collection(THINGS)
    assert backend.upsert("things", make_batch(range(n))) == n
    return spec


def ids_of(found: list[Any]) -> list[str]:
    return [item.id for item in found]


def test_collections_are_created_listed_and_deleted(backend):
    before = datetime.now(UTC)
    spec = backend.create_collection(THINGS)
    assert spec.create_time is not None
    assert before - timedelta(seconds=1) <= spec.create_time <= datetime.now(UTC)
    assert replace(spec, create_time=None) == THINGS
    with pytest.raises(CollectionExists):
        backend.create_collection(THINGS)
    # Names starting with '_' are the servicer's own; the backend takes them.
    reserved = backend.create_collection(replace(THINGS, name="_policies", dimension=2))

    assert backend.list_collections() == [reserved, spec]
    state = backend.get_collection("things")
    assert (state.spec, state.point_count, state.indexed_point_count) == (spec, 0, 0)

    assert backend.delete_collection("things") is True
    assert backend.delete_collection("things") is False
    assert backend.list_collections() == [reserved]
    missing: list[Callable[[], Any]] = [
        lambda: backend.get_collection("things"),
        lambda: backend.upsert("things", make_batch([1])),
        lambda: backend.retrieve("things", ["p1"], True, True),
        lambda: backend.delete_ids("things", ["p1"]),
        lambda: backend.count("things"),
        lambda: backend.search("things", [Query(vector_of(0))], SearchOptions()),
        lambda: backend.scroll("things", None, 10, None, False, False),
    ]
    for call in missing:
        with pytest.raises(CollectionNotFound):
            call()
    # The name is free again.
    assert backend.create_collection(THINGS).name == "things"


def test_upsert_replaces_points_with_the_same_id(backend):
    things(backend)
    moved = Batch(
        ids=["p1", "p2"],
        vectors=np.array([[0, 1, 0, 0], [0, 2, 0, 0]], np.float32),
        payloads=[{"color": "green"}, {"color": "green", "size": 99}],
    )
    assert backend.upsert("things", moved) == 2
    assert backend.upsert("things", moved) == 2
    assert backend.count("things") == N
    assert backend.get_collection("things").point_count == N
    found = backend.retrieve("things", ["p1", "p2", "p3"], True, True)
    assert [(r.id, r.payload) for r in found] == [
        ("p1", {"color": "green"}),
        ("p2", {"color": "green", "size": 99}),
        ("p3", payload_of(3)),
    ]
    np.testing.assert_array_equal(found[0].vector, [0, 1, 0, 0])
    np.testing.assert_array_equal(found[2].vector, vector_of(3))


def test_retrieve_keeps_the_order_asked_and_leaves_out_unknown_ids(backend):
    things(backend)
    found = backend.retrieve("things", ["p7", "nobody", "p2"], with_payload=True, with_vector=True)
    assert ids_of(found) == ["p7", "p2"]
    assert found[0].payload == payload_of(7)  # without ID_KEY
    assert ID_KEY not in found[1].payload
    assert found[0].vector.dtype == np.float32
    np.testing.assert_array_equal(found[1].vector, vector_of(2))
    bare = backend.retrieve("things", ["p2"], with_payload=False, with_vector=False)
    assert [(r.id, r.payload, r.vector) for r in bare] == [("p2", None, None)]
    assert backend.retrieve("things", [], True, True) == []


def test_points_are_deleted_by_id_and_by_filter(backend):
    things(backend)
    assert backend.delete_ids("things", ["p0", "p1", "p1", "nobody"]) == 2
    assert backend.count("things") == N - 2
    red = Filter(must=(Condition("color", equals="red"),))
    reds_left = sum(1 for i in range(2, N) if payload_of(i)["color"] == "red")
    assert backend.delete_by_filter("things", red) == reds_left
    assert backend.delete_by_filter("things", red) == 0
    assert backend.count("things", red) == 0
    assert backend.count("things") == N - 2 - reds_left
    assert backend.get_collection("things").point_count == N - 2 - reds_left


def eq(key: str, value: Any) -> Condition:
    return Condition(key, equals=value)


# (filter, what it keeps) pairs the counts are checked against.
FILTERS: list[tuple[Filter, Callable[[dict[str, Any]], bool]]] = [
    (Filter(must=(eq("color", "red"),)), lambda p: p["color"] == "red"),
    (Filter(must=(eq("size", 7),)), lambda p: p["size"] == 7),
    (Filter(must=(eq("fresh", True),)), lambda p: p["fresh"]),
    (Filter(must=(eq("fresh", False),)), lambda p: not p["fresh"]),
    (Filter(must=(eq("meta.lang", "fr"),)), lambda p: p["meta"]["lang"] == "fr"),
    (Filter(must=(eq("tags", "b"),)), lambda p: "b" in p["tags"]),
    (Filter(must=(Condition("color", any_of=("red", "pink")),)), lambda p: p["color"] == "red"),
    (Filter(must=(Condition("size", any_of=(1, 2, 3, 50)),)), lambda p: p["size"] in (1, 2, 3)),
    (Filter(must=(Condition("size", gte=5, lt=9),)), lambda p: 5 <= p["size"] < 9),
    (Filter(must=(Condition("weight", gt=2.0, lte=4.5),)), lambda p: 2.0 < p["weight"] <= 4.5),
    (Filter(must_not=(eq("color", "red"),)), lambda p: p["color"] != "red"),
    (
        Filter(must=(eq("color", "blue"), Condition("size", lt=12)), must_not=(eq("fresh", True),)),
        lambda p: p["color"] == "blue" and p["size"] < 12 and not p["fresh"],
    ),
]


@pytest.mark.parametrize("case", range(len(FILTERS)))
def test_count_applies_each_kind_of_condition(backend, case):
    things(backend)
    filter, keeps = FILTERS[case]
    expected = sum(1 for i in range(N) if keeps(payload_of(i)))
    assert 0 < expected < N
    assert backend.count("things", filter) == expected
    assert backend.count("things", None) == N


def test_search_filters_thresholds_and_returns_what_is_asked(backend):
    things(backend)
    origin = vector_of(0)
    [hits] = backend.search("things", [Query(origin, k=5)], SearchOptions())
    assert ids_of(hits) == ["p0", "p1", "p2", "p3", "p4"]
    assert [h.score for h in hits] == pytest.approx([0, 1, 2, 3, 4], abs=1e-4)
    assert all(h.payload is None and h.vector is None for h in hits)

    red = Filter(must=(eq("color", "red"),))
    not_red_small = Filter(must=(Condition("size", lt=7),), must_not=(eq("color", "red"),))
    some = Filter(must=(Condition("size", any_of=(3, 11, 15)),))
    weights = Filter(must=(Condition("weight", gte=5.0),))
    queries = [
        Query(origin, k=3, filter=red),
        Query(origin, k=10, filter=not_red_small),
        Query(origin, k=10, filter=some),
        Query(origin, k=2, filter=weights),
        # EUCLID: the threshold is the farthest distance kept.
        Query(origin, k=10, score_threshold=2.5),
    ]
    results = backend.search("things", queries, SearchOptions(with_payload=True, with_vector=True))
    assert [ids_of(r) for r in results] == [
        ["p1", "p3", "p5"],
        ["p0", "p2", "p4", "p6"],
        ["p3", "p11", "p15"],
        ["p10", "p11"],
        ["p0", "p1", "p2"],
    ]
    first = results[0][0]
    assert first.payload == payload_of(1)
    np.testing.assert_array_equal(first.vector, vector_of(1))
    exact = SearchOptions(exact=True, hnsw_ef=128)
    assert ids_of(backend.search("things", [Query(origin, k=2)], exact)[0]) == ["p0", "p1"]


@pytest.mark.parametrize("distance", list(Distance), ids=lambda d: d.value)
def test_every_distance_ranks_like_numpy(backend, distance):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    backend.create_collection(CollectionSpec("space", 8, distance))
    backend.upsert("space", Batch([f"v{i}" for i in range(60)], vectors))
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    results = backend.search("space", [Query(q, k=10) for q in queries], SearchOptions())
    for query, hits in zip(queries, results, strict=True):
        scores = _scores(distance, vectors, query)
        best = np.argsort(-scores if distance.higher_is_closer else scores)[:10]
        assert ids_of(hits) == [f"v{i}" for i in best]
        assert [h.score for h in hits] == pytest.approx(scores[best], rel=1e-4, abs=1e-4)


def _scores(distance: Distance, vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    v, q = vectors.astype(np.float64), query.astype(np.float64)
    if distance is Distance.COSINE:
        return (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    if distance is Distance.DOT:
        return v @ q
    if distance is Distance.EUCLID:
        return np.linalg.norm(v - q, axis=1)
    return np.abs(v - q).sum(axis=1)


def test_a_batch_of_searches_answers_each_like_one_search(backend):
    things(backend)
    red = Filter(must=(eq("color", "red"),))
    at = lambda x: np.array([x, 0, 0, 0], np.float32)  # noqa: E731
    queries = [
        Query(at(4.2), k=3),
        Query(at(12.2), k=5, filter=red),
        Query(at(18.6), k=4, score_threshold=2.5),
    ]
    options = SearchOptions(with_payload=True)
    batch = backend.search("things", queries, options)
    alone = [backend.search("things", [q], options)[0] for q in queries]
    assert [[(h.id, h.payload) for h in r] for r in batch] == [
        [(h.id, h.payload) for h in r] for r in alone
    ]
    assert [ids_of(r) for r in batch] == [
        ["p4", "p5", "p3"],
        ["p13", "p11", "p15", "p9", "p17"],
        ["p19", "p18", "p17"],
    ]


def test_recommend_follows_the_average_vector_and_skips_the_examples(backend):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    spec = replace(THINGS, name="recs", dimension=6)
    backend.create_collection(spec)
    payloads = [payload_of(i) for i in range(40)]
    backend.upsert("recs", Batch([f"r{i}" for i in range(40)], vectors, payloads))

    def expected(
        positive: list[int], negative: list[int], keep: Callable[[int], bool]
    ) -> list[str]:
        target = vectors[positive].mean(axis=0)
        if negative:
            target = target + target - vectors[negative].mean(axis=0)
        order = np.argsort(np.linalg.norm(vectors - target, axis=1))
        examples = {*positive, *negative}
        return [f"r{i}" for i in order if i not in examples and keep(i)][:5]

    query = Query(np.zeros(6, np.float32), k=5)
    hits = backend.recommend("recs", ["r1", "r2"], ["r3"], query, SearchOptions())
    assert ids_of(hits) == expected([1, 2], [3], lambda i: True)
    hits = backend.recommend("recs", ["r4"], [], query, SearchOptions(with_payload=True))
    assert ids_of(hits) == expected([4], [], lambda i: True)
    assert hits[0].payload == payload_of(int(hits[0].id[1:]))
    red = replace(query, filter=Filter(must=(eq("color", "red"),)))
    hits = backend.recommend("recs", ["r5", "r7"], ["r9"], red, SearchOptions())
    assert ids_of(hits) == expected([5, 7], [9], lambda i: i % 2 == 1)

    with pytest.raises(PointNotFound) as raised:
        backend.recommend("recs", ["r1", "ghost"], [], query, SearchOptions())
    assert raised.value.point_id == "ghost"
    with pytest.raises(PointNotFound):
        backend.recommend("recs", ["r1"], ["phantom"], query, SearchOptions())


def test_scroll_pages_cover_every_point_once_in_engine_id_order(backend):
    things(backend, n=25)
    seen: list[str] = []
    offset, pages = None, 0
    while True:
        page, offset = backend.scroll("things", offset, 7, None, False, False)
        pages += 1
        assert all(r.payload is None and r.vector is None for r in page)
        seen += ids_of(page)
        if offset is None:
            break
    assert pages == 4
    assert sorted(seen) == sorted(f"p{i}" for i in range(25))
    assert seen == sorted(seen, key=engine_id)

    red = Filter(must=(eq("color", "red"),))
    page, offset = backend.scroll("things", None, 100, red, True, True)
    assert offset is None
    assert sorted(ids_of(page)) == sorted(f"p{i}" for i in range(25) if i % 2)
    assert page[0].payload == payload_of(int(page[0].id[1:]))
    np.testing.assert_array_equal(page[0].vector, vector_of(int(page[0].id[1:])))


def test_a_failed_upsert_changes_nothing_and_its_retry_succeeds(backend):
    things(backend, n=6)
    batch = make_batch(range(3, 9), color="green")  # p3..p5 exist, p6..p8 are new
    calls = []

    def fail() -> None:
        calls.append(1)
        raise RuntimeError("injected engine failure")

    backend.max_points_per_update = 2
    backend.fault_hook = fail
    with pytest.raises(EngineUnavailable):
        backend.upsert("things", batch)
    assert calls == [1]  # the first 2 points were written, then undone
    assert backend.count("things") == 6
    assert backend.retrieve("things", ["p6", "p7", "p8"], True, True) == []
    for record in backend.retrieve("things", ["p3", "p4", "p5"], True, True):
        i = int(record.id[1:])
        assert record.payload == payload_of(i)
        np.testing.assert_array_equal(record.vector, vector_of(i))

    backend.fault_hook = None
    assert backend.upsert("things", batch) == 6
    assert backend.upsert("things", batch) == 6
    assert backend.count("things") == 9
    green = backend.count("things", Filter(must=(eq("color", "green"),)))
    assert green == 6


def test_reads_run_alongside_writes(backend):
    things(backend)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                [hits] = backend.search("things", [Query(vector_of(3), k=3)], SearchOptions())
                assert len(hits) == 3
                backend.count("things")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for round in range(30):
            backend.upsert("things", make_batch(range(N), round=round))
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert errors == []
    assert backend.count("things", Filter(must=(Condition("size", gte=0),))) == N


def test_edge_snapshots_restore_an_earlier_state(edge_backend):
    backend = edge_backend
    things(backend, n=5)
    first = backend.create_snapshot("things")
    assert (first.collection, first.point_count) == ("things", 5)
    assert first.size_bytes < 2_000_000  # not the engine's preallocated zeros (128 MB)
    backend.upsert("things", make_batch(range(5, 10)))
    backend.delete_ids("things", ["p0"])
    second = backend.create_snapshot("things")
    assert second.point_count == 9
    assert backend.list_snapshots("things") == [second, first]

    state = backend.restore_snapshot("things", first.name)
    assert state.point_count == 5
    assert ids_of(backend.retrieve("things", ["p0", "p7"], True, False)) == ["p0"]
    [hits] = backend.search("things", [Query(vector_of(9), k=1)], SearchOptions())
    assert ids_of(hits) == ["p4"]
    # Writes go on after a restore.
    backend.upsert("things", make_batch([7]))
    assert backend.count("things") == 6

    backend.delete_snapshot("things", first.name)
    assert backend.list_snapshots("things") == [second]
    for name in (first.name, "../../collection", "nothing"):
        with pytest.raises(SnapshotNotFound):
            backend.delete_snapshot("things", name)
        with pytest.raises(SnapshotNotFound):
            backend.restore_snapshot("things", name)
    with pytest.raises(CollectionNotFound):
        backend.create_snapshot("ghost")
    assert backend.restore_snapshot("things", second.name).point_count == 9


def test_local_mode_has_no_snapshots(remote_backend):
    things(remote_backend, n=2)
    calls: list[Callable[[], Any]] = [
        lambda: remote_backend.create_snapshot("things"),
        lambda: remote_backend.list_snapshots("things"),
        lambda: remote_backend.restore_snapshot("things", "s"),
        lambda: remote_backend.delete_snapshot("things", "s"),
    ]
    for call in calls:
        with pytest.raises(Unsupported):
            call()


def test_recall_at_10_after_indexing(backend):
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((20, 64))
    points = centers[rng.integers(0, 20, 2000)] + 0.35 * rng.standard_normal((2000, 64))
    points = points.astype(np.float32)
    backend.create_collection(CollectionSpec("recall", 64, Distance.COSINE))
    for start in range(0, 2000, 500):
        ids = [f"x{i}" for i in range(start, start + 500)]
        backend.upsert("recall", Batch(ids, points[start : start + 500]))
    if isinstance(backend, EdgeBackend):
        state = backend.wait_for_indexing("recall")
        assert state.indexed_point_count > 0  # searched through HNSW, not exactly
    else:
        assert isinstance(backend, RemoteBackend)
        state = backend.get_collection("recall")
    assert state.point_count == 2000

    queries = (centers[rng.integers(0, 20, 50)] + 0.35 * rng.standard_normal((50, 64))).astype(
        np.float32
    )
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    truth = np.argsort(-(unit @ queries.T), axis=0)[:10].T
    results = backend.search("recall", [Query(q, k=10) for q in queries], SearchOptions())
    found = sum(
        len({f"x{i}" for i in expected} & set(ids_of(hits)))
        for expected, hits in zip(truth, results, strict=True)
    )
    assert found / (10 * len(queries)) >= 0.95


def test_the_service_searches_small_filters_exactly_by_default(tmp_path):
    """The default full-scan threshold (engine/base.py) reaches the engine's
    config, and a filtered search of an indexed collection then finds the
    exact top 10 of the filter's points."""
    rng = np.random.default_rng(12)
    n, dim = 3000, 64
    centers = rng.standard_normal((20, dim))
    points = centers[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, dim))
    points = points.astype(np.float32)
    groups = rng.integers(0, 10, n)
    backend = EdgeBackend(tmp_path / "edge", indexing_threshold_kb=128)
    try:
        spec = CollectionSpec("scan", dim, Distance.COSINE, payload_indexes=(("group", "integer"),))
        backend.create_collection(spec)
        config = backend._config(spec)
        assert config.hnsw_config.full_scan_threshold == FULL_SCAN_THRESHOLD_KB
        for start in range(0, n, 500):
            rows = range(start, start + 500)
            payloads = [{"group": int(groups[i])} for i in rows]
            ids = [f"x{i}" for i in rows]
            backend.upsert("scan", Batch(ids, points[start : start + 500], payloads))
        assert backend.wait_for_indexing("scan").indexed_point_count > 0
        queries = centers[rng.integers(0, 20, 30)] + 0.35 * rng.standard_normal((30, dim))
        queries = queries.astype(np.float32)
        unit = points / np.linalg.norm(points, axis=1, keepdims=True)
        keep = Filter(must=(Condition("group", equals=3),))
        asked = [Query(q, k=10, filter=keep) for q in queries]
        results = backend.search("scan", asked, SearchOptions())
        for query, hits in zip(queries, results, strict=True):
            scores = np.where(groups == 3, unit @ query, -np.inf)
            assert set(ids_of(hits)) == {f"x{i}" for i in np.argsort(-scores)[:10]}
    finally:
        backend.close()


def test_the_remote_catalog_is_hidden_and_an_orphan_can_be_deleted(remote_backend):
    with pytest.raises(CollectionExists):
        remote_backend.create_collection(replace(THINGS, name=CATALOG))
    # A Qdrant collection without a catalog point (a create that died
    # between its two writes).
    remote_backend._client.create_collection(
        "things", vectors_config=models.VectorParams(size=4, distance=models.Distance.EUCLID)
    )
    assert remote_backend.list_collections() == []
    with pytest.raises(CollectionNotFound):
        remote_backend.get_collection("things")
    with pytest.raises(CollectionExists):
        remote_backend.create_collection(THINGS)
    assert remote_backend.delete_collection("things") is True
    assert remote_backend.create_collection(THINGS).name == "things"
    assert [s.name for s in remote_backend.list_collections()] == ["things"]


def test_an_unreachable_server_is_engine_unavailable():
    backend = RemoteBackend("http://127.0.0.1:1", timeout_s=1)  # nothing listens on port 1
    try:
        calls: list[Callable[[], Any]] = [
            backend.list_collections,
            lambda: backend.create_collection(THINGS),
            lambda: backend.get_collection("things"),
            lambda: backend.upsert("things", make_batch([1])),
            lambda: backend.search("things", [Query(vector_of(0))], SearchOptions()),
        ]
        for call in calls:
            with pytest.raises(EngineUnavailable):
                call()
    finally:
        backend.close()
