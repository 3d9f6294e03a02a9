"""The study's training stages on top of ``medtx.training.train`` (DESIGN.md §6).

1. ``pretrain_exemplar``: the three plane encoders learn, without labels, that a
   volume and its Bézier intensity remap are one brain (triplet loss). Selection by
   the epoch's mean training loss.
2. ``pretrain_masked``: with those encoders frozen, the transformer learns to predict
   masked slice encodings. Selection by training loss.
3. ``finetune``: a task model (diagnosis, brain age, tumour segmentation) starts from
   the pre-trained encoders (+ transformer), or from scratch, and is selected by its
   validation metric (mAUC max / MAE min / mean Dice max); the best state then
   predicts the test set: a per-scan TSV and a JSON of the test metrics.

Data come from the float16 ``.npy`` cache of ``medtx.volumes`` through ``VolumeSet``;
``manifest_items`` picks a rotation's train/val/test rows of a fold manifest.

Losses (finetune): cross-entropy; L1 (default, ``loss_regression: l1``: the paper
reports MAE, and L1 optimizes it directly) or MSE on standardized ages (the training
set's mean/std, stored in the checkpoint, so the head starts near the right scale);
BCE-with-logits + soft Dice over the WT/TC/ET region channels.

Every stage takes a ``config`` dict whose keys are those of ``DEFAULTS`` (an unknown
key is an error, naming the allowed ones).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from medtx.codehash import code_hash
from medtx.errors import BadScanError, CohortError, ConfigError, MedtxError
from medtx.folds import DEFAULT_LABEL_MAP, ROLES
from medtx.io import sha256, write_json, write_text
from medtx.metrics import BRATS_REGIONS, mae, mauc
from medtx.models.pretext import MaskToken, exemplar_loss, masked_encoding_loss
from medtx.models.slice_transformer import (
    PRESETS,
    MedicalTransformer,
    build_model,
    inflate_state_dict,
)
from medtx.training import (
    MODEL_FORMAT,
    TRAIN_DEFAULTS,
    TrainResult,
    load_state,
    pick_device,
    resolve_train_config,
    seed_everything,
    train,
)
from medtx.volumes import load_cached

FINETUNE_TASKS = ("classification", "regression", "segmentation")
DATA_TASKS = FINETUNE_TASKS + ("pretrain",)
REGION_NAMES = tuple(BRATS_REGIONS)  # WT, TC, ET: the segmentation head's channels

# Every config key a stage reads, with its default. The loop's own keys
# (medtx.training.TRAIN_DEFAULTS) come first.
DEFAULTS: dict[str, Any] = {
    "preset": "table3",  # model preset (medtx.models.PRESETS): table3 (d=64) or paper_text
    **TRAIN_DEFAULTS,  # lr 1e-4, lr_decay 0.99, epochs 150, patience 30, batch_size 10,
    # checkpoint_minutes 10, threads 2, seed 42, amp True, num_workers 0, log_every 10
    "downsample": 1,  # average-pool volumes by this factor on load (2: 96x114x96 -> 48x57x48)
    "loss_regression": "l1",  # l1 | mse, on standardized ages
    "label_map": dict(DEFAULT_LABEL_MAP),  # diagnosis -> class index; K = number of classes
    "margin": 1.0,  # stage 1: triplet margin
    "mask_ratio": 0.1,  # stage 2: fraction of slices masked per plane
    "mask_token": "constant",  # stage 2: constant (encoder output of a blank slice) | learned
}
REGRESSION_LOSSES = ("l1", "mse")
MASK_TOKENS = ("constant", "learned")


def resolve_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` overlaid with ``config``; unknown keys and bad values raise ConfigError."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown training config key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    cfg = resolve_train_config({**DEFAULTS, **config})
    problems = []
    if cfg["preset"] not in PRESETS:
        problems.append(f"preset {cfg['preset']!r} is not one of {sorted(PRESETS)}")
    ds = cfg["downsample"]
    if not isinstance(ds, int) or isinstance(ds, bool) or ds < 1:
        problems.append(f"downsample must be an integer >= 1, not {ds!r}")
    if cfg["loss_regression"] not in REGRESSION_LOSSES:
        problems.append(f"loss_regression {cfg['loss_regression']!r} is not one of "
                        f"{list(REGRESSION_LOSSES)}")
    if cfg["mask_token"] not in MASK_TOKENS:
        problems.append(f"mask_token {cfg['mask_token']!r} is not one of {list(MASK_TOKENS)}")
    if not isinstance(cfg["margin"], (int, float)) or cfg["margin"] <= 0:
        problems.append(f"margin must be a positive number, not {cfg['margin']!r}")
    if not isinstance(cfg["mask_ratio"], (int, float)) or not 0 < cfg["mask_ratio"] < 1:
        problems.append(f"mask_ratio must be in (0, 1), not {cfg['mask_ratio']!r}")
    lm = cfg["label_map"]
    if not isinstance(lm, Mapping) or not lm:
        problems.append(f"label_map must be a non-empty mapping, not {lm!r}")
    elif sorted(set(lm.values())) != list(range(len(set(lm.values())))):
        problems.append(f"label_map values must be the class indices 0..K-1, not "
                        f"{sorted(set(lm.values()))}")
    if problems:
        raise ConfigError("bad training config: " + "; ".join(problems))
    cfg["label_map"] = {str(k): int(v) for k, v in lm.items()}
    return cfg


def n_classes(cfg: Mapping[str, Any]) -> int:
    return len(set(cfg["label_map"].values()))


# ---------------------------------------------------------------------------- data


def downsample_volume(volume: Tensor, factor: int) -> Tensor:
    """Average-pool (C, X, Y, Z) by ``factor`` in each axis (sizes floor-divided)."""
    if factor == 1:
        return volume
    return F.avg_pool3d(volume[None], factor)[0]


def downsample_regions(regions: Tensor, factor: int) -> Tensor:
    """Max-pool binary region masks (3, X, Y, Z): a region touching a block keeps it.

    Max rather than nearest so a small enhancing tumour does not vanish (which would
    turn its Dice into the empty-vs-empty 1.0); WT ⊇ TC ⊇ ET nesting is kept.
    """
    if factor == 1:
        return regions
    return F.max_pool3d(regions[None], factor)[0]


def read_cached(path: str | Path, *, scan: str | None = None, what: str = "volume"
                ) -> np.ndarray:
    """A cached .npy as float32 (C, X, Y, Z) (a 3-D array gets a channel axis)."""
    path = Path(path)
    if not path.is_file():
        raise BadScanError(path, f"cached {what} does not exist", subject=scan)
    try:
        array = load_cached(path)
    except (OSError, ValueError) as err:
        raise BadScanError(path, f"not a readable .npy cache ({err})", subject=scan) from err
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise BadScanError(path, f"cached {what} must be 3-D or 4-D (C, X, Y, Z), but it is "
                           f"{array.ndim}-D with shape {array.shape}", subject=scan)
    out = np.asarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise BadScanError(path, f"cached {what} has NaN or Inf voxels", subject=scan)
    return out


class VolumeSet(torch.utils.data.Dataset):
    """Cached volumes and their targets for one task.

    Each item is a dict with "scan", "image" (.npy cache path), "label" (class index
    for classification, age for regression) and, for segmentation, "seg" (.npy WT/TC/ET
    region masks, ``medtx.volumes.cache_labels``). ``dataset[i]`` is
    {"image": float32 (C, X, Y, Z), "target": ..., "index": i} with target a long class
    index, a float age, or float (3, X, Y, Z) region masks; "pretrain" has no target.

    Args:
        items: the scans (``manifest_items``).
        task: classification, regression, segmentation or pretrain.
        downsample: integer factor ≥ 1: average-pool the image (max-pool the regions)
            on load, e.g. 2 for 96×114×96 -> 48×57×48.
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], *, task: str, downsample: int = 1):
        if task not in DATA_TASKS:
            raise ConfigError(f"task {task!r} is not one of {list(DATA_TASKS)}")
        if not isinstance(downsample, int) or downsample < 1:
            raise ConfigError(f"downsample must be an integer >= 1, not {downsample!r}")
        self.items, self.task, self.downsample = [dict(i) for i in items], task, downsample
        self.targets: list[Any] = []
        problems = []
        for n, item in enumerate(self.items):
            where = f"item {n} (scan {item.get('scan', '?')!r})"
            if not item.get("image"):
                problems.append(f"{where}: no 'image' cache path")
            target = None
            if task == "classification":
                try:
                    target = int(str(item.get("label")).strip())
                except ValueError:
                    problems.append(f"{where}: class label {item.get('label')!r} is not an integer")
            elif task == "regression":
                try:
                    target = float(str(item.get("label")).strip())
                    if not np.isfinite(target):
                        raise ValueError
                except ValueError:
                    problems.append(f"{where}: age {item.get('label')!r} is not a number")
            elif task == "segmentation" and not item.get("seg"):
                problems.append(f"{where}: no 'seg' region cache path")
            self.targets.append(target)
        if problems:
            raise CohortError(problems, what=f"the {task} data")

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Tensor:
        item = self.items[i]
        volume = torch.from_numpy(read_cached(item["image"], scan=item.get("scan")))
        return downsample_volume(volume, self.downsample)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image(i), "index": i}
        if self.task == "classification":
            out["target"] = torch.tensor(self.targets[i], dtype=torch.long)
        elif self.task == "regression":
            out["target"] = torch.tensor(self.targets[i], dtype=torch.float32)
        elif self.task == "segmentation":
            item = self.items[i]
            regions = torch.from_numpy(read_cached(item["seg"], scan=item.get("scan"),
                                                   what="region masks"))
            out["target"] = downsample_regions((regions > 0.5).float(), self.downsample)
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack a list of ``VolumeSet`` items into one batch dict."""
    batch = {"image": torch.stack([s["image"] for s in samples]),
             "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
    if "target" in samples[0]:
        batch["target"] = torch.stack([s["target"] for s in samples])
    return batch


def default_cache_path(row: Mapping[str, Any]) -> Path:
    """The manifest row's image with .nii/.nii.gz replaced by .npy (its cache beside it)."""
    path = str(row["path"])
    for suffix in (".nii.gz", ".nii"):
        if path.endswith(suffix):
            return Path(path[: -len(suffix)] + ".npy")
    return Path(path)


