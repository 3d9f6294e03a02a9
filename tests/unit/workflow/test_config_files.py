"""Which config is in effect: a command-line config naming datasets replaces the demo."""

import pytest

from medtx.errors import ConfigError
from medtx.workflow.config_files import use_config_in_effect

DEMO = {"datasets": {"demo_adni": {"kind": "bids"}}, "train": {"finetune": {"epochs": 6}}}


def test_a_config_naming_datasets_replaces_the_demo_whole(tmp_path):
    mine = tmp_path / "my.yaml"
    mine.write_text("datasets:\n  adni: {kind: csv, path: a.csv, role: [regression]}\n")
    merged = {**DEMO, "datasets": {**DEMO["datasets"], "adni": {"kind": "csv"}}}
    cli = {"datasets": {"adni": {"kind": "csv"}}}
    config = dict(merged)
    line = use_config_in_effect(config, [str(mine)], cli, [str(mine), "config.yaml"])
    assert config == cli  # no demo dataset, and none of the demo's small sizes
    assert line.endswith("the demo's config.yaml is not used); datasets: adni")


def test_a_config_without_datasets_extends_the_demo(tmp_path):
    seed = tmp_path / "seed.yaml"
    seed.write_text("seed: 7\n")
    config = {**DEMO, "seed": 7}
    line = use_config_in_effect(config, [str(seed)], {"seed": 7}, [str(seed), "config.yaml"])
    assert config == {**DEMO, "seed": 7}
    assert line == f"medtx: config config.yaml, {seed}; datasets: demo_adni"
    assert use_config_in_effect(dict(DEMO), [], None, ["config.yaml"]) == (
        "medtx: config config.yaml; datasets: demo_adni"
    )


def test_an_unreadable_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: cannot read the config file"):
        use_config_in_effect({}, [str(bad)], {}, [])
