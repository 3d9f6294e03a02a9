"""Backbones by name, so training and evaluation build any of them the same way.

A checkpoint records its ``model_kwargs`` (backbone, preset, task, outputs,
input channels, ...); ``build`` turns them back into the model. A new backbone
registers a builder here and needs no edit to ``medtx.train`` or
``medtx.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from medtx.errors import ConfigError
from medtx.models import slice_transformer

DEFAULT_BACKBONE = "medical_transformer"


class Backbone:
    """A builder ``(preset, task, **kwargs) -> nn.Module`` and its named presets."""

    def __init__(self, builder: Callable[..., nn.Module], presets: Mapping[str, Any]):
        self.builder, self.presets = builder, presets


BACKBONES: dict[str, Backbone] = {
    DEFAULT_BACKBONE: Backbone(slice_transformer.build_model, slice_transformer.PRESETS),
}


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"backbone {name!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def build(model_kwargs: Mapping[str, Any]) -> nn.Module:
    """The model a checkpoint's ``model_kwargs`` describe (backbone default: the paper's)."""
    kw = dict(model_kwargs)
    spec = backbone(kw.pop("backbone", DEFAULT_BACKBONE))
    return spec.builder(kw.pop("preset"), kw.pop("task"), **kw)