def manifest_items(manifest: pd.DataFrame, *, rotation: int, role: str, fraction: int = 100,
                   cache_dir_fn: Callable[[Mapping[str, Any]], str | Path] | None = None,
                   seg_fn: Callable[[Mapping[str, Any]], str | Path] | None = None
                   ) -> list[dict[str, Any]]:
    """The scans of one role in rotation ``rotation`` of a fold manifest, as items.

    Training rows are those with ``role_<k> == "train"`` and ``frac_<k> <= fraction``
    (the nested label fractions); val and test rows ignore ``fraction``.

    Args:
        manifest: a fold manifest (``medtx.folds.read_manifest``).
        rotation: k, the rotation (test = fold k, val = fold k + 1).
        role: train, val or test.
        fraction: label fraction in percent (training rows only).
        cache_dir_fn: manifest row (dict) -> the image's .npy cache path
            (default ``default_cache_path``: the ``path`` column with .npy).
        seg_fn: manifest row -> the region-mask .npy (segmentation); default the
            row's ``seg`` column when there is one.

    Returns:
        [{"dataset", "subject", "session", "scan", "image", "label", "seg"}], in
        manifest order.
    """
    column, frac_column = f"role_{rotation}", f"frac_{rotation}"
    if column not in manifest.columns:
        have = sorted(c for c in manifest.columns if c.startswith("role_"))
        raise MedtxError(f"the manifest has no rotation {rotation} (column {column!r}); it has "
                         f"{have or 'no role_<k> columns'}")
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {list(ROLES)}")
    rows = manifest[manifest[column].astype(str).str.strip() == role]
    if role == "train":
        fracs = pd.to_numeric(rows[frac_column], errors="coerce")
        if fracs.isna().any():
            bad = rows.loc[fracs.isna(), "scan"].tolist()
            raise MedtxError(f"training rows of rotation {rotation} without a {frac_column}: "
                             f"{bad[:5]}")
        rows = rows[fracs <= fraction]
    if rows.empty:
        raise MedtxError(f"the manifest has no {role} scans in rotation {rotation}"
                         + (f" at fraction {fraction}%" if role == "train" else ""))
    to_image = cache_dir_fn or default_cache_path
    items = []
    for rec in rows.to_dict("records"):
        seg = seg_fn(rec) if seg_fn else rec.get("seg") or None
        items.append({"dataset": rec.get("dataset", ""), "subject": rec.get("subject", ""),
                      "session": rec.get("session", ""), "scan": rec["scan"],
                      "image": str(to_image(rec)), "label": rec.get("label", ""),
                      "seg": str(seg) if seg else None})
    return items


