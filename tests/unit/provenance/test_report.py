"""The cohort provenance report: its page, its folder, outliers, sites and methods.

``synthetic_cohort`` (also used by test_report_browser.py) builds merged records
by hand, with metric values spread evenly (so no robust outlier appears by
chance) and the failures and outliers placed where a test wants them.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from medtx.errors import MedtxError
from medtx.io import save_nifti, write_text
from medtx.provenance import report_folder, report_plots
from medtx.provenance.qc import check
from medtx.provenance.records import StepRecord, load_scan_records, merge_scan
from medtx.provenance.report import (
    assets_dir,
    build_report,
    methods_paragraph,
    write_report,
)
from medtx.provenance.report_metrics import (
    Metric,
    cohort_metrics,
    robust_outliers,
    robust_scale,
    scan_statuses,
)
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


ROW = re.compile(r'<tr class="scan[^"]*"[^>]*>(.*?)</tr>', flags=re.S)


def test_one_row_per_scan_sorted_with_counts(cohort):
    html = _render(cohort)
    rows = ROW.findall(html)
    assert len(rows) == 3
    datasets = [re.search(r"<td>(.*?)</td>", r).group(1) for r in rows]
    assert datasets == ["demo_adni", "demo_adni", "demo_ixi"]  # the failure first
    assert ">a01</a>" in rows[0]
    assert '<span id="n-scans">3 scans processed</span>' in html
    assert "2 passed QC" in html and "1 failed QC" in html and "1 excluded" in html
    assert html.count('<tr class="scan failed"') == 1
    assert "brain_volume_ml 500" in html
    assert html.count("<details") == 3


def test_exclusions_and_escaping(cohort):
    html = _render(cohort)
    assert "brain_volume_ml=310 below 800" in html and "data/a09.nii.gz" in html
    assert html.count("<script>") == 1 and "<script>alert" not in html  # only the page's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "echo &#39;n4 &lt;quoted&gt; &amp; done&#39;" in html  # exact command, escaped


def _img_srcs(html):
    return re.findall(r'<img class="thumb" loading="lazy"[^>]* src="([^"]+)">', html)


def test_thumbnails_are_linked_files_loaded_lazily(cohort):
    root, recs, _ = cohort
    html = _render(cohort)
    page = root / "report" / "report.html"
    assert "data:image" not in html and "base64" not in html
    srcs = _img_srcs(html)
    assert len(srcs) == 2 and html.count("<img") == 2
    on_disk = {(root / r["thumbnail"]).read_bytes() for r in recs if "thumbnail" in r}
    linked = [page.parent / unquote(src) for src in srcs]
    assert all(src.startswith("report_files/thumbs/") for src in srcs)  # relative
    assert {p.read_bytes() for p in linked} == on_disk
    originals = {(root / r["thumbnail"]).stat().st_ino for r in recs if "thumbnail" in r}
    assert {p.stat().st_ino for p in linked} == originals  # hard links, not copies
    assert "no thumbnail" in html
    (root / recs[0]["thumbnail"]).unlink()  # recorded but deleted: placeholder, no crash
    again = _render(cohort)
    assert "thumbnail missing" in again and len(_img_srcs(again)) == 1


def test_thumbnails_are_copied_where_links_fail(cohort, monkeypatch):
    root, recs, _ = cohort

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(report_folder.os, "link", no_link)
    html = _render(cohort)
    page = root / "report" / "report.html"
    linked = [page.parent / unquote(src) for src in _img_srcs(html)]
    assert len(linked) == 2
    originals = {(root / r["thumbnail"]).stat().st_ino for r in recs if "thumbnail" in r}
    assert not {p.stat().st_ino for p in linked} & originals
    assert {p.read_bytes() for p in linked} == {
        (root / r["thumbnail"]).read_bytes() for r in recs if "thumbnail" in r
    }


def test_assets_dir_is_the_pages_sibling():
    assert assets_dir("results/reports/provenance.html") == Path("results/reports/provenance_files")
    assert assets_dir(Path("/x/my report.html")) == Path("/x/my report_files")


def test_details_hold_hashes_calls_and_versions(cohort):
    _, recs, _ = cohort
    html = _render(cohort)
    for rec in recs:
        for step in rec["steps"]:
            for f in step["inputs"] + step["outputs"]:
                assert f["sha256"] in html
    assert "ants.registration(type_of_transform=&#34;AffineFast&#34;)" in html
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


def test_unchecked_metrics_are_offered_without_a_flag(cohort):
    root, recs, excl = cohort
    recs[0]["steps"][1]["qc"]["metrics"]["similarity_mi"] = 0.4321
    html = build_report(recs, excl, SETTINGS, root / "r.html", base_dir=root).read_text()
    options = re.findall(r'<option value="(\d+)"[^>]*>([^<]*)</option>', html)
    k = next(int(v) for v, label in options if label == "similarity_mi (n4)")
    values = {
        re.search(r'data-i="(\d+)"', m.group(0)).group(1): m.group(1).split(",")[k]
        for m in re.finditer(r'<tr class="scan[^>]*data-m="([^"]*)"', html)
    }
    assert sorted(values.values()) == ["", "", "0.4321"]  # unflagged: no "!" or "~"


# ---------------------------------------------------------------- synthetic cohorts

# step -> metric -> (min, max) of its check; None: recorded but not checked
SYNTH_QC = {
    "bet": {"brain_volume_ml": (800.0, 2200.0)},
    "flirt": {"ncc_template": (0.25, None)},
    "n4": {"bias_ratio": (None, 3.0), "bias_p1": None},
    "normalize": {"face_margin_mm": None},
}
SYNTH_SITES = ("siteA", "siteB", "siteC")
SYNTH_DATASETS = ("dsA", "dsB")
FAILING_VOLUME = 500.0  # below brain_volume_ml's 800
OUTLYING_NCC = 0.5  # passes ncc_template's 0.25, far below the cohort's ~0.95


def synthetic_values(k: int, n: int) -> dict[str, float]:
    """Scan k's metrics: evenly spread over a realistic range (permuted by k), so no
    value is a robust outlier (uniform data: |z| <= 1.35)."""
    return {
        "brain_volume_ml": 1200.0 + 600.0 * ((7 * k) % n) / n,
        "ncc_template": 0.93 + 0.04 * ((11 * k) % n) / n,
        "bias_ratio": 1.1 + 0.3 * ((13 * k) % n) / n,
        "bias_p1": 0.15 + 0.05 * ((3 * k) % n) / n,
        "face_margin_mm": 10.0,
    }


def synthetic_record(dataset: str, scan: str, values: dict[str, float], k: int, n: int) -> dict:
    """A merged record (as ``merge_scan`` writes) with the SYNTH_QC steps and checks."""
    steps, failures = [], []
    for s, (step, spec) in enumerate(SYNTH_QC.items()):
        checks = []
        for metric, bounds in spec.items():
            if bounds is None:
                continue
            lo, hi = bounds
            v = values[metric]
            passed = (lo is None or v >= lo) and (hi is None or v <= hi)
            checks.append({"metric": metric, "value": v, "min": lo, "max": hi, "passed": passed})
            if not passed:
                failures.append(f"{step}: {metric}={v:g}")
        metrics = {m: values[m] for m in spec}
        metrics |= {"shape": [96, 114, 96], "masked": True}  # not numbers: not metrics
        digest = f"{k:08x}{s:056x}"
        steps.append(
            {
                "step": step,
                "scan": scan,
                "dataset": dataset,
                "backend": "ants",
                "tool": {"name": "antspyx", "version": "0.6.3"},
                "command": f"medtx step {step} --scan '{scan}'",
                "inputs": [{"role": "in", "path": f"{scan}_in.nii.gz", "sha256": digest}],
                "outputs": [{"role": "out", "path": f"{scan}_{step}.nii.gz", "sha256": digest}],
                "duration_s": (0.5 + s) * (1 + 40.0 * ((17 * k) % n) / n),  # 2 to 330 s in all
                "qc": {
                    "metrics": metrics,
                    "checks": checks,
                    "passed": all(c["passed"] for c in checks),
                },
            }
        )
    return {
        "schema": 1,
        "scan": scan,
        "dataset": dataset,
        "subject": scan.removeprefix("sub-"),
        "session": None,
        "backend": "ants",
        "qc_passed": not failures,
        "qc_failures": failures,
        "steps": steps,
    }


def synthetic_cohort(root: Path, n: int, *, fail=(), outlier=(), thumbnails=True):
    """``n`` records (scan k: dataset ``SYNTH_DATASETS[k % 2]``, site
    ``SYNTH_SITES[k % 3]``, none when k % 10 == 9), scans in ``fail`` failing the
    brain volume check, those in ``outlier`` with an outlying ncc; a small PNG
    thumbnail each under ``root``. Returns (records, sites)."""
    records, sites = [], {}
    for k in range(n):
        dataset, scan = SYNTH_DATASETS[k % 2], f"sub-{k:03d}"
        values = synthetic_values(k, n)
        if k in fail:
            values["brain_volume_ml"] = FAILING_VOLUME
        if k in outlier:
            values["ncc_template"] = OUTLYING_NCC
        record = synthetic_record(dataset, scan, values, k, n)
        if thumbnails:
            png = root / "thumbs" / f"{scan}_qc.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (90, 60), color=(37 * k) % 256).save(png)
            record["thumbnail"] = str(png.relative_to(root))
        if k % 10 != 9:
            sites[(dataset, scan)] = SYNTH_SITES[k % 3]
        records.append(record)
    return records, sites


def _build(root, records, sites=None, **kw):
    out = build_report(
        records, [], SETTINGS, root / "out" / "report.html", base_dir=root, sites=sites, **kw
    )
    return out, out.read_text()


def _rows(html):
    """(data-i, data-status, scan) of the scan table's rows, in page order."""
    return [
        (int(m.group(1)), m.group(2), m.group(3))
        for m in re.finditer(
            r'<tr class="scan[^"]*" id="row-\d+" data-i="(\d+)" data-status="(\w+)".*?'
            r'<td><a href="[^"]*">([^<]*)</a>',
            html,
            flags=re.S,
        )
    ]


