"""The training stages' config: every key a stage reads, its default, its check.

``resolve_config`` is the one place the code checks these values; the config
schema (``workflow/schemas/config.schema.yaml``, ``$defs/training``) states the
same defaults and bounds for the workflow, and a test holds the two together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medtx.domain import DEFAULT_LABEL_MAP
from medtx.errors import ConfigError

# The loop's own config keys and their defaults (the stages add theirs: DEFAULTS below).
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,  # Adam learning rate
    "lr_decay": 0.99,  # ExponentialLR gamma, applied once per epoch
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
        v = cfg[key]
        if not _is_int(v) or v < minimum:
            problems.append(f"{key} must be an integer >= {minimum}, not {v!r}")

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
    minutes = cfg["checkpoint_minutes"]
    if minutes is not None and (not _is_number(minutes) or minutes < 0):
        problems.append(f"checkpoint_minutes must be a number >= 0 or null, not {minutes!r}")
    for key in ("amp", "deterministic"):
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, not {cfg[key]!r}")
    if problems:
        raise ConfigError("bad training config: " + "; ".join(problems))
    return cfg


# Every config key a stage reads, with its default. The loop's own keys
# (TRAIN_DEFAULTS) come first.
DEFAULTS: dict[str, Any] = {
    "preset": "table3",  # model preset (medtx.models.PRESETS): table3 (d=64) or paper_text
    **TRAIN_DEFAULTS,  # lr 1e-4, lr_decay 0.99, epochs 150, patience 30, batch_size 10,
    # checkpoint_minutes 10, threads 2, seed 42, amp True, num_workers 2,
    # prefetch_factor 2, log_every 10, deterministic True
    "downsample": 1,  # average-pool volumes by this factor on load (2: 96x114x96 -> 48x57x48)
    "loss_regression": "l1",  # l1 | mse, on standardized ages
    "label_map": dict(DEFAULT_LABEL_MAP),  # diagnosis -> class index; K = number of classes
    "margin": 1.0,  # stage 1: triplet margin
    "mask_ratio": 0.1,  # stage 2: fraction of slices masked per plane
    "mask_token": "constant",  # stage 2: constant (encoder output of a blank slice) | learned
}
REGRESSION_LOSSES = ("l1", "mse")
MASK_TOKENS = ("constant", "learned")
# As preprocess/pool/factor: beyond 4 the 2 mm volumes shrink below 24 voxels a side.
DOWNSAMPLE_MAX = 4


def resolve_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` overlaid with ``config``; unknown keys and bad values raise ConfigError."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown training config key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    cfg = resolve_train_config({**DEFAULTS, **config})
    problems = []
    # here, not at the top: the workflow reads TRAIN_DEFAULTS without importing torch
    from medtx.models.registry import DEFAULT_BACKBONE, backbone

    presets = backbone(DEFAULT_BACKBONE).presets
    if not isinstance(cfg["preset"], str) or cfg["preset"] not in presets:  # a list: unhashable
        problems.append(f"preset {cfg['preset']!r} is not one of {sorted(presets)}")
    ds = cfg["downsample"]
    if not _is_int(ds) or not 1 <= ds <= DOWNSAMPLE_MAX:
        problems.append(f"downsample must be an integer >= 1 and <= {DOWNSAMPLE_MAX}, not {ds!r}")
    if cfg["loss_regression"] not in REGRESSION_LOSSES:
        problems.append(
            f"loss_regression {cfg['loss_regression']!r} is not one of {list(REGRESSION_LOSSES)}"
        )
    if cfg["mask_token"] not in MASK_TOKENS:
        problems.append(f"mask_token {cfg['mask_token']!r} is not one of {list(MASK_TOKENS)}")
    if not _is_number(cfg["margin"]) or cfg["margin"] <= 0:
        problems.append(f"margin must be a positive number, not {cfg['margin']!r}")
    # mask_ratio < 1: masking every slice would leave no context to predict from
    if not _is_number(cfg["mask_ratio"]) or not 0 < cfg["mask_ratio"] < 1:
        problems.append(f"mask_ratio must be in (0, 1), not {cfg['mask_ratio']!r}")
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


def n_classes(cfg: Mapping[str, Any]) -> int:
    return len(set(cfg["label_map"].values()))
