"""Per-step provenance records: what ran, on what, with which tool, and QC.

Each preprocessing step writes one JSON record; ``merge_scan`` gathers the
steps of a scan into ``<scan>_provenance.json``, which the cohort report and
``medtx audit`` read. A record holds enough to rerun or cite the step: inputs
and outputs with sha256, the exact command line (FSL) or function and
arguments (antspyx), parameters, tool versions, backend, seed, timing, host,
SLURM job id, QC metrics with pass/fail, and the working directory its
relative paths are relative to. Every record written is chained into its
scan's manifest (``medtx.provenance.manifest``), which the audit checks it by.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError
from medtx.io import sha256, write_json
from medtx.provenance.manifest import MERGED, STEP, append_record, record_sha256
from medtx.provenance.qc import judge
from medtx.workflow.paths import PROVENANCE_SUFFIX

SCHEMA_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@functools.cache
def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fsl_version(fsldir: str | Path | None = None) -> str | None:
    """FSL's version from ``<fsldir>/etc/fslversion`` (default ``$FSLDIR``); None if absent."""
    fsldir = fsldir or os.environ.get("FSLDIR")
    if not fsldir:
        return None
    path = Path(fsldir) / "etc" / "fslversion"
    try:
        return path.read_text().strip().split(":")[0] or None
    except OSError:
        return None


def tool_versions() -> dict[str, str | None]:
    """The Python packages every step imports.

    FSL is not here: a step that runs FSL adds its version (``add_version``),
    so an ants-backend record does not list FSL just because ``$FSLDIR`` is set.
    """
    return {
        "medtx": package_version("medtx"),
        "antspyx": package_version("antspyx"),
        "nipype": package_version("nipype"),
        "nibabel": package_version("nibabel"),
        "numpy": package_version("numpy"),
    }