def test_outlier_rule_by_hand():
    # median 4.5; |x - 4.5| = 3.5 2.5 1.5 .5 .5 1.5 2.5 10.5 -> MAD 2, scale 2.9652
    values = [1, 2, 3, 4, 5, 6, 7, 15]
    median, scale = robust_scale(values)
    assert median == 4.5 and scale == pytest.approx(1.4826 * 2)
    assert robust_outliers(values) == [False] * 7 + [True]  # 10.5 / 2.9652 = 3.54
    assert robust_outliers([1, 2, 3, 4, 5, 6, 7, 14]) == [False] * 8  # 9.5 / 2.9652 = 3.20
    assert robust_outliers(values, z=3.6) == [False] * 8
    # MAD 0 (most values equal): 1.2533 * mean |x - 5| = 1.2533 * 4/7; 4 / 0.7162 = 5.59
    same = [5, 5, 5, 5, 5, 5, 9]
    assert robust_scale(same) == (5, pytest.approx(1.2533 * 4 / 7))
    assert robust_outliers(same) == [False] * 6 + [True]
    assert robust_outliers([5] * 7) == [False] * 7  # no spread: nothing to differ from
    assert robust_outliers([1, 2, 3, 100]) == [False] * 4  # too few scans


def test_cohort_metrics_from_checks_and_metrics(tmp_path):
    records, _ = synthetic_cohort(tmp_path, 12, fail={3}, outlier={5}, thumbnails=False)
    metrics = {m.key: m for m in cohort_metrics(records)}
    assert set(metrics) == {
        "bet.brain_volume_ml",
        "flirt.ncc_template",
        "n4.bias_ratio",
        "n4.bias_p1",
        "normalize.face_margin_mm",
    }  # shape (a list) and masked (a bool) are not metrics
    volume = metrics["bet.brain_volume_ml"]
    assert volume.values[3] == FAILING_VOLUME and volume.failed == {3}
    assert volume.bounds == {("min", 800.0), ("max", 2200.0)}
    assert metrics["flirt.ncc_template"].outliers == {5}
    assert metrics["normalize.face_margin_mm"].constant
    assert scan_statuses(records, list(metrics.values())) == [
        "failed" if k == 3 else "outlier" if k == 5 else "passed" for k in range(12)
    ]


