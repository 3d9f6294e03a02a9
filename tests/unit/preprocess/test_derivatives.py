"""The BIDS-derivatives dataset: layout, links, sidecars, and the official validator."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medtx.data.bids_validation import errors, validate, validator_command
from medtx.errors import MedtxError
from medtx.preprocess.derivatives import IMAGES, TRANSFORM, build_derivatives, scan_folder
from medtx.workflow.paths import t1_outputs

needs_validator = pytest.mark.skipif(
    validator_command() is None, reason="bids-validator-deno is not installed"
)
SCANS = ("sub-a01", "sub-b02_ses-m12", "sub-a01_run-2")


def _nifti(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.full((4, 5, 4), value, np.float32), np.eye(4))
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


@pytest.fixture
def cohort(tmp_path: Path) -> dict:
    """Working folders of three scans as the chain leaves them, their raw BIDS
    dataset and the scan table."""
    raw = tmp_path / "raw"
    rows, records = [], []
    for i, scan in enumerate(SCANS):
        t1 = raw / scan_folder(scan) / f"{scan}_T1w.nii.gz"
        _nifti(t1, i)
        work = t1_outputs(tmp_path / "work" / scan, scan)
        for path in work.values():
            if path.endswith(".nii.gz"):
                _nifti(Path(path), i + 1)
        Path(work[TRANSFORM]).write_text("#Insight Transform File V1.0\n")
        Path(work["qc_png"]).write_bytes(b"\x89PNG\r\n\x1a\n")
        Path(work["provenance"]).write_text("{}")
        records.append(work["provenance"])
        rows.append({"dataset": "d", "scan": scan, "t1": str(t1), "status": "ok"})
    table = tmp_path / "d.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return {"raw": raw, "records": records, "table": table, "out": tmp_path / "deriv"}


def _build(c: dict, **kw) -> Path:
    args = {"source_root": c["raw"], "factor": 2, "code": "c0de"} | kw
    return build_derivatives("d", c["records"], c["table"], c["out"], **args)


def test_layout_links_and_sidecars(cohort):
    out = _build(cohort)
    anat = out / "sub-b02/ses-m12/anat"
    preproc = anat / Path(t1_outputs(".", "sub-b02_ses-m12")["preproc"]).name
    work = t1_outputs(Path(cohort["records"][1]).parent, "sub-b02_ses-m12")
    # a hard link to the working folder's file, not a copy
    assert preproc.stat().st_ino == os.stat(work["preproc"]).st_ino
    side = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
    assert side["SkullStripped"] is True and "2 mm" in side["Resolution"]
    assert side["Sources"] == [f"bids::sub-b02/ses-m12/anat/{Path(work['n4']).name}"]
    brain = anat / Path(work["bet_brain"]).name
    side = json.loads(brain.with_name(brain.name.replace(".nii.gz", ".json")).read_text())
    raw_uri = "bids:raw:sub-b02/ses-m12/anat/sub-b02_ses-m12_T1w.nii.gz"
    assert side["Sources"] == [raw_uri] and side["SpatialReference"] == raw_uri
    mask = anat / Path(work["bet_mask"]).name
    assert json.loads(mask.with_suffix("").with_suffix(".json").read_text())["Type"] == "Brain"
    # intermediates stay in the working folder; the QC strip goes to figures/
    assert not (anat / Path(work["flirt_brain"]).name).exists()
    assert (out / "sub-b02/ses-m12/figures/sub-b02_ses-m12_qc.png").is_file()
    assert len(list((out / "sub-a01/anat").glob("*.nii.gz"))) == 2 * len(IMAGES)  # two runs
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "medtx"
    assert desc["GeneratedBy"][0]["CodeHash"] == "c0de"
    assert desc["DatasetLinks"]["raw"] == cohort["raw"].resolve().as_uri()


def test_table_listed_dataset_cites_files(cohort):
    out = _build(cohort, source_root=None)
    brain = next((out / "sub-a01/anat").glob("sub-a01_desc-brain_T1w.json"))
    assert json.loads(brain.read_text())["Sources"][0].startswith("file:///")
    assert "SourceDatasets" not in json.loads((out / "dataset_description.json").read_text())


def test_a_missing_image_is_named(cohort):
    victim = Path(t1_outputs(Path(cohort["records"][0]).parent, SCANS[0])["n4"])
    victim.unlink()
    record = re.escape(str(cohort["records"][0]))
    with pytest.raises(
        MedtxError,
        match=f"{victim.name}: missing \\(scan {SCANS[0]} of .*\\); run again with"
        f" --forcerun {record}:",
    ):
        _build(cohort)


@needs_validator
def test_the_official_validator_passes(cohort):
    out = _build(cohort)
    assert errors(validate(out)) == []
    # and it does check: without .bidsignore the ITK transforms are not BIDS files
    (out / ".bidsignore").unlink()
    codes = {(f.code, Path(f.location).suffix) for f in errors(validate(out))}
    assert ("NOT_INCLUDED", ".mat") in codes