def file_entry(role: str, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {"role": role, "path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size}


class StepRecord:
    """Collects one step's provenance while it runs.

    Example:
        rec = StepRecord("n4", scan="sub-01", backend="ants", params=p, seed=42)
        rec.add_input("t1", path)
        rec.call("ants.n4_bias_field_correction", shrink_factor=4)
        ... do the work ...
        rec.add_output("n4", out_path)
        rec.set_qc({"bias_max": 1.3}, [check("bias_max", 1.3, maximum=2.0)])
        rec.finish(json_path)
    """

    def __init__(
        self,
        step: str,
        *,
        scan: str,
        backend: str,
        params: dict,
        seed: int | None,
        dataset: str | None = None,
        subject: str | None = None,
        session: str | None = None,
        rerun: dict[str, str] | None = None,
    ):
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "step": step,
            "scan": scan,
            "dataset": dataset,
            "subject": subject,
            "session": session,
            "backend": backend,
            "tool": None,
            "command": None,
            "cwd": os.getcwd(),
            "function": None,
            "arguments": None,
            "params": params,
            "seed": seed,
            "inputs": [],
            "outputs": [],
            "versions": tool_versions(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "start": _now(),
            "end": None,
            "duration_s": None,
            "qc": {"metrics": {}, "checks": [], "passed": True},
        }
        if rerun is not None:  # what decides a rerun (medtx.preprocess.steps.rerun_key)
            self.data["rerun"] = dict(rerun)
        self._t0 = time.perf_counter()

    def add_input(self, role: str, path: str | Path) -> None:
        self.data["inputs"].append(file_entry(role, path))

    def add_output(self, role: str, path: str | Path) -> None:
        self.data["outputs"].append(file_entry(role, path))

    def set_tool(self, name: str, version: str | None) -> None:
        self.data["tool"] = {"name": name, "version": version}

    def add_version(self, name: str, version: str | None) -> None:
        """Add a tool this step ran (FSL) to ``versions``, beside the Python packages."""
        self.data["versions"][name] = version

    def command(self, cmdline: str) -> None:
        """Record an external command line (appended when a step runs several).

        ``cwd`` keeps the absolute working directory, against which any
        relative path in the command resolves.
        """
        prev = self.data["command"]
        self.data["command"] = cmdline if prev is None else f"{prev}\n{cmdline}"
        self.data["cwd"] = os.getcwd()

    def call(self, function: str, **arguments: Any) -> None:
        """Record a library call and its arguments (several calls are kept in order)."""
        entry = {"function": function, "arguments": arguments}
        if self.data["function"] is None:
            self.data["function"], self.data["arguments"] = function, arguments
            self.data["calls"] = [entry]
        else:
            self.data["calls"].append(entry)

    def set_qc(self, metrics: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        self.data["qc"] = {
            "metrics": metrics,
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
        }

    def finish(self, path: str | Path) -> dict[str, Any]:
        """Write the record and chain it into its scan's manifest."""
        self.data["end"] = _now()
        self.data["duration_s"] = round(time.perf_counter() - self._t0, 3)
        write_json(self.data, path)
        append_record(path, kind=STEP)
        return self.data


def load_step_records(step_files: Sequence[str | Path]) -> list[dict[str, Any]]:
    """A scan's step records, in the order given."""
    steps = []
    for p in step_files:
        try:
            steps.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as err:
            raise MedtxError(f"{p}: not a readable step record ({err})") from err
    return steps


def step_file(
    steps: list[dict[str, Any]], step: str, role: str, *, direction: str = "outputs"
) -> str:
    """The path a step recorded for ``role`` (an output unless ``direction="inputs"``)."""
    for record in steps:
        if record.get("step") == step:
            for entry in record.get(direction, []):
                if entry["role"] == role:
                    return entry["path"]
    raise MedtxError(
        f"no {direction[:-1]} {role!r} of step {step!r} in the step records "
        f"(steps: {[r.get('step') for r in steps]})"
    )


def merge_scan(step_files: Sequence[str | Path], out: str | Path, **identity_and_qc: Any) -> dict:
    """Gather a scan's step record files into one JSON (see ``merge_steps``)."""
    return merge_steps(load_step_records(step_files), out, **identity_and_qc)


def merge_steps(
    steps: list[dict[str, Any]], out: str | Path, **identity_and_qc: Any
) -> dict[str, Any]:
    """Write ``merged_record`` of a scan's loaded step records to ``out`` and chain
    it into the scan's manifest, with the hash of each step record it merged.

    The record keeps where it was written (``written_to``, as given, and
    ``cwd``), so an audit of a moved results folder maps recorded paths there.
    """
    hashes = {str(s.get("step")): record_sha256(s) for s in steps}
    record = merged_record(steps, **identity_and_qc)
    record["written_to"] = str(out)
    record["cwd"] = os.getcwd()
    write_json(record, out)
    append_record(out, kind=MERGED, merged=hashes)
    return record


def merged_record(
    steps: list[dict[str, Any]],
    *,
    scan: str | None = None,
    dataset: str | None = None,
    subject: str | None = None,
    session: str | None = None,
    qc: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A scan's step records gathered into one record, QC judged against ``qc``.

    Pure (the steps are copied), so ``medtx audit`` re-derives a merged record
    from the step records on disk with this same function. The scan's identity
    comes from the records (each step wrote it from its context) unless given.
    """
    import copy

    steps = copy.deepcopy(steps)
    first = steps[0] if steps else {}
    scan = scan or first.get("scan")
    dataset = dataset if dataset is not None else first.get("dataset")
    subject = subject or first.get("subject") or scan
    session = session if session is not None else first.get("session")
    for step in steps:
        checks = step["qc"]["checks"] + judge(step, qc or {})
        step["qc"]["checks"] = checks
        step["qc"]["passed"] = all(c["passed"] for c in checks)
    return {
        "schema": SCHEMA_VERSION,
        "scan": scan,
        "dataset": dataset,
        "subject": subject,
        "session": session,
        "backend": steps[0]["backend"] if steps else None,
        "qc_passed": not (failed := qc_failures(steps)),
        "qc_failures": failed,
        "qc": {"thresholds": qc or {}},
        "steps": steps,
        **(extra or {}),
    }


def qc_failures(steps: list[dict[str, Any]]) -> list[str]:
    """``"<step>: <metric>=<value>"`` for every failed check, in step order."""
    return [
        f"{s['step']}: {c['metric']}={c['value']:.4g}"
        for s in steps
        for c in s["qc"]["checks"]
        if not c["passed"]
    ]


# ------------------------------------------------------------------------ reading merged records

PROVENANCE_GLOB = f"*{PROVENANCE_SUFFIX}"


def find_provenance_files(root: str | Path) -> list[Path]:
    """All ``*_provenance.json`` files under ``root`` (recursively), sorted."""
    root = Path(root)
    if not root.exists():
        raise MedtxError(f"provenance root does not exist: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob(PROVENANCE_GLOB) if p.is_file())


def load_scan_record(path: str | Path) -> dict[str, Any]:
    """One per-scan provenance record, checked to be a JSON object with steps."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MedtxError(f"provenance record does not exist: {path}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedtxError(f"{path}: not a readable provenance JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
        raise MedtxError(
            f"{path}: not a per-scan provenance record (expected an object "
            "with a 'steps' list, as medtx.provenance.records.merge_scan writes)"
        )
    return record


def load_scan_records(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load per-scan records from JSON files; a directory is searched recursively."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(find_provenance_files(p) if p.is_dir() else [p])
    return [load_scan_record(f) for f in files]
