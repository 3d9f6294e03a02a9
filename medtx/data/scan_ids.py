"""Scan ids, the names in every output path, and the identity they encode.

A T1 scan is ``sub-<subject>[_ses-<session>]`` (BIDS entities, ids in
[A-Za-z0-9]); a BraTS scan keeps its case folder's name, and its subject is
that name's letters and digits. Rules pass only the id; each step reads the
subject and session back from it here instead of looking them up.
"""

from __future__ import annotations

import re

from medtx.errors import MedtxError

SCAN_ID_PATTERN = re.compile(r"^sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?$")


def scan_id(subject: str, session: str | None) -> str:
    """``sub-<subject>[_ses-<session>]``, the name used in every output path."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def brats_subject(case: str) -> str:
    """A BraTS case's subject id: ``BraTS2021_00001`` -> ``BraTS202100001``."""
    return re.sub(r"[^A-Za-z0-9]", "", case)


def scan_identity(scan: str, *, brats: bool = False) -> dict[str, str | None]:
    """``{"subject", "session"}`` of a scan id: the inverse of ``scan_id``."""
    if brats:
        return {"subject": brats_subject(scan), "session": None}
    match = SCAN_ID_PATTERN.match(scan)
    if not match:
        raise MedtxError(f"scan id {scan!r}: use sub-<id>[_ses-<id>] with ids in [A-Za-z0-9]")
    return {"subject": match["subject"], "session": match["session"]}
