"""Can a backbone learn a task? A small fine-tuning run on a planted cohort, its test
metric held against what the cohort allows.

Before a GPU-day goes to a model, a minute on a CPU shows that it learns: each
backbone x task trains its CPU-sized preset (the demo's) with the real stage
(``medtx.train.finetune.finetune``: the loop, the loss, the selection, the
prediction and the metrics a study reports) on a cohort of
``medtx.train.planted``, whose ceiling is known, and must come within a stated
distance of it (``goals``). The same check with the training and validation
labels shuffled (``broken="labels"``) must fail: that is what shows the bar means
something.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medtx.domain import BACKBONES, TASKS
from medtx.errors import ConfigError
from medtx.train.finetune import finetune
from medtx.train.planted import COHORTS, Ceiling, PlantedCohort

#: Each backbone's CPU-sized preset (the demo's).
PRESET = {"medical_transformer": "table3", "pumit": "tiny"}
#: Training settings every check shares: the planted cohorts are at training size.
COMMON: dict[str, Any] = {
    "downsample": 1,
    "batch_size": 4,
    "threads": 1,
    "num_workers": 0,
    "log_every": 1000,
    "checkpoint_minutes": 0,
}
#: Epochs and learning rate per backbone and task: about a minute on one CPU core
#: each. The ViT needs many short epochs at a lower rate; its 32x38x32 input is
#: 2x3x2 tokens, so an epoch takes 0.1 s.
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("medical_transformer", "classification"): {"epochs": 15, "lr": 1e-3},
    ("medical_transformer", "regression"): {"epochs": 15, "lr": 1e-3},
    ("medical_transformer", "segmentation"): {"epochs": 12, "lr": 1e-3},
    ("pumit", "classification"): {"epochs": 100, "lr": 3e-4},
    ("pumit", "regression"): {"epochs": 100, "lr": 3e-4},
    ("pumit", "segmentation"): {"epochs": 12, "lr": 1e-3},
}
assert set(RECIPES) == {(b, t) for b in BACKBONES for t in TASKS}
#: Cohort sizes: 3/5 train, 1/5 validation, 1/5 test (``split``).
SIZES = {"classification": 60, "regression": 45, "segmentation": 36}
#: The test metrics a check reports (its goals' and the task's others).
SCORES = {
    "classification": ("mauc", "accuracy"),
    "regression": ("mae",),
    "segmentation": ("dice_WT", "dice_TC", "dice_ET"),
}
#: Roles by turn, so every split spans the classes and ages the cohort draws in turn.
ROLES = ("train", "train", "train", "val", "test")


class Goal(NamedTuple):
    """A test metric's bar: ``metric`` >= ``bound`` ("max") or <= it ("min")."""

    metric: str
    bound: float
    mode: str
    ceiling: Ceiling

    def met(self, value: float) -> bool:
        return value >= self.bound if self.mode == "max" else value <= self.bound


def goals(cohort: PlantedCohort) -> list[Goal]:
    """The bars a model must reach on ``cohort``'s test split:

    - mAUC: 80 % of the way from chance (0.5) to the ceiling (0.9 for a ceiling of 1),
      and accuracy 75 % of the way (0.83: at most 2 of 12 wrong); mAUC alone passed
      once on shuffled labels, ranking by the one severity axis by chance;
    - MAE: a third of the ages' standard deviation (the floor is far below: 0.8 years);
    - Dice: WT >= 0.7 and ET >= 0.5 of the ceiling (1.0); TC is reported.
    """
    c = cohort.ceilings
    if cohort.task == "classification":
        m, a = c["mauc"], c["accuracy"]
        return [
            Goal("mauc", m.chance + 0.8 * (m.best - m.chance), "max", m),
            Goal("accuracy", a.chance + 0.75 * (a.best - a.chance), "max", a),
        ]
    if cohort.task == "regression":
        sd = float(np.std([i["label"] for i in cohort.items]))
        return [Goal("mae", sd / 3, "min", c["mae"])]
    return [
        Goal("dice_WT", 0.7 * c["dice_WT"].best, "max", c["dice_WT"]),
        Goal("dice_ET", 0.5 * c["dice_ET"].best, "max", c["dice_ET"]),
    ]


