"""The scan table: BIDS, CSV and BraTS inputs, checks, exclusions, cache."""

import numpy as np
import pandas as pd
import pytest

import medtx.data.scans as scans
from medtx.data.bids_validation import validator_command
from medtx.data.scans import build_scan_table
from medtx.errors import CohortError, MedtxError
from tests.conftest import sphere, write_nifti


def make_bids(root, subjects=("01", "02"), participants=None, sessions=None):
    for i, sub in enumerate(subjects):
        for ses in sessions or [None]:
            anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_T1w.nii.gz"
            write_nifti(anat / name, sphere(seed=i))
    lines = participants or [f"sub-{s}\t{60 + i}\tAD" for i, s in enumerate(subjects)]
    (root / "participants.tsv").write_text(
        "participant_id\tage\tdiagnosis\n" + "\n".join(lines) + "\n"
    )
    return root


def bids(root, **kw):
    return {"kind": "bids", "role": ["classification"], "path": str(root), **kw}


def test_bids_rows_with_labels_and_sessions(tmp_path):
    make_bids(tmp_path, sessions=["1", "2"])
    table = build_scan_table("ds", bids(tmp_path))
    assert list(table["scan"]) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-02_ses-2"]
    assert set(table["status"]) == {"ok"}
    assert table.loc[table["subject"] == "02", "age"].tolist() == ["61", "61"]


def test_listed_subject_without_files_is_a_skipped_row_naming_its_line(tmp_path):
    make_bids(tmp_path, participants=["sub-01\t60\tCN", "sub-02\t61\tCN", "sub-09\t70\tAD"])
    table = build_scan_table("ds", bids(tmp_path))
    assert table["status"].tolist() == ["ok", "ok", "skipped"]
    skipped = table.iloc[2]
    assert (skipped["subject"], skipped["scan"], skipped["t1"]) == ("09", "", None)
    assert skipped["reason"] == (
        f"{tmp_path / 'participants.tsv'} line 4: sub-09 is listed but "
        f"{tmp_path / 'sub-09'} does not exist"
    )


def test_exclude_mode_lists_bad_scans_and_keeps_the_rest(tmp_path):
    make_bids(tmp_path, subjects=("01", "02", "03"))
    bad = tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    data = sphere()
    data[1, 1, 1] = np.nan
    write_nifti(bad, data)
    cache = tmp_path / "cache.tsv"
    table = build_scan_table("ds", bids(tmp_path), cache_path=cache, on_bad_scan="exclude")
    ok = table[table["status"] == "ok"]
    excluded = table[table["status"] == "excluded"]
    assert list(ok["subject"]) == ["01", "03"]
    assert list(excluded["subject"]) == ["02"]
    assert "NaN or Inf" in excluded["reason"].iloc[0] and "sub-02_T1w" in excluded["reason"].iloc[0]
    assert pd.read_csv(cache, sep="\t")["status"].tolist().count("excluded") == 1