# ---------------------------------------------------------------------------- checkpoints


def _scans(items: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(i.get("scan", i.get("image"))) for i in items]


def _subjects(items: Sequence[Mapping[str, Any]]) -> list[str]:
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
                h.update(f"{path}\0{st.st_size if st else -1}\0"
                         f"{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:16]


def _run_config(cfg: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
                **run: Any) -> dict[str, Any]:
    """What the resume key (the loop's config hash) covers: the stage config, what
    defines this run's data, the inputs' fingerprint and the training code's hash
    (an edit to medtx/models retrains instead of resuming a finished run)."""
    return {**cfg, **run, "inputs": input_fingerprint(items), "code": code_hash("train")}


def _metadata(stage: str, task: str, cfg: Mapping[str, Any], model_kwargs: Mapping[str, Any],
              trained: Sequence[str], train_items: Sequence[Mapping[str, Any]],
              extra: Mapping[str, Any] | None, **more: Any) -> dict[str, Any]:
    meta = dict(extra or {})
    meta.update({
        "stage": stage, "task": task, "preset": cfg["preset"], "model_kwargs": dict(model_kwargs),
        "trained": list(trained), "downsample": cfg["downsample"], "seed": cfg["seed"],
        "subjects": _subjects(train_items), "train_scans": _scans(train_items), **more,
    })
    return meta


def load_pretrained(model: MedicalTransformer, init: str | Path, *,
                    parts: Sequence[str] = ("encoders", "transformer")) -> dict[str, Any]:
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
        raise MedtxError(f"{init}: not a medtx model checkpoint (format "
                         f"{ckpt.get('format')!r})")
    trained = (ckpt.get("metadata") or {}).get("trained") or list(parts)
    take = [p for p in parts if p in trained]
    if "encoders" not in take:
        raise MedtxError(f"{init}: holds no trained encoders (trained: {trained})")
    keep = {k: v for k, v in state.items() if k.split(".")[0] in take}
    if model.in_channels != 1:
        keep = inflate_state_dict(keep, model.in_channels)
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in keep.items() if k in own and own[k].shape != v.shape]
    missing = sorted(k for k in keep if k not in own)
    if bad or missing:
        preset = (ckpt.get("metadata") or {}).get("preset")
        raise ConfigError(f"{init} (preset {preset!r}) does not fit this model: "
                          + "; ".join(bad[:5] + [f"no key {k}" for k in missing[:5]]))
    model.load_state_dict(keep, strict=False)
    return {"init": str(init), "init_sha256": sha256(init),
            "init_stage": (ckpt.get("metadata") or {}).get("stage"), "loaded": take,
            "keys": len(keep)}


