"""Config validation names the bad key and fills defaults from the schema."""

import copy

import pytest
import yaml

from medtx.config import DEFAULT_CONFIG, load_config, step_params, validate_config
from medtx.errors import ConfigError


def base():
    return copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))


def test_default_config_is_valid_and_filled():
    config = load_config()
    assert config["preprocess"]["n4"]["shrink_factor"] >= 1
    assert config["qc"]["ncc_min"] <= 1
    assert all(isinstance(ds["role"], list) for ds in config["datasets"].values())


def test_defaults_fill_missing_sections():
    config = {"datasets": {"a": {"kind": "bids", "role": "pretrain", "path": "x"}}}
    validate_config(config)
    assert config["preprocess"]["backend"] == "auto"
    assert config["preprocess"]["flirt"]["fsl"]["dof"] == 12
    assert config["preprocess"]["flirt"]["fsl"]["cost"] == "corratio"
    assert config["preprocess"]["pool"]["factor"] == 2
    assert config["on_bad_scan"] == "fail"
    assert config["datasets"]["a"]["role"] == ["pretrain"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c["preprocess"]["n4"].update(shrink_factor=0),
            r"'preprocess/n4/shrink_factor': 0 is less than the minimum of 1",
        ),
        (
            lambda c: c["preprocess"].update(backend="spm"),
            r"'preprocess/backend': 'spm' is not one of \['auto', 'fsl', 'ants'\]",
        ),
        (
            lambda c: c["preprocess"].update(bakend="ants"),
            r"'preprocess': .*'bakend' was unexpected.*allowed keys: backend",
        ),
        (lambda c: c.update(on_bad_scan="skip"), r"'on_bad_scan': 'skip' is not one of"),
        (
            lambda c: c["datasets"]["demo_adni"].update(kind="nii"),
            r"'datasets/demo_adni/kind': 'nii' is not one of",
        ),
        (
            lambda c: c["datasets"]["demo_adni"].pop("path"),
            r"'datasets/demo_adni': 'path' is a required property",
        ),
        (
            lambda c: c["datasets"]["demo_adni"].update(role="diagnosis"),
            r"'datasets/demo_adni/role': 'diagnosis' is not a valid value",
        ),
        (
            lambda c: c["preprocess"]["flirt"]["fsl"].update(dof=8),
            r"'preprocess/flirt/fsl/dof': 8 is not one of \[6, 7, 9, 12\]",
        ),
        (lambda c: c["qc"].update(ncc_min="high"), r"'qc/ncc_min': 'high' is not of type 'number'"),
    ],
)
def test_schema_errors_name_the_key(edit, message):
    config = base()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_all_problems_reported_at_once():
    config = base()
    config["seed"] = -1
    config["preprocess"]["pool"]["factor"] = 9
    with pytest.raises(ConfigError, match=r"2 problem\(s\)") as err:
        validate_config(config)
    assert "'seed'" in str(err.value) and "'preprocess/pool/factor'" in str(err.value)


def test_dataset_names_restricted():
    config = base()
    config["datasets"]["bad name"] = config["datasets"].pop("demo_adni")
    with pytest.raises(ConfigError, match="bad name"):
        validate_config(config)


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_config(path)


def test_registration_schedule_levels_must_match():
    """Two iteration counts against three shrink factors stopped ANTs mid-run."""
    config = base()
    ants = config["preprocess"]["flirt"]["ants"]
    ants.update(
        aff_iterations=[20, 10], aff_shrink_factors=[4, 2, 1], aff_smoothing_sigmas=[2, 1, 0]
    )
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value) == (
        "config key 'preprocess/flirt/ants': one entry per level in each of aff_iterations, "
        "aff_shrink_factors, aff_smoothing_sigmas; got aff_iterations [20, 10], "
        "aff_shrink_factors [4, 2, 1], aff_smoothing_sigmas [2, 1, 0]"
    )


def test_a_step_given_part_of_its_section_runs_with_the_schema_defaults():
    """``medtx step`` called by hand with a partial --params gets what the workflow
    would pass: the keys given, the rest from the schema, other sections untouched."""
    full = load_config()["preprocess"]
    assert step_params("n4", {"shrink_factor": 2}) == {**full["n4"], "shrink_factor": 2}
    bet = step_params("bet", {"ants": {"method": "robex"}})
    assert bet == {"ants": {**full["bet"]["ants"], "method": "robex"}}  # no fsl section added
    both = step_params("pool_normalize", {"pool": {}, "normalize": {"clip_percentile": 99.0}})
    assert both["pool"] == full["pool"] and both["normalize"]["within"] == "brain"
    flirt = step_params("flirt", {"ants": {}})["ants"]
    # the schema's schedule (finest level 1 mm), not the demo config's 2 mm
    assert (flirt["registration_mm"], flirt["aff_shrink_factors"]) == (1.0, [8, 4, 2, 1])
    schedule = ("registration_mm", "aff_iterations", "aff_shrink_factors", "aff_smoothing_sigmas")
    rest = {k: v for k, v in full["flirt"]["ants"].items() if k not in schedule}
    assert {k: v for k, v in flirt.items() if k not in schedule} == rest


def test_the_chain_fills_each_steps_params_as_its_own_step_would():
    """``medtx step chain`` gets every step's params by step name: each filled as that
    step alone is (so a record has one rerun key whichever layout made it), qc as given."""
    parts = {"n4": {"shrink_factor": 2}, "bet": {"ants": {"method": "robex"}}}
    chain = step_params("chain", {**parts, "qc": {"ncc_min": 0.5}})
    assert chain == {
        "n4": step_params("n4", parts["n4"]),
        "bet": step_params("bet", parts["bet"]),
        "qc": {"ncc_min": 0.5},
    }


def test_datasets_inside_results_are_fine_results_inside_a_dataset_are_not(tmp_path, monkeypatch):
    """The demo generates its datasets under results/ (the reverse is harmless); the
    check compares the folders themselves, not their names' prefixes."""
    monkeypatch.chdir(tmp_path)
    config = base()
    assert config["datasets"]["demo_adni"]["path"].startswith(config["results"] + "/")
    validate_config(config)
    config = base()
    config["results"] = "results/demo/adni_out"  # beside results/demo/adni, not in it
    validate_config(config)
    config = base()
    config["results"] = "results/demo/adni/out"
    with pytest.raises(ConfigError, match=r"inside dataset 'demo_adni' \('results/demo/adni'\)"):
        validate_config(config)
