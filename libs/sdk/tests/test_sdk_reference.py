"""parse_reference / format_reference: the three forms and what they refuse."""

from __future__ import annotations

import pytest
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh_sdk.reference import format_reference, parse_reference


def test_plain_name_means_newest() -> None:
    reference = parse_reference("churn-model")
    assert reference.model == "churn-model"
    assert reference.WhichOneof("selector") is None


def test_version() -> None:
    reference = parse_reference("churn/12")
    assert (reference.model, reference.WhichOneof("selector"), reference.version) == (
        "churn",
        "version",
        12,
    )


def test_alias() -> None:
    reference = parse_reference("churn@champion-2")
    assert (reference.model, reference.WhichOneof("selector"), reference.alias) == (
        "churn",
        "alias",
        "champion-2",
    )


def test_one_letter_alias_and_largest_version() -> None:
    assert parse_reference("ab@c").alias == "c"
    assert parse_reference(f"ab/{2**63 - 1}").version == 2**63 - 1


@pytest.mark.parametrize("text", ["churn", "churn/3", "churn@champion", "a1-b2/9"])
def test_format_is_the_inverse(text: str) -> None:
    assert format_reference(parse_reference(text)) == text


def test_format_of_built_references() -> None:
    assert format_reference(ModelReference(model="m1", version=4)) == "m1/4"
    assert format_reference(ModelReference(model="m1", alias="prod")) == "m1@prod"
    assert format_reference(ModelReference(model="m1")) == "m1"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("c", "model name 'c'"),  # too short
        ("Churn", "model name 'Churn'"),
        ("1churn", "model name '1churn'"),
        ("churn_model", "model name"),
        (" churn", "model name"),
        ("a" * 64, "model name"),
        ("churn/", "version ''"),
        ("churn/0", "version '0'"),
        ("churn/-1", "version '-1'"),
        ("churn/+1", "version '+1'"),
        ("churn/01", "version '01'"),
        ("churn/1.5", "version '1.5'"),
        ("churn/latest", "version 'latest'"),
        (f"churn/{2**63}", "out of range"),
        ("churn@", "alias ''"),
        ("churn@Champion", "alias 'Champion'"),
        ("churn@1st", "alias '1st'"),
        ("churn@" + "a" * 64, "alias"),
        ("/3", "model name ''"),
        ("@champion", "model name ''"),
        ("churn/3@champion", "more than one"),
        ("churn@champion/3", "more than one"),
        ("a/b/c", "more than one"),
        ("churn@@x", "more than one"),
    ],
)
def test_bad_references_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_reference(text)
    assert says in str(raised.value)


def test_not_a_string() -> None:
    with pytest.raises(TypeError):
        parse_reference(3)  # type: ignore[arg-type]
