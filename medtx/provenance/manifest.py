"""A scan's record manifest: a hash chain of every provenance record written for it.

Re-hashing the outputs a record names proves nothing once the record itself
can be edited. So each step record and each merged record, when written,
appends one line to its scan's manifest: the sha256 of the record's canonical
JSON, a short digest of every field (so the audit can name the field that was
edited), and the sha256 of the line before it (so a removed or edited entry
breaks the chain). A rerun appends again; the latest entry for a record wins.

**One manifest per scan, not one per run.** A scan's steps run one after the
other (each needs the last one's output, and collect needs them all), so its
manifest has one writer at a time, on a laptop or on SLURM. One file for a
whole run would need a lock across cluster nodes, which shared filesystems do
not reliably give (Lustre locks per node only, or refuses, unless mounted with
``-o flock``; NFS goes through its lock daemon), and thousands of jobs would
queue on it. Appends still take ``fcntl.flock`` on the scan's manifest (two
runs of one scan started by hand) and go on without it where the filesystem
refuses locks. The file lives beside the scan's records
(``medtx.workflow.paths.record_manifest``).

**Tamper-evident, not tamper-proof.** Whoever knows this format can rewrite a
whole chain. Labs that need more set ``MEDTX_PROVENANCE_KEY``: every entry then
carries an HMAC-SHA256 under that key, which nobody without the key can forge,
and ``medtx audit`` verifies it when the key is set (and says "unsigned"
otherwise).

**A chain cannot vouch for its own folder.** A folder restored from an earlier
signed run, or another image's signed folder copied in under the scan's id,
holds a valid chain too, and a deleted folder holds none to break. The run
index (``medtx.provenance.run_index``) records each scan's chain head
(``chain_head``) once the run is done, which the audit holds the chains to.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import hmac
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError

KEY_ENV = "MEDTX_PROVENANCE_KEY"
STEP = "step"
MERGED = "merged"
# What ``read_manifest`` finds wrong: a broken link or unreadable line, a bad signature.
CHAIN = "chain"
SIGNATURE = "signature"
# List items are named by the first of these keys that every item has, with
# distinct values, so a field reads ``outputs[preproc].sha256``, not ``outputs[1]``.
ITEM_LABELS = ("step", "role", "metric", "function")
_GENESIS = "0" * 64


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that hashes and signatures are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_sha256(record: Any) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a record by its path (``qc.metrics.bias_ratio``); lists of
    scalars are one leaf."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) and v for v in obj):
        label = next(
            (
                k
                for k in ITEM_LABELS
                if all(k in v for v in obj) and len({str(v[k]) for v in obj}) == len(obj)
            ),
            None,
        )
        out = {}
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}[{value[label] if label else i}]"))
        return out
    return {prefix: obj}


def digest(value: Any) -> str:
    """A field's short digest: enough to tell it changed (the record's full hash
    is what the chain holds)."""
    return hashlib.sha256(canonical(value)).hexdigest()[:16]


def field_digests(record: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    kept = {k: v for k, v in record.items() if k not in skip}
    return {path: digest(value) for path, value in flatten(kept).items()}


def provenance_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def signature(entry: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in entry.items() if k != "hmac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def line_sha256(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Any]:
    """The manifest open for appending under an exclusive ``flock`` (where the
    filesystem gives one: a scan's manifest has one writer anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        except ImportError:  # not POSIX
            pass
        yield fh


def append(manifest: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to a manifest, chained to its last line (and signed when
    ``MEDTX_PROVENANCE_KEY`` is set); returns the entry as written."""
    path = Path(manifest)
    try:
        with _locked(path) as fh:
            fh.seek(0)
            text = fh.read()
            if text and not text.endswith(b"\n"):  # a writer killed mid-line
                text = text[: text.rfind(b"\n") + 1]
                fh.truncate(len(text))
            lines = text.splitlines()
            entry = {
                **entry,
                "seq": len(lines) + 1,
                "prev": line_sha256(lines[-1]) if lines else _GENESIS,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                "host": socket.gethostname(),
            }
            key = provenance_key()
            if key:
                entry["hmac"] = signature(entry, key)
            fh.write(canonical(entry) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise MedtxError(f"{path}: cannot append to the record manifest ({err})") from err
    return entry


def append_record(
    record_path: str | Path, *, kind: str, merged: dict[str, str] | None = None
) -> dict[str, Any]:
    """Chain a record just written at ``record_path`` into its scan's manifest.

    The record is read back from disk, so the hash is of what a reader will see.

    Args:
        kind: ``"step"`` (a step record) or ``"merged"`` (``<scan>_provenance.json``).
        merged: for a merged record, the sha256 of each step record it merged.
    """
    from medtx.workflow.paths import record_manifest

    path = Path(record_path)
    record = json.loads(path.read_text())
    scan = record.get("scan") or path.stem
    manifest = Path(record_manifest(path.parent, scan))
    entry = {
        "kind": kind,
        "scan": scan,
        "step": record.get("step") if kind == STEP else None,
        "record": path.name,
        "written_to": str(record_path),
        "cwd": os.getcwd(),
        "sha256": record_sha256(record),
        "fields": field_digests(record, skip=("steps",) if kind == MERGED else ()),
    }
    if merged is not None:
        entry["merged"] = merged
    return append(manifest, entry)


def entry_name(entry: dict[str, Any]) -> str:
    return f"step {entry.get('step')}" if entry.get("kind") == STEP else "collect"


def read_manifest(
    manifest: str | Path, *, key: bytes | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str | None, str]]]:
    """A manifest's entries and what is wrong with its chain.

    Returns:
        ``(entries, problems)``: the entries that parse, in file order, and
        ``(CHAIN or SIGNATURE, step or None, message)`` for every broken link
        or unreadable line, and (with ``key``) every unsigned or badly signed entry.
    """
    path = Path(manifest)
    entries: list[dict[str, Any]] = []
    problems: list[tuple[str, str | None, str]] = []
    prev_line: bytes | None = None
    prev_entry: dict[str, Any] | None = None
    unsigned: list[str] = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            problems.append((CHAIN, None, f"{path.name} line {n} is not a manifest entry"))
            prev_line, prev_entry = line, None
            continue
        expected = line_sha256(prev_line) if prev_line is not None else _GENESIS
        if entry.get("prev") != expected:
            after = (
                f"entry {prev_entry.get('seq')} ({entry_name(prev_entry)})"
                if prev_entry
                else ("the start" if prev_line is None else f"line {n - 1}")
            )
            problems.append(
                (
                    CHAIN,
                    entry.get("step"),
                    f"{path.name}: chain broken at entry {entry.get('seq')} "
                    f"({entry_name(entry)}): it does not follow {after}; an entry "
                    "between them was removed, or the one before it edited",
                )
            )
        if key is not None:
            if "hmac" not in entry:
                unsigned.append(str(entry.get("seq")))
            elif not hmac.compare_digest(str(entry["hmac"]), signature(entry, key)):
                problems.append(
                    (
                        SIGNATURE,
                        entry.get("step"),
                        f"{path.name}: entry {entry.get('seq')} ({entry_name(entry)}) "
                        f"has a signature that {KEY_ENV} does not give: forged, "
                        "edited, or signed with another key",
                    )
                )
        entries.append(entry)
        prev_line, prev_entry = line, entry
    if unsigned:
        problems.append(
            (
                SIGNATURE,
                None,
                f"{path.name}: {len(unsigned)} of {len(entries)} entries unsigned "
                f"(entry {', '.join(unsigned)}), but {KEY_ENV} is set",
            )
        )
    return entries, problems


def line_hashes(manifest: str | Path) -> list[str]:
    """The sha256 of each line of a manifest, in file order: what ``prev`` links
    and a run index's chain head (``medtx.provenance.run_index``) are taken over."""
    return [line_sha256(line) for line in Path(manifest).read_bytes().splitlines() if line]


def chain_head(manifest: str | Path) -> dict[str, Any] | None:
    """A manifest's latest entry, as a run index keeps it: the sha256 of its line
    (which signs, through ``prev``, everything before it), its ``seq`` and ``time``.
    None if the manifest is empty."""
    lines = [line for line in Path(manifest).read_bytes().splitlines() if line]
    if not lines:
        return None
    try:
        entry = json.loads(lines[-1])
    except ValueError:
        entry = None
    entry = entry if isinstance(entry, dict) else {}
    return {"sha256": line_sha256(lines[-1]), "seq": entry.get("seq"), "time": entry.get("time")}


def latest(entries: list[dict[str, Any]]) -> tuple[dict[str, dict], dict | None]:
    """The latest entry of each step, and the latest merged entry (a rerun wins)."""
    steps: dict[str, dict] = {}
    merged = None
    for entry in entries:
        if entry.get("kind") == STEP:
            steps[str(entry.get("step"))] = entry
        elif entry.get("kind") == MERGED:
            merged = entry
    return steps, merged
