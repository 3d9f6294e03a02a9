"""A dataset's record list reaches a command as one @FILE argument."""

from __future__ import annotations

import pytest

from medtx.cli import build_parser
from medtx.errors import MedtxError
from medtx.provenance import run_index
from medtx.workflow.argfile import write_argfile


def test_the_cli_reads_an_argfile_as_one_argument_per_line(tmp_path):
    paths = [f"results/work/ds/sub-{i:05d}/sub-{i:05d}_provenance.json" for i in range(3)]
    paths.append(str(tmp_path / "a b;$(touch x)" / "s_provenance.json"))  # kept whole
    listed = write_argfile(paths, tmp_path / "ds.records.txt")
    args = build_parser().parse_args(
        ["folds", "--dataset", "ds", "--task", "regression", "--table", "t.tsv",
         "--records", f"@{listed}", "--params", "{}", "--out-tsv", "o", "--out-json", "j"]
    )  # fmt: skip
    assert args.records == paths
    report = build_parser().parse_args(
        ["report", "--records", f"@{listed}", f"@{listed}", "--out", "r"]
    )
    assert report.records == paths + paths  # one list per dataset, in order


def test_run_index_reads_the_record_lists_too(tmp_path, capsys):
    listed = write_argfile([str(tmp_path / "missing_provenance.json")], tmp_path / "l.txt")
    assert run_index.main(["--records", f"@{listed}", "--out", str(tmp_path / "i.json")]) == 1
    assert "missing_provenance.json" in capsys.readouterr().err  # the listed path was read


@pytest.mark.parametrize("bad", ["a\nb.json", "@other.txt"])
def test_a_path_the_list_cannot_carry_is_refused(tmp_path, bad):
    with pytest.raises(MedtxError, match="cannot be passed in an argument file"):
        write_argfile(["ok.json", bad], tmp_path / "l.txt")
    assert not (tmp_path / "l.txt").exists()
