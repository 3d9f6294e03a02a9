"""The official BIDS validator, run on a dataset folder.

``bids-validator-deno`` (PyPI) is the BIDS project's own schema-based validator as
one binary. medtx runs it on a user's BIDS input when the dataset asks for it
(``bids_validate: true``) and, in its tests, on the generated demo datasets and
on its BIDS-derivatives outputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medtx.errors import MedtxError

VALIDATOR = "bids-validator-deno"
TIMEOUT_S = 600


@dataclass(frozen=True)
class Finding:
    """One issue the validator reported, at one file (or the dataset)."""

    code: str
    severity: str
    location: str
    message: str

    def line(self, root: str | Path) -> str:
        where = f"{Path(root)}{self.location}" if self.location else str(root)
        return f"{where}: {self.code}" + (f" ({self.message})" if self.message else "")


def validator_command() -> str | None:
    """The validator beside this Python (its venv), else on PATH, else None."""
    beside = Path(sys.executable).with_name(VALIDATOR)
    return str(beside) if beside.is_file() else shutil.which(VALIDATOR)


def validate(root: str | Path) -> list[Finding]:
    """Every issue (errors and warnings) the validator finds in the dataset at ``root``."""
    command = validator_command()
    if command is None:
        raise MedtxError(f"{VALIDATOR} is not installed (pip install {VALIDATOR})")
    if not Path(root).is_dir():
        raise MedtxError(f"{root}: not a folder; a BIDS dataset is a folder")
    try:
        done = subprocess.run(
            [command, "--format", "json", str(root)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        issues = json.loads(done.stdout)["issues"]["issues"]
    except subprocess.TimeoutExpired as err:
        raise MedtxError(f"{root}: the BIDS validator ran over {TIMEOUT_S} s") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MedtxError(f"{root}: the BIDS validator failed ({last})") from err
    return [
        Finding(
            code=str(i.get("code", "")),
            severity=str(i.get("severity", "")),
            location=str(i.get("location") or (i.get("affects") or [""])[0]),
            message=" ".join(str(i.get("issueMessage") or i.get("subCode") or "").split())[:200],
        )
        for i in issues
    ]


def errors(findings: list[Finding]) -> list[Finding]:
    """The findings that make a dataset invalid (warnings only advise)."""
    return [f for f in findings if f.severity == "error"]