def model_from_checkpoint(path: str | Path) -> tuple[MedicalTransformer, dict[str, Any]]:
    """Rebuild a stage's model from its final checkpoint: (model in eval mode, checkpoint)."""
    ckpt = load_state(path)
    meta = ckpt.get("metadata") or {}
    if ckpt.get("format") != MODEL_FORMAT or "model_kwargs" not in meta:
        raise MedtxError(f"{path}: not a medtx stage checkpoint")
    kw = dict(meta["model_kwargs"])
    model = build_model(kw.pop("preset"), kw.pop("task"), **kw)
    result = model.load_state_dict(ckpt["model"], strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("mask_token.")]
    if result.missing_keys or unexpected:
        raise MedtxError(f"{path}: state does not match its model (missing "
                         f"{result.missing_keys[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), ckpt


# ---------------------------------------------------------------------------- pre-training


def _model_kwargs(cfg, task, num_outputs, in_channels, use_transformer=True) -> dict[str, Any]:
    return {"preset": cfg["preset"], "task": task, "num_outputs": int(num_outputs),
            "in_channels": int(in_channels), "use_transformer": bool(use_transformer)}


def pretrain_exemplar(items: Sequence[Mapping[str, Any]], *, out: str | Path,
                      config: Mapping[str, Any] | None = None,
                      metadata: Mapping[str, Any] | None = None,
                      device: str | torch.device | None = None,
                      max_steps_this_run: int | None = None,
                      log: Callable[[str], None] | None = None) -> TrainResult:
    """Stage 1: train the three plane encoders with the exemplar (triplet) loss.

    The whole classification model of the preset is built so the checkpoint loads into
    any later stage, but only the encoders are optimized and marked trained. Batches
    need ≥ 2 volumes (the negative is another volume of the batch); an epoch's last
    single volume is skipped. Volumes must lie in [0, 1]. Selection: lowest mean
    training loss (no labels).
    """
    cfg = resolve_config(config)
    data = VolumeSet(items, task="pretrain", downsample=cfg["downsample"])
    if len(data) < 2:
        raise MedtxError(f"exemplar pre-training needs at least 2 volumes, got {len(data)}")
    seed_everything(cfg["seed"])
    kwargs = _model_kwargs(cfg, "classification", n_classes(cfg), 1)
    model = _build(kwargs)
    model.requires_grad_(False)
    model.encoders.requires_grad_(True)

    def loss_fn(m: MedicalTransformer, batch: dict[str, Tensor], ctx) -> Tensor:
        return exemplar_loss(m, batch["image"], ctx.rng, margin=float(cfg["margin"]))

    meta = _metadata("pretrain_exemplar", "pretrain", cfg, kwargs, ["encoders"], items, metadata)
    return train(model, data, loss_fn=loss_fn, out=out,
                 config=_run_config(cfg, items, stage="pretrain_exemplar",
                                    train_scans=_scans(items)),
                 params=model.encoders.parameters(), collate=collate, metadata=meta,
                 device=device, max_steps_this_run=max_steps_this_run, min_batch=2, log=log)


def pretrain_masked(items: Sequence[Mapping[str, Any]], *, init: str | Path, out: str | Path,
                    config: Mapping[str, Any] | None = None,
                    metadata: Mapping[str, Any] | None = None,
                    device: str | torch.device | None = None,
                    max_steps_this_run: int | None = None,
                    log: Callable[[str], None] | None = None) -> TrainResult:
    """Stage 2: frozen stage-1 encoders; train the transformer on masked slice encodings.

    ``mask_token: learned`` adds a trained mask vector per plane (saved as
    ``mask_token.tokens``); ``constant`` uses the encoder output of a blank slice.
    Selection: lowest mean training loss. The checkpoint holds encoders + transformer.
    """
    cfg = resolve_config(config)
    data = VolumeSet(items, task="pretrain", downsample=cfg["downsample"])
    seed_everything(cfg["seed"])
    kwargs = _model_kwargs(cfg, "classification", n_classes(cfg), 1)
    model = _build(kwargs)
    info = load_pretrained(model, init, parts=("encoders",))
    model.requires_grad_(False)
    model.transformer.requires_grad_(True)
    mask_token = None
    if cfg["mask_token"] == "learned":
        mask_token = model.mask_token = MaskToken(d_model=model.d_model)

    def loss_fn(m: MedicalTransformer, batch: dict[str, Tensor], ctx) -> Tensor:
        return masked_encoding_loss(m, batch["image"], ratio=float(cfg["mask_ratio"]),
                                    generator=ctx.generator, mask_token=mask_token)

    meta = _metadata("pretrain_masked", "pretrain", cfg, kwargs, ["encoders", "transformer"],
                     items, metadata, init=info)
    return train(model, data, loss_fn=loss_fn, out=out,
                 config=_run_config(cfg, items, stage="pretrain_masked", train_scans=_scans(items),
                                    init_sha256=info["init_sha256"]),
                 params=[p for p in model.parameters() if p.requires_grad], collate=collate,
                 metadata=meta, device=device, max_steps_this_run=max_steps_this_run, log=log)


def _build(kwargs: Mapping[str, Any]) -> MedicalTransformer:
    kw = dict(kwargs)
    return build_model(kw.pop("preset"), kw.pop("task"), **kw)


# ---------------------------------------------------------------------------- fine-tuning


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per case and region channel, averaged: (B, K, X, Y, Z) logits."""
    probs = torch.sigmoid(logits.float())
    dims = tuple(range(2, logits.ndim))
    inter = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + smooth) / (total + smooth)).mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE-with-logits + soft Dice on the WT/TC/ET region channels."""
    return (F.binary_cross_entropy_with_logits(logits.float(), target)
            + soft_dice_loss(logits, target))


def dice_per_case(logits: Tensor, target: Tensor) -> Tensor:
    """Hard Dice (sigmoid > 0.5) per case and region: (B, K); empty vs empty = 1.0,
    as ``medtx.metrics.dice``."""
    pred = logits > 0
    truth = target > 0.5
    dims = tuple(range(2, logits.ndim))
    inter = (pred & truth).sum(dims).double()
    total = pred.sum(dims).double() + truth.sum(dims).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def selection_mauc(y: np.ndarray, probs: np.ndarray) -> float:
    """mAUC for model selection: over the classes present when a small validation
    fold lacks some (probabilities renormalized over them); the mean log-probability
    of the true class when only one class is present."""
    present = sorted(set(np.asarray(y).tolist()))
    if len(present) == probs.shape[1]:
        return mauc(y, probs)
    if len(present) >= 2:
        sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
        remap = {c: i for i, c in enumerate(present)}
        return mauc(np.array([remap[c] for c in y]), sub)
    return float(np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))


