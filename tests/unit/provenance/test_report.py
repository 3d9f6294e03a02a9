"""The cohort provenance report and its methods paragraph."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from medtx.errors import MedtxError
from medtx.io import save_nifti, write_text
from medtx.provenance.records import StepRecord, check, merge_scan
from medtx.provenance.report import build_report, load_scan_records, methods_paragraph
from medtx.provenance.thumbnails import scan_thumbnails

SETTINGS = {
    "backend": "ants",
    "bet": {"fsl": {"frac": 0.5, "robust": True}, "ants": {"type_of_transform": "AffineFast"}},
    "flirt": {
        "fsl": {"dof": 12, "cost": "corratio"},
        "ants": {"type_of_transform": "Affine", "aff_iterations": [2100, 1200, 1200, 10]},
    },
    "n4": {"masked": True, "shrink_factor": 4, "iterations": [50, 50, 50, 50], "tol": 1e-7},
    "pool": {"factor": 2},
    "normalize": {"method": "minmax", "within": "brain"},
    "seed": 42,
    "deterministic": True,
}
VERSIONS = {"medtx": "0.1.0", "antspyx": "0.6.3", "nipype": "1.11.0", "fsl": None}


def make_scan(root, dataset, subject, *, volume_ml=1350.0, thumbnail=True, session=None):
    """A two-step scan (bet, n4) with real files, StepRecords and merge_scan."""
    scan = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    d = root / "results" / "preprocess" / dataset / scan
    rng = np.random.default_rng(len(subject))
    raw = save_nifti(rng.normal(size=(8, 8, 8)), np.eye(4), d / f"{scan}_T1w.nii.gz")
    brain = save_nifti(rng.normal(size=(8, 8, 8)), np.eye(4), d / f"{scan}_desc-brain_T1w.nii.gz")
    n4 = save_nifti(rng.normal(size=(8, 8, 8)), np.eye(4), d / f"{scan}_desc-n4_T1w.nii.gz")

    bet = StepRecord(
        "bet",
        scan=scan,
        backend="ants",
        params={"type_of_transform": "AffineFast"},
        seed=42,
        dataset=dataset,
    )
    bet.set_tool("antspyx", "0.6.3")
    bet.add_input("t1", raw)
    bet.call("ants.registration", type_of_transform="AffineFast")
    bet.call("ants.apply_transforms", interpolator="nearestNeighbor")
    bet.add_output("brain", brain)
    bet.set_qc(
        {"brain_volume_ml": volume_ml},
        [check("brain_volume_ml", volume_ml, minimum=800, maximum=2200)],
    )
    bet.finish(d / "bet.json")

    n4s = StepRecord(
        "n4", scan=scan, backend="ants", params={"shrink_factor": 4}, seed=42, dataset=dataset
    )
    n4s.set_tool("antspyx", "0.6.3")
    n4s.add_input("brain", brain)
    n4s.command("echo 'n4 <quoted> & done'")
    n4s.add_output("n4", n4)
    n4s.set_qc({"bias_max": 1.2}, [check("bias_max", 1.2, maximum=2.0)])
    n4s.finish(d / "n4.json")

    extra = {}
    if thumbnail:
        png = scan_thumbnails([("raw", raw, None)], d / f"{scan}_qc.png")
        extra["thumbnail"] = str(png.relative_to(root))
    return merge_scan(
        [d / "bet.json", d / "n4.json"],
        d / f"{scan}_provenance.json",
        scan=scan,
        dataset=dataset,
        subject=subject,
        session=session,
        extra=extra,
    )


@pytest.fixture
def cohort(tmp_path):
    recs = [
        make_scan(tmp_path, "demo_ixi", "b02"),
        make_scan(tmp_path, "demo_adni", "a01", volume_ml=500.0),  # fails QC
        make_scan(tmp_path, "demo_adni", "<script>alert(1)</script>", thumbnail=False),
    ]
    exclusions = [
        {
            "dataset": "demo_adni",
            "subject": "a09",
            "session": None,
            "path": "data/a09.nii.gz",
            "reason": "brain_volume_ml=310 below 800",
        }
    ]
    return tmp_path, recs, exclusions


def _render(cohort, **kw):
    root, recs, exclusions = cohort
    out = build_report(
        recs, exclusions, SETTINGS, root / "report" / "report.html", base_dir=root, **kw
    )
    return out.read_text()


def test_one_row_per_scan_sorted_with_counts(cohort):
    html = _render(cohort)
    rows = re.findall(r'<tr class="scan[^"]*">(.*?)</tr>', html, flags=re.S)
    assert len(rows) == 3
    datasets = [re.search(r"<td>(.*?)</td>", r).group(1) for r in rows]
    assert datasets == ["demo_adni", "demo_adni", "demo_ixi"]
    assert '<span id="n-scans">3 scans processed</span>' in html
    assert "2 passed QC" in html and "1 failed QC" in html and "1 excluded" in html
    assert html.count('<tr class="scan failed">') == 1
    assert "brain_volume_ml 500" in html
    assert html.count("<details") == 3


def test_exclusions_and_escaping(cohort):
    html = _render(cohort)
    assert "brain_volume_ml=310 below 800" in html and "data/a09.nii.gz" in html
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "echo &#x27;n4 &lt;quoted&gt; &amp; done&#x27;" in html  # exact command, escaped


def test_thumbnail_embedded_and_missing_one_is_a_placeholder(cohort):
    root, recs, _ = cohort
    html = _render(cohort)
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 2
    on_disk = {(root / r["thumbnail"]).read_bytes() for r in recs if "thumbnail" in r}
    assert {base64.b64decode(u) for u in uris} == on_disk
    assert "no thumbnail" in html
    (root / recs[0]["thumbnail"]).unlink()  # recorded but deleted: placeholder, no crash
    assert "thumbnail missing" in _render(cohort)


def test_details_hold_hashes_calls_and_versions(cohort):
    _, recs, _ = cohort
    html = _render(cohort)
    for rec in recs:
        for step in rec["steps"]:
            for f in step["inputs"] + step["outputs"]:
                assert f["sha256"] in html
    assert "ants.registration(type_of_transform=&quot;AffineFast&quot;)" in html
    assert "ants.apply_transforms" in html
    assert "<h2>Tool versions</h2>" in html and "antspyx" in html and "0.6.3" in html
    methods = re.search(r'<p class="methods">(.*?)</p>', html, flags=re.S).group(1)
    assert "ants backend" in methods and "seed was 42" in methods
    assert "antspyx 0.6.3" in methods and "shrink factor 4" in methods


def test_mixed_versions_are_flagged(cohort):
    root, recs, excl = cohort
    recs[0]["steps"][0]["tool"]["version"] = "0.6.4"
    html = build_report(recs, excl, SETTINGS, root / "r.html", base_dir=root).read_text()
    assert "0.6.4 (1 scans)" in html and "class=warn" in html
    assert "antspyx 0.6.3 / 0.6.4" in html  # the methods paragraph names both


def test_empty_cohort(tmp_path):
    html = build_report([], [], {}, tmp_path / "r.html").read_text()
    assert "0 scans processed" in html and "No scans were excluded" in html


def test_methods_paragraph_follows_settings():
    ants = methods_paragraph(SETTINGS, VERSIONS)
    assert "ants backend" in ants and "antspyx 0.6.3" in ants and "seed was 42" in ants
    assert "shrink factor 4" in ants and "within the brain mask" in ants
    assert "96×114×96" in ants and "ICBM 2009c" in ants and "min-max" in ants

    fsl = methods_paragraph(dict(SETTINGS, backend="fsl"), dict(VERSIONS, fsl="6.0.7.9"))
    assert fsl != ants
    assert "FSL BET 6.0.7.9" in fsl and "fractional intensity threshold 0.5" in fsl
    assert "correlation ratio" in fsl and "FSL FLIRT" in fsl and "12 degrees of freedom" in fsl
    assert "FSL BET" not in ants

    n4 = dict(SETTINGS, n4=dict(SETTINGS["n4"], shrink_factor=2, masked=False))
    other = methods_paragraph(n4, VERSIONS)
    assert other != ants and "shrink factor 2" in other and "over the whole image" in other
    assert methods_paragraph(dict(SETTINGS, seed=7), VERSIONS) != ants
    assert methods_paragraph(dict(SETTINGS, pool={"factor": 4}), VERSIONS) != ants
    # an unknown key still changes the text
    extra = dict(SETTINGS, n4=dict(SETTINGS["n4"], weight="x"))
    assert methods_paragraph(extra, VERSIONS) != ants


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"backend": "fsl"},
        {"backend": "ants", "bet": None},
        {"backend": "ants", "n4": {}, "pool": {"factor": "two"}},
    ],
)
def test_methods_paragraph_survives_missing_keys(settings):
    text = methods_paragraph(settings, {})
    assert text.startswith("Images were preprocessed") and text.endswith(".")


def test_load_scan_records(cohort):
    root, recs, _ = cohort
    loaded = load_scan_records(root)
    assert sorted(r["scan"] for r in loaded) == sorted(r["scan"] for r in recs)
    one = load_scan_records([root / "results/preprocess/demo_ixi/sub-b02/sub-b02_provenance.json"])
    assert one[0]["subject"] == "b02"
    bad = write_text("{not json", root / "bad_provenance.json")
    with pytest.raises(MedtxError, match="bad_provenance.json"):
        load_scan_records(root)
    write_text(json.dumps({"scan": "x"}), bad)
    with pytest.raises(MedtxError, match="'steps' list"):
        load_scan_records([bad])


def test_unchecked_metrics_are_listed_without_a_flag(cohort):
    root, recs, excl = cohort
    recs[0]["steps"][1]["qc"]["metrics"]["similarity_mi"] = 0.4321
    html = build_report(recs, excl, SETTINGS, root / "r.html", base_dir=root).read_text()
    assert re.search(r'<span class="info"[^>]*>similarity_mi 0.4321</span>', html)
