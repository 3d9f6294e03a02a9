"""The medtx command: one-line errors, Table 3, scan ids."""

import pytest

from medtx.cli import main
from medtx.preprocess.chain import default_scan_id


def test_params_prints_table3_counts(capsys):
    assert main(["params", "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    counts = {(r[0], r[1]): int(r[4]) for r in rows}
    backbones = {r[1]: r[6] for r in rows}
    assert backbones["table3"] == "medical_transformer" and backbones["base"] == "pumit"
    assert 80e6 < counts[("classification", "base")] < 100e6  # ViT-B
    assert counts[("classification", "table3")] == 2_402_163
    assert counts[("regression", "table3")] == 2_401_777
    assert counts[("segmentation", "table3")] == 2_410_227
    assert counts[("classification", "paper_text")] == 2_104_083


@pytest.mark.parametrize(
    "path,scan",
    [
        ("/d/sub-01_ses-2_T1w.nii.gz", "sub-01_ses-2"),
        ("/d/sub-A7_T1w.nii", "sub-A7"),
        ("atlas.nii.gz", "sub-atlas"),
        ("my scan-3.nii.gz", "sub-myscan3"),
    ],
)
def test_default_scan_id(path, scan):
    assert default_scan_id(path) == scan


def test_bad_json_params_is_one_line(capsys):
    code = main(["step", "n4", "--input", "brain=a", "--params", "{nope", "--context", "{}"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "medtx: error: --params is not valid JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)"
    )


def test_bad_scan_id(tmp_path, tiny_t1, capsys):
    assert (
        main(
            [
                "preprocess",
                str(tiny_t1),
                "--out",
                str(tmp_path / "o"),
                "--scan",
                "sub-a_b",
                "--backend",
                "ants",
            ]
        )
        == 1
    )
    assert "use sub-<id>[_ses-<id>]" in capsys.readouterr().err


def test_step_records_the_identity_read_from_scan(tmp_path):
    """The rules pass --scan/--dataset; subject and session come from the id."""
    import json

    import numpy as np

    from tests.conftest import write_nifti

    mask = np.zeros((8, 8, 8), np.float32)
    mask[2:6, 2:6, 2:6] = 1
    image = write_nifti(tmp_path / "n4.nii.gz", mask * np.arange(8, dtype=np.float32) * 100)
    maskp = write_nifti(tmp_path / "mask.nii.gz", mask)
    outs = {
        "pooled": "pooled.nii.gz",
        "mask": "pmask.nii.gz",
        "pool_record": "pool.json",
        "image": "preproc.nii.gz",
        "record": "norm.json",
    }
    args = ["step", "pool_normalize", "--input", f"image={image}", "--input", f"mask={maskp}"]
    for role, name in outs.items():
        args += ["--output", f"{role}={tmp_path / name}"]
    assert (
        main(
            [
                *args,
                "--params",
                '{"pool": {"factor": 2}, "normalize": {"within": "brain"}}',
                "--context",
                '{"backend": "ants", "seed": 7}',
                "--scan",
                "sub-0295_ses-m06",
                "--dataset",
                "adni",
            ]
        )
        == 0
    )
    for name in ("pool.json", "norm.json"):
        record = json.loads((tmp_path / name).read_text())
        assert (
            record["scan"],
            record["dataset"],
            record["subject"],
            record["session"],
            record["seed"],
        ) == ("sub-0295_ses-m06", "adni", "0295", "m06", 7)


def test_step_names_a_scan_id_it_cannot_read(capsys):
    code = main(["step", "n4", "--params", "{}", "--context", "{}", "--scan", "0295"])
    assert code == 1
    assert "scan id '0295'" in capsys.readouterr().err


def test_version_prints_the_version_and_the_code_hash(capsys):
    import re

    from medtx import __version__
    from medtx.cli import main
    from medtx.workflow.codehash import package_hash

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"medtx {__version__} (code {package_hash()})"
    assert re.fullmatch(r"medtx \S+ \(code [0-9a-f]{16}\)", out)


def test_every_command_help_shows_an_example_of_itself():
    from medtx.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for name, command in commands.items():
        text = command.format_help()
        example = text.split("example:\n", 1)[1].strip()
        assert example.startswith(f"medtx {name} "), (name, example)
