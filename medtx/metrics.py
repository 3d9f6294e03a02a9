"""Evaluation metrics of the paper's three tasks (Jun et al. 2021).

- Diagnosis (AD/MCI/CN): mAUC, Hand & Till's multi-class AUC (the mean over class
  pairs of the pairwise AUCs), as scikit-learn's one-vs-one macro average.
- Brain age: mean absolute error in years.
- BraTS segmentation: Dice of the three nested tumour regions, whole tumour
  WT = {1, 2, 4}, tumour core TC = {1, 4}, enhancing tumour ET = {4}.

Pure numpy and below training: fine-tuning selects its model by these and the
evaluation reports them, so both read one definition.
"""

from __future__ import annotations

import numpy as np

from medtx.domain import BRATS_REGIONS, regions_from_labels


def mauc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Hand & Till (2001) multi-class AUC of class probabilities.

    Args:
        y_true: (n,) integer class labels 0..K-1; every class must occur.
        probs: (n, K) class probabilities (softmax outputs; rows sum to 1).

    For K = 2 it is the ordinary ROC AUC of the class-1 probability.
    """
    # here, not at the top: 1.5 s of every training job's start, and only
    # classification needs it
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, K) with n = {y.shape[0]} labels, not {p.shape}")
    missing = sorted(set(range(p.shape[1])) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"mAUC needs every class among the labels; missing {missing}")
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(
        roc_auc_score(y, p, multi_class="ovo", average="macro", labels=np.arange(p.shape[1]))
    )


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error (years, for brain age)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"MAE needs as many predictions as targets: {p.size} vs {t.size}")
    return float(np.abs(t - p).mean())


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice 2|P∩T| / (|P| + |T|) of two binary masks; 1.0 when both are empty.

    Empty-vs-empty counts as a perfect score, as in the BraTS challenge's evaluation:
    a case without enhancing tumour where none is predicted is right, not undefined.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"Dice needs masks of one shape, got {p.shape} and {t.shape}")
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def dice_brats(pred_regions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Dice of WT, TC and ET for one case.

    Args:
        pred_regions: (3, X, Y, Z) binary predicted regions in the order WT, TC, ET
            (the segmentation head's channels after thresholding).
        labels: (X, Y, Z) ground-truth BraTS labels 0/1/2/4.
    """
    pred = np.asarray(pred_regions)
    truth = regions_from_labels(labels)
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred_regions must be (3, *labels.shape) = {truth.shape}, not {pred.shape}"
        )
    return {name: dice(p, t) for name, p, t in zip(BRATS_REGIONS, pred, truth)}
