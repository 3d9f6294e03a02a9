"""Backbones by name, so training and evaluation build any of them the same way.

A checkpoint records its ``model_kwargs`` (backbone, preset, task, outputs,
input channels, ...); ``build`` turns them back into the model. A new backbone
registers a builder here and needs no edit to ``medtx.train`` or
``medtx.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from medtx.domain import BACKBONES, DEFAULT_BACKBONE
from medtx.errors import ConfigError
from medtx.models import slice_transformer
from medtx.models.pumit import model as pumit

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "Backbone", "backbone", "build"]


@dataclass(frozen=True)
class Backbone:
    """How to build a backbone and what fine-tuning takes from its pre-training.

    builder: ``(preset, task, **kwargs) -> nn.Module``; presets: its named sizes;
    pretrained: the state-dict prefixes a "pretrained" fine-tuning loads (heads
    stay fresh); inflate: a 1-channel state made to take ``in_channels`` (BraTS);
    unused_when_finetuning: parameters no task's loss reaches (PUMIT's MIM mask
    token), frozen in fine-tuning so that data parallelism needs no search for them.
    pretraining: the module of ``medtx.train`` whose ``STAGES`` pre-train it, each
    run by the one driver ``medtx.train.pretraining`` (named, not imported: models
    sit below training).
    """

    builder: Callable[..., nn.Module]
    presets: Mapping[str, Any]
    pretrained: tuple[str, ...]
    inflate: Callable[[dict[str, Tensor], int], dict[str, Tensor]]
    pretraining: str
    unused_when_finetuning: tuple[str, ...] = ()


REGISTRY: dict[str, Backbone] = {
    "medical_transformer": Backbone(
        slice_transformer.build_model,
        slice_transformer.PRESETS,
        ("encoders", "transformer"),
        slice_transformer.inflate_state_dict,
        "medtx.train.pretrain",
    ),
    "pumit": Backbone(
        pumit.build_model,
        pumit.PRESETS,
        ("vit",),
        pumit.inflate_state_dict,
        "medtx.train.mim",
        unused_when_finetuning=("vit.mask_token",),
    ),
}
assert tuple(REGISTRY) == BACKBONES


def backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise ConfigError(f"backbone {name!r} is not one of {list(REGISTRY)}")
    return REGISTRY[name]


def build(model_kwargs: Mapping[str, Any]) -> nn.Module:
    """The model a checkpoint's ``model_kwargs`` describe (backbone default: the paper's)."""
    kw = dict(model_kwargs)
    spec = backbone(kw.pop("backbone", DEFAULT_BACKBONE))
    return spec.builder(kw.pop("preset"), kw.pop("task"), **kw)
