"""Pre-training, the paper's two self-supervised stages.

1. ``pretrain_exemplar``: the three plane encoders learn, without labels, that a
   volume and its Bézier intensity remap are one brain (triplet loss). Selection by
   the epoch's mean training loss.
2. ``pretrain_masked``: with those encoders frozen, the transformer learns to predict
   masked slice encodings. Selection by training loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from medtx.errors import MedtxError
from medtx.models.pretext import MaskToken, exemplar_loss, masked_encoding_loss
from medtx.models.registry import build
from medtx.models.slice_transformer import MedicalTransformer
from medtx.train.checkpoints import (
    load_pretrained,
    model_kwargs,
    run_config,
    scans_of,
    stage_metadata,
)
from medtx.train.config import n_classes, resolve_config
from medtx.train.data import VolumeSet, collate, items_from_indexes
from medtx.train.loop import TrainResult, seed_everything, train


def pretrain_exemplar(
    items: Sequence[Mapping[str, Any]],
    *,
    out: str | Path,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    max_steps_this_run: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Stage 1: train the three plane encoders with the exemplar (triplet) loss.

    The whole classification model of the preset is built so the checkpoint loads into
    any later stage, but only the encoders are optimized and marked trained. Batches
    need ≥ 2 volumes (the negative is another volume of the batch); an epoch's last
    single volume is skipped. Volumes must lie in [0, 1]. Selection: lowest mean
    training loss (no labels).
    """
    cfg = resolve_config(config)
    data = VolumeSet(items, task="pretrain", downsample=cfg["downsample"], stored=True)
    if len(data) < 2:
        raise MedtxError(f"exemplar pre-training needs at least 2 volumes, got {len(data)}")
    seed_everything(cfg["seed"])
    kwargs = model_kwargs(cfg, "classification", n_classes(cfg), 1)
    model = cast(MedicalTransformer, build(kwargs))
    model.requires_grad_(False)
    model.encoders.requires_grad_(True)

    def loss_fn(m: MedicalTransformer, batch: dict[str, Tensor], ctx) -> Tensor:
        return exemplar_loss(
            m,
            batch["image"],
            ctx.rngs(),
            margin=float(cfg["margin"]),
            gather=ctx.gather_rows,
            positions=ctx.group.positions(ctx.volumes),
        )

    meta = stage_metadata(
        "pretrain_exemplar", "pretrain", cfg, kwargs, ["encoders"], items, metadata
    )
    return train(
        model,
        data,
        loss_fn=loss_fn,
        out=out,
        config=run_config(cfg, items, stage="pretrain_exemplar", train_scans=scans_of(items)),
        params=model.encoders.parameters(),
        collate=collate,
        prepare=data.prepare,
        metadata=meta,
        device=device,
        max_steps_this_run=max_steps_this_run,
        min_batch=2,
        log=log,
    )


def pretrain_masked(
    items: Sequence[Mapping[str, Any]],
    *,
    init: str | Path,
    out: str | Path,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    max_steps_this_run: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Stage 2: frozen stage-1 encoders; train the transformer on masked slice encodings.

    ``mask_token: learned`` adds a trained mask vector per plane (saved as
    ``mask_token.tokens``); ``constant`` uses the encoder output of a blank slice.
    Selection: lowest mean training loss. The checkpoint holds encoders + transformer.
    """
    cfg = resolve_config(config)
    data = VolumeSet(items, task="pretrain", downsample=cfg["downsample"], stored=True)
    seed_everything(cfg["seed"])
    kwargs = model_kwargs(cfg, "classification", n_classes(cfg), 1)
    model = cast(MedicalTransformer, build(kwargs))
    info = load_pretrained(model, init, parts=("encoders",))
    model.requires_grad_(False)
    assert model.transformer is not None  # built with use_transformer=True
    model.transformer.requires_grad_(True)
    mask_token = None
    if cfg["mask_token"] == "learned":
        mask_token = model.mask_token = MaskToken(d_model=model.d_model)

    def loss_fn(m: MedicalTransformer, batch: dict[str, Tensor], ctx) -> Tensor:
        return masked_encoding_loss(
            m,
            batch["image"],
            ratio=float(cfg["mask_ratio"]),
            generators=ctx.generators(),
            mask_token=mask_token,
        )

    meta = stage_metadata(
        "pretrain_masked",
        "pretrain",
        cfg,
        kwargs,
        ["encoders", "transformer"],
        items,
        metadata,
        init=info,
    )
    return train(
        model,
        data,
        loss_fn=loss_fn,
        out=out,
        config=run_config(
            cfg,
            items,
            stage="pretrain_masked",
            train_scans=scans_of(items),
            init_sha256=info["init_sha256"],
        ),
        params=[p for p in model.parameters() if p.requires_grad],
        collate=collate,
        prepare=data.prepare,
        metadata=meta,
        device=device,
        max_steps_this_run=max_steps_this_run,
        log=log,
    )


def pretrain_stage(
    stage: str,
    indexes: Sequence[str | Path],
    *,
    out: str | Path,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
    init: str | Path | None = None,
) -> TrainResult:
    """``medtx pretrain {exemplar,masked}``: one stage on the scans the indexes list."""
    items = items_from_indexes(indexes)
    if stage == "exemplar":
        return pretrain_exemplar(items, out=out, config=config, metadata=metadata)
    if stage == "masked":
        if init is None:
            raise MedtxError("masked pre-training needs --init, the exemplar stage's checkpoint")
        return pretrain_masked(items, init=init, out=out, config=config, metadata=metadata)
    raise MedtxError(f"pre-training stage {stage!r} is not exemplar or masked")
