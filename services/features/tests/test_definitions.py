"""The feature DSL: what it accepts, and every kind of bad definition
refused with a violation on its path and its line:column."""

from __future__ import annotations

import pytest
from features_fixtures import GOOD
from mlmesh_chassis.errors import InvalidArgument
from mlmesh_features import expressions as ex
from mlmesh_features.definitions import parse


def violations(source: str) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as raised:
        parse(source)
    return {v.field: v.description for v in raised.value.violations}


def test_a_good_document_parses_into_views_and_services():
    defs = parse(GOOD)
    spend = defs.feature_views["user_spend"]
    assert spend.windowed and spend.feature_types() == {
        "spend_1d": "double",
        "purchases_1h": "int64",
        "categories_1d": "int64",
    }
    assert [f.name for f in defs.feature_views["user_purchases"].row_order()] == ["doubled", "big"]
    assert defs.feature_services["fraud_model"].features == (
        ("user_spend", "spend_1d"),
        ("user_purchases", "doubled"),
        ("user_purchases", "big"),
    )


def test_unknown_columns_type_mismatches_and_duplicates_are_each_named():
    bad = (
        GOOD.replace('expression: "amount * 2"', 'expression: "amout * 2"')
        .replace(
            "column: category, window: 1d}",
            "column: category, window: 1d}\n"
            "      - {name: spend_1d, function: sum, column: category, window: 1d}",
        )
        .replace("{name: purchases_1h, function: count", "{name: purchases_1h, function: median")
    )
    found = violations(bad)
    assert found["feature_views[0].features[0].expression"].endswith("unknown column 'amout'")
    assert "sum needs a number, not string" in found["feature_views[1].aggregations[3].column"]
    assert "one of count" in found["feature_views[1].aggregations[1].function"]
    # line:column of the bad value in the source
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "amout" in text)
    assert found["feature_views[0].features[0].expression"].startswith(f"{line}:")


def test_a_cycle_between_row_features_is_refused():
    bad = GOOD.replace('expression: "amount * 2"', 'expression: "big + 1"').replace(
        'expression: "doubled > 200"', 'expression: "doubled > 2"'
    )
    found = violations(bad)
    assert "cycle: doubled -> big -> doubled" in found["feature_views[0].features[0].expression"]


def test_an_expression_type_must_match_its_declared_type():
    found = violations(GOOD.replace("{name: big, type: bool", "{name: big, type: string"))
    assert found["feature_views[0].features[1].type"].endswith("the expression is bool, not string")


def test_names_sections_and_references_are_checked():
    found = violations(
        GOOD.replace("name: user_spend", "name: User-Spend\n")
        .replace("fraud_model, features: [", 'fraud_model, features: ["nope:x", ')
        .replace("entities:\n  - {name: user", "extras: 1\nentities:\n  - {name: user")
    )
    assert "is not a name" in found["feature_views[1].name"]
    assert "unknown feature view 'nope'" in found["feature_services[0].features[0]"]
    assert "unknown section" in found["extras"]


def test_entity_join_keys_must_be_source_columns_of_the_same_type():
    found = violations(GOOD.replace("value_type: int64}", "value_type: string}"))
    assert (
        "is int64 in source 'purchases', string in entity 'user'"
        in found["feature_views[0].entities[0]"]
    )


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "amount.real",
        "[x for x in amount]",
        "lambda: 1",
        "amount[0]",
        "open('f')",
    ],
)
def test_expressions_refuse_everything_but_the_small_language(text):
    with pytest.raises(ex.ExpressionError):
        ex.parse(text)


def test_yaml_aliases_huge_sources_and_deep_nesting_are_refused():
    bomb = "a: &a [1, 2]\nb: *a\n"
    assert "anchors and aliases" in violations(bomb)["source"]
    assert "larger than" in violations("#" * (1 << 20 + 1))["source"]
    deep = "entities: " + "[" * 40 + "]" * 40
    assert "nested deeper" in violations(deep)["source"]
    assert "not valid YAML" in violations("entities: [\n")["source"]


def test_a_feature_may_pass_a_column_through_under_its_name():
    source = GOOD.replace(
        '{name: doubled, type: double, expression: "amount * 2"}',
        '{name: amount, type: double, expression: "amount"}\n'
        '      - {name: doubled, type: double, expression: "amount * 2"}',
    )
    view = parse(source).feature_views["user_purchases"]
    assert [f.name for f in view.row_order()] == ["amount", "doubled", "big"]
    assert next(f for f in view.features if f.name == "doubled").reads == frozenset()
