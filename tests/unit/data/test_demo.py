"""The synthetic demo cohort: plans, the simulated anatomy and the written files."""

from __future__ import annotations

import json
from collections import Counter

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from medtx.data import demo
from medtx.data.templates import TEMPLATE_SHAPE
from medtx.errors import ConfigError

# ---------------------------------------------------------------- planning


def test_plan_is_deterministic_and_seeded():
    spec = {"n_subjects": 9, "seed": 3}
    assert demo.plan_t1_cohort(spec) == demo.plan_t1_cohort(dict(spec))
    other = demo.plan_t1_cohort({**spec, "seed": 4})
    assert other != demo.plan_t1_cohort(spec)


def test_plan_rows_have_the_agreed_fields():
    rows = demo.plan_t1_cohort({"n_subjects": 12, "age": [60, 80], "sites": ["a", "b", "c"]})
    assert [r["subject"] for r in rows] == [f"demo{i:03d}" for i in range(1, 13)]
    for r in rows:
        assert r["subject"].isalnum()
        assert r["session"] is None
        assert r["t1"] == f"sub-{r['subject']}/anat/sub-{r['subject']}_T1w.nii.gz"
        assert 60 <= r["age"] <= 80 and r["age"] == round(r["age"], 1)
        assert r["sex"] in {"F", "M"}
    assert Counter(r["site"] for r in rows) == {"a": 4, "b": 4, "c": 4}


@pytest.mark.parametrize(
    "n, proportions, expected",
    [
        (12, None, {"CN": 4, "MCI": 4, "AD": 4}),
        # ties go to the alphabetically first class (a YAML mapping has no order)
        (10, None, {"AD": 4, "CN": 3, "MCI": 3}),
        (11, {"CN": 0.6, "MCI": 0.3, "AD": 0.1}, {"CN": 7, "MCI": 3, "AD": 1}),
        (7, {"CN": 1, "AD": 1}, {"AD": 4, "CN": 3}),
    ],
)
def test_diagnoses_come_in_exact_proportions(n, proportions, expected):
    spec = {"n_subjects": n, **({"diagnoses": proportions} if proportions else {})}
    rows = demo.plan_t1_cohort(spec)
    assert Counter(r["diagnosis"] for r in rows) == expected
    # Shuffled, not in blocks: the first four are not all of one class.
    if n == 12:
        assert len({r["diagnosis"] for r in rows[:6]}) > 1


def test_patients_are_older_than_controls_with_overlap():
    rows = demo.plan_t1_cohort({"n_subjects": 300, "seed": 1})
    ages = {
        dx: np.array([r["age"] for r in rows if r["diagnosis"] == dx]) for dx in ("CN", "MCI", "AD")
    }
    assert ages["CN"].mean() + 1 < ages["MCI"].mean()
    assert ages["MCI"].mean() + 1 < ages["AD"].mean()
    assert ages["AD"].min() < ages["CN"].max()


@pytest.mark.parametrize(
    "spec",
    [
        {"prefix": "demo_x"},
        {"n_subjects": 0},
        {"age": [80, 60]},
        {"diagnoses": {"CN": 1, "FTD": 1}},
        {"n_subject": 3},
    ],
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(ConfigError):
        demo.plan_t1_cohort(spec)


def test_unknown_diagnosis_is_allowed_with_a_severity():
    rows = demo.plan_t1_cohort(
        {"diagnoses": {"CN": 1, "FTD": 1}, "diagnosis_severity": {"FTD": 1.5}}
    )
    assert Counter(r["diagnosis"] for r in rows) == {"CN": 6, "FTD": 6}


def test_brats_plan():
    rows = demo.plan_brats_cohort({"n_cases": 3})
    assert rows == demo.plan_brats_cohort({"n_cases": 3})
    assert [r["case"] for r in rows] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    case = rows[0]["case"]
    assert rows[0]["files"] == {
        m: f"{case}/{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")
    }
    with pytest.raises(ConfigError):
        demo.plan_brats_cohort({"prefix": "../x"})


