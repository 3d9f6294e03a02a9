"""Scans built to exhaust memory are refused in one line before their data is allocated.

Issue 31's probe: a 93-byte gzip whose header declares 2000^3 float32 (32 GB), a
498 KB gzip of 800^3 zero bytes (a 512 MB image, 2 GB as float32), and one such
file among good cases in ``medtx predict``. Each file is written by hand, header
bytes and gzip, as an attacker or a broken converter would.

The memory checks run the read in a child process under an address-space cap,
so a regression fails with a ``MemoryError`` or a large peak RSS there instead
of taking this machine's memory.
"""

import gzip
import os
import resource
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medtx.data.scans import check_row
from medtx.predict.run import PREDICTIONS, predict_bundle
from tests.conftest import REPO
from tests.unit.predict.test_predict import bundle, cases  # noqa: F401 (fixtures)

AS_CAP = 1536 << 20  # the child's address space: far below any of the declared images
RSS_GROWTH_MAX = 256 << 20  # what a refused read may grow the child's peak RSS by


def header_only(path, shape, dtype):
    """A NIfTI that is only its 352 header bytes, gzipped: it declares ``shape`` x ``dtype``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_data_offset(352)
    path.write_bytes(gzip.compress(hdr.binaryblock + bytes(4), compresslevel=9))
    return path


def zero_bomb(path, side=800):
    """A valid .nii.gz of ``side``^3 uint8 zeros, streamed into gzip (never held whole)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((side,) * 3)
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_offset(352)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(hdr.binaryblock + bytes(4))
        plane = bytes(side * side)
        for _ in range(side):
            fh.write(plane)
    return path


def read_in_child(path):
    """``load_volume(path)`` in a capped child: (its output lines, peak RSS growth in bytes)."""
    probe = textwrap.dedent(
        """
        import sys
        from medtx.errors import MedtxError
        from medtx.io import load_volume

        def peak_kib():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's)
            with open("/proc/self/status") as fh:
                return int(next(x for x in fh if x.startswith("VmHWM:")).split()[1])

        before = peak_kib()
        try:
            load_volume(sys.argv[1])
            print("loaded")
        except MedtxError as err:
            print(f"refused: {err}")
        print(f"rss_growth_kib: {peak_kib() - before}")
        """
    )

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MEDTX_MAX_IMAGE_BYTES", None)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        preexec_fn=cap,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # a MemoryError traceback lands here
    lines = done.stdout.splitlines()
    return lines[:-1], int(lines[-1].split()[-1]) * 1024


def test_a_tiny_header_declaring_32_gb_is_refused_before_allocation(tmp_path):
    path = header_only(tmp_path / "huge.nii.gz", (2000, 2000, 2000), np.float32)
    assert path.stat().st_size < 200
    lines, growth = read_in_child(path)
    assert lines == [
        f"refused: {path}: header declares 2000x2000x2000 float32 voxels: 29.8 GiB to read, "
        "more than the 2.0 GiB limit (MEDTX_MAX_IMAGE_BYTES)"
    ]
    assert growth < RSS_GROWTH_MAX


def test_the_workflows_scan_check_refuses_it_in_one_line(tmp_path):
    """Snakemake builds the scan table at parse time (``build_scan_tables`` ->
    ``check_row`` -> ``load_volume``): the file is one excluded row, not a crash."""
    path = header_only(tmp_path / "sub-01_T1w.nii.gz", (2000, 2000, 2000), np.float32)
    cache: dict = {}
    problem = check_row({"subject": "01", "t1": str(path)}, cache)
    assert problem == (
        f"subject 01: {path}: header declares 2000x2000x2000 float32 voxels: 29.8 GiB to read, "
        "more than the 2.0 GiB limit (MEDTX_MAX_IMAGE_BYTES)"
    )
    assert cache[str(path)][1] == problem  # cached: a rerun does not read it again


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return zero_bomb(tmp_path_factory.mktemp("bomb") / "zeros.nii.gz")


def test_a_gzip_of_zeros_is_refused_without_inflating_it(bomb):
    assert bomb.stat().st_size < 600_000  # 498 KB for a 512 MB image
    lines, growth = read_in_child(bomb)
    assert len(lines) == 1 and lines[0].startswith(f"refused: {bomb}: gzip expands ")
    assert "more than the 1000:1 a scan compresses" in lines[0]
    assert growth < RSS_GROWTH_MAX


def test_a_bomb_under_the_ratio_floor_is_named_all_zeros_after_a_bounded_read(tmp_path):
    """Below the ratio check's floor the data is streamed through, never held
    as float32, and the empty image is still named."""
    path = zero_bomb(tmp_path / "small_zeros.nii.gz", side=300)  # 27 MB: under the floor
    lines, growth = read_in_child(path)
    assert lines == [f"refused: {path}: image is all zeros"]
    assert growth < 48 << 20  # its float32 copy alone would be 103 MiB


def test_one_bad_case_among_good_ones_keeps_their_predictions(bundle, cases, tmp_path):  # noqa: F811
    good = sorted(p.name for p in cases.iterdir() if p.is_dir())
    root = tmp_path / "cases"
    root.mkdir()
    for name in good:
        (root / name).symlink_to(cases / name)
    bad = root / "bad"
    bad.mkdir()
    donor = cases / good[0]
    for mod in ("t1ce", "t2", "flair"):
        (bad / f"bad_{mod}.nii.gz").symlink_to(donor / f"{good[0]}_{mod}.nii.gz")
    t1 = header_only(bad / "bad_t1.nii.gz", (2000, 2000, 2000), np.float32)
    lines: list[str] = []
    out = tmp_path / "out"
    table = predict_bundle(bundle.path, [root], out, log=lines.append)
    written = pd.read_csv(out / PREDICTIONS, sep="\t", keep_default_na=False)
    assert sorted(written["scan"]) == sorted([*good, "bad"])
    for row in written[written["scan"] != "bad"].to_dict("records"):
        assert row["error"] == ""
        assert (out / row["scan"] / f"{row['scan']}_seg.nii.gz").exists()
        assert (out / row["scan"] / f"{row['scan']}_predict.json").exists()
    why = f"subject bad: {t1}: header declares 2000x2000x2000 float32 voxels"
    (reason,) = written.loc[written["scan"] == "bad", "error"]
    assert reason.startswith(why) and "\n" not in reason
    assert f"medtx: skipped: {reason}" in lines
    assert table["error"].fillna("").astype(bool).sum() == 1
