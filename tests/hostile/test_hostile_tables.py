"""Tables nobody planned for: one clear line, never a pandas or OS traceback.

Issue 12: an empty CSV ended in pandas' EmptyDataError, a 300-character subject
id in a traceback from the file system once its output path was made. Each
test writes the table to disk and reads it as the workflow does; a bad table
is a ``MedtxError`` (the workflow prints it as ``medtx: error: ...``) whose
lines each name the file and, where there is one, the line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medtx.data.scan_ids import MAX_ID_LENGTH
from medtx.data.scans import build_scan_table
from medtx.errors import CohortError, ConfigError, MedtxError
from tests.conftest import sphere, write_nifti

LONG = "a" * 300


def images(folder: Path, n: int = 2) -> None:
    for i in range(n):
        write_nifti(folder / f"s{i}.nii.gz", sphere(shape=(12, 12, 12), radius=4, seed=i))


def read_csv_text(tmp_path, text: str | bytes, mode="fail", columns=None, name="scans.csv"):
    folder = tmp_path / "in"
    images(folder)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    ds = {"kind": "csv", "role": ["pretrain"], "path": str(path)}
    if columns:
        ds["columns"] = columns
    cache = tmp_path / "results" / "c.tsv"
    return path, lambda: build_scan_table("c", ds, cache_path=cache, on_bad_scan=mode)


def one_line(err: MedtxError) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_csv_is_one_line(tmp_path, text):
    path, build = read_csv_text(tmp_path, text)
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value) == (
        f"{path}: the dataset table is empty; its first line must name the columns"
    )
    assert not (tmp_path / "results").exists()


def test_a_headerless_csv_names_what_it_found(tmp_path):
    path, build = read_csv_text(tmp_path, "01,s0.nii.gz,70\n02,s1.nii.gz,71\n")
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value) == (
        f"{path}: missing column 'subject' (found ['01', 's0.nii.gz', '70']); "
        "the first line must name the columns"
    )


def test_a_header_only_csv_has_no_usable_scans(tmp_path):
    path, build = read_csv_text(tmp_path, "subject,t1\n")
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value) == f"dataset 'c' ({path}): no usable scans"


def test_ragged_rows_are_each_named_by_line(tmp_path):
    path, build = read_csv_text(tmp_path, "subject,t1\n01,s0.nii.gz,x,y\n02,s1.nii.gz\n03\n")
    with pytest.raises(CohortError) as err:
        build()
    assert err.value.problems == [
        f"{path} line 2: 4 field(s), but the header (line 1) has 2",
        f"{path} line 4: 1 field(s), but the header (line 1) has 2",
    ]


def test_a_binary_file_is_not_a_table(tmp_path):
    path, build = read_csv_text(tmp_path, bytes(range(256)) * 4)
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value).startswith(f"{path}: the dataset table is not UTF-8 text (")


def test_a_byte_order_mark_does_not_hide_the_header(tmp_path):
    _, build = read_csv_text(tmp_path, "\ufeffsubject,t1\n01,s0.nii.gz\n".encode())
    assert build()["scan"].tolist() == ["sub-01"]


@pytest.mark.parametrize("mode", ["fail", "exclude"])
def test_a_300_character_subject_id_is_one_line_and_never_a_path(tmp_path, mode):
    path, build = read_csv_text(tmp_path, f"subject,t1\n{LONG},s0.nii.gz\n02,s1.nii.gz\n", mode)
    expected = (
        f"{path} line 2: subject id 'aaaaaaaaaaaaaaaaaaaaaaaa…' has 300 characters, "
        f"more than the {MAX_ID_LENGTH} allowed"
    )
    if mode == "fail":
        with pytest.raises(CohortError) as err:
            build()
        assert err.value.problems == [expected]
    else:
        table = build()
        assert table.loc[table["status"] == "ok", "scan"].tolist() == ["sub-02"]
        assert table.loc[table["status"] == "excluded", "reason"].tolist() == [expected]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == (
        ["c.tsv"] if mode == "exclude" else []
    ) + ["s0.nii.gz", "s1.nii.gz", "scans.csv"]


def test_ids_up_to_the_maximum_are_fine(tmp_path):
    sub = "b" * MAX_ID_LENGTH
    _, build = read_csv_text(tmp_path, f"subject,session,t1\n{sub},{sub},s0.nii.gz\n")
    assert build()["scan"].tolist() == [f"sub-{sub}_ses-{sub}"]


def test_csv_rows_whose_ids_collide_once_normalised(tmp_path):
    text = "subject,session,t1\nsub-07,1,s0.nii.gz\n07,1,s1.nii.gz\nAB,,s0.nii.gz\nab,,s1.nii.gz\n"
    text += "09,,s0.nii.gz\n"
    path, build = read_csv_text(tmp_path, text)
    with pytest.raises(CohortError) as err:
        build()
    same = "ids compare without 'sub-' and ignoring case"
    assert err.value.problems == [
        f"{path} line 2: subject '07' session '1' is also on line 3 ({same})",
        f"{path} line 3: duplicate row for subject '07' session '1' (first on line 2 as 'sub-07')",
        f"{path} line 4: subject 'AB' is also on line 5 ({same})",
        f"{path} line 5: duplicate row for subject 'AB' (first on line 4 as 'AB')",
    ]
    _, build = read_csv_text(tmp_path, text, mode="exclude")
    table = build()
    assert table.loc[table["status"] == "ok", "scan"].tolist() == ["sub-09"]
    assert (table["status"] == "excluded").sum() == 4  # neither row's labels can be trusted


def test_a_columns_entry_naming_no_column_is_one_line(tmp_path):
    path, build = read_csv_text(tmp_path, "subject,t1\n01,s0.nii.gz\n", columns={"age": "AGE"})
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value) == f"{path}: no column 'AGE' (config key 'datasets/c/columns/age')"
    _, build = read_csv_text(tmp_path, "subject,t1\n01,s0.nii.gz\n", columns={"years": "age"})
    with pytest.raises(ConfigError, match=r"^config key 'datasets/c/columns/years': not a column"):
        build()


@pytest.mark.parametrize(
    "text,message",
    [
        ("", ": participants.tsv is empty; its first line must name the columns"),
        ("sub-01\t70\n", ": missing column 'participant_id' (found ['sub-01', '70'])"),
        ("participant_id\tage\nsub-01\t70\tx\n", " line 2: 3 field(s), but the header"),
    ],
)
def test_a_bad_participants_tsv_is_one_line(tmp_path, text, message):
    root = tmp_path / "bids"
    write_nifti(root / "sub-01/anat/sub-01_T1w.nii.gz", sphere(shape=(12, 12, 12), radius=4))
    (root / "participants.tsv").write_text(text)
    with pytest.raises(MedtxError) as err:
        build_scan_table("b", {"kind": "bids", "role": ["pretrain"], "path": str(root)})
    lines = err.value.problems if isinstance(err.value, CohortError) else [one_line(err.value)]
    assert len(lines) == 1 and lines[0].startswith(f"{root / 'participants.tsv'}{message}")


def test_a_300_character_participant_id(tmp_path):
    root = tmp_path / "bids"
    write_nifti(root / "sub-01/anat/sub-01_T1w.nii.gz", sphere(shape=(12, 12, 12), radius=4))
    (root / "participants.tsv").write_text(f"participant_id\nsub-{LONG}\nsub-01\n")
    ds = {"kind": "bids", "role": ["pretrain"], "path": str(root)}
    with pytest.raises(CohortError) as err:
        build_scan_table("b", ds)
    assert err.value.problems == [
        f"{root / 'participants.tsv'} line 2: participant_id 'aaaaaaaaaaaaaaaaaaaaaaaa…' "
        f"has 300 characters, more than the {MAX_ID_LENGTH} allowed"
    ]


def test_a_file_name_with_braces_is_one_line(tmp_path):
    """Snakemake would read ``{x}`` in an input path as a wildcard and fail planning."""
    folder = tmp_path / "in"
    write_nifti(folder / "s{x}.nii.gz", sphere(shape=(12, 12, 12), radius=4))
    images(folder, 1)
    path = folder / "scans.csv"
    path.write_text("subject,t1\n01,s{x}.nii.gz\n02,s0.nii.gz\n")
    ds = {"kind": "csv", "role": ["pretrain"], "path": str(path)}
    table = build_scan_table(
        "c", ds, cache_path=tmp_path / "results" / "c.tsv", on_bad_scan="exclude"
    )
    assert table.loc[table["status"] == "ok", "scan"].tolist() == ["sub-02"]
    (reason,) = table.loc[table["status"] == "excluded", "reason"]
    assert (
        reason
        == f"{folder / 's{x}.nii.gz'}: braces in a file name are not supported; rename the file"
    )


def test_a_duplicated_column_is_one_line_naming_the_file_and_the_column(tmp_path):
    """Issue 31: csv.DictReader keeps the last of two 'age' columns and says nothing."""
    path, build = read_csv_text(tmp_path, "subject,age,t1,age\n01,60,s0.nii.gz,61\n")
    with pytest.raises(MedtxError) as err:
        build()
    assert one_line(err.value) == (
        f"{path}: the dataset table has two columns named 'age' (columns 2 and 4 of line 1); "
        "keep one"
    )
    path, build = read_csv_text(tmp_path, "\nsubject,t1, t1\n01,s0.nii.gz,s1.nii.gz\n")
    with pytest.raises(MedtxError, match=r"two columns named 't1' \(columns 2 and 3 of line 2\)"):
        build()
