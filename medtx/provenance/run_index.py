"""A run's index: which scans the run made, each one's chain head and raw inputs.

A scan's manifest proves its records were not edited, but nothing inside a
scan's folder can prove the folder is the one the run left: an earlier signed
run of the scan restored over it, another image's signed records copied in
under its id, its raw input replaced, or the whole folder deleted all leave
every chain intact. So at the end of a run the workflow (the provenance report
rule, which already gathers every scan's record) writes one index that lists
each scan with

- its folder (relative to the index, so a moved results folder still matches),
- its identity (scan, dataset, subject, session),
- its chain head: the sha256 of its manifest's last line, which through the
  chain's ``prev`` links vouches for every entry before it,
- its raw inputs (those no step of the scan wrote) with the sha256 read,

and, with ``MEDTX_PROVENANCE_KEY`` set, an HMAC-SHA256 over all of it, as the
manifests are signed. ``medtx audit`` checks the scans it finds against it.

**The limit without a key.** Whoever can write the results folder can rewrite
the index as easily as the chains, consistently, so an unsigned index only
catches tampering that forgot it. With the key, nobody without it can make an
index the audit accepts; but a whole results folder put back as an earlier
signed run left it, index and all, is that run, and passes. The writer prints
the index's sha256 for a lab that wants to keep it outside the folder.

The index is one file for the whole run, written once, after every scan is
done: no lock across cluster nodes (``medtx.provenance.manifest`` says why the
manifests are per scan) is needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hmac
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError
from medtx.io import sha256, write_json
from medtx.provenance.manifest import KEY_ENV, chain_head, provenance_key, signature
from medtx.workflow.argfile import PREFIX
from medtx.workflow.paths import PROVENANCE_SUFFIX, record_manifest

SCHEMA = 1
KIND = "medtx-run-index"
INDEX_NAME = "run_index.json"
# Where the workflow writes it, under its results folder (``index_path``).
INDEX_REL = f"reports/{INDEX_NAME}"
IDENTITY = ("scan", "dataset", "subject", "session")


def index_path(results: str) -> str:
    """The run index of a results folder, beside the cohort report's folder."""
    return f"{results}/{INDEX_REL}"


def raw_inputs(steps: Sequence[Any]) -> list[dict[str, Any]]:
    """The inputs of a scan's steps that none of its steps wrote (the image the
    scan began from), each once: role, path and cwd as recorded, the sha256 read,
    and the step that read it first."""

    def where(path: Any, cwd: Any) -> str:
        return os.path.normpath(os.path.join(str(cwd or ""), str(path)))

    records = [s for s in steps if isinstance(s, dict)]
    written = {
        where(o.get("path"), s.get("cwd"))
        for s in records
        for o in s.get("outputs") or []
        if isinstance(o, dict)
    }
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s in records:
        for i in s.get("inputs") or []:
            if not isinstance(i, dict):
                continue
            key = where(i.get("path"), s.get("cwd"))
            if key in written or key in seen:
                continue
            seen.add(key)
            out.append(
                {
                    "role": i.get("role"),
                    "path": str(i.get("path")),
                    "cwd": s.get("cwd"),
                    "sha256": i.get("sha256"),
                    "step": s.get("step"),
                }
            )
    return out


def _record_files(records: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in records:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.rglob(f"*{PROVENANCE_SUFFIX}"))
        elif path.is_file() and path.name.endswith(PROVENANCE_SUFFIX):
            files.append(path)
        else:
            raise MedtxError(f"{path}: not a *{PROVENANCE_SUFFIX} record or a folder of them")
    return files