# ---------------------------------------------------------------- anatomy


def test_severity_grows_with_age_and_diagnosis():
    s = demo.atrophy_severity
    assert s(70, "CN") < s(70, "MCI") < s(70, "AD")
    assert s(60, "CN") < s(80, "CN")
    assert s(75, "AD") == pytest.approx(0.02 * 25 + 2.0)


def test_plan_does_not_depend_on_the_order_of_the_diagnoses():
    """Rules get the spec as key-sorted JSON, the scan table from the config's order:
    the images and the labels must describe the same subjects."""
    spec = {"n_subjects": 12, "seed": 12, "diagnoses": {"CN": 0.34, "MCI": 0.33, "AD": 0.33}}
    as_rules_pass_it = json.loads(json.dumps(spec, sort_keys=True))
    assert list(as_rules_pass_it["diagnoses"]) != list(spec["diagnoses"])
    assert demo.plan_t1_cohort(as_rules_pass_it) == demo.plan_t1_cohort(spec)


def test_ventricle_severity_follows_age_more_than_diagnosis():
    v = demo.ventricle_severity
    assert v(90, "CN") - v(55, "CN") > v(70, "AD") - v(70, "CN") > 0
    assert v(75, "AD") == pytest.approx(0.06 * 25 + 0.5 * 2.0)


def test_ventricle_severity_moves_only_the_ventricles(atrophied):
    tpl, out = atrophied
    maps = demo.template_atrophy_maps()
    t1, labels = demo.apply_atrophy(tpl.t1, tpl.labels, 1.0, maps, ventricle_severity=3.0)
    _, same_cortex = out[1.0]
    _, same_ventricles = out[3.0]
    assert _volume(labels, demo.VENTRICLE_NAMES) == _volume(same_ventricles, demo.VENTRICLE_NAMES)
    # out of the ventricles' reach, what the exterior CSF claims follows ``severity`` alone
    far = np.isinf(maps.ventricle_dist)
    np.testing.assert_array_equal(labels[far], same_cortex[far])
    assert not np.array_equal(labels, same_cortex)


