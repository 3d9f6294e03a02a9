"""presets/paper.yaml holds the Medical Transformer paper's protocol (Jun et al. 2021,
sections 4.1-4.2), whether it is merged before a user's own config (which replaces
the demo) or over the demo's config.yaml."""

import copy

import nibabel as nib
import pytest
import yaml

from medtx.config import validate_config
from medtx.data.templates import template_path
from medtx.train.config import resolve_config, stage_keys
from medtx.workflow.config_files import use_config_in_effect
from tests.conftest import REPO

PRESET = REPO / "presets" / "paper.yaml"
# What the paper states, with its words.
PAPER = {
    "n_folds": 5,  # "We divided samples to five folds"
    "fractions": [10, 30, 50, 70, 100],  # Table 4
    "input": (96, 114, 96),  # the pooled 1 mm ICBM volume
    "batch_size": 10,  # "mini-batches of 10 samples"
    "lr": 1e-4,  # "Adam optimizer with an initial learning rate of 1e-4"
    "lr_decay": 0.99,  # "a multiplicative decay of 0.99"
    "epochs": 150,  # "for 150 epochs"
    "patience": 30,  # "early stopping of 30 patience"
    "mask_ratio": 0.1,  # "the masking ratio was set 10%"
}


def merge(base, extra):
    """Snakemake's merge of a config file over another: key by key, recursively."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective(with_user_datasets, tmp_path):
    preset = yaml.safe_load(PRESET.read_text())
    files = [str(PRESET)]
    cli = preset
    if with_user_datasets:
        mine = {"datasets": {"adni": {"kind": "csv", "path": "a.csv", "role": ["regression"]}}}
        path = tmp_path / "my.yaml"
        path.write_text(yaml.safe_dump(mine))
        files.append(str(path))
        cli = merge(preset, mine)
    config = merge(yaml.safe_load((REPO / "config.yaml").read_text()), cli)
    use_config_in_effect(config, files, cli, ["config.yaml", *files])
    (tmp_path / "a.csv").touch()
    return validate_config(config)


@pytest.mark.parametrize("with_user_datasets", [True, False], ids=["own-datasets", "over-demo"])
def test_the_paper_preset_is_the_papers_protocol(tmp_path, monkeypatch, with_user_datasets):
    monkeypatch.chdir(tmp_path)
    config = effective(with_user_datasets, tmp_path)
    assert ("demo_adni" in config["datasets"]) is not with_user_datasets
    assert config["folds"]["n_folds"] == PAPER["n_folds"]
    assert config["folds"]["fractions"] == config["train"]["fractions"] == PAPER["fractions"]
    assert config["train"]["gpu"] is True
    assert config["preprocess"]["flirt"]["ants"]["registration_mm"] == 1.0
    template = nib.load(str(template_path("t1_brain"))).shape[:3]
    factor = config["preprocess"]["pool"]["factor"]
    for stage in ("pretrain", "finetune"):
        cfg = resolve_config(
            stage_keys("medical_transformer", stage, config["train"], seed=42, label_map={"CN": 0})
        )
        shape = tuple(s // factor // cfg["downsample"] for s in template)
        assert shape == PAPER["input"], stage
        for key in ("batch_size", "lr", "lr_decay", "epochs", "patience"):
            assert cfg[key] == pytest.approx(PAPER[key]), (stage, key)
        if stage == "pretrain":
            assert cfg["mask_ratio"] == pytest.approx(PAPER["mask_ratio"])
