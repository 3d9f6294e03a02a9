"""Fold manifests: grouping, stratification, fold roles, fractions, QC gating, the firewall."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtx.data.scans import COLUMNS
from medtx.errors import CohortError, MedtxError
from medtx.folds.firewall import LeakageError, check_leakage, leakage_report
from medtx.folds.manifest import (
    load_overrides,
    load_qc,
    make_manifest,
    moved_subjects,
    read_manifest,
    subjects_sha256,
    write_manifest,
)

CLASSES = ["CN", "MCI", "AD"]
REPO = Path(__file__).resolve().parents[3]
N_FOLDS = 5


def cohort(n=40, dataset="adni", seed=0, diagnoses=None):
    """A scan table: n subjects, CN/MCI/AD in turn, every 4th with two sessions, ages 55-90."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        subject = f"S{i:03d}"
        age = rng.uniform(55, 90)
        diagnosis = (diagnoses or CLASSES)[i % len(diagnoses or CLASSES)]
        for ses in ["1", "2"] if i % 4 == 0 else [""]:
            row = dict.fromkeys(COLUMNS, "")
            row.update(
                dataset=dataset,
                kind="bids",
                subject=subject,
                session=ses,
                scan=f"sub-{subject}" + (f"_ses-{ses}" if ses else ""),
                t1=f"raw/{subject}_{ses}.nii.gz",
                diagnosis=diagnosis,
                age=f"{age + (1.5 if ses == '2' else 0):.1f}",
                status="ok",
            )
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def paths_of(table):
    return {s: f"results/preprocess/{s}_desc-norm_T1w.nii.gz" for s in table["scan"]}


def manifest_of(table=None, **kw):
    table = cohort() if table is None else table
    args = dict(
        dataset="adni", task="classification", n_folds=N_FOLDS, seed=42, paths=paths_of(table)
    )
    args.update(kw)
    return make_manifest(table, **args)


def per_subject(manifest):
    return manifest.drop_duplicates("subject").set_index("subject")


# --- grouping and fold roles ---


@pytest.mark.parametrize("method", ["hash", "sklearn"])
def test_sessions_share_a_fold_and_each_subject_has_one_role(method):
    manifest, sidecar = manifest_of(method=method)
    assert manifest.groupby("subject")["fold"].nunique().max() == 1
    assert len(manifest) == 50 and manifest["subject"].nunique() == 40
    for k in range(N_FOLDS):
        assert manifest.groupby("subject")[f"role_{k}"].nunique().max() == 1
        assert set(manifest[f"role_{k}"]) == {"train", "val", "test"}
    subjects = per_subject(manifest)
    tests = [set(subjects.index[subjects[f"role_{k}"] == "test"]) for k in range(N_FOLDS)]
    assert sum(len(t) for t in tests) == 40 and set().union(*tests) == set(subjects.index)
    assert sidecar["n_subjects"] == 40 and sidecar["n_scans"] == 50
    assert sidecar["subjects_sha256"] == subjects_sha256(subjects.index)


def test_fold_k_tests_fold_k_and_validates_fold_k_plus_1():
    manifest, _ = manifest_of()
    for k in range(N_FOLDS):
        role = manifest[f"role_{k}"]
        assert (role == "test").eq(manifest["fold"] == k).all()
        assert (role == "val").eq(manifest["fold"] == (k + 1) % N_FOLDS).all()
        assert (manifest.loc[role != "train", f"frac_{k}"] == "").all()


# --- stratification ---


@pytest.mark.parametrize("method", ["hash", "sklearn"])
def test_class_counts_per_fold_within_one_of_proportion(method):
    manifest, sidecar = manifest_of(cohort(n=47), method=method)
    subjects = per_subject(manifest)
    overall = subjects["label"].value_counts(normalize=True)
    for k in range(N_FOLDS):
        fold = subjects[subjects["fold"] == k]
        for label, p in overall.items():
            assert abs((fold["label"] == label).sum() - len(fold) * p) <= 1, (k, label)
        assert sum(sidecar["folds"][k]["class_counts"].values()) == len(fold)
    assert sidecar["label_map"] == {"CN": 0, "MCI": 1, "AD": 2}