def test_near_distance_is_the_euclidean_distance_up_to_its_radius():
    rng = np.random.default_rng(0)
    target = rng.random((30, 31, 32)) < 0.02
    candidates = np.zeros_like(target)
    candidates[3:-3, 3:-3, 3:-3] = True
    got = demo._near_distance(target, candidates, 2.0)
    exact = ndi.distance_transform_edt(~target)
    want = np.where(candidates & ~target & (exact <= 2.0), exact, np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def atrophied():
    tpl = demo.template()
    maps = demo.template_atrophy_maps()
    return tpl, {s: demo.apply_atrophy(tpl.t1, tpl.labels, s, maps) for s in (0.0, 1.0, 2.0, 3.0)}


def _volume(labels, names):
    return int(np.count_nonzero(demo.in_labels(labels, demo.label_ids(names))))


def test_atrophy_zero_leaves_the_template_unchanged(atrophied):
    tpl, out = atrophied
    t1, labels = out[0.0]
    np.testing.assert_array_equal(labels, tpl.labels)
    np.testing.assert_allclose(t1, tpl.t1)


def test_ventricles_grow_and_hippocampus_shrinks_with_severity(atrophied):
    _, out = atrophied
    vent = [_volume(out[s][1], demo.VENTRICLE_NAMES) for s in sorted(out)]
    hippo = [_volume(out[s][1], ("Hippocampus",)) for s in sorted(out)]
    amyg = [_volume(out[s][1], ("Amygdala",)) for s in sorted(out)]
    assert all(a < b for a, b in zip(vent, vent[1:])), vent
    assert all(a > b for a, b in zip(hippo, hippo[1:])), hippo
    assert amyg[-1] < amyg[0]
    assert vent[3] > 2 * vent[0]  # AD-like ventricles are much larger
    cortex = [
        int(
            np.count_nonzero(
                demo.in_labels(out[s][1], demo.label_ids(demo.NON_CORTICAL_NAMES, exclude=True))
            )
        )
        for s in sorted(out)
    ]
    assert all(a >= b for a, b in zip(cortex, cortex[1:])) and cortex[3] < 0.95 * cortex[0]


def test_claimed_tissue_turns_dark_like_csf(atrophied):
    tpl, out = atrophied
    t1, labels = out[3.0]
    vent_ids = demo.label_ids(demo.VENTRICLE_NAMES)
    grown = demo.in_labels(labels, vent_ids) & ~demo.in_labels(tpl.labels, vent_ids)
    assert grown.sum() > 10_000
    assert t1[grown].mean() < 0.5 * tpl.t1[grown].mean()
    assert abs(np.median(t1[grown]) - tpl.csf_t1) < 0.1 * tpl.wm_t1


# ---------------------------------------------------------------- T1 scans


def _rows_by_orientation():
    rows = demo.plan_t1_cohort({})
    pick = {}
    for r in rows:
        pick.setdefault(demo.t1_acquisition(r, {})["orientation"], r)
    assert set(pick) == set(demo.ORIENTATIONS)
    return [pick[o] for o in demo.ORIENTATIONS]


@pytest.fixture(scope="module", params=_rows_by_orientation(), ids=lambda r: r["subject"])
def t1_scan(request, tmp_path_factory):
    row = request.param
    path = tmp_path_factory.mktemp("t1") / row["t1"]
    demo.generate_t1_scan(row, {}, path)
    return row, path


def test_t1_scan_is_a_raw_looking_head(t1_scan):
    row, path = t1_scan
    acq = demo.t1_acquisition(row, {})
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.ndim == 3 and data.dtype == np.int16 and img.get_data_dtype() == np.int16
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert "".join(nib.aff2axcodes(img.affine)) == acq["orientation"]
    np.testing.assert_allclose(img.header.get_zooms(), acq["voxel_size"], atol=1e-5)
    assert not np.allclose(img.header.get_zooms(), 1.0)
    assert img.shape != TEMPLATE_SHAPE
    # White matter near the site's level; background is noise, far darker.
    wm = acq["wm_level"]
    assert 0.8 * wm < np.percentile(data, 99) < 1.6 * wm
    corner = data[:8, :8, -8:]
    assert 0 < corner.mean() < 0.15 * wm


def test_t1_scan_is_deterministic(t1_scan, tmp_path):
    row, path = t1_scan
    again = tmp_path / "again.nii.gz"
    demo.generate_t1_scan(row, {}, again)
    a, b = nib.load(path), nib.load(again)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)


def test_acquisition_varies_between_subjects():
    rows = demo.plan_t1_cohort({"n_subjects": 20})
    acqs = [demo.t1_acquisition(r, {}) for r in rows]
    assert len({tuple(a["voxel_size"]) for a in acqs}) > 1
    assert len({a["margins_mm"][4] > 0 for a in acqs}) == 2  # neck kept and cut
    severity = {
        dx: [a["severity"] for a, r in zip(acqs, rows) if r["diagnosis"] == dx]
        for dx in ("CN", "AD")
    }
    assert min(severity["AD"]) > max(severity["CN"])


def test_participants_and_description(tmp_path):
    rows = demo.plan_t1_cohort({"n_subjects": 5})
    demo.write_t1_participants(rows, tmp_path)
    table = pd.read_csv(tmp_path / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "age", "sex", "diagnosis", "site"]
    assert list(table.participant_id) == [f"sub-{r['subject']}" for r in rows]
    assert list(table.age) == [r["age"] for r in rows]
    assert list(table.diagnosis) == [r["diagnosis"] for r in rows]
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.8.0" and desc["DatasetType"] == "raw"
    assert desc["GeneratedBy"][0]["Name"] == "medtx demo"


# ---------------------------------------------------------------- BraTS


