"""No two installed distributions in the services' environment ship the same
module. Where two do (xds-protos and opentelemetry-proto both shipped
opentelemetry/proto/.../common_pb2.py), which copy is on disk depends on the
installer's order: a clean install once kept the older one, and every service
exporting spans failed to start."""

from __future__ import annotations

from collections import defaultdict
from importlib import metadata


def test_no_module_is_shipped_by_two_distributions():
    owners: dict[str, set[str]] = defaultdict(set)
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        for path in dist.files or []:
            text = str(path)
            if text.endswith(".py") and not text.endswith("__init__.py") and ".." not in text:
                owners[text].add(name.lower())
    shared = {path: sorted(names) for path, names in owners.items() if len(names) > 1}
    assert not shared, f"modules shipped by several distributions: {sorted(shared.items())[:20]}"
