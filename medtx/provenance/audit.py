"""``medtx audit``: re-derive every claim the provenance records make, and check it.

Re-hashing the outputs a merged record names proves nothing once the record
can be edited too. So, per scan, the audit:

1. follows the scan's record manifest (``medtx.provenance.manifest``): a broken
   link, an unreadable line and, with ``MEDTX_PROVENANCE_KEY`` set, a missing
   or wrong signature;
2. checks each step record and the merged record against the hash of its
   latest manifest entry, naming every field that differs;
3. re-derives the merged record from the step records on disk
   (``merged_record``, with the thresholds it recorded): a step dropped from it,
   a field edited in one copy, a step rerun since collect;
4. re-derives every QC check from its value and bounds, and each verdict
   (the step's, the scan's ``qc_passed`` and ``qc_failures``) from the checks;
5. re-hashes every output, checks that each step read what the step before it
   wrote, and that no two scans hold the same output content where their
   inputs differ (a file copied over another's, its hash rewritten);
6. checks the run against its run index (``medtx.provenance.run_index``), which
   the workflow writes once every scan is done: each scan it lists must be
   there (MISSING-SCAN), end its chain at the entry the index records
   (ROLLBACK: another state of the scan restored; STALE: steps ran after the
   index), belong to the same image (SUBSTITUTED: another raw image or
   identity), and each raw input must still hash as the run read it
   (RAW-CHANGED; scans the index does not list are checked against their
   own records).

Nothing inside a scan's folder can show that the folder is the one the run
left; the index can, but only with ``MEDTX_PROVENANCE_KEY`` set: without it,
whoever can write the results folder can rewrite the index as consistently as
the chains, and the verdict says so. With the key, an index that is missing,
unsigned or edited is itself a problem.

Each problem is one line naming the scan, the step and what is wrong; a
verdict line ends the list, and ``medtx audit`` exits 1 if there is any.

Relative paths in records are relative to the directory the workflow ran in,
which each record keeps (``cwd``). A merged record also keeps where it was
written, so a results folder that was moved or copied elsewhere maps recorded
paths to where it is now; ``base_dir`` (``--base``) instead says what relative
paths are relative to.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError
from medtx.io import sha256
from medtx.provenance.manifest import (
    KEY_ENV,
    canonical,
    chain_head,
    digest,
    flatten,
    latest,
    line_hashes,
    provenance_key,
    read_manifest,
    record_sha256,
)
from medtx.provenance.qc import check
from medtx.provenance.records import load_scan_record, merged_record, qc_failures
from medtx.provenance.run_index import (
    IDENTITY,
    INDEX_NAME,
    INDEX_REL,
    raw_inputs,
    read_run_index,
)
from medtx.workflow.paths import PROVENANCE_SUFFIX, record_manifest

# Problem kinds, in the order the verdict line counts them.
CHANGED = "changed"  # an output's bytes differ from its recorded sha256
MISSING = "missing"  # an output is gone
EDITED = "edited"  # a record differs from what was written, or from its other copy
DROPPED = "dropped"  # a step the manifest has is gone from the merged record or disk
QC = "qc"  # a QC verdict that does not follow from the metrics and thresholds
STALE = "stale"  # a step read other bytes than its predecessor wrote, or was rerun
DUPLICATE = "duplicate"  # two scans hold the same output content
CHAIN = "chain"  # a broken manifest link
SIGNATURE = "signature"  # a missing or wrong HMAC (with the key set)
UNCHAINED = "unchained"  # a record no manifest vouches for
UNREADABLE = "unreadable"  # a record that is not JSON
INCOMPLETE = "incomplete"  # steps that ran but were never merged
# Against the run index (issue 31):
ROLLBACK = "rollback"  # a scan's chain does not end where the run left it
SUBSTITUTED = "substituted"  # a scan's records are another image's
RAW_CHANGED = "raw-changed"  # a raw input's bytes differ from what the run read
MISSING_SCAN = "missing-scan"  # a scan the run index lists is gone
UNINDEXED = "unindexed"  # with the key: no run index says what the run made
KINDS = (
    CHANGED,
    MISSING,
    ROLLBACK,
    SUBSTITUTED,
    RAW_CHANGED,
    MISSING_SCAN,
    EDITED,
    DROPPED,
    QC,
    STALE,
    DUPLICATE,
    CHAIN,
    SIGNATURE,
    UNCHAINED,
    UNREADABLE,
    INCOMPLETE,
    UNINDEXED,
)
# Label maps (brain masks, segmentations) may legitimately be equal for two
# scans; intensity images and transforms may not.
LABEL_ROLES = ("mask", "seg", "regions")
MANIFEST_SUFFIX = "_manifest.jsonl"
# What an audit without the key cannot promise (the README's stated limit).
UNSIGNED_LIMIT = (
    "whoever can write the results folder can rewrite the records, their chains and the "
    "run index consistently: a scan rolled back, substituted or deleted that way passes"
)


@dataclass
class AuditResult:
    """What ``run_audit`` found, and how much it checked."""

    problems: list[dict[str, Any]] = field(default_factory=list)
    n_scans: int = 0
    n_records: int = 0
    n_files: int = 0
    n_raw: int = 0
    n_raw_absent: int = 0
    index: str = ""  # the run index(es) read, "" if none
    n_indexed: int = 0  # scans it lists among those audited
    n_unlisted: int = 0  # scans audited that it does not list
    signing: str = "unsigned"


def _short(value: Any, width: int = 40) -> str:
    if isinstance(value, str) and len(value) == 64 and value.isalnum():  # a sha256
        return _sha(value)
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _bounds(low: Any, high: Any) -> str:
    if low is None:
        return f"<= {high}"
    return f">= {low}" if high is None else f"[{low}, {high}]"


def _sha(value: Any) -> str:
    return f"{str(value)[:12]}…" if value else "?"


class _Locator:
    """Where a recorded path is now.

    ``base`` (``--base``) takes relative paths as relative to it. Otherwise a
    relative path is taken against the ``cwd`` its record kept, and if the
    scan's merged record was found elsewhere than where it was written (the
    results folder moved or was copied), against the same place there.
    """

    def __init__(self, base: Path | None, anchor: tuple[str, str | None, Path] | None):
        self.base = base
        self.moved: tuple[Path, Path] | None = None
        if anchor is not None:
            recorded, cwd, found = anchor
            written = _absolute(recorded, cwd)
            if written is not None:
                self.moved = _common_root(written, found.resolve())

    def resolve(self, raw: str, cwd: str | None) -> Path:
        path = Path(raw)
        if self.base is not None:
            return path if path.is_absolute() else self.base / path
        absolute = _absolute(raw, cwd) or Path(os.path.normpath(Path.cwd() / path))
        if self.moved is not None and absolute.is_relative_to(self.moved[0]):
            return self.moved[1] / absolute.relative_to(self.moved[0])
        return absolute


def _absolute(raw: str, cwd: str | None) -> Path | None:
    path = Path(raw)
    if path.is_absolute():
        return Path(os.path.normpath(path))
    return Path(os.path.normpath(Path(cwd) / path)) if cwd else None


def _common_root(written: Path, found: Path) -> tuple[Path, Path] | None:
    """(the folder it was written under, the same folder now) from one file's two paths."""
    a, b = written.parts, found.parts
    n = 0
    while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
        n += 1
    return (Path(*a[: len(a) - n]), Path(*b[: len(b) - n])) if n else None


