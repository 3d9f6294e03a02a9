"""One driver for every backbone's pre-training stages.

A backbone's stage module (``pretrain.py`` for the Medical Transformer, ``mim.py``
for PUMIT) builds each stage's own pieces: its volumes, the model with the parts
it trains, its loss and what its checkpoint records besides the common keys. The
driver does the rest the same way for both: the checkpoint's metadata, the run's
resume key, the training loop and what follows it (``pretrain``), and ``medtx
pretrain <stage>`` from the scans the cache indexes list (``pretrain_stage``
over the module's ``STAGES``). The CLI finds the module from the backbone registry
(``medtx.models.registry.Backbone.pretraining``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from medtx.errors import MedtxError
from medtx.train.checkpoints import run_config, scans_of, stage_metadata
from medtx.train.data import VolumeSet, collate, items_from_indexes
from medtx.train.loop import StepContext, TrainResult, train

if TYPE_CHECKING:
    from typing_extensions import Unpack


class PretrainRun(TypedDict, total=False):
    """Where and how a stage trains (a stage's keywords besides ``out`` and ``init``):
    its config section, what its checkpoint also stores, and the loop's device,
    simulated walltime (``max_steps_this_run``) and log, as ``train``'s."""

    config: Mapping[str, Any] | None
    metadata: Mapping[str, Any] | None
    device: str | torch.device | None
    max_steps_this_run: int | None
    log: Callable[[str], None] | None


@dataclass
class Stage:
    """What a backbone's pre-training stage hands the driver.

    name: the checkpoint's stage (``pretrain_exemplar``); model: built and frozen
    but for ``trained``, the parts that learn (recorded in the metadata); data and
    cfg: its volumes and resolved config; kwargs: the model arguments the
    checkpoint records; params: what the optimizer gets (default: the parameters
    that require a gradient); metadata: the stage's own metadata keys (its init,
    losses, weights); run: the stage's own resume-key entries (the init's and the
    weights' hashes); min_batch: as ``train``'s; finish: run on the finished
    checkpoint by the process that wrote it, with the result, ``out`` and device.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, dict[str, Tensor], StepContext], Tensor]
    trained: list[str]
    kwargs: Mapping[str, Any]
    data: VolumeSet
    cfg: Mapping[str, Any]
    params: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    min_batch: int = 1
    finish: Callable[[TrainResult, str | Path, str | torch.device | None], None] | None = None


#: A stage's builder: (items, config, init checkpoint or None) -> the ``Stage``.
Build = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any] | None, Any], Stage]


def pretrain_volumes(items: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> VolumeSet:
    """The pre-training volumes as the cache stores them (no labels)."""
    return VolumeSet(items, task="pretrain", downsample=cfg["downsample"], stored=True)


def pretrain(
    build: Build,
    items: Sequence[Mapping[str, Any]],
    *,
    out: str | Path,
    init: str | Path | None = None,
    **run: Unpack[PretrainRun],
) -> TrainResult:
    """Build a stage from ``items`` and train it: its metadata and resume key, the
    loop, then its ``finish``."""
    stage = build(items, run.get("config"), init)
    cfg, device = stage.cfg, run.get("device")
    meta = stage_metadata(
        stage.name,
        "pretrain",
        cfg,
        stage.kwargs,
        stage.trained,
        items,
        run.get("metadata"),
        **stage.metadata,
    )
    params = stage.params
    if params is None:
        params = [p for p in stage.model.parameters() if p.requires_grad]
    result = train(
        stage.model,
        stage.data,
        loss_fn=stage.loss_fn,
        out=out,
        config=run_config(cfg, items, stage=stage.name, train_scans=scans_of(items), **stage.run),
        params=params,
        collate=collate,
        prepare=stage.data.prepare,
        metadata=meta,
        device=device,
        max_steps_this_run=run.get("max_steps_this_run"),
        min_batch=stage.min_batch,
        log=run.get("log"),
    )
    if stage.finish is not None and result.status != "interrupted" and result.rank == 0:
        stage.finish(result, out, device)
    return result


@dataclass(frozen=True)
class StageEntry:
    """A ``medtx pretrain`` stage: its builder, and the stage whose checkpoint it
    starts from (``--init``), if any."""

    build: Build
    init_from: str | None = None


def pretrain_stage(
    stages: Mapping[str, StageEntry],
    stage: str,
    indexes: Sequence[str | Path],
    *,
    out: str | Path,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
    init: str | Path | None = None,
) -> TrainResult:
    """``medtx pretrain <stage>``: one of a backbone's ``stages`` on the scans the
    indexes list."""
    if stage not in stages:
        raise MedtxError(f"pre-training stage {stage!r} is not one of {list(stages)}")
    entry = stages[stage]
    items = items_from_indexes(indexes)
    if entry.init_from is not None and init is None:
        raise MedtxError(
            f"{stage} pre-training needs --init, the {entry.init_from} stage's checkpoint"
        )
    return pretrain(entry.build, items, out=out, init=init, config=config, metadata=metadata)
