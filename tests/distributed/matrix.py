"""The training matrix the GPU-semantics tests run: every backbone, stage and task.

Ten configurations, each the real stage function (``medtx.train.pretrain``,
``medtx.train.mim``, ``medtx.train.finetune``) on tiny cached volumes:

- Medical Transformer: exemplar and masked pre-training, fine-tuning for
  classification, regression and segmentation;
- PUMIT (tiny): tokenizer and MIM pre-training, fine-tuning for the same three tasks.

``prepare`` writes the volumes and the two init checkpoints (exemplar for masked,
tokenizer for MIM) once; ``run`` trains one configuration, in whatever process and
torchrun environment it is called. Batches of 3 volumes split 2 + 1 over two
processes (unequal shares), 6 training volumes give 2 steps an epoch, 3 validation
volumes split 2 + 1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from medtx.models import slice_transformer
from medtx.train.checkpoints import load_state
from medtx.train.finetune import finetune
from medtx.train.loop import TrainResult
from medtx.train.mim import pretrain_mim, pretrain_tokenizer
from medtx.train.pretrain import pretrain_exemplar, pretrain_masked
from tests.unit.train.test_stages import write_items

SHAPE = (20, 24, 18)  # PUMIT pads it to 32^3: 8 tokens
BASE = {"lr": 1e-3, "batch_size": 3, "threads": 1, "log_every": 1, "seed": 5}
BASE.update(num_workers=0, epochs=2, patience=5, checkpoint_minutes=0)
CONFIG = {
    "medical_transformer": {**BASE, "backbone": "medical_transformer"},
    "pumit": {**BASE, "backbone": "pumit", "preset": "tiny"},
}
STAGES = {"medical_transformer": ("exemplar", "masked"), "pumit": ("tokenizer", "mim")}
TASKS = ("classification", "regression", "segmentation")
CONFIGS = [f"{b}-{s}" for b in CONFIG for s in (*STAGES[b], *TASKS)]
INITS = {"medical_transformer-masked": "exemplar.pt", "pumit-mim": "tokenizer.pt"}


def prepare(root: Path) -> None:
    """The volumes of every configuration (listed in ``items.json``), and the inits
    of the second stages."""
    written = {"pretrain": write_items(root / "pretrain", 6, shape=SHAPE, prefix="p")}
    for task in TASKS:
        for split, n, seed in (("train", 6, 0), ("val", 3, 1), ("test", 2, 2)):
            written[f"{task}/{split}"] = write_items(
                root / task / split, n, task=task, shape=SHAPE, seed=seed, prefix=split
            )
    (root / "items.json").write_text(json.dumps(written))
    quiet = {"log": lambda _line: None}
    pretrain_exemplar(
        items(root, "pretrain"),
        out=root / INITS["medical_transformer-masked"],
        config={**CONFIG["medical_transformer"], "epochs": 1},
        **quiet,
    )
    pretrain_tokenizer(
        items(root, "pretrain"),
        out=root / INITS["pumit-mim"],
        config={**CONFIG["pumit"], "epochs": 1},
        **quiet,
    )


def items(root: Path, key: str) -> list[dict[str, Any]]:
    """The items ``prepare`` wrote: "pretrain", or "<task>/<split>"."""
    return json.loads((root / "items.json").read_text())[key]


def run(
    cid: str, root: Path, out: Path, *, max_steps: int | None = None, **config: Any
) -> TrainResult:
    """Train configuration ``cid`` into ``out`` (its checkpoint path)."""
    backbone, stage = cid.split("-")
    cfg = {**CONFIG[backbone], **config}
    kw: dict[str, Any] = {"out": out, "config": cfg, "max_steps_this_run": max_steps}
    kw["log"] = lambda _line: None
    if stage in TASKS:
        splits = [items(root, f"{stage}/{split}") for split in ("train", "val", "test")]
        return finetune(stage, *splits, predictions_out=out.with_suffix(".tsv"), **kw)
    pre = items(root, "pretrain")
    if stage == "exemplar":
        return pretrain_exemplar(pre, **kw)
    if stage == "masked":
        return pretrain_masked(pre, init=root / INITS[cid], **kw)
    if stage == "tokenizer":
        return pretrain_tokenizer(pre, **kw)
    return pretrain_mim(pre, init=root / INITS[cid], **kw)


@contextlib.contextmanager
def no_dropout() -> Iterator[None]:
    """The Medical Transformer's presets without dropout (PUMIT has none): with it, one
    process and two draw different masks by design (``Trainer.step``)."""
    saved = {name: dict(p) for name, p in slice_transformer.PRESETS.items()}
    for preset in slice_transformer.PRESETS.values():
        preset["dropout"] = 0.0
    try:
        yield
    finally:
        for name, p in saved.items():
            slice_transformer.PRESETS[name].update(p)


@contextlib.contextmanager
def first_step_gradients(path: Path) -> Iterator[None]:
    """Save the gradients of the first optimizer step taken inside (all parameters
    of every group, in order; NaN where a parameter has none) and the parameters
    before it to ``path``: {"grads": [...], "params": [...]}."""
    seen: list[bool] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if seen:
            return
        seen.append(True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [
            p.grad.detach().clone() if p.grad is not None else torch.full_like(p, float("nan"))
            for p in params
        ]
        torch.save({"grads": grads, "params": [p.detach().clone() for p in params]}, path)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def first_step_loss(out: Path) -> float:
    """The mean loss of the one step a ``max_steps=1`` run saved in ``<out>.last.pt``."""
    saved = load_state(out.with_name(out.name + ".last.pt"))
    return saved["epoch_loss_sum"] / saved["epoch_volumes"]
