"""Metrics against scikit-learn and hand computations."""

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, roc_auc_score

from medtx.metrics import dice, dice_brats, mae, mauc, regions_from_labels


def random_probs(rng, n, k):
    logits = rng.normal(size=(n, k))
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(3))
def test_mauc_matches_sklearn_ovo_macro(seed):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(3), rng.integers(0, 3, 57)])
    p = random_probs(rng, 60, 3)
    assert mauc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovo", average="macro"))


def test_mauc_is_hand_and_till_mean_of_pairwise_aucs():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), 10)
    p = random_probs(rng, 30, 3)
    pairs = []
    for i in range(3):
        for j in range(i + 1, 3):
            sel = np.isin(y, [i, j])
            a_ij = roc_auc_score(y[sel] == i, p[sel, i])
            a_ji = roc_auc_score(y[sel] == j, p[sel, j])
            pairs.append((a_ij + a_ji) / 2)
    assert mauc(y, p) == pytest.approx(np.mean(pairs))


def test_mauc_perfect_and_binary():
    y = np.array([0, 1, 2, 0, 1, 2])
    assert mauc(y, np.eye(3)[y]) == 1.0
    yb = np.array([0, 1, 1, 0])
    pb = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    assert mauc(yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]))


def test_mauc_names_missing_class():
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        mauc(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3))


def test_mae_matches_sklearn():
    rng = np.random.default_rng(0)
    t, p = rng.uniform(55, 90, 40), rng.uniform(55, 90, 40)
    assert mae(t, p) == pytest.approx(mean_absolute_error(t, p))
    with pytest.raises(ValueError, match="as many predictions"):
        mae(t, p[:3])


def test_regions_follow_brats_conventions():
    labels = np.array([0, 1, 2, 4])
    wt, tc, et = regions_from_labels(labels)
    assert wt.tolist() == [False, True, True, True]
    assert tc.tolist() == [False, True, False, True]
    assert et.tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match=r"found \[3\]"):
        regions_from_labels(np.array([0, 3]))


def test_dice_brats_on_hand_made_volume():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :2] = 1  # 2 voxels NCR
    labels[1, 0, :] = 2  # 4 voxels edema
    labels[2, 0, 0] = 4  # 1 voxel enhancing
    pred = regions_from_labels(labels).copy()
    pred[0, 3, 3, 3] = True  # one false-positive WT voxel: 2*7/(8+7)
    pred[1] = False  # TC missed entirely: 0
    got = dice_brats(pred, labels)
    assert got == pytest.approx({"WT": 14 / 15, "TC": 0.0, "ET": 1.0})


def test_dice_empty_cases():
    empty = np.zeros((2, 3), bool)
    one = empty.copy()
    one[0, 0] = True
    assert dice(empty, empty) == 1.0  # no tumour, none predicted: perfect
    assert dice(one, empty) == 0.0
    assert dice(empty, one) == 0.0
    no_et = np.zeros((3, 2, 2), np.uint8)
    assert dice_brats(np.zeros((3, 3, 2, 2), bool), no_et) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_dice_brats_checks_shapes():
    with pytest.raises(ValueError, match=r"\(3, \*labels.shape\)"):
        dice_brats(np.zeros((2, 4, 4), bool), np.zeros((4, 4), np.uint8))
