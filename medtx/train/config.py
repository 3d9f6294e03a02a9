"""The training stages' config: every key a stage reads, its default, its check.

``resolve_config`` is the one place the code checks these values, and the
defaults below are their one statement. The config schema
(``workflow/schemas/config.schema.yaml``, ``$defs/training``) states the same
bounds and no defaults; tests/unit/train/test_config_schema.py holds the two
together, and the generated configuration reference (docs/generate.py) shows
these defaults beside the schema's keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from medtx.domain import BACKBONES, DEFAULT_BACKBONE, DEFAULT_LABEL_MAP
from medtx.errors import ConfigError

# The loop's own config keys and their defaults (the stages add theirs: DEFAULTS below).
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,  # Adam learning rate
    "lr_decay": 0.99,  # ExponentialLR gamma, applied once per epoch (lr_schedule: exponential)
    # exponential (per epoch, lr_decay) or cosine (per step, after a linear warm-up over
    # warmup_fraction of the steps, down towards lr_min: timm's CosineLRScheduler)
    "lr_schedule": "exponential",
    "warmup_fraction": 0.0,
    "lr_min": 1e-6,
    "grad_clip": None,  # clip the gradients' global L2 norm to this (null: no clipping)
    "epochs": 150,  # maximum number of epochs
    "patience": 30,  # epochs without a better selection metric before stopping
    "batch_size": 10,  # volumes per step
    "checkpoint_minutes": 10,  # minutes between mid-epoch checkpoints (0/None: epoch ends only)
    "threads": 2,  # torch CPU threads (CPU only)
    "seed": 42,  # seeds python/numpy/torch, the data order and every step's generators
    "amp": True,  # mixed precision on CUDA (ignored on CPU)
    "num_workers": 2,  # DataLoader worker processes (0: load in the training process)
    "prefetch_factor": 2,  # batches each worker loads ahead
    "log_every": 10,  # steps between progress lines (and host reads of the loss)
    "deterministic": True,  # CUDA: deterministic kernels, exact resume; false: faster
}


LR_SCHEDULES = ("exponential", "cosine")
# Upper bounds, generous: a slip (epochs: 1000000000) stops at the config, not at the
# end of the allocation, and a seed reaches torch whole (it overflows at 2**64).
MAXIMA: dict[str, int] = {
    "epochs": 100_000,
    "patience": 100_000,  # as epochs: patience = epochs trains every epoch
    "batch_size": 4096,  # volumes per step: far past any GPU's memory
    "threads": 1024,
    "num_workers": 256,
    "prefetch_factor": 128,  # batches held per worker
    "log_every": 1_000_000,
    "seed": 2**32 - 1,  # numpy's seed range (seed_everything takes it modulo 2**32)
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (as JSON Schema's ``number``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_train_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``TRAIN_DEFAULTS`` overlaid with ``config`` (other keys kept), values checked."""
    cfg = {**TRAIN_DEFAULTS, **(config or {})}
    problems = []

    def positive_int(key: str, minimum: int = 1) -> None:
        v, maximum = cfg[key], MAXIMA[key]
        if not _is_int(v) or not minimum <= v <= maximum:
            problems.append(f"{key} must be an integer >= {minimum} and <= {maximum}, not {v!r}")

    # patience >= 1: the loop stops once `patience` epochs in a row did not improve, so 0
    # would stop after the first epoch whatever it scored (patience = epochs: no early stop).
    for key in ("epochs", "patience", "batch_size", "threads", "log_every", "prefetch_factor"):
        positive_int(key)
    for key in ("num_workers", "seed"):
        positive_int(key, 0)
    if not _is_number(cfg["lr"]) or not cfg["lr"] > 0:
        problems.append(f"lr must be a positive number, not {cfg['lr']!r}")
    if not _is_number(cfg["lr_decay"]) or not 0 < cfg["lr_decay"] <= 1:
        problems.append(f"lr_decay must be in (0, 1], not {cfg['lr_decay']!r}")
    if cfg["lr_schedule"] not in LR_SCHEDULES:
        problems.append(f"lr_schedule {cfg['lr_schedule']!r} is not one of {list(LR_SCHEDULES)}")
    if not _is_number(cfg["warmup_fraction"]) or not 0 <= cfg["warmup_fraction"] < 1:
        problems.append(f"warmup_fraction must be in [0, 1), not {cfg['warmup_fraction']!r}")
    if not _is_number(cfg["lr_min"]) or cfg["lr_min"] < 0:
        problems.append(f"lr_min must be a number >= 0, not {cfg['lr_min']!r}")
    clip = cfg["grad_clip"]
    if clip is not None and (not _is_number(clip) or clip <= 0):
        problems.append(f"grad_clip must be a positive number or null, not {clip!r}")
    minutes = cfg["checkpoint_minutes"]
    if minutes is not None and (not _is_number(minutes) or minutes < 0):
        problems.append(f"checkpoint_minutes must be a number >= 0 or null, not {minutes!r}")
    for key in ("amp", "deterministic"):
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, not {cfg[key]!r}")
    if problems:
        raise ConfigError("bad training config: " + "; ".join(problems))
    return cfg


