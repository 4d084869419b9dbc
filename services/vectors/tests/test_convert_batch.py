"""A SearchBatch's queries converted at once: vectors read from the packed
wire bytes, a repeated filter converted once, every bad query reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import struct_pb2
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_vectors import convert
from mlmesh_vectors.engine.base import CollectionSpec, Distance

SPEC = CollectionSpec(
    name="things", dimension=4, distance=Distance.COSINE, payload_indexes=(("group", "integer"),)
)


def query(vector, group=None) -> rpc.BatchQuery:
    item = rpc.BatchQuery(vector=vector)
    if group is not None:
        item.filter.must.add(key="group", equals=struct_pb2.Value(number_value=group))
    return item


@pytest.mark.parametrize(
    "values", [[], [1.5], [0.1, -2.0, 3.25e-7, 1e30], list(np.linspace(-1, 1, 384))]
)
def test_packed_floats_match_the_field(values):
    point = pb.Point(id="p", vector=values)
    point.payload.update({"note": "x" * 300})  # other fields are skipped
    read = convert.packed_floats(point)
    np.testing.assert_array_equal(read, np.asarray(values, dtype=np.float32))
    assert read.dtype == np.float32


def test_a_batch_is_one_matrix_and_a_repeated_filter_one_object():
    items = [query([1, 0, 0, 0], 3), query([0, 1, 0, 0], 3), query([0, 0, 1, 0])]
    vectors, filters = convert.batch_queries_of(items, SPEC)
    np.testing.assert_array_equal(vectors, np.eye(4, dtype=np.float32)[:3])
    assert filters[0] is not None and filters[0] is filters[1]
    assert filters[2] is None


def test_every_bad_query_is_reported_in_order():
    items = [
        query([1, 0, 0, 0]),
        query([1, 0, 0]),  # wrong dimension
        query([math.nan, 0, 0, 0]),
        query([0, 0, 0, 0]),  # no direction for cosine
        query([1, 0, 0, 0], group=None),
    ]
    items[4].filter.must.add(key="unindexed", equals=struct_pb2.Value(number_value=1))
    with pytest.raises(InvalidArgument) as raised:
        convert.batch_queries_of(items, SPEC)
    fields = [v.field for v in raised.value.violations]
    assert fields[:3] == ["queries[1].vector", "queries[2].vector", "queries[3].vector"]
    assert fields[3].startswith("queries[4].filter")
