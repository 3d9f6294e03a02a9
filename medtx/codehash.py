"""Hashes of the medtx source files each workflow stage runs.

Snakemake's code trigger sees a rule's own shell line, not the modules that
line imports. Each rule therefore carries ``code=code_hash(stage)`` in its
params: editing ``medtx/preprocess/n4.py`` reruns N4 and what follows it, and
nothing before. The table below is the one place to review what each stage
depends on.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# cli.py and config.py are left out on purpose: the command line only
# dispatches (its arguments are in each rule's shell line, which Snakemake's
# own code trigger sees), and config values reach rules through params. What
# it reads from a scan id (subject, session) comes from scan_ids.py, hashed.
_COMMON = ["errors.py", "io.py", "provenance.py", "preprocess/__init__.py",
           "preprocess/context.py", "scan_ids.py"]
_ANTS = ["preprocess/antsio.py", "templates.py", "preprocess/backend.py"]

STAGE_MODULES: dict[str, list[str]] = {
    "demo": ["demo.py", "templates.py", "io.py", "errors.py"],
    "bet": _COMMON + _ANTS + ["preprocess/bet.py"],
    "flirt": _COMMON + _ANTS + ["preprocess/flirt.py", "preprocess/intensity.py"],
    "n4": _COMMON + ["preprocess/antsio.py", "preprocess/n4.py"],
    "pool_normalize": _COMMON + ["preprocess/intensity.py", "volumes.py"],
    "brats": _COMMON + ["preprocess/brats.py", "preprocess/intensity.py", "volumes.py"],
    "collect": _COMMON + ["qc.py", "qc_images.py", "preprocess/chain.py"],
    "report": _COMMON + ["report.py", "scans.py", "qc.py"],
    "folds": _COMMON + ["folds.py", "report.py"],
    "train": _COMMON + ["training.py", "stages.py", "volumes.py", "metrics.py", "folds.py",
                        "models/__init__.py", "models/slice_transformer.py", "models/pretext.py"],
    "evaluate": _COMMON + ["tables.py", "stages.py", "metrics.py", "volumes.py",
                           "models/slice_transformer.py"],
}


@functools.lru_cache(maxsize=None)
def code_hash(stage: str) -> str:
    """sha256 (first 16 hex digits) over the sorted source files of ``stage``."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"no code table entry for stage {stage!r}; known: {sorted(STAGE_MODULES)}")
    h = hashlib.sha256()
    for rel in sorted(set(STAGE_MODULES[stage])):
        h.update(rel.encode())
        h.update((PACKAGE / rel).read_bytes())
    return h.hexdigest()[:16]