# Keys every backbone's stages read, with their defaults. The loop's own keys
# (TRAIN_DEFAULTS) come first.
SHARED_DEFAULTS: dict[str, Any] = {
    **TRAIN_DEFAULTS,
    "downsample": 1,  # average-pool volumes by this factor on load (2: 96x114x96 -> 48x57x48)
    "loss_regression": "l1",  # l1 | mse, on standardized ages
    "label_map": dict(DEFAULT_LABEL_MAP),  # diagnosis -> class index; K = number of classes
}
# Each backbone's own keys and defaults (``preset`` names a preset of its registry entry).
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "medical_transformer": {
        "preset": "table3",  # table3 (d=64, the paper's Table 3 counts) or paper_text
        "margin": 1.0,  # stage 1: triplet margin
        "mask_ratio": 0.1,  # stage 2: fraction of slices masked per plane
        "mask_token": "constant",  # stage 2: constant (encoder output of a blank slice) | learned
    },
    "pumit": {
        "preset": "base",  # base (ViT-B, 1,024 codes: the paper's) or tiny (CPU demo, tests)
        "mask_ratio": 0.55,  # MIM: fraction of tokens masked
        # tokenizer: the official loss.yaml's weights (function2-llx/PUMIT at 67218a2)
        "diversity": 1.0,  # quant_weight: Σ p̄ log p̄ over the mean token distribution
        "sharpness": 0.2,  # entropy_weight: the mean per-token entropy
        "gan_weight": 3e-3,  # the adversarial term's (on while the discriminator wins)
        "lpips_weights": None,  # VGG-16 + LPIPS weights file (null: no perceptual term)
        # MIM: start the ViT from EVA-02 B's ImageNet weights (null: from scratch), and
        # the file's expected sha256 (null: recorded, not checked)
        "eva02_weights": None,
        "eva02_sha256": None,
        "pooling": "cls",  # classification/regression from the class token, or mean of patches
        "weight_decay": 0.05,  # AdamW's (the paper trains with AdamW)
        # (its pre-training stages default to the authors' schedule and clipping:
        # medtx.train.mim.PRETRAINING_DEFAULTS; fine-tuning keeps the study's protocol)
    },
}
assert set(BACKBONE_DEFAULTS) == set(BACKBONES)


