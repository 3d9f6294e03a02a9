"""Checkpoints of the training stages: what they record, how a later stage loads one.

A stage's final checkpoint holds the best state and metadata (stage, task, model
arguments, parts trained, the subjects seen, the run's identity); the resume key
covers the stage config, the inputs' fingerprint and the training code's hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from medtx.errors import ConfigError, MedtxError
from medtx.io import sha256
from medtx.models.registry import build
from medtx.models.slice_transformer import MedicalTransformer, inflate_state_dict
from medtx.train.loop import MODEL_FORMAT, load_state
from medtx.workflow.codehash import code_hash


def scans_of(items: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(i.get("scan", i.get("image"))) for i in items]


def subjects_of(items: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({f"{i.get('dataset', '')}:{i.get('subject', '')}" for i in items})


def input_fingerprint(items: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (16 hex) of every cached input's path, size and mtime.

    Part of the resume key: a requeued job sees the same files and resumes, but a
    job that Snakemake reruns because its inputs were rewritten (new preprocessing,
    a new cache) must not pick up the ``.last.pt`` of the previous data.
    """
    h = hashlib.sha256()
    for item in items:
        for key in ("image", "seg"):
            if item.get(key):
                path = Path(item[key])
                st = path.stat() if path.exists() else None
                h.update(
                    f"{path}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode()
                )
    return h.hexdigest()[:16]


def run_config(
    cfg: Mapping[str, Any], items: Sequence[Mapping[str, Any]], **run: Any
) -> dict[str, Any]:
    """What the resume key (the loop's config hash) covers: the stage config, what
    defines this run's data, the inputs' fingerprint and the training code's hash
    (an edit to medtx/models retrains instead of resuming a finished run)."""
    code = code_hash("finetune" if run.get("stage") == "finetune" else "pretrain")
    return {**cfg, **run, "inputs": input_fingerprint(items), "code": code}


def stage_metadata(
    stage: str,
    task: str,
    cfg: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    trained: Sequence[str],
    train_items: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None,
    **more: Any,
) -> dict[str, Any]:
    meta = dict(extra or {})
    meta.update(
        {
            "stage": stage,
            "task": task,
            "preset": cfg["preset"],
            "model_kwargs": dict(model_kwargs),
            "trained": list(trained),
            "downsample": cfg["downsample"],
            "seed": cfg["seed"],
            "subjects": subjects_of(train_items),
            "train_scans": scans_of(train_items),
            **more,
        }
    )
    return meta


def load_pretrained(
    model: MedicalTransformer,
    init: str | Path,
    *,
    parts: Sequence[str] = ("encoders", "transformer"),
) -> dict[str, Any]:
    """Load the ``parts`` (state-dict prefixes) of a pre-trained checkpoint into ``model``.

    Only parts the checkpoint's stage trained are taken (stage 1 trains the encoders
    only: its transformer is random and is not loaded). 1-channel stems are inflated to
    the model's input channels (BraTS). Heads stay fresh.

    Returns:
        {"init", "init_sha256", "init_stage", "loaded": [parts], "keys": n}.
    """
    ckpt = load_state(init)
    state = ckpt.get("model")
    if ckpt.get("format") != MODEL_FORMAT or not isinstance(state, Mapping):
        raise MedtxError(f"{init}: not a medtx model checkpoint (format {ckpt.get('format')!r})")
    trained = (ckpt.get("metadata") or {}).get("trained") or list(parts)
    take = [p for p in parts if p in trained]
    if "encoders" not in take:
        raise MedtxError(f"{init}: holds no trained encoders (trained: {trained})")
    keep = {k: v for k, v in state.items() if k.split(".")[0] in take}
    if model.in_channels != 1:
        keep = inflate_state_dict(keep, model.in_channels)
    own = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in keep.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(k for k in keep if k not in own)
    if bad or missing:
        preset = (ckpt.get("metadata") or {}).get("preset")
        raise ConfigError(
            f"{init} (preset {preset!r}) does not fit this model: "
            + "; ".join(bad[:5] + [f"no key {k}" for k in missing[:5]])
        )
    model.load_state_dict(keep, strict=False)
    return {
        "init": str(init),
        "init_sha256": sha256(init),
        "init_stage": (ckpt.get("metadata") or {}).get("stage"),
        "loaded": take,
        "keys": len(keep),
    }


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a stage's model from its final checkpoint: (model in eval mode, checkpoint)."""
    ckpt = load_state(path)
    meta = ckpt.get("metadata") or {}
    if ckpt.get("format") != MODEL_FORMAT or "model_kwargs" not in meta:
        raise MedtxError(f"{path}: not a medtx stage checkpoint")
    model = build(meta["model_kwargs"])
    result = model.load_state_dict(ckpt["model"], strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("mask_token.")]
    if result.missing_keys or unexpected:
        raise MedtxError(
            f"{path}: state does not match its model (missing "
            f"{result.missing_keys[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval(), ckpt


def model_kwargs(cfg, task, num_outputs, in_channels, use_transformer=True) -> dict[str, Any]:
    return {
        "preset": cfg["preset"],
        "task": task,
        "num_outputs": int(num_outputs),
        "in_channels": int(in_channels),
        "use_transformer": bool(use_transformer),
    }
