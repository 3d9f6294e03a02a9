"""Checkpoints of the training stages: what they record, how a later stage loads one.

A stage's final checkpoint holds the best state and metadata (stage, task, model
arguments, parts trained, the subjects seen, the run's identity); the resume key
covers the stage config, the inputs' fingerprint and the training code's hash.

The resumable state is kept twice, so one damaged file never costs the run:
each save writes ``<out>.last.pt`` atomically and keeps the state it replaces
as ``<out>.prev.pt``. A run resumes from the newest file it can read. When
``<out>.last.pt`` cannot be read (truncated by a full disk, a partial copy) or
is missing, it resumes from ``<out>.prev.pt`` with a warning naming both
files. It never starts from zero in their place: when files exist but none
can be read, the run fails with one line naming them, and the user asks for a
fresh start by deleting them. (A state written for another config is a
different run, not damage: the loop starts that one afresh with a warning.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtx.domain import DEFAULT_BACKBONE
from medtx.errors import ConfigError, MedtxError
from medtx.io import atomic_path, sha256
from medtx.models.registry import backbone, build
from medtx.workflow.codehash import code_hash

CHECKPOINT_FORMAT = "medtx-train-state"
MODEL_FORMAT = "medtx-model"
FORMAT_VERSION = 1


def last_path(out: str | Path) -> Path:
    """Where the resumable state of the run that ends in ``out`` lives: ``<out>.last.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".last.pt")


def load_state(path: str | Path) -> dict[str, Any]:
    """A medtx checkpoint (``<out>`` or ``<out>.last.pt``), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise MedtxError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common base
        first = (str(err).strip().splitlines() or [""])[0]  # torch's messages run for lines
        raise MedtxError(f"{path}: cannot read checkpoint ({type(err).__name__}: {first})") from err


def previous_path(out: str | Path) -> Path:
    """Where the state before the newest is kept: ``<out>.prev.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".prev.pt")


def save_resumable(state: Mapping[str, Any], out: str | Path, *, keep_previous: bool) -> None:
    """Write ``<out>.last.pt`` atomically; with ``keep_previous`` the file it
    replaces becomes ``<out>.prev.pt`` (pass False while ``<out>.last.pt`` is
    unreadable or another run's, so it never displaces a good previous state)."""
    last = last_path(out)
    with atomic_path(last) as tmp:
        torch.save(dict(state), tmp)
        if keep_previous and last.exists():
            os.replace(last, previous_path(out))


def load_resumable(
    out: str | Path, log: Callable[[str], None]
) -> tuple[dict[str, Any], Path] | None:
    """The newest readable resumable state of the run ending in ``out``, and its file.

    None when neither ``<out>.last.pt`` nor ``<out>.prev.pt`` exists (a fresh
    run). Falling back to ``<out>.prev.pt`` logs a warning naming both files;
    when files exist but none can be read, a MedtxError names them.
    """
    last, prev = last_path(out), previous_path(out)
    problems = []
    for path in (last, prev):
        if not path.exists():
            if path == last and prev.exists():
                problems.append(f"{last} is missing")
            continue
        try:
            saved = load_state(path)
        except MedtxError as err:
            problems.append(str(err))
            continue
        if problems:
            log(f"[train] WARNING: {problems[0]}; resuming from the previous state {path}")
        return saved, path
    if not problems:
        return None
    files = " and ".join(str(p) for p in (last, prev) if p.exists())
    raise MedtxError(
        f"{'; '.join(problems)}; no readable state to resume from, and training does not "
        f"restart from zero by itself: delete {files} to train from scratch"
    )


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


# A training stage -> the workflow stage whose code hash covers it (STAGE_ENTRIES).
CODE_STAGES = {
    "finetune": "finetune",
    "pretrain_exemplar": "pretrain",
    "pretrain_masked": "pretrain",
    "pretrain_tokenizer": "pretrain_pumit",
    "pretrain_mim": "pretrain_pumit",
}


def run_config(
    cfg: Mapping[str, Any], items: Sequence[Mapping[str, Any]], **run: Any
) -> dict[str, Any]:
    """What the resume key (the loop's config hash) covers: the stage config, what
    defines this run's data, the inputs' fingerprint and the training code's hash
    (an edit to medtx/models retrains instead of resuming a finished run)."""
    code = code_hash(CODE_STAGES[run["stage"]])
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
    model: nn.Module,
    init: str | Path,
    *,
    parts: Sequence[str] = ("encoders", "transformer"),
    backbone_name: str = DEFAULT_BACKBONE,
    checkpoint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the ``parts`` (state-dict prefixes) of a pre-trained checkpoint into ``model``.

    Only parts the checkpoint's stage trained are taken (stage 1 trains the encoders
    only: its transformer is random and is not loaded); the first part is required.
    1-channel stems are inflated to the model's input channels (BraTS) by the
    backbone's rule. Heads stay fresh.

    ``checkpoint``: the checkpoint already read, as a received encoder bundle gives
    it (``medtx.bundle.Bundle.as_checkpoint``, whose ``sha256`` is then the
    ``init_sha256``: its manifest's, which covers every file).

    Returns:
        {"init", "init_sha256", "init_stage", "loaded": [parts], "keys": n}.
    """
    ckpt = load_state(init) if checkpoint is None else checkpoint
    state = ckpt.get("model")
    if (checkpoint is None and ckpt.get("format") != MODEL_FORMAT) or not isinstance(
        state, Mapping
    ):
        raise MedtxError(f"{init}: not a medtx model checkpoint (format {ckpt.get('format')!r})")
    meta = ckpt.get("metadata") or {}
    saved_backbone = (meta.get("model_kwargs") or {}).get("backbone", DEFAULT_BACKBONE)
    if saved_backbone != backbone_name:
        raise ConfigError(
            f"{init}: pre-trained for backbone {saved_backbone!r}, not {backbone_name!r}"
        )
    trained = meta.get("trained") or list(parts)
    take = [p for p in parts if p in trained]
    if parts[0] not in take:
        raise MedtxError(f"{init}: holds no trained {parts[0]} (trained: {trained})")
    keep = {k: v for k, v in state.items() if k.split(".")[0] in take}
    in_channels = int(getattr(model, "in_channels", 1))
    if in_channels != 1:
        keep = backbone(backbone_name).inflate(keep, in_channels)
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
        "init_sha256": ckpt.get("sha256") or sha256(init),
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
    # pre-training's own parts (stage 2's mask token, MIM's head and tokenizer)
    extra = ("mask_token.", "mim_head.", "tokenizer.")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(extra)]
    if result.missing_keys or unexpected:
        raise MedtxError(
            f"{path}: state does not match its model (missing "
            f"{result.missing_keys[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval(), ckpt


def model_kwargs(cfg, task, num_outputs, in_channels, use_transformer=True) -> dict[str, Any]:
    """What ``medtx.models.registry.build`` needs to rebuild a stage's model."""
    kw: dict[str, Any] = {
        "backbone": cfg.get("backbone", DEFAULT_BACKBONE),
        "preset": cfg["preset"],
        "task": task,
        "num_outputs": int(num_outputs),
        "in_channels": int(in_channels),
    }
    if kw["backbone"] == DEFAULT_BACKBONE:
        kw["use_transformer"] = bool(use_transformer)
    else:
        if not use_transformer:
            raise ConfigError(f"backbone {kw['backbone']} has no 'without transformer' ablation")
        kw["pooling"] = cfg["pooling"]
    return kw