def test_failures_first_then_outliers_then_the_rest(tmp_path):
    records, sites = synthetic_cohort(tmp_path, 30, fail={4, 21}, outlier={7, 12})
    _, html = _build(tmp_path, records, sites)
    rows = _rows(html)
    assert [i for i, _, _ in rows] == list(range(30))
    assert [s for _, s, _ in rows] == ["failed"] * 2 + ["outlier"] * 2 + ["passed"] * 26
    # within each group by dataset, then scan: 12 and 4 are dsA, 7 and 21 dsB
    assert [scan for _, _, scan in rows[:4]] == ["004", "021", "012", "007"]
    passed = [(f"ds{'AB'[int(s) % 2]}", s) for _, _, s in rows[4:]]
    assert passed == sorted(passed)
    assert '<span class="bad" id="n-fail">2 failed QC</span>' in html
    assert "2 outliers (passed QC)" in html and "28 passed QC" in html
    outlier_row = ROW.findall(html)[2]
    assert '<span class="outl"' in outlier_row and "ncc_template 0.5" in outlier_row


def test_site_summary(tmp_path):
    n = 30
    records, sites = synthetic_cohort(tmp_path, n, fail={4, 21}, outlier={7})
    _, html = _build(tmp_path, records, sites)
    table = html.split('id="sites"')[1].split("</table>")[0]
    head = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    got = {}
    for row in re.findall(r"<tr data-i[^>]*>(.*?)</tr>", table):
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
        got[(cells[0], cells[1])] = dict(zip(head[2:], cells[2:]))
    expected = {}
    for k in range(n):
        key = (SYNTH_DATASETS[k % 2], SYNTH_SITES[k % 3] if k % 10 != 9 else "unknown")
        e = expected.setdefault(key, {"scans": 0, "passed": 0, "outliers": 0, "failed": 0})
        e["scans"] += 1
        e["failed" if k in (4, 21) else "outliers" if k == 7 else "passed"] += 1
    assert set(got) == set(expected) and ("dsB", "unknown") in got
    for key, counts in expected.items():
        assert {c: int(got[key][c]) for c in counts} == counts, key
        volumes = [
            FAILING_VOLUME if k in (4, 21) else synthetic_values(k, n)["brain_volume_ml"]
            for k in range(n)
            if (SYNTH_DATASETS[k % 2], SYNTH_SITES[k % 3] if k % 10 != 9 else "unknown") == key
        ]
        assert float(got[key]["brain_volume_ml"]) == pytest.approx(
            statistics.median(volumes), rel=1e-3
        )
    assert "face_margin_mm" not in head  # constant: neither plotted nor summarised


