"""Run a preprocessing step, or skip it when its record shows it already ran as asked.

In the default layout (``preprocess/job_per: scan``) one workflow job runs a
scan's whole T1 chain, so Snakemake reruns that job when any step's settings
or code changed. Inside the job each step is then skipped when its record
already holds this run: the same code (the hash of the step's import closure,
``medtx.workflow.codehash``), the same settings and context, and the same
inputs (sha256), with its outputs still the files it recorded. Once a step
runs, every step after it runs too, as Snakemake reruns everything downstream
of a rerun job: an edit to N4's code reruns n4, pool and normalize, and not
bet or flirt, in either layout.

A step that runs records its ``rerun`` key (``code``, ``settings``) beside its
inputs and outputs; the records are otherwise the ones the steps always wrote,
so ``medtx audit`` reads them as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path

from medtx.io import sha256
from medtx.preprocess.context import StepContext
from medtx.workflow.codehash import STAGE_ENTRIES, code_hash

# The records each step writes, by output role.
STEP_RECORDS: dict[str, tuple[str, ...]] = {
    "bet": ("record",),
    "flirt": ("record",),
    "n4": ("record",),
    "pool_normalize": ("pool_record", "record"),
    "brats": ("record",),
}


def rerun_key(step: str, params: dict, ctx: StepContext) -> dict[str, str]:
    """What a step's rerun depends on besides its input files: its code and its
    settings (the params it is given and the context: backend, seed, threads,
    determinism and the scan's identity)."""
    context = dataclasses.asdict(ctx)
    context.pop("rerun")
    text = json.dumps({"params": params, "context": context}, sort_keys=True, separators=(",", ":"))
    return {"code": code_hash(step), "settings": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _files_match(entries: list[dict]) -> bool:
    for entry in entries:
        path = Path(entry["path"])
        if not path.is_file() or sha256(path) != entry["sha256"]:
            return False
    return True


def unchanged(record_files: list[str], key: dict[str, str], inputs: dict[str, str]) -> bool:
    """True when every record exists with ``key``, names each of ``inputs`` among
    its inputs, and every file it recorded (inputs and outputs) still has the
    recorded sha256."""
    wanted = {str(p) for p in inputs.values()}
    recorded_inputs: set[str] = set()
    for path in record_files:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False
        if record.get("rerun") != key:
            return False
        if not _files_match(record.get("inputs", [])) or not _files_match(
            record.get("outputs", [])
        ):
            return False
        recorded_inputs.update(e["path"] for e in record.get("inputs", []))
    return wanted <= recorded_inputs


def run_step(
    step: str,
    inputs: dict[str, str],
    outputs: dict[str, str],
    params: dict,
    ctx: StepContext,
    *,
    force: bool = False,
    log: Callable[[str], object] | None = None,
) -> bool:
    """Run ``step`` (files by role, as ``medtx step`` takes them) unless its records
    show it unchanged; ``force`` runs it regardless. Returns whether it ran.
    ``log`` gets one line per step (the workflow's job log); ``medtx preprocess``
    passes none and stays quiet on success."""
    log = log or (lambda line: None)
    key = rerun_key(step, params, ctx)
    records = [outputs[role] for role in STEP_RECORDS[step]]
    if not force and unchanged(records, key, inputs):
        log(f"{step}: unchanged since {', '.join(records)}; skipped")
        return False
    (entry,) = STAGE_ENTRIES[step]
    importlib.import_module(entry).run_step(
        inputs, outputs, params, dataclasses.replace(ctx, rerun=key)
    )
    log(f"{step}: ran")
    return True
