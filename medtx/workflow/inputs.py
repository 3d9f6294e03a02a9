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


def model_input_settings(preprocess: Mapping[str, Any], backend: str, *, brats: bool) -> dict:
    """The preprocessing settings that made a model's inputs.

    BraTS inputs depend only on the brats settings, T1 inputs on the T1 chain, so
    a change to N4 does not retrain a model that never saw an N4 output.
    """
    if brats:
        return {"brats": preprocess["brats"]}
    settings = {k: v for k, v in preprocess.items() if k != "brats"}
    settings["backend"] = backend
    return settings


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over key-sorted compact JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