def test_write_report_takes_sites_from_the_scan_tables(tmp_path):
    records, _ = synthetic_cohort(tmp_path, 6, thumbnails=False)
    paths = []
    for r in records:
        path = tmp_path / "records" / f"{r['scan']}_provenance.json"
        paths.append(str(write_text(json.dumps(r), path)))
    columns = ["dataset", "subject", "session", "scan", "t1", "flair", "site", "status", "reason"]
    lines = ["\t".join(columns)]
    for k, r in enumerate(records):
        site = "" if k == 0 else f"site{k % 2}"  # blank: unknown
        lines.append(f"{r['dataset']}\t{r['subject']}\t\t{r['scan']}\tt1.nii.gz\t\t{site}\tok\t")
    lines.append("dsA\tx9\t\tsub-x9\tx9.nii.gz\t\tsite0\texcluded\tunreadable")
    table = write_text("\n".join(lines) + "\n", tmp_path / "scans.tsv")
    out = write_report(paths, [str(table)], SETTINGS, tmp_path / "report.html")
    html = out.read_text()
    site_cells = {
        scan: re.findall(r"<td>([^<]*)</td>", row)[2]  # dataset, session, site
        for row in ROW.findall(html)
        for scan in [re.search(r">([^<]*)</a>", row).group(1)]
    }
    assert site_cells == {"000": "unknown", **{f"00{k}": f"site{k % 2}" for k in range(1, 6)}}
    assert "1 excluded" in html and "unreadable" in html


