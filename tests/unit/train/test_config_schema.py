"""The config schema's training block and medtx.train.config agree on keys, defaults and bounds.

Both sides are read, never copied here: the bounds come from the schema's
``$defs/training`` and are probed at their edges against the schema
(``validate_config``) and the code (``resolve_config``), so a bound changed on one
side only fails a test.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from medtx.config import _fill_defaults, load_config, load_schema, validate_config
from medtx.domain import BACKBONES
from medtx.errors import ConfigError
from medtx.models.registry import REGISTRY
from medtx.train.config import (
    DOWNSAMPLE_MAX,
    MASK_TOKENS,
    MAXIMA,
    POOLINGS,
    REGRESSION_LOSSES,
    defaults,
    resolve_config,
    stage_keys,
)

SCHEMA = load_schema()
TRAINING = SCHEMA["$defs"]["training"]
KEYS = TRAINING["properties"]
STAGE_BLOCKS = ("common", "pretrain", "finetune")
# Set by the workflow itself (stage_config: folds/label_map, the backbone), so not
# a train/* key.
FROM_WORKFLOW = {"label_map", "backbone"}
# The values the code accepts for its string keys.
CODE_CHOICES = {
    "preset": tuple(p for spec in REGISTRY.values() for p in spec.presets),
    "loss_regression": REGRESSION_LOSSES,
    "mask_token": MASK_TOKENS,
    "pooling": POOLINGS,
}
# The schema's one training block serves every backbone: a value passes it when it
# passes some backbone that reads the key (PUMIT's from train/pumit/common).
OWNERS = {key: [b for b in BACKBONES if key in defaults(b)] for key in TRAINING["properties"]}
BASE = load_config()  # the repo's config.yaml, validated and filled


def with_common(key: str, value: Any) -> dict:
    """The repo's config with train/common/<key> set to ``value``."""
    config = copy.deepcopy(BASE)
    config["train"]["common"][key] = value
    return config


def schema_accepts(key: str, value: Any) -> bool:
    try:
        validate_config(with_common(key, value))
    except ConfigError:
        return False
    return True


def code_accepts(key: str, value: Any) -> bool:
    """resolve_config on what the workflow hands a stage (stage_keys' merge), for some
    backbone that reads ``key``."""
    for name in OWNERS[key]:
        config = copy.deepcopy(BASE)
        config["train"].update(finetune={}, pumit={})  # nothing over common's value
        block = config["train"]["common"]
        if name != "medical_transformer":
            block = config["train"].setdefault(name, {}).setdefault("common", {})
        block[key] = value
        stage = "finetune"
        try:
            resolve_config(
                stage_keys(
                    name,
                    stage,
                    config["train"],
                    seed=config["seed"],
                    label_map=config["folds"]["label_map"],
                )
            )
        except ConfigError:
            continue
        return True
    return False


def probes(key: str) -> list[Any]:
    """Values at and just past each bound the schema states, and a few the bounds
    would have to exclude if one side dropped them (negatives, zero, huge, wrong type)."""
    prop = KEYS[key]
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    values: list[Any] = ["text", [1]]
    if "enum" in prop:
        values += [*prop["enum"], *CODE_CHOICES.get(key, ()), "not_a_choice", 1]
    if "boolean" in types:
        values += [True, False, 0, 1]
    if "null" in types:
        values.append(None)
    if "integer" in types:
        values += [-1, 0, 1, 2, 10**6, 1.5, True]
        step = {"minimum": -1, "maximum": 1, "exclusiveMinimum": 1, "exclusiveMaximum": -1}
        for bound, away in step.items():
            if bound in prop:
                values += [prop[bound], prop[bound] + away, prop[bound] - away]
    if "number" in types:
        values += [-1.0, 0, 0.5, 1, 1.5, 1e6, True]
        toward = {
            "minimum": -math.inf,
            "maximum": math.inf,
            "exclusiveMinimum": math.inf,
            "exclusiveMaximum": -math.inf,
        }
        for bound, direction in toward.items():
            if bound in prop:
                edge = float(prop[bound])
                values += [edge, math.nextafter(edge, direction), math.nextafter(edge, -direction)]
    unique = []
    for v in values:  # 1 == 1.0 == True: keep each once, by type and value
        if not any(type(v) is type(u) and v == u for u in unique):
            unique.append(v)
    return unique


