"""Config mistakes nobody planned for: one line naming the key, before any job.

Issue 12: ``results:`` pointing at a file ended in a NotADirectoryError
traceback from whichever step first wrote there, and a QC range given
backwards (``qc: brain_volume_ml: [2600, 700]``) was accepted and judged
every scan a failure. Both now fail at config validation, naming the key.
"""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import yaml

from medtx.config import DEFAULT_CONFIG, validate_config
from medtx.errors import ConfigError
from tests.conftest import REPO

SNAKEMAKE = str(REPO / ".venv" / "bin" / "snakemake")


def base() -> dict:
    return copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))


def one_line_error(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("qc_range", [[2600, 700], [900, 900]])
def test_qc_range_backwards_names_the_key(qc_range):
    config = base()
    config["qc"]["brain_volume_ml"] = qc_range
    message = one_line_error(config)
    assert message == (
        f"config key 'qc/brain_volume_ml': {qc_range!r} must be [min, max] with min < max"
    )


def test_demo_age_range_backwards_names_the_key():
    config = base()
    config["datasets"]["demo_adni"]["generate"]["age"] = [90, 55]
    message = one_line_error(config)
    assert message.startswith("config key 'datasets/demo_adni/generate/age': [90, 55] must be")


def test_ranges_in_order_pass():
    config = base()
    config["qc"]["brain_volume_ml"] = [800, 2000]
    assert validate_config(config)["qc"]["brain_volume_ml"] == [800, 2000]


def test_results_pointing_at_a_file_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.txt").write_text("keep me")
    config = base()
    config["results"] = "out.txt"
    message = one_line_error(config)
    assert message.startswith("config key 'results': 'out.txt' is a file, not a folder")
    assert (tmp_path / "out.txt").read_text() == "keep me"


def test_results_under_a_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.txt").write_text("keep me")
    config = base()
    config["results"] = "out.txt/run1"
    message = one_line_error(config)
    assert "'out.txt/run1' is under 'out.txt', which is a file, not a folder" in message
    assert (tmp_path / "out.txt").read_text() == "keep me"


def test_results_as_a_broken_link_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "gone", tmp_path / "res")
    config = base()
    config["results"] = "res"
    assert "'res' is a broken link, not a folder" in one_line_error(config)


@pytest.mark.parametrize(
    "value,problem",
    [("", "should be non-empty"), ("res/{dataset}", "does not match")],
)
def test_results_that_cannot_name_a_folder(value, problem):
    config = base()
    config["results"] = value
    message = one_line_error(config)
    assert message.startswith("config key 'results': ") and problem in message


def test_results_folder_that_does_not_exist_yet_is_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = base()
    config["results"] = "new/deeper"
    assert validate_config(config)["results"] == "new/deeper"
    assert not (tmp_path / "new").exists()  # validation makes nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_results_in_a_read_only_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    config = base()
    config["results"] = "ro/results"
    assert "cannot write in 'ro'" in one_line_error(config)


@pytest.mark.integration
def test_snakemake_prints_one_line_for_a_results_file(tmp_path):
    """The workflow stops at parse time with the key, no traceback, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "results").write_text("not a folder")
    config = {
        "results": "results",
        "datasets": {"d": {"kind": "csv", "role": ["pretrain"], "path": "scans.csv"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(work)]
        + ["--configfile", str(tmp_path / "c.yaml"), "--cores", "1", "all"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.strip().splitlines()[-1] == (
        "medtx: error: config key 'results': 'results' is a file, not a folder;"
        " point it at a folder (one is made if missing)"
    )
    assert "Traceback" not in out and 'File "' not in out, out
    assert (work / "results").read_text() == "not a folder"
    made = {p.relative_to(work).parts[0] for p in work.rglob("*")}
    assert made <= {"results", ".snakemake"}, made  # Snakemake's own folder at most


# Issue 31: a results folder inside an input dataset, and training integers of 10^9.


def dataset_config(kind: str, path: str, results: str) -> dict:
    config = base()
    config["datasets"] = {"mine": {"kind": kind, "role": ["pretrain"], "path": path}}
    config["results"] = results
    return config


@pytest.mark.parametrize(
    "results", ["data/mybids", "data/mybids/out", "data/mybids/sub-99", "data/mybids/derivatives"]
)
def test_results_inside_a_bids_dataset_names_the_key_and_the_dataset(
    tmp_path, monkeypatch, results
):
    """The validator flags medtx's files as not BIDS, and a folder named sub-* is read as
    a subject; only derivatives/<pipeline> is a place for outputs in a BIDS dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "mybids").mkdir(parents=True)
    message = one_line_error(dataset_config("bids", "data/mybids", results))
    assert message.startswith(
        f"config key 'results': {results!r} is inside dataset 'mine' ('data/mybids')"
    ), message
    assert "data/mybids/derivatives/<name>" in message