@torch.no_grad()
def predict(model: MedicalTransformer, data: VolumeSet, *, batch_size: int,
            device: torch.device, target_stats: tuple[float, float] = (0.0, 1.0),
            amp: bool = False) -> dict[str, np.ndarray]:
    """Run ``model`` over ``data``: {"target", "probs" | "age" | "dice" (n, 3)}."""
    was_training = model.training
    model.eval()
    use_amp = amp and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate)
    outs, targets = [], []
    for batch in loader:
        x = batch["image"].to(device)
        target = batch["target"].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            logits = model(x).float()
        if data.task == "classification":
            outs.append(torch.softmax(logits, dim=1).cpu())
        elif data.task == "regression":
            mean, std = target_stats
            outs.append((logits[:, 0] * std + mean).cpu())
        else:
            outs.append(dice_per_case(logits, target).cpu())
        targets.append(batch["index"] if data.task == "segmentation" else target.cpu())
    model.train(was_training)
    key = {"classification": "probs", "regression": "age", "segmentation": "dice"}[data.task]
    return {key: torch.cat(outs).double().numpy(), "target": torch.cat(targets).numpy()}


def finetune(task: str, train_items: Sequence[Mapping[str, Any]],
             val_items: Sequence[Mapping[str, Any]], test_items: Sequence[Mapping[str, Any]],
             *, init: str | Path | None = None, use_transformer: bool = True,
             out: str | Path, predictions_out: str | Path, metrics_out: str | Path | None = None,
             config: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
             device: str | torch.device | None = None, max_steps_this_run: int | None = None,
             log: Callable[[str], None] | None = None) -> TrainResult:
    """Stage 3: train a task model, select it on validation, predict the test set.

    Args:
        task: classification (K = classes of ``label_map``), regression (brain age) or
            segmentation (WT/TC/ET from as many channels as the cached images have).
        train_items, val_items, test_items: ``manifest_items`` of one rotation.
        init: a pre-trained checkpoint (stage 1 or 2), or None for scratch. Its
            trained encoders (+ transformer when ``use_transformer``) are loaded; heads
            are fresh; 1-channel stems are inflated for 4-channel input.
        use_transformer: False is the "w/o transformer" ablation (encoders only).
        out: the final checkpoint (best-by-validation state + metadata).
        predictions_out: per-scan test predictions TSV: scan, subject, label, then
            prediction + p_0..p_{K-1} (classification), prediction = age in years
            (regression), or dice_WT, dice_TC, dice_ET (segmentation).
        metrics_out: the test metrics JSON (default: predictions_out with .json).
        config: ``DEFAULTS`` keys.
        metadata: stored in the checkpoint (fold sidecar, preprocessing fingerprint).
        device, max_steps_this_run, log: as ``medtx.training.train``.

    Returns:
        The TrainResult; ``extra["metrics"]`` holds the test metrics unless interrupted
        (then nothing is predicted and the next call resumes).
    """
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"task {task!r} is not one of {list(FINETUNE_TASKS)}")
    cfg = resolve_config(config)
    for name, items in (("training", train_items), ("validation", val_items),
                        ("test", test_items)):
        if not items:
            raise MedtxError(f"finetune {task}: no {name} scans")
    sets = {name: VolumeSet(items, task=task, downsample=cfg["downsample"])
            for name, items in (("train", train_items), ("val", val_items),
                                ("test", test_items))}
    dev = pick_device(device)
    if task == "classification":
        k = n_classes(cfg)
        bad = [f"scan {i.get('scan')!r}: class {t}" for s in sets.values()
               for i, t in zip(s.items, s.targets) if not 0 <= t < k]
        if bad:
            raise CohortError(bad, what=f"class labels (label_map has {k} classes: "
                              f"{cfg['label_map']})")
        outputs, channels = k, 1
    elif task == "regression":
        outputs, channels = 1, 1
    else:
        outputs = len(REGION_NAMES)
        first = train_items[0]
        channels = int(read_cached(first["image"], scan=first.get("scan")).shape[0])
    stats = (0.0, 1.0)
    if task == "regression":
        ages = np.asarray(sets["train"].targets, dtype=np.float64)
        std = float(ages.std())
        stats = (float(ages.mean()), std if std > 1e-8 else 1.0)

    seed_everything(cfg["seed"])
    kwargs = _model_kwargs(cfg, task, outputs, channels, use_transformer)
    model = _build(kwargs)
    info = None
    if init is not None:
        parts = ("encoders", "transformer") if use_transformer else ("encoders",)
        info = load_pretrained(model, init, parts=parts)
        (log or _stderr)(f"[finetune] loaded {', '.join(info['loaded'])} from {init}")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32) for v in stats)

    def loss_fn(m: MedicalTransformer, batch: dict[str, Tensor], ctx) -> Tensor:
        logits = m(batch["image"])
        if task == "classification":
            return F.cross_entropy(logits.float(), batch["target"])
        if task == "regression":
            z = (batch["target"] - mean_t.to(logits.device)) / std_t.to(logits.device)
            loss = F.l1_loss if cfg["loss_regression"] == "l1" else F.mse_loss
            return loss(logits[:, 0].float(), z)
        return segmentation_loss(logits, batch["target"])

    def validate(m: MedicalTransformer) -> float:
        pred = predict(m, sets["val"], batch_size=cfg["batch_size"], device=dev,
                       target_stats=stats, amp=cfg["amp"])
        if task == "classification":
            return selection_mauc(pred["target"], pred["probs"])
        if task == "regression":
            return mae(pred["target"], pred["age"])
        return float(pred["dice"].mean())

    mode = "min" if task == "regression" else "max"
    selected_by = {"classification": "val mAUC", "regression": "val MAE",
                   "segmentation": "val mean Dice"}[task]
    trained = ["encoders", "head"] + (["transformer"] if use_transformer else [])
    meta = _metadata("finetune", task, cfg, kwargs, trained, train_items, metadata,
                     init=info, val_scans=_scans(val_items), selected_by=selected_by,
                     target_mean=stats[0], target_std=stats[1], label_map=cfg["label_map"],
                     loss={"classification": "cross_entropy",
                           "regression": f"{cfg['loss_regression']} on standardized age",
                           "segmentation": "bce_with_logits + soft_dice"}[task])
    run = _run_config(cfg, [*train_items, *val_items, *test_items], stage="finetune",
                      task=task, use_transformer=use_transformer,
                      train_scans=_scans(train_items), val_scans=_scans(val_items),
                      init_sha256=info["init_sha256"] if info else "scratch")
    result = train(model, sets["train"], loss_fn=loss_fn, out=out, config=run,
                   validate=validate, mode=mode, collate=collate, metadata=meta, device=dev,
                   max_steps_this_run=max_steps_this_run, log=log)
    if result.status == "interrupted":
        return result

    model.load_state_dict(load_state(out)["model"])
    pred = predict(model, sets["test"], batch_size=cfg["batch_size"], device=dev,
                   target_stats=stats, amp=cfg["amp"])
    table = prediction_table(task, sets["test"].items, pred)
    write_text(table.to_csv(sep="\t", index=False, float_format="%.6g"), predictions_out)
    metrics = evaluate_predictions(task, predictions_out)
    metrics_out = (Path(metrics_out) if metrics_out is not None
                   else Path(predictions_out).with_suffix(".json"))
    write_json({**metrics, "selected_by": selected_by, "val_metric": result.best_metric,
                "best_epoch": result.best_epoch, "epochs_done": result.epochs_done,
                "status": result.status, "checkpoint": str(out),
                "predictions": str(predictions_out), "init": str(init) if init else "scratch",
                "use_transformer": use_transformer}, metrics_out)
    result.extra["metrics"] = metrics
    return result


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prediction_table(task: str, items: Sequence[Mapping[str, Any]],
                     pred: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The per-scan predictions TSV's rows (see ``finetune``)."""
    base = pd.DataFrame({"scan": [i.get("scan", "") for i in items],
                         "subject": [i.get("subject", "") for i in items],
                         "label": [i.get("label", "") for i in items]})
    if task == "classification":
        probs = pred["probs"]
        base["prediction"] = probs.argmax(axis=1)
        for c in range(probs.shape[1]):
            base[f"p_{c}"] = probs[:, c]
    elif task == "regression":
        base["prediction"] = pred["age"]
    else:
        for r, name in enumerate(REGION_NAMES):
            base[f"dice_{name}"] = pred["dice"][:, r]
    return base


def evaluate_predictions(task: str, predictions_tsv: str | Path) -> dict[str, Any]:
    """Test metrics from a predictions TSV written by ``finetune``.

    classification: mAUC (Hand & Till, ``medtx.metrics.mauc``; over the classes present,
    listed in ``mauc_classes``, when the test set lacks some) and accuracy;
    regression: MAE (years); segmentation: mean Dice of WT, TC, ET and their mean.
    """
    path = Path(predictions_tsv)
    try:
        table = pd.read_csv(path, sep="\t", dtype={"scan": str, "subject": str})
    except (OSError, pd.errors.EmptyDataError) as err:
        raise MedtxError(f"{path}: cannot read predictions ({err})") from err
    if task == "classification":
        prob_cols = sorted((c for c in table.columns if c.startswith("p_")),
                           key=lambda c: int(c[2:]))
        need = ["label"] + (prob_cols or ["p_0"])
    elif task == "regression":
        need = ["label", "prediction"]
    elif task == "segmentation":
        need = [f"dice_{r}" for r in REGION_NAMES]
    else:
        raise ConfigError(f"task {task!r} is not one of {list(FINETUNE_TASKS)}")
    missing = [c for c in need if c not in table.columns]
    if missing or table.empty:
        raise MedtxError(f"{path}: {'no rows' if table.empty else f'missing column(s) {missing}'}"
                         f" for {task} predictions (columns: {list(table.columns)})")
    out: dict[str, Any] = {"task": task, "n": int(len(table))}
    if task == "classification":
        y = table["label"].astype(int).to_numpy()
        probs = table[prob_cols].to_numpy(dtype=np.float64)
        present = sorted(set(y.tolist()))
        out["mauc"] = selection_mauc(y, probs) if len(present) >= 2 else None
        out["mauc_classes"] = present
        out["accuracy"] = float((probs.argmax(axis=1) == y).mean())
    elif task == "regression":
        out["mae"] = mae(table["label"].to_numpy(float), table["prediction"].to_numpy(float))
    else:
        for r in REGION_NAMES:
            out[f"dice_{r}"] = float(table[f"dice_{r}"].mean())
        out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGION_NAMES]))
    return out