def test_regression_balances_age_bins():
    table = cohort(n=60)
    manifest, sidecar = manifest_of(table, task="regression")
    subjects = per_subject(manifest)
    assert subjects["label"].between(55, 92).all()
    edges = sidecar["age_bins"]
    assert 2 <= len(edges) + 1 <= 5
    bins = np.searchsorted(edges, subjects["label"].to_numpy(), side="right")
    for b in set(bins):
        in_bin = subjects["fold"][bins == b]
        counts = in_bin.value_counts().reindex(range(N_FOLDS), fill_value=0)
        assert counts.max() - counts.min() <= 1, b
    means = [f["age_mean"] for f in sidecar["folds"]]
    assert max(means) - min(means) < 6


def test_regression_with_given_age_bins():
    manifest, sidecar = manifest_of(cohort(n=60), task="regression", age_bins=[70, 80])
    assert sidecar["age_bins"] == [70.0, 80.0]
    assert all(len(f["age_bin_counts"]) == 3 for f in sidecar["folds"])


# --- label fractions ---


def test_fractions_are_nested_and_stratified():
    manifest, sidecar = manifest_of(cohort(n=60))
    subjects = per_subject(manifest)
    overall = subjects["label"].value_counts(normalize=True)
    for k in range(N_FOLDS):
        train = subjects[subjects[f"role_{k}"] == "train"]
        frac = train[f"frac_{k}"].astype(int)
        sets = {p: set(train.index[frac <= p]) for p in (10, 30, 50, 70, 100)}
        assert sets[10] < sets[30] < sets[50] < sets[70] < sets[100] == set(train.index)
        assert {p: len(s) for p, s in sets.items()} == {
            int(p): n for p, n in sidecar["folds"][k]["train_subjects_by_fraction"].items()
        }
        assert len(sets[10]) == int(np.ceil(0.1 * len(train)))
        share = train["label"].value_counts(normalize=True)
        for p in (10, 30, 50, 70):
            subset = train.loc[sorted(sets[p]), "label"]
            for label, q in share.items():  # within one subject of the training set's share
                assert abs((subset == label).sum() - len(subset) * q) < 1, (k, p, label)
        half = train.loc[sorted(sets[50]), "label"]
        for label, q in overall.items():
            assert abs((half == label).mean() - q) <= 0.1, (k, label)


def test_tiny_fraction_keeps_one_subject():
    manifest, sidecar = manifest_of(fractions=(1, 50))
    assert sidecar["fractions"] == [1, 50, 100]
    assert all(f["train_subjects_by_fraction"]["1"] == 1 for f in sidecar["folds"])


# --- determinism and stability ---


def test_same_inputs_give_identical_files_and_another_seed_differs(tmp_path):
    table = cohort()
    a, side_a = manifest_of(table)
    shuffled = table.sample(frac=1, random_state=3).reset_index(drop=True)
    b, side_b = manifest_of(shuffled)
    write_manifest(a, side_a, tmp_path / "a.tsv", tmp_path / "a.json")
    write_manifest(b, side_b, tmp_path / "b.tsv", tmp_path / "b.json")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["seed"] == 42 and sidecar["sklearn_version"]
    back = read_manifest(tmp_path / "a.tsv")
    assert list(back["fold"]) == [str(f) for f in a["fold"]]
    c, _ = manifest_of(table, seed=7)
    assert c.to_csv(sep="\t", index=False) != a.to_csv(sep="\t", index=False)
    for method in ("hash", "sklearn"):
        x, _ = manifest_of(table, method=method)
        y, _ = manifest_of(table, method=method)
        assert x.to_csv(sep="\t", index=False) == y.to_csv(sep="\t", index=False)


