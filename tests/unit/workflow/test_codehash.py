"""Code hashes derived from imports: each stage's hash covers what it really runs."""

import importlib
import json
import shutil
import subprocess
import sys

import pytest

from medtx.workflow import codehash
from tests.conftest import REPO

STAGES = sorted(codehash.STAGE_ENTRIES)


def closure_files(stage):
    return {f.removeprefix("medtx/") for f in codehash.stage_files(stage)}


@pytest.mark.parametrize("stage", STAGES)
def test_hash_covers_every_module_importing_the_stage_loads(stage):
    """What Python really loads when a stage's entry modules are imported (a fresh
    interpreter) is inside the stage's hash; so is every medtx import in those files."""
    entries = codehash.STAGE_ENTRIES[stage]
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(entries)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'medtx')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout))
    covered = set(codehash.closure(entries))
    assert loaded <= covered, sorted(loaded - covered)
    assert set(entries) <= covered
    for module in covered:  # closed under import, including imports inside functions
        assert codehash.imported_modules(module) <= covered, module


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of medtx/ that the hashes read instead of the checkout's."""
    pkg = tmp_path / "medtx"
    shutil.copytree(codehash.PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codehash, "PACKAGE", pkg)
    codehash.code_hash.cache_clear()
    codehash.closure.cache_clear()
    codehash.imported_modules.cache_clear()
    yield pkg
    codehash.code_hash.cache_clear()
    codehash.closure.cache_clear()
    codehash.imported_modules.cache_clear()


def hashes():
    codehash.code_hash.cache_clear()
    codehash.closure.cache_clear()
    codehash.imported_modules.cache_clear()
    return {s: codehash.code_hash(s) for s in STAGES}


def changed_by(pkg, rel, text="\n"):
    before = hashes()
    (pkg / rel).write_text((pkg / rel).read_text() + text)
    after = hashes()
    return {s for s in STAGES if before[s] != after[s]}


def test_an_edit_deep_in_extraction_changes_the_steps_that_run_it(package_copy):
    # the ants extraction reaches intensity.py through antsio.at_resolution; predict
    # preprocesses raw scans through the same chain (`medtx predict` outside the rules);
    # the BIDS derivatives record the chain's hash as their GeneratedBy; defacing
    # registers the head to find its face (medtx.share.deface.head_orientation); the
    # one-job-per-scan chain runs them all
    assert changed_by(package_copy, "preprocess/intensity.py") == {
        "chain",
        "deface",
        "bet",
        "flirt",
        "n4",
        "pool_normalize",
        "brats",
        "derivatives",
        "predict",
    }


def test_an_evaluation_only_module_changes_the_evaluation_hash_alone(package_copy):
    assert changed_by(package_copy, "evaluate/figures.py") == {"evaluate"}
    assert changed_by(package_copy, "evaluate/tables.py") == {"evaluate"}


def test_a_shared_module_changes_every_stage_that_imports_it(package_copy):
    assert changed_by(package_copy, "errors.py") == set(STAGES)
    training = {"pretrain", "pretrain_pumit", "finetune", "evaluate", "predict"}
    # the registry builds both backbones, so every training stage imports both
    assert changed_by(package_copy, "models/slice_transformer.py") == training
    assert changed_by(package_copy, "models/pumit/tokenizer.py") == training
    assert changed_by(package_copy, "train/mim.py") == {"pretrain_pumit"}


def test_a_template_edit_changes_the_stages_that_render_it(package_copy):
    """Templates are code: the report's page reruns the report, a card's reruns evaluation."""
    report = changed_by(package_copy, "provenance/templates/report.html.j2")
    assert "report" in report and "finetune" not in report, report
    cards = changed_by(package_copy, "evaluate/templates/model_card.md.j2")
    assert "evaluate" in cards and "report" not in cards and "bet" not in cards, cards


def test_a_new_import_is_covered_without_listing_it(package_copy):
    assert "evaluate/figures.py" not in closure_files("n4")
    n4 = package_copy / "preprocess/n4.py"
    n4.write_text(n4.read_text() + "\n\ndef _plot():\n    from medtx.evaluate import figures\n")
    hashes()
    assert "evaluate/figures.py" in closure_files("n4")
    assert "evaluate/__init__.py" in closure_files("n4")  # the package runs on import
    assert changed_by(package_copy, "evaluate/figures.py") >= {"n4", "evaluate"}


def test_relative_imports_resolve(package_copy):
    (package_copy / "folds/extra.py").write_text("from ..evaluate import tables\n")
    manifest = package_copy / "folds/manifest.py"
    manifest.write_text(manifest.read_text() + "\nfrom . import extra  # noqa\n")
    hashes()
    assert {"folds/extra.py", "evaluate/tables.py"} <= closure_files("folds")


def test_unknown_stage_and_missing_module_are_named():
    with pytest.raises(KeyError, match="known"):
        codehash.code_hash("nope")
    with pytest.raises(KeyError, match="medtx.nothing"):
        codehash.closure(("medtx.nothing",))


def test_the_command_line_is_in_no_hash_and_each_step_is_its_own_entry():
    from medtx import cli

    assert all("cli.py" not in closure_files(s) for s in STAGES)
    for step in cli.STEPS:  # `medtx step` runs the first entry module of the step's stage
        module = codehash.STAGE_ENTRIES[step][0]
        assert callable(importlib.import_module(module).run_step), module


def test_every_rule_names_a_known_stage():
    import re

    used = set()
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        used |= set(re.findall(r'code_hash\("(\w+)"\)', smk.read_text()))
    assert used == set(STAGES)


def test_exporting_reruns_nothing_and_the_bundle_format_its_readers(package_copy):
    """`medtx export` is no rule's; the bundle format is read by the firewall (received
    encoders' subject digests), fine-tuning from one, and the predict rule."""
    assert changed_by(package_copy, "share/export.py") == set()
    assert changed_by(package_copy, "predict/run.py") == {"predict"}
    assert changed_by(package_copy, "bundle.py") == {"firewall", "finetune", "predict"}
    assert "models/registry.py" not in closure_files("firewall")
