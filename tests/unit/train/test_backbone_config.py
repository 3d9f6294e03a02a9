"""Each backbone's training config: its own keys and defaults, and what the workflow
hands each stage (``stage_keys``) from the config's train blocks."""

from __future__ import annotations

import copy

import pytest

from medtx.config import load_config
from medtx.domain import BACKBONE_INITS, BACKBONES, PRETRAIN_STAGES, RunId
from medtx.errors import ConfigError
from medtx.train.config import BACKBONE_DEFAULTS, STAGE_BLOCKS, resolve_config, stage_keys

TRAIN = {
    "common": {"preset": "table3", "mask_ratio": 0.2, "batch_size": 4, "threads": 1},
    "pretrain": {"epochs": 3},
    "finetune": {"epochs": 6, "lr": 3e-4, "margin": 2.0},
    "pumit": {"common": {"preset": "tiny"}, "mim": {"epochs": 9}, "finetune": {"lr": 1e-3}},
}


def keys(backbone, stage, train=TRAIN):
    return stage_keys(backbone, stage, train, seed=7, label_map={"CN": 0, "AD": 1})


def test_pumit_takes_the_shared_keys_not_the_medical_transformers_own():
    mim = keys("pumit", "mim")
    assert mim["preset"] == "tiny" and mim["epochs"] == 9 and mim["batch_size"] == 4
    assert "mask_ratio" not in mim  # common's 0.2 is the Medical Transformer's
    assert resolve_config(mim)["mask_ratio"] == 0.55  # so PUMIT's default holds
    fine = keys("pumit", "finetune")
    # the shared protocol (epochs) with PUMIT's own override (lr), not the triplet margin
    assert fine["epochs"] == 6 and fine["lr"] == 1e-3 and "margin" not in fine
    assert "epochs" not in keys("pumit", "tokenizer")  # train/pretrain is not PUMIT's
    assert keys("pumit", "tokenizer")["seed"] == 7


def test_the_medical_transformer_ignores_pumits_blocks():
    before = keys("medical_transformer", "finetune")
    changed = copy.deepcopy(TRAIN)
    changed["pumit"]["finetune"]["lr"] = 0.5
    changed["pumit"]["common"]["pooling"] = "mean"
    assert keys("medical_transformer", "finetune", changed) == before
    assert before["lr"] == 3e-4 and before["mask_ratio"] == 0.2 and before["margin"] == 2.0


def test_a_key_of_the_other_backbone_names_its_block():
    bad = copy.deepcopy(TRAIN)
    bad["common"]["diversity"] = 0.5
    with pytest.raises(ConfigError, match=r"train/common: key\(s\) \['diversity'\].*train/pumit"):
        keys("medical_transformer", "pretrain", bad)
    bad = copy.deepcopy(TRAIN)
    bad["pumit"]["mim"]["mask_token"] = "learned"
    with pytest.raises(ConfigError, match=r"train/pumit/mim: key\(s\) \['mask_token'\]"):
        keys("pumit", "mim", bad)
    with pytest.raises(ConfigError, match="no training stage 'pretrain'"):
        keys("pumit", "pretrain")


def test_resolve_config_checks_pumits_keys():
    cfg = resolve_config({"backbone": "pumit", "preset": "tiny"})
    assert cfg["pooling"] == "cls" and cfg["mask_ratio"] == 0.55 and cfg["diversity"] == 1.0
    with pytest.raises(ConfigError, match=r"\['margin'\] belong to another backbone"):
        resolve_config({"backbone": "pumit", "margin": 1.0})
    with pytest.raises(ConfigError, match="preset 'table3' is not one of"):
        resolve_config({"backbone": "pumit", "preset": "table3"})
    with pytest.raises(ConfigError, match="pooling 'max'"):
        resolve_config({"backbone": "pumit", "pooling": "max"})
    with pytest.raises(ConfigError, match="sharpness must be a number >= 0"):
        resolve_config({"backbone": "pumit", "sharpness": -1})


def test_every_backbone_has_defaults_stages_and_inits():
    assert set(BACKBONE_DEFAULTS) == set(STAGE_BLOCKS) == set(BACKBONES)
    assert set(PRETRAIN_STAGES) == set(BACKBONE_INITS) == set(BACKBONES)
    stages = [s for names in PRETRAIN_STAGES.values() for s in names]
    assert len(stages) == len(set(stages))  # one checkpoint name per stage
    with pytest.raises(ValueError, match="init 'notransformer' is not one of"):
        RunId("adni", "classification", "notransformer", 100, 0, "pumit")


def test_the_repo_config_gives_every_stage_a_valid_config():
    config = load_config()
    for backbone in config["train"]["backbones"]:
        for stage in STAGE_BLOCKS[backbone]:
            cfg = resolve_config(
                stage_keys(
                    backbone,
                    stage,
                    config["train"],
                    seed=config["seed"],
                    label_map=config["folds"]["label_map"],
                )
            )
            assert cfg["backbone"] == backbone