def test_plots_draw_every_scan_with_its_name(tmp_path):
    n = 30
    records, sites = synthetic_cohort(tmp_path, n, fail={4}, outlier={7})
    _, html = _build(tmp_path, records, sites)
    figures = dict(
        re.findall(r'<figure class="plot" data-metric="([^"]+)">(.*?)</figure>', html, re.S)
    )
    assert set(figures) == {
        "bet.brain_volume_ml",
        "flirt.ncc_template",
        "n4.bias_ratio",
        "n4.bias_p1",
    }
    assert "face_margin_mm (normalize) = 10" in html  # constant, named, not plotted
    order = [scan for _, _, scan in _rows(html)]  # data-i -> subject
    for key, figure in figures.items():
        dots = re.findall(r'<circle [^>]*data-i="(\d+)"([^>]*)><title>([^<]*)</title>', figure)
        assert sorted(int(i) for i, _, _ in dots) == list(range(n)), key
        for i, _, title in dots:
            assert title.startswith(f"ds{'AB'[int(order[int(i)]) % 2]}/sub-{order[int(i)]}: ")
    volume = figures["bet.brain_volume_ml"]
    failed = re.findall(r'data-i="(\d+)" class="f"><title>([^<]*)</title>', volume)
    assert [t for _, t in failed] == ["dsA/sub-004: 500 (failed)"]
    assert re.search(r'<text class="thr"[^>]*>min 800</text>', volume)  # in range: a line
    assert '<line class="thr"' in volume and "max 2200 ▸" in volume  # off range: a note
    ncc = figures["flirt.ncc_template"]
    assert re.findall(r'class="o"><title>([^<]*)</title>', ncc) == ["dsB/sub-007: 0.5 (outlier)"]
    assert "◂ min 0.25" in ncc  # below every value: a note at the left edge


def test_a_bound_both_min_and_max_is_one_line():
    m = Metric("normalize", "face_margin_mm", values={0: 9.0, 1: 10.0, 2: 10.0})
    m.bounds = {("min", 10.0), ("max", 10.0)}
    m.failed = {0}
    svg = report_plots.strip_plot(m, ["d/a", "d/b", "d/c"])
    assert svg.count('<line class="thr"') == 1 and ">min = max 10</text>" in svg
    assert svg.count("<circle") == 3 and "<title>d/a: 9 (failed)</title>" in svg


def test_nice_ticks():
    assert report_plots.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert report_plots.nice_ticks(1187.0, 1813.0) == [1200.0, 1400.0, 1600.0, 1800.0]


