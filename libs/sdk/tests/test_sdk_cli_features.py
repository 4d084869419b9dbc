"""`mlmesh features`: a folder of definitions becomes one document; replies
print as one line per change or entity."""

from __future__ import annotations

import pytest
import yaml
from google.protobuf import struct_pb2
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh_sdk import cli_features
from mlmesh_sdk.cli import build_parser, summary


def test_a_folder_of_yaml_files_is_joined_section_by_section(tmp_path):
    (tmp_path / "a_entities.yaml").write_text("entities:\n  - {name: user, join_key: user_id}\n")
    (tmp_path / "b_views.yml").write_text(
        "entities:\n  - {name: shop, join_key: shop_id}\nfeature_views: []\n"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    joined = yaml.safe_load(cli_features.read_repo(tmp_path))
    assert [e["name"] for e in joined["entities"]] == ["user", "shop"]
    assert "feature_views" not in joined  # empty sections are left out
    (tmp_path / "c_bad.yaml").write_text("models: []\n")
    with pytest.raises(ValueError, match="unknown section 'models'"):
        cli_features.read_repo(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.yaml files"):
        cli_features.read_repo(empty)


def test_replies_print_one_line_per_change_and_per_entity():
    applied = rpc.ApplyFeatureDefinitionsResponse(
        revision=3,
        changes=[
            pb.ObjectChange(
                object_type=pb.OBJECT_TYPE_FEATURE_VIEW,
                name="user_spend",
                action=pb.CHANGE_ACTION_CREATED,
            ),
            pb.ObjectChange(
                object_type=pb.OBJECT_TYPE_ENTITY, name="user", action=pb.CHANGE_ACTION_UNCHANGED
            ),
        ],
    )
    assert (
        summary(applied) == "created   feature_view user_spend\nrevision 3: 1 changed, 1 unchanged"
    )
    read = rpc.GetOnlineFeaturesResponse(
        feature_names=["spend_1d", "big"],
        rows=[
            pb.FeatureRow(
                values=[
                    pb.FeatureValue(
                        value=struct_pb2.Value(number_value=12.5), status=pb.FEATURE_STATUS_PRESENT
                    ),
                    pb.FeatureValue(status=pb.FEATURE_STATUS_NOT_FOUND),
                ]
            )
        ],
    )
    assert summary(read) == "spend_1d=12.5  big=not_found"


def test_get_takes_a_service_or_features_and_entities():
    args = build_parser().parse_args(["features", "get", "fraud_model", "user_id=1", "user_id=2"])
    assert args.service == "fraud_model" and args.entities == ["user_id=1", "user_id=2"]
    row = cli_features._entity_row("user_id=12345678901234567890,shop=a")
    assert row.join_keys["user_id"].string_value == "12345678901234567890"
    assert row.join_keys["shop"].string_value == "a"
    with pytest.raises(ValueError, match="key=value"):
        cli_features._entity_row("user_id")