def test_fail_mode_collects_every_problem(tmp_path):
    make_bids(tmp_path, subjects=("01", "02", "03"))
    write_nifti(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", np.zeros((5, 5, 5), np.float32))
    (tmp_path / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_text("not nifti")
    with pytest.raises(CohortError, match=r"2 problem\(s\)") as err:
        build_scan_table("ds", bids(tmp_path))
    assert "all zeros" in str(err.value) and "sub-03_T1w.nii.gz: not a readable NIfTI" in str(
        err.value
    )


def test_subject_ids_must_be_alphanumeric(tmp_path):
    make_bids(tmp_path, subjects=("01", "0x_2"), participants=["sub-01\t1\tCN", "sub-0x_2\t2\tCN"])
    with pytest.raises(
        CohortError, match=r"subject id '0x_2' has characters outside \[A-Za-z0-9\]"
    ):
        build_scan_table("ds", bids(tmp_path))


def test_duplicate_participants(tmp_path):
    make_bids(tmp_path, participants=["sub-01\t1\tCN", "sub-02\t2\tCN", "sub-01\t3\tAD"])
    with pytest.raises(CohortError, match="participant_id 'sub-01' is listed more than once"):
        build_scan_table("ds", bids(tmp_path))


def write_csv(tmp_path, lines):
    for i in range(3):
        write_nifti(tmp_path / f"s{i}.nii.gz", sphere(seed=i))
    path = tmp_path / "scans.csv"
    path.write_text("subject,session,t1,age,diagnosis\n" + "\n".join(lines) + "\n")
    return {"kind": "csv", "role": ["regression"], "path": str(path)}


def test_csv_relative_paths_and_labels(tmp_path):
    ds = write_csv(tmp_path, ["a1,,s0.nii.gz,70,CN", "a2,1,s1.nii.gz,71.5,MCI"])
    table = build_scan_table("c", ds)
    assert list(table["scan"]) == ["sub-a1", "sub-a2_ses-1"]
    assert table["t1"].iloc[1] == str(tmp_path / "s1.nii.gz")


def test_csv_duplicate_rows_named_with_lines(tmp_path):
    ds = write_csv(tmp_path, ["a1,1,s0.nii.gz,70,CN", "a1,1,s1.nii.gz,70,CN"])
    with pytest.raises(
        CohortError, match=r"line 3: duplicate row for subject 'a1' session '1' \(first on line 2\)"
    ):
        build_scan_table("c", ds)


def test_csv_missing_file(tmp_path):
    ds = write_csv(tmp_path, ["a1,,s0.nii.gz,70,CN", "a2,,gone.nii.gz,70,CN"])
    with pytest.raises(CohortError, match=r"gone\.nii\.gz: file does not exist"):
        build_scan_table("c", ds)


def test_csv_missing_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("id,t1\n1,a.nii.gz\n")
    with pytest.raises(MedtxError, match=r"x\.csv: missing column 'subject'"):
        build_scan_table("c", {"kind": "csv", "role": ["pretrain"], "path": str(path)})


def test_cache_rechecks_only_changed_files(tmp_path, monkeypatch):
    make_bids(tmp_path, subjects=("01", "02", "03"))
    cache = tmp_path / "cache.tsv"
    build_scan_table("ds", bids(tmp_path), cache_path=cache)
    calls = []
    real = scans.load_volume
    monkeypatch.setattr(scans, "load_volume", lambda p, **k: calls.append(p) or real(p, **k))
    build_scan_table("ds", bids(tmp_path), cache_path=cache)
    assert calls == []  # nothing re-read
    changed = tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    write_nifti(changed, np.zeros((6, 6, 6), np.float32))
    with pytest.raises(CohortError, match="sub-02_T1w.nii.gz: image is all zeros"):
        build_scan_table("ds", bids(tmp_path), cache_path=cache)
    assert calls == [str(changed)]


def test_cache_not_rewritten_when_unchanged(tmp_path):
    make_bids(tmp_path)
    cache = tmp_path / "cache.tsv"
    build_scan_table("ds", bids(tmp_path), cache_path=cache)
    first = cache.stat().st_mtime_ns
    build_scan_table("ds", bids(tmp_path), cache_path=cache)
    assert cache.stat().st_mtime_ns == first


def test_a_spawned_job_reads_the_written_tables_as_they_were_built(tmp_path):
    """``planned_scan_tables`` (a SLURM job's view) gives each written table with the
    text the planner built, so its stamps agree; a dataset without a table is built."""
    written = write_csv(tmp_path, ["a1,,s0.nii.gz,70,CN", "a2,1,s1.nii.gz,71.5,MCI"])
    make_bids(tmp_path / "bids")
    datasets = {"c": written, "b": bids(tmp_path / "bids")}
    table_path = lambda name: tmp_path / f"{name}.tsv"  # noqa: E731
    built = scans.build_scan_tables(datasets, table_path=table_path, write=False)
    scans.write_scan_table(scans.table_text(built["c"]), table_path("c"))
    (tmp_path / "s1.nii.gz").unlink()  # gone since the plan: the job does not look
    planned = scans.planned_scan_tables(datasets, table_path=table_path, write=False)
    assert list(planned) == ["c", "b"]
    for name in datasets:
        assert scans.table_text(planned[name]) == scans.table_text(built[name])
    assert not table_path("b").exists()  # built, as the planner builds it: not written
    with pytest.raises(CohortError, match=r"s1\.nii\.gz: file does not exist"):
        scans.build_scan_tables(datasets, table_path=table_path, write=False)


def test_brats_missing_modality(tmp_path):
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        for mod in ("t1", "t1ce", "t2", "flair", "seg"):
            if case.endswith("2") and mod == "flair":
                continue
            data = sphere() if mod != "seg" else (sphere() > 50).astype(np.float32)
            write_nifti(tmp_path / case / f"{case}_{mod}.nii.gz", data)
    table = build_scan_table(
        "b",
        {"kind": "brats", "role": ["segmentation"], "path": str(tmp_path)},
        on_bad_scan="exclude",
    )
    assert table.loc[table["status"] == "ok", "scan"].tolist() == ["BraTS20_Training_001"]
    assert "missing flair" in table.loc[table["status"] == "excluded", "reason"].iloc[0]
    assert table["subject"].iloc[0] == "BraTS20Training001"


def test_no_usable_scans(tmp_path):
    make_bids(tmp_path, subjects=("01",))
    write_nifti(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(MedtxError, match="no usable scans; 1 excluded"):
        build_scan_table("ds", bids(tmp_path), on_bad_scan="exclude")


@pytest.mark.skipif(
    validator_command() is None,
    reason="bids-validator-deno is not installed",
)
def test_bids_validate_names_the_validators_errors(tmp_path):
    import json

    make_bids(tmp_path, sessions=["1"])
    missing = r"(?s)the BIDS validator.*dataset_description.json: MISSING"
    with pytest.raises(CohortError, match=missing):
        build_scan_table("ds", bids(tmp_path, bids_validate=True))
    description = {"Name": "t", "BIDSVersion": "1.10.0", "DatasetType": "raw"}
    (tmp_path / "dataset_description.json").write_text(json.dumps(description))
    # a file the validator does not know, named with its path
    (tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_T1w_copy.nii.gz").write_bytes(b"x")
    with pytest.raises(CohortError, match=r"sub-01_ses-1_T1w_copy.nii.gz: "):
        build_scan_table("ds", bids(tmp_path, bids_validate=True))
    (tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_T1w_copy.nii.gz").unlink()
    assert len(build_scan_table("ds", bids(tmp_path, bids_validate=True))) == 2


def test_bids_validate_is_for_bids_inputs(tmp_path):
    with pytest.raises(MedtxError, match="datasets/ds/bids_validate': only a bids dataset"):
        build_scan_table("ds", {**bids(tmp_path), "kind": "csv", "bids_validate": True})
