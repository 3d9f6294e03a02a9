"""Re-hash recorded outputs and report any that changed since preprocessing.

Every output in a per-scan provenance record (``*_provenance.json``) carries the
sha256 it had when the step wrote it. ``audit`` hashes each file again (each
distinct file once, however many records name it) and lists the ones that
differ or are gone; ``medtx audit [ROOT]`` prints the summary and exits 1 when
anything is wrong, so a modified or deleted result cannot go unnoticed before
training or publication.

Relative paths in records are relative to the directory the workflow ran in
(the repository root); pass ``base_dir`` when auditing from elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError
from medtx.io import sha256
from medtx.provenance.report import find_provenance_files, load_scan_record

CHANGED = "changed"
MISSING = "missing"


def _records(records_or_root: Any) -> list[tuple[str | None, Mapping[str, Any]]]:
    """(source JSON path or None, record) for a root, a JSON path, or a list of either/dicts."""
    if isinstance(records_or_root, (str, Path)):
        items: Iterable[Any] = find_provenance_files(records_or_root)
    elif isinstance(records_or_root, Mapping):
        items = [records_or_root]
    else:
        items = records_or_root
    out: list[tuple[str | None, Mapping[str, Any]]] = []
    for item in items:
        if isinstance(item, Mapping):
            out.append((None, item))
        elif Path(item).is_dir():
            out.extend((str(p), load_scan_record(p)) for p in find_provenance_files(item))
        else:
            out.append((str(item), load_scan_record(item)))
    return out


def _hash(path: Path) -> str | None:
    """sha256 of a file, None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return sha256(path)
    except OSError as err:
        raise MedtxError(f"{path}: cannot read a recorded output to re-hash it ({err})") from err


def audit_outputs(
    records_or_root: Any, *, base_dir: str | Path | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Like ``audit``, also returning how many distinct files were hashed."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cache: dict[Path, str | None] = {}
    problems: list[dict[str, Any]] = []
    for source, record in _records(records_or_root):
        for step in record.get("steps") or []:
            for out in step.get("outputs") or []:
                recorded = out.get("sha256")
                raw = out.get("path")
                if not raw:
                    continue
                path = Path(raw) if Path(raw).is_absolute() else base / raw
                key = path.resolve()
                if key not in cache:
                    cache[key] = _hash(key)
                current = cache[key]
                if current is None:
                    status = MISSING
                elif current != recorded:
                    status = CHANGED
                else:
                    continue
                problems.append(
                    {
                        "path": str(raw),
                        "scan": record.get("scan"),
                        "step": step.get("step"),
                        "status": status,
                        "recorded_sha256": recorded,
                        "current_sha256": current,
                        "provenance": source,
                    }
                )
    return problems, len(cache)


def audit(records_or_root: Any, *, base_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Re-hash every output recorded in per-scan provenance and list the problems.

    Args:
        records_or_root: a directory searched recursively for
            ``*_provenance.json``, one such file, or a list of files,
            directories or already-loaded records.
        base_dir: what relative paths in the records are relative to (the
            current directory by default).

    Returns:
        One dict per recorded output that is ``"changed"`` or ``"missing"``:
        ``path, scan, step, status, recorded_sha256, current_sha256`` (None when
        missing) and ``provenance`` (the JSON it came from, None for a dict).
    """
    return audit_outputs(records_or_root, base_dir=base_dir)[0]


def format_audit(problems: list[dict[str, Any]], n_files: int) -> str:
    """A human summary: one line per problem, then a verdict."""
    if not problems:
        return f"audit: all {n_files} recorded output file(s) match their sha256."
    lines = []
    for p in sorted(
        problems, key=lambda p: (p["status"], str(p["path"]), str(p["scan"]), str(p["step"]))
    ):
        where = f"(scan {p.get('scan')}, step {p.get('step')})"
        rec = (p.get("recorded_sha256") or "?")[:12]
        if p["status"] == MISSING:
            lines.append(f"MISSING  {p['path']}  {where}: recorded sha256 {rec}..., file is gone")
        else:
            cur = (p.get("current_sha256") or "?")[:12]
            lines.append(f"CHANGED  {p['path']}  {where}: recorded sha256 {rec}..., now {cur}...")
    n_changed = sum(p["status"] == CHANGED for p in problems)
    n_missing = sum(p["status"] == MISSING for p in problems)
    lines.append(
        f"audit: {len(problems)} problem(s) among {n_files} recorded output file(s): "
        f"{n_changed} changed, {n_missing} missing."
    )
    return "\n".join(lines)


def main_audit(root: str) -> int:
    """``medtx audit [ROOT]``: print the summary; 0 if all outputs match, 1 otherwise.

    A root that does not exist, holds no provenance records or holds an
    unreadable one is also an error (exit 1), with the reason as the last line.
    """
    try:
        files = find_provenance_files(root)
        if not files:
            raise MedtxError(f"no *_provenance.json records found under {root}")
        problems, n_files = audit_outputs(files)
    except MedtxError as err:
        print(f"audit: {err}")
        return 1
    print(format_audit(problems, n_files))
    return 1 if problems else 0