@dataclass
class _Claim:
    """An output file one scan's step says it wrote, as it is now."""

    scan: str
    step: str
    role: str
    raw: str
    path: Path
    inputs: tuple[str, ...]


class _Run:
    """State shared by the scans of one audit: hashes, claims, problems."""

    def __init__(self, base: Path | None, key: bytes | None):
        self.base = base
        self.key = key
        self.hashes: dict[Path, str | None] = {}
        self.claims: dict[str, list[_Claim]] = {}
        self.result = AuditResult()
        self.signed = 0
        self.raw_hashes: dict[Path, str | None] = {}
        self.states: dict[Path, _ScanState] = {}  # by resolved manifest path

    def add(self, kind: str, scan: str | None, step: str | None, message: str, **extra) -> None:
        self.result.problems.append(
            {"status": kind, "scan": scan, "step": step, "message": message, **extra}
        )

    def hash(self, path: Path, *, raw: bool = False) -> str | None:
        """A file's sha256 (None if absent), each file read once; raw inputs are
        counted apart from outputs."""
        cache = self.raw_hashes if raw else self.hashes
        key = path.resolve()
        if key not in cache:
            try:
                cache[key] = sha256(key) if key.is_file() else None
            except OSError as err:
                what = "raw input" if raw else "recorded output"
                raise MedtxError(f"{path}: cannot read a {what} ({err})") from err
        return cache[key]


@dataclass
class _ScanState:
    """What the per-scan audit found of a scan, for the run index's checks."""

    scan: str
    prov: Path
    manifest: Path
    merged: dict[str, Any] | None
    steps: list[dict[str, Any]]
    locate: _Locator


def find_scans(root_or_files: str | Path | Iterable[str | Path]) -> list[tuple[str, Path, Path]]:
    """(scan, its ``*_provenance.json``, its manifest) for each scan found; either
    file may be absent. A folder is searched recursively."""
    items = [root_or_files] if isinstance(root_or_files, (str, Path)) else list(root_or_files)
    found: dict[tuple[Path, str], tuple[str, Path, Path]] = {}
    for item in items:
        path = Path(item)
        if not path.exists():
            raise MedtxError(f"provenance root does not exist: {path}")
        if path.is_dir():
            files = sorted(path.rglob(f"*{PROVENANCE_SUFFIX}")) + sorted(
                path.rglob(f"*{MANIFEST_SUFFIX}")
            )
        elif path.name.endswith((PROVENANCE_SUFFIX, MANIFEST_SUFFIX)):
            files = [path]
        else:
            raise MedtxError(f"{path}: not a *{PROVENANCE_SUFFIX} record or a scan manifest")
        for f in files:
            if not f.is_file():
                continue
            scan = f.name.removesuffix(PROVENANCE_SUFFIX).removesuffix(MANIFEST_SUFFIX)
            key = (f.parent.resolve(), scan)
            if key not in found:
                prov = f.parent / f"{scan}{PROVENANCE_SUFFIX}"
                found[key] = (scan, prov, Path(record_manifest(f.parent, scan)))
    return sorted(found.values(), key=lambda s: (str(s[1].parent), s[0]))


