"""Pre-training, the paper's two self-supervised stages.

1. ``pretrain_exemplar``: the three plane encoders learn, without labels, that a
   volume and its Bézier intensity remap are one brain (triplet loss). Selection by
   the epoch's mean training loss.
2. ``pretrain_masked``: with those encoders frozen, the transformer learns to predict
   masked slice encodings. Selection by training loss.

Each builds its ``Stage``; ``medtx.train.pretraining`` runs it, as it runs PUMIT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from medtx.errors import MedtxError
from medtx.models.pretext import MaskToken, exemplar_loss, masked_encoding_loss
from medtx.models.registry import build
from medtx.models.slice_transformer import MedicalTransformer
from medtx.train.checkpoints import load_pretrained, model_kwargs
from medtx.train.config import n_classes, resolve_config
from medtx.train.loop import TrainResult, seed_everything
from medtx.train.pretraining import PretrainRun, Stage, StageEntry, pretrain, pretrain_volumes

if TYPE_CHECKING:
    from typing_extensions import Unpack


def pretrain_exemplar(
    items: Sequence[Mapping[str, Any]], *, out: str | Path, **run: Unpack[PretrainRun]
) -> TrainResult:
    """Stage 1: train the three plane encoders with the exemplar (triplet) loss.

    The whole classification model of the preset is built so the checkpoint loads into
    any later stage, but only the encoders are optimized and marked trained. Batches
    need ≥ 2 volumes (the negative is another volume of the batch); an epoch's last
    single volume is skipped. Volumes must lie in [0, 1]. Selection: lowest mean
    training loss (no labels). ``run``: as ``medtx.train.pretraining.PretrainRun``.
    """
    return pretrain(exemplar_stage, items, out=out, **run)


def exemplar_stage(
    items: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None, init: None = None
) -> Stage:
    """Stage 1's pieces: encoders that learn, the rest of the model frozen."""
    cfg = resolve_config(config)
    data = pretrain_volumes(items, cfg)
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

    return Stage(
        "pretrain_exemplar",
        model,
        loss_fn,
        ["encoders"],
        kwargs,
        data,
        cfg,
        params=model.encoders.parameters(),
        min_batch=2,
    )


def pretrain_masked(
    items: Sequence[Mapping[str, Any]],
    *,
    init: str | Path,
    out: str | Path,
    **run: Unpack[PretrainRun],
) -> TrainResult:
    """Stage 2: frozen stage-1 encoders; train the transformer on masked slice encodings.

    ``mask_token: learned`` adds a trained mask vector per plane (saved as
    ``mask_token.tokens``); ``constant`` uses the encoder output of a blank slice.
    Selection: lowest mean training loss. The checkpoint holds encoders + transformer.
    ``run``: as ``medtx.train.pretraining.PretrainRun``.
    """
    return pretrain(masked_stage, items, out=out, init=init, **run)


def masked_stage(
    items: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None, init: str | Path
) -> Stage:
    """Stage 2's pieces: the exemplar stage's encoders loaded and frozen, the
    transformer (and a learned mask token) trained."""
    cfg = resolve_config(config)
    data = pretrain_volumes(items, cfg)
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

    return Stage(
        "pretrain_masked",
        model,
        loss_fn,
        ["encoders", "transformer"],
        kwargs,
        data,
        cfg,
        metadata={"init": info},
        run={"init_sha256": info["init_sha256"]},
    )


#: ``medtx pretrain`` stages of the Medical Transformer (``medtx.domain.PRETRAIN_STAGES``)
STAGES = {
    "exemplar": StageEntry(exemplar_stage),
    "masked": StageEntry(masked_stage, init_from="exemplar"),
}