CASES = [pytest.param(key, value, id=f"{key}={value!r}") for key in KEYS for value in probes(key)]


@pytest.mark.parametrize("key,value", CASES)
def test_schema_and_code_accept_the_same_values(key, value):
    schema, code = schema_accepts(key, value), code_accepts(key, value)
    assert schema == code, (
        f"train/common/{key}={value!r}: the schema {'accepts' if schema else 'rejects'} it, "
        f"resolve_config {'accepts' if code else 'rejects'} it"
    )


def test_schema_declares_exactly_the_codes_keys():
    every = set().union(*(defaults(b) for b in BACKBONES))
    assert set(KEYS) == every - FROM_WORKFLOW
    undocumented = sorted(k for k, p in KEYS.items() if not p.get("description"))
    assert not undocumented, f"training keys without a description: {undocumented}"


@pytest.mark.parametrize("key", sorted(KEYS))
def test_schema_defaults_are_the_codes(key):
    """The code's DEFAULTS is the one definition: the schema may not state another one,
    and the code's default must pass both checks."""
    for name in OWNERS[key]:
        default = defaults(name)[key]
        if "default" in KEYS[key]:
            assert KEYS[key]["default"] == default
        assert schema_accepts(key, default)
        assert code_accepts(key, default)


def test_every_training_integer_has_the_codes_upper_bound():
    """The schema's maxima are the code's (MAXIMA, DOWNSAMPLE_MAX), and no integer key
    is left without one: 10^9 epochs were once accepted by both."""
    integers = {k for k, p in KEYS.items() if "integer" in p["type"]}
    assert {k: KEYS[k].get("maximum") for k in integers} == {**MAXIMA, "downsample": DOWNSAMPLE_MAX}


def test_the_top_level_seed_stays_within_the_training_seeds_bound():
    """Stages take the top-level seed unless train/*/seed is set: the schema may not
    accept one there that resolve_config refuses."""
    assert SCHEMA["properties"]["seed"]["maximum"] == MAXIMA["seed"]
    assert KEYS["seed"]["maximum"] == MAXIMA["seed"]


def test_schema_fills_no_training_key():
    """Filled defaults at each level would hide common's values and the top-level seed."""
    config = copy.deepcopy(BASE)
    config["train"] = {}
    validate_config(config)
    assert {block: config["train"][block] for block in STAGE_BLOCKS} == {
        block: {} for block in STAGE_BLOCKS
    }


def test_the_training_block_is_written_once():
    train = SCHEMA["properties"]["train"]["properties"]
    for block in STAGE_BLOCKS:
        assert train[block].get("$ref") == "#/$defs/training", block
        assert "properties" not in train[block], f"train/{block} repeats the training keys"


@pytest.mark.parametrize("block", STAGE_BLOCKS)
def test_unknown_training_key_is_rejected_by_both(block):
    config = copy.deepcopy(BASE)
    config["train"][block]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=rf"'train/{block}': .*'learning_rate' was unexpected"):
        validate_config(config)
    with pytest.raises(ConfigError, match="unknown training config key"):
        resolve_config({"learning_rate": 1e-3})


def test_bad_value_in_a_stage_block_names_its_path():
    config = copy.deepcopy(BASE)
    config["train"]["finetune"]["patience"] = 0
    with pytest.raises(ConfigError, match=r"'train/finetune/patience': 0 is less than"):
        validate_config(config)


def test_fill_defaults_follows_local_refs():
    schema = {
        "$defs": {"block": {"type": "object", "properties": {"x": {"default": 1}}}},
        "properties": {"a": {"$ref": "#/$defs/block", "default": {}}},
    }
    config: dict = {}
    _fill_defaults(config, schema)
    assert config == {"a": {"x": 1}}