def _field_edits(
    fields: dict[str, str], record: dict[str, Any], skip: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """(field, what happened to it) for each field of a record that differs from
    the digests its manifest entry kept."""
    now = flatten({k: v for k, v in record.items() if k not in skip})
    edits = [
        (path, f"{path} edited (now {_short(value)})")
        if path in fields
        else (path, f"{path} added (= {_short(value)})")
        for path, value in now.items()
        if fields.get(path) != digest(value)
    ]
    removed = [p for p in fields if p not in now and not _has_child(p, now)]
    return edits + [(path, f"{path} removed") for path in removed]


def _value(flat: dict[str, Any], path: str) -> str:
    """A field of a flattened record, for a message."""
    if path in flat:
        return _short(flat[path])
    return "{…}" if _has_child(path, flat) else "(absent)"


def _has_child(path: str, fields: Iterable[str]) -> bool:
    """Whether ``path`` (an empty dict or list once) now has fields below it."""
    return any(f.startswith((f"{path}.", f"{path}[")) for f in fields)


def _passes(c: dict[str, Any]) -> bool | None:
    """A check re-made from its value and bounds; None if they are not numbers."""
    try:
        return check(str(c.get("metric")), c["value"], minimum=c.get("min"), maximum=c.get("max"))[
            "passed"
        ]
    except (KeyError, TypeError):
        return None


def _qc_problems(step: dict[str, Any], thresholds: dict | None) -> list[tuple[str, str]]:
    """(field, what is wrong) for each QC claim of a step that its numbers do not give.

    Each check is re-made from its value and bounds, its value compared with
    the metric, the step's verdict with its checks, and (``thresholds``) the
    checks ``judge`` makes from the metrics must all be there.
    """
    from medtx.provenance.qc import judge

    qc: dict = step["qc"] if isinstance(step.get("qc"), dict) else {}
    metrics: dict = qc["metrics"] if isinstance(qc.get("metrics"), dict) else {}
    checks = [c for c in qc.get("checks") or [] if isinstance(c, dict)]
    out = []
    for c in checks:
        metric, value, passed = c.get("metric"), c.get("value"), _passes(c)
        if passed is None:
            out.append((f"qc.checks[{metric}]", f"check {metric} is not numbers ({_short(c)})"))
            continue
        if metric in metrics and canonical(metrics[metric]) != canonical(value):
            out.append(
                (
                    f"qc.metrics.{metric}",
                    f"qc.metrics.{metric} is {_short(metrics[metric])}, but its check "
                    f"was made on {_short(value)}",
                )
            )
        if c.get("passed") != passed:
            out.append(
                (
                    f"qc.checks[{metric}].passed",
                    f"check {metric} says passed={c.get('passed')}, but {value:.4g} against "
                    f"{_bounds(c.get('min'), c.get('max'))} {'passes' if passed else 'fails'}",
                )
            )
    if thresholds:
        have = {(c.get("metric"), c.get("min"), c.get("max")) for c in checks}
        try:
            expected = judge({"step": step.get("step"), "qc": {"metrics": metrics}}, thresholds)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            expected = []
            out.append(("qc.metrics", f"its metrics cannot be judged ({err})"))
        for c in expected:
            if (c["metric"], c["min"], c["max"]) not in have:
                out.append(
                    (
                        f"qc.checks[{c['metric']}]",
                        f"no check of {c['metric']} against its recorded threshold "
                        f"{_bounds(c['min'], c['max'])} (removed?)",
                    )
                )
    verdict = all(_passes(c) for c in checks)
    if qc.get("passed") != verdict:
        out.append(("qc.passed", f"qc.passed is {qc.get('passed')}, but its checks say {verdict}"))
    return out


def _scan_verdict(merged: dict[str, Any]) -> list[tuple[str, str]]:
    """The scan's ``qc_passed`` and ``qc_failures``, re-derived from its steps' checks."""
    steps = []
    for s in merged.get("steps") or []:
        qc: dict = s["qc"] if isinstance(s, dict) and isinstance(s.get("qc"), dict) else {}
        checks = [
            {**c, "passed": _passes(c)}
            for c in qc.get("checks") or []
            if isinstance(c, dict) and _passes(c) is not None
        ]
        steps.append(
            {"step": s.get("step") if isinstance(s, dict) else None, "qc": {"checks": checks}}
        )
    failures = qc_failures(steps)
    out = []
    if merged.get("qc_passed") != (not failures):
        out.append(
            (
                "qc_passed",
                f"qc_passed is {merged.get('qc_passed')}, but the recorded metrics and "
                f"thresholds give {not failures}"
                + (f" (failing: {'; '.join(failures)})" if failures else ""),
            )
        )
    if merged.get("qc_failures") != failures:
        out.append(
            (
                "qc_failures",
                f"qc_failures is {_short(merged.get('qc_failures'), 60)}, but the checks "
                f"give {_short(failures, 60)}",
            )
        )
    return out


def _audit_scan(run: _Run, scan: str, prov: Path, manifest: Path) -> None:
    """Every check of one scan (see the module docstring), problems into ``run``.

    A fact is said once: a field named by one check is skipped by the later ones.
    """
    source = str(prov)
    said: set[tuple[str | None, str]] = set()  # (step or None, field) already named

    def add(kind: str, step: str | None, message: str, *, where: str | None = None, **extra):
        if where is not None:
            if (step, where) in said:
                return
            said.add((step, where))
        run.add(kind, scan, step, message, provenance=source, **extra)

    merged = _read_merged(run, scan, prov, add)
    entries, step_entries, merged_entry = _read_chain(run, prov, manifest, add)
    locate = _Locator(run.base, _anchor(merged, prov, manifest, step_entries))
    disk, names = _audit_step_records(run, manifest, step_entries, add)

    merged_steps: dict[str, dict[str, Any]] = {}
    if merged is not None:
        merged_steps = {str(s.get("step")): s for s in merged["steps"] if isinstance(s, dict)}
    stale = _merged_against_manifest(prov, merged, merged_steps, entries, add)

    if merged is not None:
        n_said = len(said)
        _audit_merged(prov, merged, merged_steps, merged_entry, disk, names, stale, add)
        if merged_entry is not None and record_sha256(merged) != merged_entry.get("sha256"):
            if len(said) == n_said and not any(
                p["scan"] == scan and p["status"] == DROPPED for p in run.result.problems
            ):
                add(EDITED, None, f"{prov.name} edited since collect wrote it")

    steps = {**merged_steps, **disk}  # a step's record on disk wins over its merged copy
    run.states[manifest.resolve()] = _ScanState(
        scan, prov, manifest, merged, list(steps.values()), locate
    )
    _audit_files(run, scan, merged, merged_steps, disk, step_entries, locate, add)


def _read_merged(run: _Run, scan: str, prov: Path, add: Callable[..., None]) -> dict | None:
    """The scan's merged record, if it exists and can be read; it must name the scan."""
    merged = None
    if prov.is_file():
        try:
            merged = load_scan_record(prov)
            run.result.n_records += 1
        except MedtxError as err:
            add(UNREADABLE, None, str(err))
        if merged is not None and merged.get("scan") != scan:
            add(EDITED, None, f"{prov.name} says it is scan {_short(merged.get('scan'))}")
    return merged


def _read_chain(
    run: _Run, prov: Path, manifest: Path, add: Callable[..., None]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The record manifest's entries (its chain checked), the latest entry of each
    step and of the merged record; a missing manifest or merged record is said."""
    entries: list[dict[str, Any]] = []
    if manifest.is_file():
        entries, chain_problems = read_manifest(manifest, key=run.key)
        for kind, step, message in chain_problems:
            add(kind, step, message)
        run.signed += sum("hmac" in e for e in entries)
    else:
        add(
            UNCHAINED,
            None,
            f"no record manifest {manifest.name}: nothing vouches for its records "
            "(written before medtx kept one? rerun the scan's steps)",
        )
    step_entries, merged_entry = latest(entries)
    if not prov.exists() and merged_entry is not None:
        add(
            DROPPED,
            None,
            f"{prov.name} is gone, though collect wrote it (entry {merged_entry.get('seq')})",
        )
    elif not prov.exists() and step_entries:
        add(
            INCOMPLETE,
            None,
            f"its steps ran but nothing merged them (no {prov.name}): collect never "
            "ran, or its record and manifest entry were removed",
        )
    return entries, step_entries, merged_entry


def _anchor(
    merged: dict | None, prov: Path, manifest: Path, step_entries: dict[str, dict[str, Any]]
) -> tuple[Any, Any, Path] | None:
    """Where the records were written from (folder, cwd, record file), which relative
    paths in them resolve against: the merged record's, else the latest step's."""
    if merged is not None and merged.get("written_to"):
        return (merged["written_to"], merged.get("cwd"), prov)
    if step_entries:
        last = max(step_entries.values(), key=lambda e: e.get("seq", 0))
        return (last.get("written_to"), last.get("cwd"), manifest.parent / str(last.get("record")))
    return None


def _audit_step_records(
    run: _Run, manifest: Path, step_entries: dict[str, dict[str, Any]], add: Callable[..., None]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Step records on disk against their manifest entries, then their own QC;
    returns the readable records and each step's record file name."""
    disk: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for step, entry in step_entries.items():
        path = manifest.parent / str(entry.get("record"))
        names[step] = path.name
        if not path.is_file():
            add(
                DROPPED,
                step,
                f"step record {path.name} is gone (manifest entry {entry.get('seq')})",
            )
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            add(UNREADABLE, step, f"{path.name}: not a readable step record ({err})")
            continue
        run.result.n_records += 1
        disk[step] = record
        if record_sha256(record) != entry.get("sha256"):
            for where, edit in _field_edits(entry.get("fields") or {}, record) or [("", "")]:
                what = edit or "its content differs from what the step wrote"
                add(
                    EDITED, step, f"{path.name} edited since the step wrote it: {what}", where=where
                )
        for where, message in _qc_problems(record, None):
            add(QC, step, f"{path.name}: {message}", where=where)
    return disk, names


def _audit_merged(
    prov: Path,
    merged: dict[str, Any],
    merged_steps: dict[str, dict[str, Any]],
    merged_entry: dict[str, Any] | None,
    disk: dict[str, dict[str, Any]],
    names: dict[str, str],
    stale: set[str],
    add: Callable[..., None],
) -> None:
    """The merged record's QC verdicts re-derived from its metrics and thresholds,
    its fields against its manifest entry, and the whole re-derived from the step
    records on disk."""
    thresholds = (merged.get("qc") or {}).get("thresholds") or {}
    thresholds = thresholds if isinstance(thresholds, dict) else {}
    for step, s in merged_steps.items():
        for where, message in _qc_problems(s, thresholds):
            add(QC, step, f"{prov.name}: {message}", where=where)
    for where, message in _scan_verdict(merged):
        add(QC, None, f"{prov.name}: {message}", where=where)
    if merged_entry is not None and record_sha256(merged) != merged_entry.get("sha256"):
        for where, edit in _field_edits(merged_entry.get("fields") or {}, merged, skip=("steps",)):
            add(EDITED, None, f"{prov.name} edited since collect wrote it: {edit}", where=where)

    fresh = [disk[s] for s in merged_steps if s in disk and s not in stale]
    identity = {k: merged.get(k) for k in ("scan", "dataset", "subject", "session")}
    try:
        derived = merged_record(fresh, qc=thresholds, **identity)["steps"]
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        derived = []
        add(EDITED, None, f"{prov.name} cannot be re-derived from its step records ({err!r})")
    for d in derived:
        step = str(d.get("step"))
        have, want = flatten(merged_steps[step]), flatten(d)
        differ = [
            k
            for k in list(have) + [k for k in want if k not in have]
            if canonical(have.get(k, "(absent)")) != canonical(want.get(k, "(absent)"))
        ]
        for where in differ:
            if any(_has_child(k, [where]) for k in differ):  # said at its parent
                continue
            add(
                EDITED,
                step,
                f"{prov.name} says {where} = {_value(have, where)}, but step record "
                f"{names.get(step)} gives {_value(want, where)}",
                where=where,
            )


def _merged_against_manifest(prov, merged, merged_steps, entries, add) -> set[str]:
    """The merged record's steps against the manifest's: dropped, never written, or
    rerun since collect (returned: their merged copies are stale, not edited)."""
    step_entries, merged_entry = latest(entries)
    if merged is None or not entries:
        return set()
    if merged_entry is None:
        add(
            UNCHAINED,
            None,
            f"{prov.name} has no manifest entry: not written by medtx collect, "
            "or its entry was removed",
        )
    collected: dict = merged_entry or {}
    for step, entry in step_entries.items():
        if step not in merged_steps:
            add(
                DROPPED,
                step,
                f"missing from {prov.name}, but the manifest has it "
                f"(entry {entry.get('seq')}, written {entry.get('time')})",
            )
    for step in collected.get("merged") or {}:
        if step not in merged_steps and step not in step_entries:
            add(
                DROPPED,
                step,
                f"collect merged it (manifest entry {collected.get('seq')}), but it is gone "
                f"from {prov.name} and from the manifest",
            )
    for step in merged_steps:
        if step not in step_entries:
            add(UNCHAINED, step, f"in {prov.name}, but no step wrote it (no manifest entry)")
    stale: set[str] = set()
    merged_hashes = collected.get("merged") or {}
    for step, entry in step_entries.items():
        was = merged_hashes.get(step)
        if step in merged_steps and was and was != entry.get("sha256"):
            if entry.get("seq", 0) > collected.get("seq", 0):
                stale.add(step)
                add(
                    STALE,
                    step,
                    f"rerun (manifest entry {entry.get('seq')}) after collect merged it "
                    f"(entry {collected.get('seq')}): rerun collect",
                )
    return stale


def _audit_files(run, scan, merged, merged_steps, disk, step_entries, locate, add) -> None:
    """Outputs re-hashed, each input against what the step before it wrote, claims kept
    for the cross-scan duplicate check. A step's record on disk wins over its merged copy."""
    order = sorted(disk, key=lambda s: step_entries[s].get("seq", 0))
    steps = {s: merged_steps[s] for s in merged_steps if s not in disk}
    steps.update({s: disk[s] for s in order})
    default_cwd = (merged or {}).get("cwd")
    written: dict[Path, tuple[str, str, str]] = {}
    for step, record in steps.items():
        cwd = record.get("cwd") or default_cwd
        inputs = tuple(sorted(str(i.get("sha256")) for i in record.get("inputs") or []))
        for out in record.get("outputs") or []:
            raw, recorded, role = str(out.get("path")), out.get("sha256"), out.get("role")
            path = locate.resolve(raw, cwd)
            current = run.hash(path)
            info = {"path": raw, "recorded_sha256": recorded, "current_sha256": current}
            if current is None:
                at = "" if path == Path(raw) else f" (looked at {path})"
                add(MISSING, step, f"output {role} {raw} is gone{at}", **info)
            elif current != recorded:
                add(
                    CHANGED,
                    step,
                    f"output {role} {raw}: recorded sha256 {_sha(recorded)}, now {_sha(current)}",
                    **info,
                )
            if current is not None:
                claim = _Claim(scan, step, str(role), raw, path.resolve(), inputs)
                run.claims.setdefault(current, []).append(claim)
            written[path.resolve()] = (step, str(role), str(recorded))
    for step, record in steps.items():
        cwd = record.get("cwd") or default_cwd
        for inp in record.get("inputs") or []:
            path = locate.resolve(str(inp.get("path")), cwd).resolve()
            by = written.get(path)
            if by and by[0] != step and by[2] != inp.get("sha256"):
                add(
                    STALE,
                    step,
                    f"input {inp.get('role')} {inp.get('path')} was read with sha256 "
                    f"{_sha(inp.get('sha256'))}, but step {by[0]} recorded writing "
                    f"{_sha(by[2])}: {by[0]} ran again after {step} (rerun {step}), "
                    "or a record was edited",
                )


def _duplicates(run: _Run) -> None:
    """Two scans holding the same output content (not a label map), though their
    steps read different inputs."""
    for current, claims in run.claims.items():
        claims = [c for c in claims if not any(r in c.role for r in LABEL_ROLES)]
        if not claims:
            continue
        first = claims[0]
        for other in claims[1:]:
            if other.scan == first.scan or other.path == first.path:
                continue
            if other.inputs == first.inputs:  # the same inputs give the same outputs
                continue
            run.add(
                DUPLICATE,
                other.scan,
                other.step,
                f"output {other.role} {other.raw} has the same content (sha256 "
                f"{_sha(current)}) as scan {first.scan}'s output {first.role} of step "
                f"{first.step}, though their inputs differ: a file copied over another?",
                path=other.raw,
            )


def _raw_path(locate: _Locator, raw: str, cwd: str | None) -> Path:
    """Where a raw input is now: where the results folder's move maps it, or, if
    nothing is there, where it was read (raw data rarely moves with the results)."""
    path = locate.resolve(raw, cwd)
    if not path.exists():
        original = _absolute(raw, cwd)
        if original is not None and original.exists():
            return original
    return path


def _check_raw_by_records(run: _Run, states: Iterable[Any]) -> None:
    """Re-hash the raw inputs of scans no run index lists, against their step records."""
    for state in states:
        _check_raw(
            run,
            state.scan,
            raw_inputs(state.steps),
            state.locate,
            "per its records",
            str(state.prov),
        )


def _check_raw(run: _Run, scan: str, raws: list, locate: _Locator, source: str, prov: str) -> None:
    """Each raw input re-hashed against the sha256 the run read (per ``source``).
    One that is gone is counted, not a problem: raw data is often archived apart."""
    for r in raws:
        if not isinstance(r, dict):
            continue
        raw = str(r.get("path"))
        path = _raw_path(locate, raw, r.get("cwd"))
        current = run.hash(path, raw=True)
        if current is None:
            run.result.n_raw_absent += 1
        elif current != r.get("sha256"):
            run.add(
                RAW_CHANGED,
                scan,
                r.get("step"),
                f"raw input {r.get('role')} {raw}: the run read sha256 {_sha(r.get('sha256'))} "
                f"({source}), now {_sha(current)}: replaced after the run",
                provenance=prov,
                path=raw,
                recorded_sha256=r.get("sha256"),
                current_sha256=current,
            )


def _find_indexes(items: list[str | Path]) -> list[Path]:
    """The run indexes for what is audited: under each folder audited, or else the
    first ``reports/run_index.json`` above it (a scan folder of a results folder)."""
    found: dict[Path, Path] = {}
    for item in items:
        path = Path(item)
        below = sorted(path.rglob(INDEX_NAME)) if path.is_dir() else []
        if not below:
            start = (path if path.is_dir() else path.parent).resolve()
            below = [a / INDEX_REL for a in (start, *start.parents) if (a / INDEX_REL).is_file()]
            below = below[:1]
        for index in below:
            if index.is_file():
                found.setdefault(index.resolve(), index)
    return list(found.values())


def _in_scope(row_dir: Path, row_files: tuple[Path, Path], items: list[str | Path]) -> bool:
    """Whether an indexed scan is among what is audited: in a folder audited, or named."""
    for item in items:
        path = Path(item).resolve()
        if row_dir.is_relative_to(path) if path.is_dir() else path in row_files:
            return True
    return False


def _index_scan(run: _Run, row: dict, state: _ScanState, locate: _Locator) -> None:
    """One scan the run index lists and that is there: its chain head, its identity
    and raw images, its raw inputs on disk."""
    scan = str(row.get("scan"))
    head = row.get("head") if isinstance(row.get("head"), dict) else None
    prov = str(state.prov)
    if head is not None and state.manifest.is_file():
        hashes = line_hashes(state.manifest)
        if hashes and hashes[-1] == head.get("sha256"):
            pass
        elif head.get("sha256") in hashes:
            after = len(hashes) - 1 - hashes.index(head.get("sha256"))
            run.add(
                STALE,
                scan,
                None,
                f"its chain has {after} entr{'y' if after == 1 else 'ies'} after the one the "
                f"run index records (entry {head.get('seq')}): steps or collect ran after the "
                "run was indexed; rerun the provenance report to index them",
                provenance=prov,
            )
        else:
            _rollback_or_substituted(run, state, row, head)
    _check_raw(run, scan, row.get("raw") or [], locate, "per the run index", prov)


def _rollback_or_substituted(run: _Run, state: _ScanState, row: dict, head: dict) -> None:
    """A chain that does not hold the head the index records: another image's
    records (SUBSTITUTED), or another state of this one's (ROLLBACK)."""
    scan, prov = str(row.get("scan")), str(state.prov)
    differ = []
    if state.merged is not None:
        for k in IDENTITY:
            if canonical(state.merged.get(k)) != canonical(row.get(k)):
                differ.append(
                    f"its records say {k} {_short(state.merged.get(k))}, "
                    f"the run index {_short(row.get(k))}"
                )
    mine = {(r["role"], r["path"]): r for r in raw_inputs(state.steps)}
    listed = [r for r in row.get("raw") or [] if isinstance(r, dict)]
    for r in listed:
        have = mine.get((r.get("role"), r.get("path")))
        if have is not None and have.get("sha256") != r.get("sha256"):
            differ.append(
                f"raw input {r.get('role')} {r.get('path')} was read with sha256 "
                f"{_sha(have.get('sha256'))}, but the run index has {_sha(r.get('sha256'))}"
            )
    if listed and not any((r.get("role"), r.get("path")) in mine for r in listed):
        differ.append("its steps read none of the raw inputs the run index lists")
    if differ:
        run.add(
            SUBSTITUTED,
            scan,
            None,
            f"its records belong to another image than the run's: {'; '.join(differ)}",
            provenance=prov,
        )
        return
    now = chain_head(state.manifest) or {}
    earlier = (now.get("seq") or 0) < (head.get("seq") or 0) or str(now.get("time")) < str(
        head.get("time")
    )
    why = (
        "an earlier state of the scan was restored over the run's (an older run's "
        "folder, or its latest entries struck)"
        if earlier
        else "its chain was replaced or rewritten after the run was indexed"
    )
    run.add(
        ROLLBACK,
        scan,
        None,
        f"its latest chain entry is entry {now.get('seq')} ({now.get('time')}, line sha256 "
        f"{_sha(now.get('sha256'))}), but the run index records entry {head.get('seq')} "
        f"({head.get('time')}, {_sha(head.get('sha256'))}), which its chain does not hold: "
        f"{why}",
        provenance=prov,
    )


def _audit_index(run: _Run, items: list[str | Path]) -> int:
    """The run against its run index (see the module docstring); returns how many
    scans the index lists that are gone."""
    indexes = _find_indexes(items)
    if not indexes:
        where = ", ".join(map(str, items)) if len(items) <= 3 else f"{len(items)} paths"
        if run.key:
            run.add(
                UNINDEXED,
                None,
                None,
                f"no run index ({INDEX_NAME}) in or above {where}: nothing lists the run's "
                "scans, their latest chain entries and raw inputs, so a scan rolled back, "
                "substituted or deleted would pass; the workflow's provenance report writes "
                "it (or python -m medtx.provenance.run_index --records ... --out ...)",
            )
        _check_raw_by_records(run, run.states.values())
        return 0
    rows: dict[Path, tuple[dict, str, dict, _Locator, Path]] = {}
    for path in indexes:
        index, problems = read_run_index(path, key=run.key)
        for kind, message in problems:
            run.add(kind, None, None, message, index=str(path))
        if index is None:
            continue
        run.signed += "hmac" in index
        anchor = (str(index.get("written_to")), index.get("cwd"), path)
        locate = _Locator(run.base, anchor if index.get("written_to") else None)
        for row in index["scans"]:
            scan_dir = os.path.normpath(path.parent / row["folder"])
            manifest = (Path(scan_dir) / row["manifest"]).resolve()
            known = rows.get(manifest)
            if known is None or str(index.get("written")) > str(known[2].get("written")):
                rows[manifest] = (row, scan_dir, index, locate, path)
    missing = 0
    listed = 0
    for manifest, (row, folder, _, locate, index_file) in sorted(rows.items()):
        prov = Path(folder) / row["provenance"]
        if not _in_scope(manifest.parent, (manifest, prov.resolve()), items):
            continue
        listed += 1
        if manifest in run.states or prov.exists() or manifest.exists():
            if manifest in run.states:  # else its records could not be audited: said
                _index_scan(run, row, run.states[manifest], locate)
            continue
        missing += 1
        head: dict = row["head"] if isinstance(row.get("head"), dict) else {}
        gone = (
            "its folder is gone"
            if not Path(folder).exists()
            else f"its records are gone (no {row['provenance']} nor {row['manifest']})"
        )
        run.add(
            MISSING_SCAN,
            str(row.get("scan")),
            None,
            f"the run index lists it in {folder} (chain entry {head.get('seq')}), but {gone}",
            index=str(index_file),
        )
    indexed = set(rows)
    unlisted = [s for m, s in run.states.items() if m not in indexed and s.prov.exists()]
    _check_raw_by_records(run, unlisted)
    run.result.index = ", ".join(map(str, indexes))
    run.result.n_indexed, run.result.n_unlisted = listed, len(unlisted)
    return missing


def run_audit(
    root_or_files: str | Path | Iterable[str | Path],
    *,
    base_dir: str | Path | None = None,
    key: bytes | None = None,
) -> AuditResult:
    """Audit every scan found under ``root_or_files``.

    Args:
        root_or_files: a folder searched recursively for ``*_provenance.json``
            and scan manifests, or a list of such files or folders.
        base_dir: what relative paths in records are relative to (default:
            the ``cwd`` each record kept, mapped to where the results folder is now).
        key: the HMAC key (default ``$MEDTX_PROVENANCE_KEY``); with a key,
            every manifest entry must carry its signature.
    """
    items = [root_or_files] if isinstance(root_or_files, (str, Path)) else list(root_or_files)
    scans = find_scans(items)
    if not scans:
        raise MedtxError(f"no *{PROVENANCE_SUFFIX} records found under {root_or_files}")
    run = _Run(Path(base_dir).resolve() if base_dir is not None else None, key or provenance_key())
    for scan, prov, manifest in scans:
        try:
            _audit_scan(run, scan, prov, manifest)
        except (TypeError, ValueError, KeyError, AttributeError) as err:  # records made nonsense
            run.add(
                UNREADABLE, scan, None, f"its records are malformed ({err!r})", provenance=str(prov)
            )
    try:
        missing = _audit_index(run, items)
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # an index made nonsense
        run.add(UNREADABLE, None, None, f"the run index is malformed ({err!r})")
        missing = 0
    _duplicates(run)
    result = run.result
    result.n_scans = len(scans) + missing
    result.n_files = len(run.hashes)
    result.n_raw = sum(h is not None for h in run.raw_hashes.values())
    if run.key:
        result.signing = f"signatures checked with {KEY_ENV}"
    else:
        said = (
            f"signed, but not verified: {KEY_ENV} is not set"
            if run.signed
            else f"unsigned (set {KEY_ENV} to sign and verify)"
        )
        result.signing = f"{said}: {UNSIGNED_LIMIT}"
    return result


def audit(
    root_or_files: str | Path | Iterable[str | Path],
    *,
    base_dir: str | Path | None = None,
    key: bytes | None = None,
) -> list[dict[str, Any]]:
    """The problems ``run_audit`` finds: dicts with ``status`` (one of ``KINDS``),
    ``scan``, ``step``, ``message``, ``provenance`` and, for files, ``path``,
    ``recorded_sha256`` and ``current_sha256``."""
    return run_audit(root_or_files, base_dir=base_dir, key=key).problems


def format_audit(result: AuditResult) -> str:
    """One line per problem (kind, scan, step, what is wrong), then a verdict."""
    lines = []
    for p in sorted(result.problems, key=lambda p: str(p.get("scan"))):
        where = "run index" if p.get("scan") is None else f"scan {p.get('scan')}"
        where += f", step {p['step']}" if p.get("step") else ""
        lines.append(f"{p['status'].upper():<10} {where}: {p['message']}")
    raw = f"{result.n_raw} raw input(s)" + (
        f" ({result.n_raw_absent} not found, not re-checked)" if result.n_raw_absent else ""
    )
    if not result.index:
        index = "no run index: a scan rolled back, substituted or deleted is not seen"
    elif result.problems:
        index = f"run index {result.index}"
    else:
        index = f"the run index {result.index} vouches for all {result.n_indexed} scan(s)"
        if result.n_unlisted:
            index += f" ({result.n_unlisted} other(s) not in it: checked on their own records)"
    checked = (
        f"{result.n_records} record(s), {result.n_files} output file(s) and {raw} of "
        f"{result.n_scans} scan(s) checked; {index}; {result.signing}"
    )
    if not result.problems:
        lines.append(
            f"audit: OK: all {result.n_files} recorded output file(s) match their sha256, "
            f"all {result.n_records} record(s) of {result.n_scans} scan(s) match their "
            f"manifests and re-derive, and {raw} hash as the run read them; {index}; "
            f"{result.signing}."
        )
        return "\n".join(lines)
    counts = Counter(p["status"] for p in result.problems)
    n_bad = len({p.get("scan") for p in result.problems if p.get("scan") is not None})
    where = f"{n_bad} of {result.n_scans} scan(s)"
    if any(p.get("scan") is None for p in result.problems):
        where = f"{where} and the run index" if n_bad else "the run index"
    lines.append(
        f"audit: {len(result.problems)} problem(s) in {where}: "
        + ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])
        + f" ({checked})."
    )
    return "\n".join(lines)


def main_audit(root: str, *, base: str | None = None) -> int:
    """``medtx audit [ROOT] [--base DIR]``: print the problems and a verdict;
    0 if none, 1 otherwise. A root that does not exist or holds no records is
    a user error (``MedtxError``)."""
    if base is not None and not Path(base).is_dir():
        raise MedtxError(f"--base {base}: not a folder")
    result = run_audit(root, base_dir=base)
    print(format_audit(result))
    return 1 if result.problems else 0
