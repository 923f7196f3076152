"""rank/alpha pattern keys: PEFT's matching rule, in linear time."""

from __future__ import annotations

import time

import pytest
from peft.utils.other import get_pattern_key

from adapterd.server.adapters.patterns import pattern_key, pattern_value
from adapterd.server.errors import FailedPrecondition

EVIL = "(.|.)*(.|.)*(.|.)*Z"  # catastrophic backtracking for Python's re on any name without a Z

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.1.mlp.down_proj",
           "model.layers.2.self_attn.v_proj", "lm_head"]
KEYS = [["q_proj"], ["layers.1.mlp.down_proj", "down_proj"], [r"model\.layers\.1\d*\.self_attn\.q_proj"],
        ["self_attn.v_proj", "v_proj"], ["layers.0.self_attn.q_proj", "q_proj"], ["^model.*q_proj"],
        ["mlp|self_attn.q_proj"], ["proj"], ["layers\\.[0-2]\\..*"], ["a)|(q_proj"]]


@pytest.mark.parametrize("keys", KEYS)
def test_keys_match_as_peft_matches_them(keys):
    for module in MODULES:
        assert pattern_key(keys, module) == get_pattern_key(keys, module), (keys, module)


def test_the_backtracking_key_is_matched_in_linear_time():
    module = "model.layers.0.self_attn.q_proj" * 20
    started = time.monotonic()
    for _ in range(100):
        assert pattern_key([EVIL, "q_proj"], module) == "q_proj"
        assert pattern_value({EVIL: 4.0}, module, 8.0) == 8.0
        assert pattern_value({EVIL: 4.0}, module + "Z", 8.0) == 4.0
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("key", [r"(a)\1", "(?=q)q_proj", "(?<!k)q_proj", "x" * 5000, "("])
def test_keys_re2_cannot_match_are_refused_naming_the_field(key):
    with pytest.raises(FailedPrecondition) as err:
        pattern_value({key: 4.0}, MODULES[0], 8.0, "alpha_pattern")
    assert "alpha_pattern" in str(err.value)


def test_non_string_keys_and_non_object_patterns_are_refused():
    with pytest.raises(FailedPrecondition, match="alpha_pattern"):
        pattern_value({1: 4.0}, MODULES[0], 8.0, "alpha_pattern")  # type: ignore[dict-item]
    with pytest.raises(FailedPrecondition, match="alpha_pattern"):
        pattern_value(["q_proj"], MODULES[0], 8.0, "alpha_pattern")  # type: ignore[arg-type]
