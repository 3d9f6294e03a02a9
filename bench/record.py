"""One JSON record per benchmark run: its figures, and where they came from.

Every ``bench/*.py`` that takes ``--json PATH`` writes through ``write_record``,
so each file names the commit, the date and the machine (CPU model, core
count) beside the figures, and ``docs/generate.py`` turns
``bench/results/<bench>.json`` into that benchmark's page.

``sections`` maps a section name to its figures: a list of rows (dicts, one
table), a dict (a table of figure / value, nested dicts as sub-sections) or a
single value.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Where and when (UTC) the figures were measured."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "commit": commit + ("+uncommitted changes" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "host": platform.node(),
        "python": platform.python_version(),
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# Taken when a bench imports this module, at its start: the commit and tree that ran,
# even if the checkout changes while it runs.
AT_START = machine()


def write_record(
    bench: str,
    sections: dict[str, Any],
    path: str | Path | None,
    *,
    notes: list[str] | tuple[str, ...] = (),
    argv: list[str] | None = None,
) -> Path | None:
    """Write ``sections`` with the machine's details to ``path`` (nothing when None).

    Rewritten whole at each call, so a bench may call it after each section and a
    run cut short keeps what it measured.
    """
    if path is None:
        return None
    argv = sys.argv if argv is None else argv
    record = {
        "bench": bench,
        "command": " ".join(shlex.quote(a) for a in ["python", f"bench/{bench}.py", *argv[1:]]),
        "machine": AT_START,
        "notes": list(notes),
        "sections": sections,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(out)
    return out