def test_large_cohorts_get_a_page_per_scan(tmp_path):
    recs, sites = synthetic_cohort(tmp_path, 8, fail={2})
    recs[2]["scan"] = recs[2]["steps"][0]["scan"] = "<script>alert(1)</script>"
    out, html = _build(tmp_path, recs, sites, inline_details_bytes=0)
    assert "<details" not in html and "too much for this page" in html
    folder = assets_dir(out)
    links = re.findall(r'<td><a href="([^"]+)">', html)
    assert len(links) == 8 and all(link.startswith("report_files/scans/") for link in links)
    for link, (i, _, _) in zip(links, _rows(html)):
        page = (out.parent / unquote(link)).read_text()
        assert f'href="../../report.html#row-{i}"' in page
        assert "sha256" in page and "medtx step bet --scan" in page
    for f in folder.rglob("*"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", f.name)
        if f.suffix == ".html":
            assert "<script>alert" not in f.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_rebuild_removes_stale_files(tmp_path):
    records, sites = synthetic_cohort(tmp_path, 12)
    out, _ = _build(tmp_path, records, sites, inline_details_bytes=0)
    folder = assets_dir(out)
    assert len(list((folder / "thumbs").iterdir())) == 12
    (folder / "stale.txt").write_text("from an old build")
    out, html = _build(tmp_path, records[:5], sites)
    assert sorted(p.name for p in folder.iterdir()) == ["thumbs"]  # details inline now
    assert len(list((folder / "thumbs").iterdir())) == 5 and len(ROW.findall(html)) == 5
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report_files"]


def test_a_crash_leaves_the_previous_report(tmp_path, monkeypatch):
    records, sites = synthetic_cohort(tmp_path, 10)
    out, before = _build(tmp_path, records, sites)
    files = sorted(p.relative_to(out.parent) for p in out.parent.rglob("*"))

    def broken(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr("medtx.provenance.report.strip_plot", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _build(tmp_path, records[:3], sites)
    assert out.read_text() == before
    assert sorted(p.relative_to(out.parent) for p in out.parent.rglob("*")) == files


def test_page_size_is_bounded_per_scan(tmp_path):
    """At a few hundred scans the page grows by a few KB a scan, whatever the
    thumbnails weigh (they are files) and however long the details are (own pages)."""
    n = 300
    records, sites = synthetic_cohort(tmp_path, n, fail=set(range(0, n, 37)), outlier={5, 50})
    for r in records:  # long details, as real records have
        r["steps"][0]["params"] = {"notes": "x" * 5000}
    out, html = _build(tmp_path, records, sites)
    per_scan = len(html.encode()) / n
    assert "<details" not in html  # 300 x 5 KB of details went to their own pages
    assert per_scan < 3000, per_scan
    thumbs = assets_dir(out) / "thumbs"
    assert sum(p.stat().st_size for p in thumbs.iterdir()) > 0
    assert len(list((assets_dir(out) / "scans").iterdir())) == n
    assert os.path.getsize(out) == len(html.encode())


def test_hostile_names_stay_inert_and_links_still_resolve(tmp_path):
    """Sites, datasets, thumbnail paths and the page's own name from user data."""
    records, sites = synthetic_cohort(tmp_path, 6, fail={1})
    evil = "<script>alert('x')</script>"
    records[0]["dataset"] = f'd"{evil}'
    odd = tmp_path / "thumbs" / 'q"<b> #1?.png'
    (tmp_path / records[1]["thumbnail"]).rename(odd)
    records[1]["thumbnail"] = str(odd)
    sites = {key: f"{evil}&amp;" for key in sites}
    page = tmp_path / "out" / 'my "report" #1?.html'
    out = build_report(records, [], SETTINGS, page, base_dir=tmp_path, sites=sites)
    html = out.read_text()
    assert html.count("<script>") == 1 and "<script>alert" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;amp;" in html
    srcs = _img_srcs(html)
    assert len(srcs) == 6 and all(
        src.startswith("my%20%22report%22%20%231%3F_files/") for src in srcs
    )
    assert all((out.parent / unquote(src)).is_file() for src in srcs)
    assert f'title="{tmp_path}/thumbs/q&#34;&lt;b&gt; #1?.png"' in html
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in assets_dir(out).rglob("*"))
