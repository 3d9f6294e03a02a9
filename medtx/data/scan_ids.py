"""Scan ids, the names in every output path, and the identity they encode.

A T1 scan is ``sub-<subject>[_ses-<session>][_run-<run>]`` (BIDS entities, ids in
[A-Za-z0-9]; the run only when a BIDS dataset takes every run, ``runs: all``);
a BraTS scan keeps its case folder's name, and its subject is that name's
letters and digits. Rules pass only the id; each step reads the subject and
session back from it here instead of looking them up.

Ids are at most ``MAX_ID_LENGTH`` characters: a subject and a session id both
go into every output file name (``sub-<64>_ses-<64>_run-<n>_desc-preproc_T1w.nii.gz``
is about 170 characters), which must stay under the 255 that file systems allow.
"""

from __future__ import annotations

import math
import re
from typing import Any

from medtx.errors import MedtxError

ID_PATTERN = re.compile(r"^[A-Za-z0-9]+$")
MAX_ID_LENGTH = 64
SCAN_ID_PATTERN = re.compile(
    r"^sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?(?:_run-(?P<run>[0-9]+))?$"
)


def scan_id(subject: str, session: str | None, run: str | None = None) -> str:
    """``sub-<subject>[_ses-<session>][_run-<run>]``, the name used in every output path."""
    return (
        f"sub-{subject}" + (f"_ses-{session}" if session else "") + (f"_run-{run}" if run else "")
    )


def brats_subject(case: str) -> str:
    """A BraTS case's subject id: ``BraTS2021_00001`` -> ``BraTS202100001``."""
    return re.sub(r"[^A-Za-z0-9]", "", case)


def scan_identity(scan: str, *, brats: bool = False) -> dict[str, str | None]:
    """``{"subject", "session"}`` of a scan id: the inverse of ``scan_id``.

    A run stays in the id (it names the outputs); the steps need only who and when.
    """
    if brats:
        return {"subject": brats_subject(scan), "session": None}
    match = SCAN_ID_PATTERN.match(scan)
    if not match:
        raise MedtxError(
            f"scan id {scan!r}: use sub-<id>[_ses-<id>][_run-<n>] with ids in [A-Za-z0-9]"
        )
    return {"subject": match["subject"], "session": match["session"]}


def shown(text: str, limit: int = 24) -> str:
    """An id for a message: quoted, and cut short when it is long."""
    return repr(text) if len(text) <= limit else repr(text[:limit] + "…")


def check_id(value: Any, what: str, where: str) -> str | None:
    """A problem line when an id is empty, too long or not [A-Za-z0-9]; else None."""
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if not text:
        return f"{where}: empty {what}"
    if len(text) > MAX_ID_LENGTH:
        return (
            f"{where}: {what} {shown(text)} has {len(text)} characters, "
            f"more than the {MAX_ID_LENGTH} allowed"
        )
    if not ID_PATTERN.match(text):
        return f"{where}: {what} {shown(text)} has characters outside [A-Za-z0-9]"
    return None
