"""PUMIT's pre-training: the soft-token tokenizer, then masked image modelling (MIM).

1. ``pretrain_tokenizer``: the official ``SimpleVQTokenizer`` learns to reconstruct
   the pre-training volumes through soft tokens, with the official VQGAN loss
   (``medtx.models.pumit.tokenizer``): L1 + ``diversity`` (1) x Σ p̄ log p̄ +
   ``sharpness`` (0.2) x mean token entropy + LPIPS (with ``lpips_weights``) +
   ``gan_weight`` (3e-3) x the patch-GAN generator term, switched on while the
   discriminator's loss is low; the discriminator trains alongside at 10x the rate.
   Selection by the epoch's mean reconstruction objective. The checkpoint holds
   the tokenizer alone and records how often each code is the most likely one over
   the pre-training volumes (``codebook_usage``), for summary.md's histogram.
2. ``pretrain_mim``: with that tokenizer frozen, the ViT sees ``mask_ratio`` (0.55)
   of its patches replaced by its mask token and predicts the tokenizer's soft
   distribution there (soft cross-entropy). The checkpoint holds the whole
   fine-tuning model (its head untrained) with the MIM head and the tokenizer, so
   fine-tuning loads its ``vit`` like the Medical Transformer's encoders.

The study's volumes are isotropic template-space crops: every input has
``Grid(0)``. The perceptual term needs ImageNet VGG-16 and LPIPS weights, which
cannot be downloaded at run time: without the ``lpips_weights`` file it is left
out, and the checkpoint's ``left_out`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from medtx.errors import MedtxError
from medtx.io import atomic_path, sha256
from medtx.models.pumit.eva02 import eva02_to_vit, load_eva02
from medtx.models.pumit.lpips import LPIPS, load_lpips
from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.model import PRESETS, PumitModel, pad_to_multiple
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.tokenizer import AdversarialTokenizer, GanSettings, Tokenizer
from medtx.models.pumit.vit import PATCH, random_token_mask
from medtx.models.registry import build
from medtx.train.checkpoints import (
    load_state,
    model_kwargs,
)
from medtx.train.config import n_classes, resolve_config
from medtx.train.data import VolumeSet, collate
from medtx.train.loop import TrainResult, pick_device, seed_everything
from medtx.train.pretraining import PretrainRun, Stage, StageEntry, pretrain, pretrain_volumes

if TYPE_CHECKING:
    from typing_extensions import Unpack

ISOTROPIC = Grid(0)
# The authors' pre-training recipe, under what a config sets: warm-up then cosine per
# step (conf/model/model.yaml, conf/tokenizer/simple/main.yaml), the gradient norm
# clipped to 0.5 in MIM (conf/model/main.yaml) and not at all in the tokenizer's
# script. Fine-tuning keeps the study's protocol, one for both backbones.
PRETRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "tokenizer": {"lr_schedule": "cosine", "warmup_fraction": 0.05, "grad_clip": None},
    "mim": {"lr_schedule": "cosine", "warmup_fraction": 0.05, "grad_clip": 0.5},
}
# the official discriminator's AdamW rate over the tokenizer's: 1e-3 / 1e-4 (main.yaml)
DISC_LR_SCALE = 10.0


def _padded(x: Tensor) -> Tensor:
    """The volume zero-padded to whole patches, as ``PumitModel`` pads it."""
    return pad_to_multiple(x, ISOTROPIC, PATCH)


def _pumit_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return resolve_config({**(config or {}), "backbone": "pumit"})


def build_tokenizer(preset: str, in_channels: int = 1) -> Tokenizer:
    return Tokenizer(PRESETS[preset].tokenizer, in_channels=in_channels)


def pretrain_tokenizer(
    items: Sequence[Mapping[str, Any]], *, out: str | Path, **run: Unpack[PretrainRun]
) -> TrainResult:
    """Stage 1: train the tokenizer against its discriminator; the checkpoint keeps
    the tokenizer alone and records its codebook usage.

    The model trained is an ``AdversarialTokenizer`` (tokenizer, discriminator, and
    the GAN switch's EMA as buffers, so a resumed run continues it). One loss gives
    both the official generator and discriminator gradients of the batch in one
    backward (``AdversarialTokenizer.losses``); the discriminator's parameter group
    runs at ``DISC_LR_SCALE`` x lr. The loss's value is the official ``vq_loss``
    (L1, priors and perceptual term): the adversarial term and the discriminator's
    loss add their gradients with a value of 0 (``x - x.detach()``), so the epoch's
    mean loss, which selects the kept state, measures the tokenizer's
    reconstruction, not how the two players stand. The schedule and clipping default
    to the authors' (``PRETRAINING_DEFAULTS``). ``run``: as
    ``medtx.train.pretraining.PretrainRun``."""
    return pretrain(tokenizer_stage, items, out=out, **run)


def tokenizer_stage(
    items: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None, init: None = None
) -> Stage:
    """Stage 1's pieces: the adversarial tokenizer, its loss and parameter groups,
    and the rewrite of its finished checkpoint (``keep_tokenizer``)."""
    cfg = _pumit_config({**PRETRAINING_DEFAULTS["tokenizer"], **(config or {})})
    data = pretrain_volumes(items, cfg)
    if not len(data):
        raise MedtxError("tokenizer pre-training has no volumes")
    lpips: LPIPS | None = None
    lpips_info: dict[str, Any] | None = None
    if cfg["lpips_weights"] is not None:
        lpips, digest = load_lpips(cfg["lpips_weights"])
        lpips_info = {"path": str(cfg["lpips_weights"]), "sha256": digest}
    seed_everything(cfg["seed"])
    gan = GanSettings(weight=float(cfg["gan_weight"]))
    model = AdversarialTokenizer.build(PRESETS[cfg["preset"]].tokenizer, 1, gan)
    lam1, lam2 = float(cfg["diversity"]), float(cfg["sharpness"])

    def loss_fn(m: AdversarialTokenizer, batch: dict[str, Tensor], ctx) -> Tensor:
        x = _padded(batch["image"])
        if lpips is not None and lpips.mean.device != x.device:
            lpips.to(x.device)
        _, _, parts = m.losses(
            x,
            ISOTROPIC,
            diversity=lam1,
            sharpness=lam2,
            all_sum=ctx.all_sum,
            share=(len(ctx.indices), ctx.volumes),
            lpips=lpips,
            generators=ctx.generators() if lpips is not None else None,
        )
        adversarial = parts["gan_term"] + parts["disc"]
        return parts["vq"] + (adversarial - adversarial.detach())

    losses: dict[str, float] = {"l1": 1.0, "diversity": lam1, "sharpness": lam2}
    if lpips is not None:
        losses["perceptual"] = 1.0
    losses["gan"] = gan.weight
    groups: list[dict[str, Any]] = [
        {"params": list(model.tokenizer.parameters())},
        {"params": list(model.discriminator.parameters()), "lr_scale": DISC_LR_SCALE},
    ]

    def finish(result: TrainResult, out: str | Path, device: str | torch.device | None) -> None:
        usage = keep_tokenizer(out, model.tokenizer, data, cfg["batch_size"], device)
        result.extra["codebook_usage"] = usage

    return Stage(
        "pretrain_tokenizer",
        model,
        loss_fn,
        ["tokenizer"],
        {"backbone": "pumit", "preset": cfg["preset"], "in_channels": 1},
        data,
        cfg,
        params=groups,
        metadata={
            "losses": losses,
            "gan": _gan_metadata(gan),
            "lpips_weights": lpips_info,
            "left_out": [] if lpips is not None else ["perceptual (LPIPS: no lpips_weights file)"],
        },
        finish=finish,
    )


def _gan_metadata(gan: GanSettings) -> dict[str, Any]:
    """How the adversarial term was switched and trained, for the checkpoint."""
    return {
        "threshold": gan.threshold,
        "momentum": gan.momentum,
        "ema_init": gan.ema_init,
        "disc_lr_scale": DISC_LR_SCALE,
        "loss": "hinge",
        "discriminator": "trained alongside, not kept in the checkpoint",
    }


def keep_tokenizer(
    out: str | Path,
    tokenizer: Tokenizer,
    data: VolumeSet,
    batch_size: int,
    device: str | torch.device | None,
) -> list[int]:
    """Rewrite the finished checkpoint with the tokenizer alone (the GAN switch's
    state in its metadata) and its codebook usage over ``data``; returns the usage."""
    saved = load_state(out)
    saved["model"], saved["metadata"]["gan_state"] = tokenizer_state(saved["model"])
    tokenizer.load_state_dict(saved["model"])
    usage = codebook_usage(tokenizer, data, batch_size=batch_size, device=device)
    saved["metadata"]["codebook_usage"] = usage
    with atomic_path(out) as tmp:
        torch.save(saved, tmp)
    return usage


def tokenizer_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An ``AdversarialTokenizer`` state -> the tokenizer's alone (what
    ``load_tokenizer`` loads; the discriminator is dropped) and the GAN switch's
    final state (for the metadata)."""
    prefix = "tokenizer."
    tokenizer = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    gan = {
        "disc_loss_ema": float(state["disc_loss_ema"]),
        "disc_loss_last": float(state["disc_loss_last"]),
        "gan_on": bool(state["gan_on"]),
    }
    return tokenizer, gan


@torch.no_grad()
def codebook_usage(
    tokenizer: Tokenizer,
    data: VolumeSet,
    *,
    batch_size: int,
    device: str | torch.device | None = None,
) -> list[int]:
    """How many token positions of ``data`` pick each code (argmax of its distribution)."""
    dev = pick_device(device)
    tokenizer = tokenizer.to(dev).eval()
    counts = torch.zeros(tokenizer.quantizer.codebook.num_embeddings, dtype=torch.long)
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        x = data.prepare({k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()})
        soft, _ = tokenizer.encode(_padded(x["image"]), ISOTROPIC)
        codes = soft.probs.argmax(dim=-1).flatten().cpu()
        counts += torch.bincount(codes, minlength=len(counts))
    return [int(c) for c in counts]


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The frozen tokenizer of a ``pretrain_tokenizer`` checkpoint, and its metadata."""
    ckpt = load_state(path)
    meta = ckpt.get("metadata") or {}
    if meta.get("stage") != "pretrain_tokenizer":
        raise MedtxError(
            f"{path}: not a tokenizer checkpoint (stage {meta.get('stage')!r}); "
            "MIM pre-training needs --init from `medtx pretrain tokenizer`"
        )
    tokenizer = build_tokenizer(meta["preset"])
    try:
        tokenizer.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise MedtxError(
            f"{path}: its tokenizer does not fit this version's {meta['preset']!r} "
            "tokenizer (an older architecture?); pre-train the tokenizer again"
        ) from err
    return tokenizer.requires_grad_(False).eval(), meta


def _start_from_eva02(
    model: PumitModel, eva02_file: tuple[dict[str, Tensor], str], path: str | Path
) -> dict[str, Any]:
    """Load the converted EVA-02 weights into the ViT; their path and sha256."""
    state, digest = eva02_file
    try:
        model.vit.load_state_dict(eva02_to_vit(state, model.vit), strict=True)
    except MedtxError as err:
        raise MedtxError(f"pumit eva02_weights {path}: {err}") from err
    return {"path": str(path), "sha256": digest}


def pretrain_mim(
    items: Sequence[Mapping[str, Any]],
    *,
    init: str | Path,
    out: str | Path,
    **run: Unpack[PretrainRun],
) -> TrainResult:
    """Stage 2: the ViT predicts the frozen tokenizer's distributions at masked patches.

    With ``eva02_weights`` the ViT starts from that EVA-02 checkpoint, converted as
    the authors' ``ViT._load_from_state_dict`` (``medtx.models.pumit.eva02``); a
    missing, unreadable, wrong-hash (``eva02_sha256``) or non-EVA-02 file stops the
    stage before training. Its path and sha256 go to the checkpoint's metadata
    (``eva02``) and to the run's config, so another file does not resume this run.
    ``run``: as ``medtx.train.pretraining.PretrainRun``."""
    return pretrain(mim_stage, items, out=out, init=init, **run)


def mim_stage(
    items: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None, init: str | Path
) -> Stage:
    """Stage 2's pieces: the tokenizer stage's tokenizer frozen, the ViT (from
    EVA-02 when given) and the MIM head trained."""
    cfg = _pumit_config({**PRETRAINING_DEFAULTS["mim"], **(config or {})})
    eva02_file: tuple[dict[str, Tensor], str] | None = None
    if cfg["eva02_weights"] is not None:
        eva02_file = load_eva02(cfg["eva02_weights"], cfg["eva02_sha256"])
    data = pretrain_volumes(items, cfg)
    if not len(data):
        raise MedtxError("MIM pre-training has no volumes")
    tokenizer, token_meta = load_tokenizer(init)
    if token_meta["preset"] != cfg["preset"]:
        raise MedtxError(
            f"{init}: tokenizer of preset {token_meta['preset']!r}, not {cfg['preset']!r}"
        )
    seed_everything(cfg["seed"])
    kwargs = model_kwargs(cfg, "classification", n_classes(cfg), 1)
    model = cast(PumitModel, build(kwargs))
    eva02: dict[str, Any] | None = None
    if eva02_file is not None:
        eva02 = _start_from_eva02(model, eva02_file, cfg["eva02_weights"])
        del eva02_file  # the source tensors go once converted
    model.requires_grad_(False)
    model.vit.requires_grad_(True)
    # saved with the model: fine-tuning takes only its vit (registry: pretrained parts)
    head = model.mim_head = MimHead(model.vit.size.dim, tokenizer.quantizer.codebook.num_embeddings)
    model.tokenizer = tokenizer
    ratio = float(cfg["mask_ratio"])

    def loss_fn(m: PumitModel, batch: dict[str, Tensor], ctx) -> Tensor:
        x = _padded(batch["image"])
        with torch.no_grad():
            soft, _ = tokenizer.encode(x, ISOTROPIC)
        target = soft.probs.flatten(1, 3).float()  # (B, N, K), the ViT's token order
        # each volume's mask from its own generator: the same in any number of processes
        mask = torch.cat(
            [random_token_mask(1, target.shape[1], ratio, generator=g) for g in ctx.generators()]
        ).to(x.device)
        out, _ = m.vit(x, ISOTROPIC, mask=mask)
        return soft_cross_entropy(head(out[:, 1:]), target, mask)

    info = {
        "init": str(init),
        "init_sha256": sha256(init),
        "init_stage": "pretrain_tokenizer",
        "loaded": ["tokenizer"],
    }
    return Stage(
        "pretrain_mim",
        model,
        loss_fn,
        ["vit", "mim_head"],
        kwargs,
        data,
        cfg,
        metadata={"init": info, "mask_ratio": ratio, "eva02": eva02},
        run={"init_sha256": info["init_sha256"], "eva02": eva02},
    )


#: ``medtx pretrain`` stages of PUMIT (``medtx.domain.PRETRAIN_STAGES``)
STAGES = {
    "tokenizer": StageEntry(tokenizer_stage),
    "mim": StageEntry(mim_stage, init_from="tokenizer"),
}