def test_results_reached_through_a_link_into_the_dataset_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "mybids").mkdir(parents=True)
    os.symlink(tmp_path / "data" / "mybids", tmp_path / "outputs")
    message = one_line_error(dataset_config("bids", "data/mybids", "outputs/run1"))
    assert "'outputs/run1' is inside dataset 'mine'" in message


@pytest.mark.parametrize("results", ["data/cases/out", "data/cases/derivatives/medtx"])
def test_results_inside_a_brats_folder_is_refused(tmp_path, monkeypatch, results):
    """The BraTS reader takes every folder in the dataset as a case."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cases").mkdir(parents=True)
    message = one_line_error(dataset_config("brats", "data/cases", results))
    assert message.startswith(f"config key 'results': {results!r} is inside dataset 'mine'")
    assert "every folder there as a case" in message


def test_results_beside_a_csv_table_is_fine(tmp_path, monkeypatch):
    """A CSV dataset is its table: the folder it sits in is not read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scans.csv").write_text("subject,t1\n")
    config = dataset_config("csv", "data/scans.csv", "data/results")
    assert validate_config(config)["results"] == "data/results"


def test_results_under_the_datasets_derivatives_is_allowed_and_stays_valid(tmp_path, monkeypatch):
    """BIDS puts outputs in derivatives/<pipeline>: the official validator and medtx's
    reader skip it, so the dataset reads and validates as before with outputs there."""
    import json

    from medtx.data.bids_validation import errors, validate, validator_command
    from medtx.data.scans import build_scan_table
    from tests.unit.data.test_scans import make_bids

    monkeypatch.chdir(tmp_path)
    root = make_bids(tmp_path / "data" / "mybids")
    description = {"Name": "t", "BIDSVersion": "1.10.0", "DatasetType": "raw"}
    (root / "dataset_description.json").write_text(json.dumps(description))
    results = "data/mybids/derivatives/medtx"
    assert validate_config(dataset_config("bids", "data/mybids", results))["results"] == results
    out = tmp_path / results
    for name in ("scans/mine.tsv", "work/mine/sub-01/sub-01_desc-brain_T1w.nii.gz", ".lock"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("medtx output")
    ds = {"kind": "bids", "role": ["pretrain"], "path": str(root)}
    assert list(build_scan_table("mine", ds)["scan"]) == ["sub-01", "sub-02"]
    if validator_command() is not None:
        assert errors(validate(root)) == []


LIMITS = {  # key -> the most the schema and resolve_train_config accept
    "epochs": 100_000,
    "patience": 100_000,
    "batch_size": 4096,
    "threads": 1024,
    "num_workers": 256,
    "prefetch_factor": 128,
    "log_every": 1_000_000,
    "seed": 2**32 - 1,
}


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_absurd_training_integers_name_the_key_and_the_bound(key):
    """epochs: 1000000000 was accepted (a run that never ends), and a seed of 10^30 went
    on to torch.manual_seed, which raises "Overflow when unpacking long long"."""
    from medtx.train.config import resolve_train_config

    value = 10**30 if key == "seed" else 10**9
    config = base()
    config["train"]["common"][key] = value
    message = one_line_error(config)
    assert message == (
        f"config key 'train/common/{key}': {value} is greater than the maximum of {LIMITS[key]}"
    )
    with pytest.raises(ConfigError, match=rf"{key} must be an integer >= \d and <= {LIMITS[key]}"):
        resolve_train_config({key: value})
    config = base()
    config["train"]["common"][key] = LIMITS[key]
    validate_config(config)  # the bound itself is allowed
    resolve_train_config({key: LIMITS[key]})


def test_the_top_level_seed_has_the_training_seeds_bound():
    """The training stages take the top-level seed unless train/*/seed says otherwise."""
    config = base()
    config["seed"] = 2**32
    assert one_line_error(config) == (
        f"config key 'seed': {2**32} is greater than the maximum of {2**32 - 1}"
    )


def test_a_job_of_a_billion_gpus_names_the_key():
    config = base()
    config["train"]["gpus"] = 10**9
    assert one_line_error(config) == (
        f"config key 'train/gpus': {10**9} is greater than the maximum of 64"
    )
