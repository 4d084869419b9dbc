"""A/B arms, sticky by a hash, and the shadow fraction."""

from __future__ import annotations

import hashlib
import random

from mlmesh.registry.v1 import model_pb2


def spread(salt: str, sticky_value: str, buckets: int) -> int:
    """0..buckets-1, the same for the same salt and value on every replica."""
    digest = hashlib.sha256(f"{salt}\0{sticky_value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def bucket(experiment: str, sticky_value: str) -> int:
    """0..99, the same for the same experiment and value on every replica."""
    return spread(experiment, sticky_value, 100)


def choose_arm(experiment: model_pb2.Experiment, sticky_value: str) -> model_pb2.ExperimentArm:
    point = bucket(experiment.name, sticky_value)
    total = 0
    for arm in experiment.arms:
        total += arm.weight
        if point < total:
            return arm
    return experiment.arms[-1]


def mirror(experiment: model_pb2.Experiment | None) -> int:
    """The shadow version to mirror this request to, or 0."""
    if experiment is None or not experiment.HasField("shadow"):
        return 0
    return experiment.shadow.version if random.random() * 100 < experiment.shadow.percent else 0
