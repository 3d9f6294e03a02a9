"""The one pre-training driver: every backbone's stages reach it through the registry."""

import importlib

import pytest

from medtx.domain import BACKBONES, PRETRAIN_STAGES
from medtx.errors import MedtxError
from medtx.models.registry import backbone
from medtx.train.pretraining import pretrain_stage


@pytest.mark.parametrize("name", BACKBONES)
def test_each_backbone_names_its_stages_in_order(name):
    stages = importlib.import_module(backbone(name).pretraining).STAGES
    assert tuple(stages) == PRETRAIN_STAGES[name]
    # each stage after the first starts from the one before it
    inits = [entry.init_from for entry in stages.values()]
    assert inits == [None, *PRETRAIN_STAGES[name][:-1]]


def test_a_stage_that_needs_init_says_which(tmp_path):
    stages = importlib.import_module(backbone("pumit").pretraining).STAGES
    with pytest.raises(MedtxError, match="mim pre-training needs --init, the tokenizer stage"):
        pretrain_stage(stages, "mim", [], out=tmp_path / "m.pt", config={}, metadata={})


def test_an_unknown_stage_lists_the_known_ones(tmp_path):
    stages = importlib.import_module(backbone("medical_transformer").pretraining).STAGES
    with pytest.raises(MedtxError, match=r"'mim' is not one of \['exemplar', 'masked'\]"):
        pretrain_stage(stages, "mim", [], out=tmp_path / "m.pt", config={}, metadata={})