class Check(NamedTuple):
    """One backbone x task: its test scores, bars, seconds, and whether it passed."""

    backbone: str
    task: str
    scores: dict[str, float]
    goals: list[Goal]
    seconds: float
    broken: str | None

    @property
    def passed(self) -> bool:
        return all(g.met(self.scores[g.metric]) for g in self.goals)

    def lines(self) -> list[str]:
        head = f"{self.backbone} {self.task}" + (f" (broken: {self.broken})" if self.broken else "")
        out = []
        for g in self.goals:
            c = g.ceiling
            out.append(
                f"{head}: {g.metric} {self.scores[g.metric]:.3f} "
                f"({'>=' if g.mode == 'max' else '<='} {g.bound:.3f} needed; "
                f"{'ceiling' if g.mode == 'max' else 'floor'} {c.best:.3f}, chance "
                f"{c.chance:.3f}) in {self.seconds:.0f} s"
            )
        extra = sorted(set(self.scores) - {g.metric for g in self.goals})
        if extra:
            out.append(f"{head}: also " + ", ".join(f"{k} {self.scores[k]:.3f}" for k in extra))
        return out


def split(items: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """train / val / test by turn (``ROLES``)."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for i, item in enumerate(items):
        out[ROLES[i % len(ROLES)]].append(dict(item))
    return out


def shuffled(items: list[dict[str, Any]], task: str, seed: int) -> list[dict[str, Any]]:
    """The items with their labels (segmentation: region masks) permuted among them."""
    key = "seg" if task == "segmentation" else "label"
    order = np.random.default_rng(seed).permutation(len(items))
    return [{**item, key: items[j][key]} for item, j in zip(items, order)]


def check(
    backbone: str,
    task: str,
    workdir: str | Path,
    *,
    cohort: PlantedCohort | None = None,
    broken: str | None = None,
    seed: int = 42,
    log: Callable[[str], None] | None = None,
) -> Check:
    """Fine-tune ``backbone`` on ``task``'s planted cohort (made in ``workdir`` unless
    given) and score its test split against ``goals``.

    broken: "labels" trains and selects on shuffled labels (the check must then fail).
    """
    if (backbone, task) not in RECIPES:
        raise ConfigError(f"no learnability recipe for {backbone} {task}")
    if broken not in (None, "labels"):
        raise ConfigError(f"broken must be None or 'labels', not {broken!r}")
    workdir = Path(workdir)
    if cohort is None:
        cohort = COHORTS[task](workdir / f"cohort-{task}", n=SIZES[task])
    sets = split(cohort.items)
    if broken == "labels":  # validation too: selecting on true labels would leak them
        sets["train"] = shuffled(sets["train"], task, seed)
        sets["val"] = shuffled(sets["val"], task, seed)
    config = {
        **COMMON,
        **RECIPES[backbone, task],
        "backbone": backbone,
        "preset": PRESET[backbone],
        "seed": seed,
    }
    config["patience"] = config["epochs"]
    name = f"{backbone}-{task}" + (f"-{broken}" if broken else "")
    start = time.monotonic()
    result = finetune(
        task,
        sets["train"],
        sets["val"],
        sets["test"],
        out=workdir / f"{name}.pt",
        predictions_out=workdir / f"{name}.tsv",
        config=config,
        log=log or (lambda _line: None),
    )
    metrics = result.extra["metrics"]
    scores = {k: float(v) for k, v in metrics.items() if k in SCORES[task]}
    return Check(backbone, task, scores, goals(cohort), time.monotonic() - start, broken)