def defaults(backbone: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """Every key a stage of ``backbone`` reads, with its default."""
    if backbone not in BACKBONE_DEFAULTS:
        raise ConfigError(f"backbone {backbone!r} is not one of {list(BACKBONES)}")
    return {"backbone": backbone, **SHARED_DEFAULTS, **BACKBONE_DEFAULTS[backbone]}


# The Medical Transformer's keys (the stages' defaults before a backbone is chosen).
DEFAULTS: dict[str, Any] = defaults()
REGRESSION_LOSSES = ("l1", "mse")
MASK_TOKENS = ("constant", "learned")
POOLINGS = ("cls", "mean")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# As preprocess/pool/factor: beyond 4 the 2 mm volumes shrink below 24 voxels a side.
DOWNSAMPLE_MAX = 4


def resolve_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``defaults(backbone)`` overlaid with ``config``; unknown keys and bad values raise
    ConfigError. ``config["backbone"]`` (default: the Medical Transformer) picks the keys."""
    config = dict(config or {})
    name = config.get("backbone", DEFAULT_BACKBONE)
    own = defaults(name)
    unknown = sorted(set(config) - set(own))
    if unknown:
        others = sorted(set().union(*BACKBONE_DEFAULTS.values()) - set(own))
        hint = [k for k in unknown if k in others]
        raise ConfigError(
            f"unknown training config key(s) {unknown} for backbone {name}"
            + (f" ({hint} belong to another backbone)" if hint else "")
            + f"; allowed: {sorted(own)}"
        )
    cfg = resolve_train_config({**own, **config})
    problems = []
    # here, not at the top: the workflow reads TRAIN_DEFAULTS without importing torch
    from medtx.models.registry import backbone

    presets = backbone(name).presets
    if not isinstance(cfg["preset"], str) or cfg["preset"] not in presets:  # a list: unhashable
        problems.append(f"preset {cfg['preset']!r} is not one of {sorted(presets)}")
    ds = cfg["downsample"]
    if not _is_int(ds) or not 1 <= ds <= DOWNSAMPLE_MAX:
        problems.append(f"downsample must be an integer >= 1 and <= {DOWNSAMPLE_MAX}, not {ds!r}")
    if cfg["loss_regression"] not in REGRESSION_LOSSES:
        problems.append(
            f"loss_regression {cfg['loss_regression']!r} is not one of {list(REGRESSION_LOSSES)}"
        )
    # mask_ratio < 1: masking everything would leave no context to predict from
    if not _is_number(cfg["mask_ratio"]) or not 0 < cfg["mask_ratio"] < 1:
        problems.append(f"mask_ratio must be in (0, 1), not {cfg['mask_ratio']!r}")
    if name == "medical_transformer":
        if cfg["mask_token"] not in MASK_TOKENS:
            problems.append(f"mask_token {cfg['mask_token']!r} is not one of {list(MASK_TOKENS)}")
        if not _is_number(cfg["margin"]) or cfg["margin"] <= 0:
            problems.append(f"margin must be a positive number, not {cfg['margin']!r}")
    else:
        for key in ("diversity", "sharpness", "gan_weight", "weight_decay"):
            if not _is_number(cfg[key]) or cfg[key] < 0:
                problems.append(f"{key} must be a number >= 0, not {cfg[key]!r}")
        lp = cfg["lpips_weights"]
        if lp is not None and (not isinstance(lp, str) or not lp):
            problems.append(f"lpips_weights must be a file path or null, not {lp!r}")
        ew = cfg["eva02_weights"]
        if ew is not None and (not isinstance(ew, str) or not ew):
            problems.append(f"eva02_weights must be a file path or null, not {ew!r}")
        es = cfg["eva02_sha256"]
        if es is not None and (not isinstance(es, str) or not SHA256_HEX.fullmatch(es)):
            problems.append(f"eva02_sha256 must be 64 hex digits or null, not {es!r}")
        if cfg["pooling"] not in POOLINGS:
            problems.append(f"pooling {cfg['pooling']!r} is not one of {list(POOLINGS)}")
    lm = cfg["label_map"]
    if not isinstance(lm, Mapping) or not lm:
        problems.append(f"label_map must be a non-empty mapping, not {lm!r}")
    elif sorted(set(lm.values())) != list(range(len(set(lm.values())))):
        problems.append(
            f"label_map values must be the class indices 0..K-1, not {sorted(set(lm.values()))}"
        )
    if problems:
        raise ConfigError("bad training config: " + "; ".join(problems))
    cfg["label_map"] = {str(k): int(v) for k, v in lm.items()}
    return cfg


# The workflow's config blocks per backbone: train/<stage> for the Medical
# Transformer, train/pumit/<stage> for PUMIT; train/finetune is both backbones'.
STAGE_BLOCKS: dict[str, tuple[str, ...]] = {
    "medical_transformer": ("pretrain", "finetune"),
    "pumit": ("tokenizer", "mim", "finetune"),
}


def stage_keys(
    backbone: str,
    stage: str,
    train: Mapping[str, Any],
    *,
    seed: int,
    label_map: Mapping[str, int],
) -> dict[str, Any]:
    """The config the workflow hands one stage of ``backbone`` (no torch needed).

    The Medical Transformer takes train/common, then train/<stage>. PUMIT takes the
    shared keys of train/common (and of train/finetune when fine-tuning: one
    protocol for both backbones), then train/pumit/common and train/pumit/<stage>;
    the Medical Transformer's own keys there (its preset, mask ratio, ...) are its
    alone. A key that does not apply to the backbone is a ConfigError naming the block.
    """
    if stage not in STAGE_BLOCKS.get(backbone, ()):
        raise ConfigError(f"backbone {backbone!r} has no training stage {stage!r}")
    allowed = defaults(backbone)
    if backbone == DEFAULT_BACKBONE:
        blocks = [("train/common", train.get("common")), (f"train/{stage}", train.get(stage))]
    else:
        theirs = set(BACKBONE_DEFAULTS[DEFAULT_BACKBONE]) - set(BACKBONE_DEFAULTS[backbone])
        theirs |= {"preset", "mask_ratio"}  # same names, the Medical Transformer's values
        shared = ["common"] + (["finetune"] if stage == "finetune" else [])
        blocks = [
            (f"train/{b}", {k: v for k, v in (train.get(b) or {}).items() if k not in theirs})
            for b in shared
        ]
        own = train.get(backbone) or {}
        blocks += [(f"train/{backbone}/{b}", own.get(b)) for b in ("common", stage)]
    out: dict[str, Any] = {"backbone": backbone, "seed": seed}
    for where, block in blocks:
        block = dict(block or {})
        wrong = sorted(set(block) - set(allowed))
        if wrong:
            raise ConfigError(
                f"{where}: key(s) {wrong} do not apply to backbone {backbone}"
                + ("; PUMIT's keys go under train/pumit" if backbone == DEFAULT_BACKBONE else "")
            )
        out.update(block)
    out["label_map"] = dict(label_map)
    return out


def n_classes(cfg: Mapping[str, Any]) -> int:
    return len(set(cfg["label_map"].values()))
