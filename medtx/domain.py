"""The study's vocabulary, written once: tasks, initializations, fold roles, label
fractions and the BraTS labels, regions and modalities.

Every other module, the rules and the config schema's checks take these names
from here, so adding a task or a region is one edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

# Fine-tuning tasks of the paper: diagnosis (CN/MCI/AD), brain age, tumour segmentation.
TASKS = ("classification", "regression", "segmentation")
# What a dataset can be used for: the tasks, (unlabelled) pre-training, or new scans
# to run exported models on (predict).
DATASET_ROLES = ("pretrain", *TASKS, "predict")
# How a fine-tuned model starts: pre-trained encoders + transformer, random
# weights, or pre-trained encoders without the transformer (the ablation).
INITS = ("scratch", "pretrained", "notransformer")
# The paper's label fractions (Table 4), in percent, nested 10 ⊂ 30 ⊂ ... ⊂ 100.
FRACTIONS = (10, 30, 50, 70, 100)
# A scan's role in one fold of a manifest: fold k is test, fold k+1 validation.
SPLITS = ("train", "val", "test")
# The encoders the study compares, by registry name (medtx.models.registry builds
# them): the paper's slice transformer, then PUMIT's spacing-adaptive ViT.
BACKBONES = ("medical_transformer", "pumit")
DEFAULT_BACKBONE = BACKBONES[0]
# The initializations each backbone has: "notransformer" is an ablation of the
# Medical Transformer (its encoders without the slice transformer).
BACKBONE_INITS: dict[str, tuple[str, ...]] = {
    "medical_transformer": INITS,
    "pumit": ("scratch", "pretrained"),
}
# Each backbone's pre-training stages, in order; the last one initializes fine-tuning.
PRETRAIN_STAGES: dict[str, tuple[str, ...]] = {
    "medical_transformer": ("exemplar", "masked"),
    "pumit": ("tokenizer", "mim"),
}
# Diagnosis -> class index when the config gives no label_map.
DEFAULT_LABEL_MAP = {"CN": 0, "MCI": 1, "AD": 2}

# BraTS 2020 labels: background, necrotic/non-enhancing core, edema, enhancing tumour.
BRATS_LABELS = (0, 1, 2, 4)
# The three nested regions scored by the challenge (and the segmentation head's
# channels, in this order): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
REGION_NAMES = tuple(BRATS_REGIONS)
# The four contrasts of a BraTS case, in channel order, and its label file.
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_FILES = (*BRATS_MODALITIES, "seg")


def regions_from_labels(labels):
    """A BraTS label volume (0/1/2/4) as WT/TC/ET region masks: bool (3, *labels.shape).

    Labels outside ``BRATS_LABELS`` raise ValueError (the preprocessing step checks
    them first and names the file).
    """
    import numpy as np

    labels = np.asarray(labels)
    unexpected = sorted(set(np.unique(labels).tolist()) - set(BRATS_LABELS))
    if unexpected:
        raise ValueError(f"BraTS labels must be in {BRATS_LABELS}, found {unexpected}")
    return np.stack([np.isin(labels, region) for region in BRATS_REGIONS.values()])


@dataclass(frozen=True)
class RunId:
    """Who a fine-tuning run is: dataset x task x backbone x init x label fraction x fold.

    Recorded in each run's ``metrics.json`` and checkpoint (``run``) and read back
    from there by the tables; the output folder names it too, but is never parsed.
    """

    dataset: str
    task: str
    init: str
    frac: int
    fold: int
    # last, with a default: runs recorded before PUMIT are the Medical Transformer's
    backbone: str = DEFAULT_BACKBONE

    # the order of the tables' rows and of the output folders
    KEYS: ClassVar[tuple[str, ...]] = ("dataset", "task", "backbone", "init", "frac", "fold")

    def __post_init__(self) -> None:
        problems = []
        if not self.dataset:
            problems.append("no dataset")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {list(TASKS)}")
        if self.backbone not in BACKBONES:
            problems.append(f"backbone {self.backbone!r} is not one of {list(BACKBONES)}")
        elif self.init not in BACKBONE_INITS[self.backbone]:
            problems.append(
                f"init {self.init!r} is not one of {list(BACKBONE_INITS[self.backbone])}"
                f" (backbone {self.backbone})"
            )
        frac, fold = self.frac, self.fold
        if not isinstance(frac, int) or isinstance(frac, bool) or not 0 < frac <= 100:
            problems.append(f"label fraction {frac!r} is not a percentage 1..100")
        if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
            problems.append(f"fold {fold!r} is not an index >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def use_transformer(self) -> bool:
        return self.init != "notransformer"
