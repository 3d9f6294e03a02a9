"""What a checkpoint records of the preprocessing that made its inputs.

The finetune rule passes ``settings_hash(model_input_settings(...))`` to each
run, and ``medtx export`` checks a config against it before writing those
settings into a bundle. Kept out of every rule's own imports, so a change here
reruns nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Keys of the preprocess section that cut the work into jobs, not what it computes.
JOB_LAYOUT_KEYS = ("job_per",)


def output_settings(preprocess: Mapping[str, Any]) -> dict:
    """The preprocess section without its job layout: a switch between one job
    per scan and one per step changes no output, model or report."""
    return {k: v for k, v in preprocess.items() if k not in JOB_LAYOUT_KEYS}


def model_input_settings(preprocess: Mapping[str, Any], backend: str, *, brats: bool) -> dict:
    """The preprocessing settings that made a model's inputs.

    BraTS inputs depend only on the brats settings, T1 inputs on the T1 chain, so
    a change to N4 does not retrain a model that never saw an N4 output.
    """
    if brats:
        return {"brats": preprocess["brats"]}
    settings = output_settings(preprocess)
    settings.pop("brats", None)
    settings["backend"] = backend
    return settings


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over key-sorted compact JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