def test_adding_one_subject_moves_few_with_hash():
    # bench/folds.py; documented in medtx/folds/manifest.py: hash moves at most
    # n_folds - 1 of 60 (6.7%),
    # mean 2.8%; StratifiedGroupKFold moves 79% (67% after relabelling folds),
    # like a fresh random split. A naive reshuffle fails both bounds below.
    spec = importlib.util.spec_from_file_location("bench_folds", REPO / "bench" / "folds.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stable = bench.benchmark_stability("hash", seeds=range(15))
    assert stable["max"] <= (N_FOLDS - 1) / 60 + 1e-9
    assert stable["mean"] < 0.06
    reshuffled = bench.benchmark_stability("sklearn", seeds=range(3))
    assert reshuffled["relabelled_mean"] > 0.5


def test_moved_subjects_names_who_changed_fold():
    old, _ = manifest_of(cohort(n=40))
    new, _ = manifest_of(cohort(n=41))
    moved = moved_subjects(old, new)
    assert len(moved) <= N_FOLDS - 1
    assert set(moved) <= set(old["subject"])


# --- QC gating and overrides ---


def test_qc_failed_scan_is_left_out_with_its_reason():
    qc = {"sub-S001": (False, "bet: brain_volume_ml=412")}
    manifest, sidecar = manifest_of(qc=qc)
    assert "sub-S001" not in set(manifest["scan"])
    assert {
        "scan": "sub-S001",
        "subject": "S001",
        "session": "",
        "reason": "QC failed: bet: brain_volume_ml=412",
    } in sidecar["exclusions"]


def test_override_include_brings_back_a_qc_failure_and_is_recorded():
    qc = {"sub-S001": (False, "bet: brain_volume_ml=412")}
    manifest, sidecar = manifest_of(qc=qc, overrides={"sub-S001": ("include", "checked by eye")})
    row = manifest[manifest["scan"] == "sub-S001"]
    assert len(row) == 1 and row["override"].item() == "include"
    assert (manifest.loc[manifest["scan"] != "sub-S001", "override"] == "").all()
    assert sidecar["overrides"] == [
        {
            "scan": "sub-S001",
            "subject": "S001",
            "session": "",
            "action": "include",
            "reason": "checked by eye",
            "applied": True,
        }
    ]
    assert not any(e["scan"] == "sub-S001" for e in sidecar["exclusions"])


def test_override_exclude_removes_a_good_scan():
    manifest, sidecar = manifest_of(overrides={"sub-S000_ses-2": "exclude"})
    assert "sub-S000_ses-2" not in set(manifest["scan"])
    assert "sub-S000_ses-1" in set(manifest["scan"])
    reasons = {e["scan"]: e["reason"] for e in sidecar["exclusions"]}
    assert reasons == {"sub-S000_ses-2": "excluded by override"}
    assert sidecar["overrides"][0]["applied"] is True


def test_override_for_another_dataset_is_ignored_and_a_typo_for_this_one_fails():
    manifest, sidecar = manifest_of(overrides={"oasis:sub-S001": "exclude"})
    assert "sub-S001" in set(manifest["scan"]) and sidecar["overrides"] == []
    with pytest.raises(CohortError, match=r"'adni:sub-X99': dataset 'adni' has no scan 'sub-X99'"):
        manifest_of(overrides={"adni:sub-X99": "exclude"})


def test_override_include_on_a_good_scan_is_recorded_as_not_needed():
    manifest, sidecar = manifest_of(overrides={"sub-S005": "include"})
    assert manifest.loc[manifest["scan"] == "sub-S005", "override"].item() == ""
    assert sidecar["overrides"][0]["applied"] is False
    assert sidecar["overrides"][0]["note"] == "not needed: the scan passed QC"


def test_labels_sharing_a_class_index_form_one_stratum():
    table = cohort(diagnoses=["CN", "HC", "AD"], n=45)
    manifest, sidecar = manifest_of(table, label_map={"CN": 0, "HC": 0, "AD": 1})
    assert set(manifest["label"]) == {0, 1}
    assert set(sidecar["folds"][0]["class_counts"]) == {"CN/HC", "AD"}


def test_bad_input_and_missing_label_are_listed_not_split():
    table = cohort()
    bad = table["scan"] == "sub-S002"
    table.loc[bad, ["status", "reason"]] = ["excluded", "image is all zeros"]
    table.loc[table["scan"] == "sub-S003", "diagnosis"] = ""
    manifest, sidecar = manifest_of(table, overrides={"sub-S002": "include"})
    assert not {"sub-S002", "sub-S003"} & set(manifest["scan"])
    reasons = {e["scan"]: e["reason"] for e in sidecar["exclusions"]}
    assert reasons == {
        "sub-S002": "excluded as bad input: image is all zeros",
        "sub-S003": "missing diagnosis label",
    }
    assert sidecar["overrides"][0]["applied"] is False
    assert "bad input" in sidecar["overrides"][0]["note"]


def test_load_qc_reads_provenance_records(tmp_path):
    for scan, ok, failures in [
        ("sub-S001", False, ["bet: brain_volume_ml=412"]),
        ("sub-S002", True, []),
    ]:
        (tmp_path / f"{scan}.json").write_text(
            json.dumps({"scan": scan, "dataset": "adni", "qc_passed": ok, "qc_failures": failures})
        )
    qc = load_qc(sorted(tmp_path.glob("*.json")), dataset="adni")
    assert qc == {"sub-S001": (False, "bet: brain_volume_ml=412"), "sub-S002": (True, "")}
    assert load_qc(sorted(tmp_path.glob("*.json")), dataset="oasis") == {}


def test_load_overrides(tmp_path):
    path = tmp_path / "overrides.tsv"
    path.write_text(
        "scan\taction\treason\nsub-S001\tinclude\tfine by eye\nsub-S004\texclude\tmotion\n"
    )
    assert load_overrides(path) == {"sub-S001": "include", "sub-S004": "exclude"}
    assert load_overrides(path, reasons=True)["sub-S004"] == ("exclude", "motion")


def test_load_overrides_names_file_and_line_of_a_bad_action(tmp_path):
    path = tmp_path / "overrides.tsv"
    path.write_text("scan\taction\treason\nsub-S001\tinclude\tok\nsub-S004\tdrop\tmotion\n")
    with pytest.raises(
        CohortError, match=r"overrides.tsv line 3: action 'drop' for scan 'sub-S004'"
    ):
        load_overrides(path)


def test_load_overrides_names_a_missing_column(tmp_path):
    path = tmp_path / "overrides.tsv"
    path.write_text("scan\treason\nsub-S001\tok\n")
    with pytest.raises(MedtxError, match=r"overrides.tsv: missing column\(s\) 'action'"):
        load_overrides(path)


# --- segmentation ---


def test_segmentation_splits_without_labels():
    rows = []
    for i in range(12):
        row = dict.fromkeys(COLUMNS, "")
        row.update(
            dataset="brats",
            kind="brats",
            subject=f"BraTS20Training{i:03d}",
            scan=f"BraTS20_Training_{i:03d}",
            status="ok",
        )
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    manifest, sidecar = make_manifest(
        table, dataset="brats", task="segmentation", n_folds=3, paths=paths_of(table)
    )
    assert (manifest["label"] == "").all()
    assert sorted(manifest["fold"].value_counts()) == [4, 4, 4]
    assert "class_counts" not in sidecar["folds"][0] and "label_map" not in sidecar


# --- bad input ---


def test_fewer_subjects_than_folds():
    with pytest.raises(MedtxError, match=r"dataset 'adni': 4 subjects are fewer than the 5 folds"):
        manifest_of(cohort(n=4))


def test_fewer_subjects_than_classes_times_folds():
    with pytest.raises(
        MedtxError,
        match=r"12 subjects are too few to stratify 3 classes into "
        r"5 folds \(need ≥ 15\)",
    ):
        manifest_of(cohort(n=12))


def test_a_class_too_small_to_stratify():
    table = cohort(n=40)
    ad = sorted(set(table.loc[table["diagnosis"] == "AD", "subject"]))
    table = table[~table["subject"].isin(ad[3:])]
    with pytest.raises(
        CohortError, match="too few to stratify: class AD has 3 subjects, 5 folds need ≥ 5"
    ):
        manifest_of(table)


def test_unknown_diagnosis_names_value_dataset_and_subject():
    table = cohort()
    table.loc[table["subject"] == "S007", "diagnosis"] = "Dementia"
    with pytest.raises(
        CohortError,
        match=r"dataset 'adni' subject 'S007' scan 'sub-S007': "
        r"diagnosis 'Dementia' is not in the label map",
    ):
        manifest_of(table)


def test_non_numeric_age_names_value_and_subject():
    table = cohort()
    table.loc[table["subject"] == "S009", "age"] = "seventy"
    with pytest.raises(
        CohortError, match=r"subject 'S009' scan 'sub-S009': age 'seventy' is not a number"
    ):
        manifest_of(table, task="regression")


def test_every_label_missing():
    table = cohort()
    table["diagnosis"] = ""
    with pytest.raises(
        MedtxError, match=r"dataset 'adni': every scan lacks a diagnosis label \(50 scans\)"
    ):
        manifest_of(table)


def test_too_few_for_two_age_bins():
    with pytest.raises(CohortError, match=r"too few to stratify by age: 8 subjects"):
        manifest_of(cohort(n=8), task="regression")


def test_given_age_bin_too_small():
    table = cohort(n=40)
    table.loc[table["subject"].isin(["S001", "S002", "S003"]), "age"] = "50"
    with pytest.raises(
        CohortError,
        match=r"too few to stratify: age bin \[-inf, 54\) has 3 "
        r"subjects, 5 folds need ≥ 5",
    ):
        manifest_of(table, task="regression", age_bins=[54])


def test_bad_arguments_and_missing_paths():
    with pytest.raises(MedtxError, match=r"n_folds must be an integer ≥ 3"):
        manifest_of(n_folds=2)
    with pytest.raises(MedtxError, match=r"task 'survival' is not one of"):
        manifest_of(task="survival")
    with pytest.raises(MedtxError, match=r"dataset 'oasis': no scans in the scan table"):
        manifest_of(dataset="oasis")
    with pytest.raises(MedtxError, match=r"no preprocessed path for scan\(s\) sub-S000_ses-1"):
        manifest_of(paths={})


# --- the leakage firewall ---


def two_manifests():
    adni, _ = manifest_of(cohort(dataset="adni"), dataset="adni")
    oasis, _ = manifest_of(cohort(dataset="oasis"), dataset="oasis", task="regression")
    return adni, oasis


def a_subject_in(manifest, role, k=0):
    return manifest.loc[manifest[f"role_{k}"] == role, "subject"].iloc[0]


def test_clean_manifests_pass():
    adni, oasis = two_manifests()
    pretrain = [("ukb", f"U{i}") for i in range(5)]
    assert leakage_report([adni, oasis], pretrain) == []
    check_leakage([adni, oasis], pretrain)
    # the same id in two datasets is two people unless declared identical
    assert leakage_report([adni], [("oasis", a_subject_in(adni, "test"))]) == []


def test_a_subject_in_two_splits_of_a_fold_is_named():
    adni, _ = two_manifests()
    bad = adni.copy()
    subject = a_subject_in(bad, "test")
    other = bad[bad["subject"] == subject].iloc[[0]].copy()
    other["role_0"] = "train"
    bad = pd.concat([bad, other], ignore_index=True)
    expected = (
        rf"adni:{subject} is in more than one split of manifest 0 \(adni\): "
        rf"fold 0: train \(adni:{subject}\) and test \(adni:{subject}\)"
    )
    with pytest.raises(LeakageError, match=expected):
        check_leakage([bad], [])


def test_a_pretraining_subject_in_val_or_test_is_named():
    adni, oasis = two_manifests()
    val, test = a_subject_in(adni, "val", k=2), a_subject_in(oasis, "test", k=1)
    train_only = a_subject_in(adni, "train")
    pretrain = [("adni", val), ("oasis", test)]
    with pytest.raises(LeakageError) as err:
        check_leakage({"adni_cls": adni, "oasis_age": oasis}, pretrain)
    message = str(err.value)
    assert (
        f"adni:{val} is a pre-training subject (as adni:{val}) and is evaluated in "
        f"manifest 'adni_cls': "
        in message
        and f"val of fold 2 as adni:{val}" in message
    )
    assert f"oasis:{test} is a pre-training subject" in message
    assert f"test of fold 1 as oasis:{test}" in message
    # each subject is listed once per manifest, with every fold it is evaluated in
    assert len(err.value.problems) == 2
    # every subject is tested in one fold, so any manifest subject used in
    # pre-training leaks, even one picked from a training set
    assert len(leakage_report([adni], [("adni", train_only)])) == 1


def test_declared_identity_links_subjects_across_datasets():
    adni, oasis = two_manifests()
    subject = a_subject_in(oasis, "val", k=3)
    pretrain = [("ukb", "U77")]
    identities = {"P1": ["ukb:U77", f"oasis:{subject}"]}
    assert leakage_report([oasis], pretrain) == []
    with pytest.raises(
        LeakageError,
        match=rf"person 'P1' is a pre-training subject \(as ukb:U77\) "
        rf"and is evaluated in manifest 0 \(oasis\): .*val of "
        rf"fold 3 as oasis:{subject}",
    ):
        check_leakage([oasis], pretrain, identities)
    # one person in train (adni) and test (oasis) of a pooled manifest
    pooled = pd.concat([adni, oasis], ignore_index=True)
    a, o = a_subject_in(adni, "train"), a_subject_in(oasis, "test")
    problems = leakage_report([pooled], [], {"P2": [f"adni:{a}", f"oasis:{o}"]})
    assert len(problems) == 1
    assert problems[0].startswith(
        f"person 'P2' is in more than one split of manifest 0 "
        f"(adni, oasis): fold 0: train (adni:{a}) and test (oasis:{o})"
    )


def test_bad_identity_declarations():
    adni, _ = two_manifests()
    with pytest.raises(CohortError, match=r"identity 'P1': 'S001' is not 'dataset:subject'"):
        check_leakage([adni], [], {"P1": ["S001"]})
    with pytest.raises(CohortError, match=r"adni:S001 is declared as both person 'P1' and 'P2'"):
        check_leakage([adni], [], {"P1": ["adni:S001"], "P2": ["adni:S001"]})