@pytest.fixture(scope="module")
def brats_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    row = demo.plan_brats_cohort({"n_cases": 2, "seed": 5})[1]
    demo.generate_brats_case(row, {"seed": 5}, root)
    images = {m: nib.load(root / row["files"][m]) for m in (*demo.BRATS_MODALITIES, "seg")}
    arrays = {m: np.asarray(img.dataobj) for m, img in images.items()}
    return row, root, images, arrays


def test_brats_files_follow_the_conventions(brats_case):
    row, root, images, arrays = brats_case
    for m, img in images.items():
        assert (root / row["files"][m]).exists()
        assert img.shape == demo.BRATS_SHAPE
        assert "".join(nib.aff2axcodes(img.affine)) == "LPS"
        np.testing.assert_allclose(img.header.get_zooms(), 1.0)
        np.testing.assert_array_equal(img.affine, images["t1"].affine)
        assert arrays[m].dtype == (np.uint8 if m == "seg" else np.int16)
    assert set(np.unique(arrays["seg"])) == {0, 1, 2, 4}


def test_brats_is_skull_stripped_and_coregistered(brats_case):
    _, _, _, a = brats_case
    brain = a["t1"] > 0
    assert 1.0e6 < brain.sum() < 2.2e6  # a brain, not a head
    for m in ("t1ce", "t2", "flair", "seg"):
        assert not a[m][~brain].any(), m
    assert (a["t2"][brain] > 0).mean() > 0.99


def test_brats_tumour_compartments_nest(brats_case):
    _, _, _, a = brats_case
    seg = a["seg"]
    necrosis, edema, core = seg == 1, seg == 2, np.isin(seg, (1, 4))
    # The enhancing rim separates necrosis from edema everywhere.
    assert not (ndi.binary_dilation(necrosis) & edema).any()
    # Edema wraps the core: most of the core's outer shell inside tissue is edema.
    shell = ndi.binary_dilation(core) & ~core & (a["t1"] > 0)
    assert edema[shell].mean() > 0.7
    assert edema.sum() > core.sum()


def test_brats_contrasts_are_plausible(brats_case):
    _, _, _, a = brats_case
    seg, t1 = a["seg"], a["t1"].astype(float)
    brain = t1 > 0
    wm = brain & (seg == 0) & (t1 > np.percentile(t1[brain], 75))
    mean = {
        m: {
            k: a[m][sel].astype(float).mean()
            for k, sel in (("wm", wm), (1, seg == 1), (2, seg == 2), (4, seg == 4))
        }
        for m in demo.BRATS_MODALITIES
    }
    assert mean["flair"][2] > 1.3 * mean["flair"]["wm"]
    assert mean["t2"][2] > 1.3 * mean["t2"]["wm"] and mean["t2"][1] > mean["t2"]["wm"]
    assert mean["t1ce"][4] > 2 * mean["t1ce"][1]
    assert mean["t1ce"][4] > mean["t1ce"]["wm"]
    assert mean["t1"][1] < 0.6 * mean["t1"]["wm"]
    # FLAIR nulls fluid: ventricles are darker than white matter, unlike T2.
    csf = brain & (seg == 0) & (t1 < np.percentile(t1[brain], 5))
    assert a["flair"][csf].mean() < 0.5 * mean["flair"]["wm"]
    assert a["t2"][csf].mean() > mean["t2"]["wm"]


def test_brats_case_is_deterministic(brats_case, tmp_path):
    row, _, _, arrays = brats_case
    demo.generate_brats_case(row, {"seed": 5}, tmp_path)
    for m in ("seg", "flair"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / row["files"][m]).dataobj), arrays[m]
        )


def test_brats_readme_says_synthetic(tmp_path):
    rows = demo.plan_brats_cohort({})
    demo.write_brats_readme(rows, tmp_path)
    text = (tmp_path / "README.txt").read_text()
    assert "SYNTHETIC" in text and all(r["case"] in text for r in rows)
