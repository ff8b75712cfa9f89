"""Tests for tfbn.finetune.patterns: strict scope patterns on variable paths."""

import pytest

from tfbn.finetune import patterns

PATHS = [
    "backbone/conv1/kernel",
    "backbone/bn1/gamma",
    "backbone/bn1/moving_mean",
    "head/conv1/kernel",
    "head/logits/bias",
]


def test_matching_uses_re_match_prefix_semantics():
    assert patterns.matching(PATHS, ["head/"], "update_part") == [
        "head/conv1/kernel",
        "head/logits/bias",
    ]
    # re.match anchors at the start only: "bn1" does not match "backbone/bn1/...".
    with pytest.raises(ValueError):
        patterns.matching(PATHS, ["bn1"], "update_part")
    assert patterns.matching(PATHS, [r".*/bn1/"], "update_part") == PATHS[1:3]


def test_typo_lists_known_prefixes():
    with pytest.raises(
        ValueError, match=r"`restore_part` pattern 'backbon/'.*'backbone/'.*'head/conv1/'"
    ):
        patterns.matching(PATHS, ["backbon/"], "restore_part")


def test_select_include_minus_exclude_and_empty_include_means_all():
    assert patterns.select(PATHS, [], ["head/"], "a", "b") == PATHS[:3]
    assert patterns.select(PATHS, ["backbone/"], [r"backbone/bn1/"], "a", "b") == [
        "backbone/conv1/kernel"
    ]
    with pytest.raises(ValueError, match="`b` pattern 'nope'"):
        patterns.select(PATHS, [], ["nope"], "a", "b")


def test_known_prefixes_up_to_depth():
    assert patterns.known_prefixes(PATHS, depth=1) == ["backbone/", "head/"]
    assert "backbone/bn1/" in patterns.known_prefixes(PATHS)
    assert patterns.known_prefixes(["flat"]) == ["flat"]


def test_large_models_quote_the_closest_prefixes_first_and_at_most_30():
    paths = [f"block_{i}_expand/kernel" for i in range(100)] + ["Conv_1/kernel"]
    with pytest.raises(ValueError) as error:
        patterns.matching(paths, ["Conv_2"], "update_part")
    message = str(error.value)
    assert "closest: ['Conv_1/'" in message
    assert f"(and {101 - patterns.MAX_QUOTED_PREFIXES} more)" in message
    shown = message.split("known prefixes: ")[1]
    assert shown.count("_expand/") <= patterns.MAX_QUOTED_PREFIXES


def test_flat_model_paths_are_layer_names():
    paths = ["Conv_1/kernel", "Conv_1_bn/gamma", "predictions/kernel", "predictions/bias"]
    assert patterns.select(paths, ["Conv_1", "predictions"], [], "update_part", "freeze_part") == (
        paths
    )
    assert patterns.select(paths, ["Conv_1/", "predictions"], [], "u", "f") == [
        "Conv_1/kernel",
        "predictions/kernel",
        "predictions/bias",
    ]
