"""Scan ids: the steps read a scan's subject and session back from its id."""

import pytest

from medtx.data.scan_ids import brats_subject, scan_id, scan_identity
from medtx.errors import MedtxError


@pytest.mark.parametrize("subject,session", [("01", None), ("A7", "2"), ("ADNI002S0295", "m06")])
def test_identity_is_the_inverse_of_scan_id(subject, session):
    assert scan_identity(scan_id(subject, session)) == {"subject": subject, "session": session}


def test_brats_case_keeps_its_letters_and_digits():
    assert scan_identity("BraTS2021_00012", brats=True) == {
        "subject": "BraTS202100012",
        "session": None,
    }
    assert brats_subject("BraTS2021_00012") == "BraTS202100012"


def test_a_run_stays_in_the_id_and_out_of_the_identity():
    scan = scan_id("01", "2", "3")
    assert scan == "sub-01_ses-2_run-3"
    assert scan_identity(scan) == {"subject": "01", "session": "2"}
    assert scan_identity("sub-01_run-01") == {"subject": "01", "session": None}


@pytest.mark.parametrize(
    "scan", ["01", "sub-a_b", "sub-01_ses-", "sub-01_run-a", "sub-01_run-1_ses-2"]
)
def test_an_id_that_is_not_a_scan_id_is_named(scan):
    with pytest.raises(MedtxError, match=f"scan id '{scan}'"):
        scan_identity(scan)
