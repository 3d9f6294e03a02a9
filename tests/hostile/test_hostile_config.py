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