def _entry(record_file: Path, index_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MedtxError(f"{record_file}: not a readable provenance record ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
        raise MedtxError(f"{record_file}: not a scan's provenance record (no list of steps)")
    scan = record_file.name.removesuffix(PROVENANCE_SUFFIX)
    manifest = Path(record_manifest(record_file.parent, scan))
    folder = os.path.relpath(record_file.parent.resolve(), index_dir.resolve())
    return {
        **{k: record.get(k) for k in IDENTITY},
        "folder": Path(folder).as_posix(),
        "provenance": record_file.name,
        "manifest": manifest.name,
        # None for records written before manifests: the audit names them unchained
        "head": chain_head(manifest) if manifest.is_file() else None,
        "raw": raw_inputs(record["steps"]),
    }


def build_run_index(records: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """The index of the scans whose merged records are ``records`` (files or folders),
    as it would be written to ``out``; signed when ``MEDTX_PROVENANCE_KEY`` is set."""
    files = _record_files(records)
    if not files:
        raise MedtxError(f"no *{PROVENANCE_SUFFIX} records in {', '.join(map(str, records))}")
    index_dir = Path(out).parent
    scans = [_entry(f, index_dir) for f in files]
    seen: dict[tuple[str, str], Path] = {}
    for f, s in zip(files, scans, strict=True):
        where = (s["folder"], s["provenance"])
        if where in seen:
            raise MedtxError(f"{f}: given twice (also as {seen[where]})")
        seen[where] = f
    index: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": KIND,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        "written_to": str(out),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "scans": scans,
    }
    key = provenance_key()
    if key:
        index["hmac"] = signature(index, key)
    return index


def write_run_index(records: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write ``build_run_index`` to ``out``."""
    index = build_run_index(records, out)
    write_json(index, out)
    return index


def read_run_index(
    path: str | Path, *, key: bytes | None = None
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """A run index and what is wrong with it: ``(index or None, [(kind, message)])``,
    kind ``"unreadable"`` (then no index) or ``"signature"`` (with ``key``: unsigned,
    or signed otherwise). Each message names the file, and the row where one is wrong."""
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, [("unreadable", f"{path}: not a readable run index ({err})")]
    if not isinstance(index, dict) or index.get("kind") != KIND:
        return None, [("unreadable", f"{path}: not a medtx run index (kind is not {KIND!r})")]
    scans = index.get("scans")
    if not isinstance(scans, list):
        return None, [("unreadable", f"{path}: 'scans' is not a list")]
    for n, row in enumerate(scans, start=1):
        missing = [
            k
            for k in ("scan", "folder", "provenance", "manifest")
            if not isinstance(row, dict) or not isinstance(row.get(k), str)
        ]
        if missing:
            return None, [("unreadable", f"{path}: scans row {n} has no {', '.join(missing)}")]
    problems = []
    if key is not None:
        if "hmac" not in index:
            problems.append(("signature", f"{path} is unsigned, but {KEY_ENV} is set"))
        elif not hmac.compare_digest(str(index["hmac"]), signature(index, key)):
            problems.append(
                (
                    "signature",
                    f"{path} has a signature that {KEY_ENV} does not give: edited "
                    "without the key, or signed with another key",
                )
            )
    return index, problems


def main(argv: list[str] | None = None) -> int:
    """``python -m medtx.provenance.run_index --records R ... --out INDEX``: the
    provenance report rule's last command. A user error is one line, exit 1."""
    parser = argparse.ArgumentParser(
        prog="python -m medtx.provenance.run_index",
        description=__doc__.splitlines()[0],
        fromfile_prefix_chars=PREFIX,  # --records @FILE: FILE's lines (the workflow's record lists)
    )
    parser.add_argument("--records", nargs="+", required=True, help="*_provenance.json or folders")
    parser.add_argument("--out", required=True, help=f"the index ({INDEX_REL} under results)")
    args = parser.parse_args(argv)
    try:
        index = write_run_index(args.records, args.out)
    except MedtxError as err:
        print(f"medtx: error: {err}", file=sys.stderr)
        return 1
    signed = f"signed with {KEY_ENV}" if "hmac" in index else f"unsigned ({KEY_ENV} not set)"
    digest = sha256(args.out)
    print(f"run index: {len(index['scans'])} scan(s) -> {args.out} (sha256 {digest}), {signed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
