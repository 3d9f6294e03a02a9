"""The study's vocabulary is written once in medtx.domain; the schema's enums agree."""

import numpy as np
import pytest

from medtx import domain
from medtx.config import load_schema
from medtx.models.registry import REGISTRY


def test_schema_enums_list_the_domain_names():
    schema = load_schema()
    dataset = schema["properties"]["datasets"]["additionalProperties"]["properties"]
    role_list = dataset["role"]["oneOf"]
    assert role_list[0]["enum"] == role_list[1]["items"]["enum"]
    assert set(role_list[0]["enum"]) == set(domain.DATASET_ROLES)
    train = schema["properties"]["train"]["properties"]
    assert set(train["inits"]["items"]["enum"]) == set(domain.INITS)
    assert set(train["inits"]["default"]) == set(domain.INITS)
    folds = schema["properties"]["folds"]["properties"]
    assert tuple(folds["fractions"]["default"]) == domain.FRACTIONS
    assert folds["label_map"]["default"] == domain.DEFAULT_LABEL_MAP
    brats = schema["properties"]["preprocess"]["properties"]["brats"]["properties"]
    assert tuple(brats["modalities"]["default"]) == domain.BRATS_MODALITIES
    assert set(brats["modalities"]["items"]["enum"]) == set(domain.BRATS_MODALITIES)
    preset = schema["$defs"]["training"]["properties"]["preset"]
    assert set(preset["enum"]) == {p for spec in REGISTRY.values() for p in spec.presets}
    assert set(train["backbones"]["items"]["enum"]) == set(domain.BACKBONES) == set(REGISTRY)
    assert train["backbones"]["default"] == [domain.DEFAULT_BACKBONE]


def test_regions_nest_and_follow_the_labels():
    labels = np.array([0, 1, 2, 4])
    wt, tc, et = domain.regions_from_labels(labels)
    assert wt.tolist() == [False, True, True, True]
    assert tc.tolist() == [False, True, False, True]
    assert et.tolist() == [False, False, False, True]
    assert domain.REGION_NAMES == ("WT", "TC", "ET")
    with pytest.raises(ValueError, match=r"found \[3\]"):
        domain.regions_from_labels(np.array([0, 3]))


def test_run_identity_is_checked():
    run = domain.RunId("adni", "regression", "notransformer", 30, 2)
    assert run.as_dict() == {
        "dataset": "adni",
        "task": "regression",
        "init": "notransformer",
        "frac": 30,
        "fold": 2,
        "backbone": "medical_transformer",
    }
    assert not run.use_transformer and domain.RunId(**run.as_dict()) == run
    with pytest.raises(ValueError, match="task 'diagnosis'.*fraction 0"):
        domain.RunId("adni", "diagnosis", "scratch", 0, 1)


def test_the_models_task_type_and_heads_cover_the_tasks():
    from typing import get_args

    from medtx.models.slice_transformer import TASK_DEFAULTS, Task

    assert get_args(Task) == domain.TASKS
    assert tuple(TASK_DEFAULTS) == domain.TASKS
