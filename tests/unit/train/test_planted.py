"""The planted cohorts say what they plant: ceilings checked against draws, the signal
seen in the images, the tumours' compartments told apart by their contrasts."""

import math

import numpy as np
import pytest
from scipy import stats

from medtx.metrics import mauc
from medtx.train import planted


def test_classification_ceiling_bounds_the_mauc_of_the_classifier_that_knows_the_severity():
    rng = np.random.default_rng(1)
    means = np.array(list(planted.CLASS_SEVERITY.values()))
    y = np.repeat(np.arange(3), 20_000)
    for sd in (1.0, planted.CLASS_SEVERITY_SD):  # 1.0: a ceiling with room below 1
        s = rng.normal(means[y], sd)
        ceiling = planted.classification_ceiling(planted.CLASS_SEVERITY, sd)
        # each pair ranked by the severity itself reaches the stated pairwise AUC
        pairs = []
        for i, j in ((0, 1), (0, 2), (1, 2)):
            lo, hi = s[y == i], s[y == j]
            pairs.append(stats.mannwhitneyu(hi, lo).statistic / (len(lo) * len(hi)))
        assert np.mean(pairs) == pytest.approx(ceiling, abs=0.003)
        # the Bayes posterior, one score per class, does not beat it
        likelihood = stats.norm.pdf(s[:, None], means[None, :], sd)
        probs = likelihood / likelihood.sum(axis=1, keepdims=True)
        assert mauc(y, probs) <= ceiling + 0.001
        # and its accuracy, the class of the nearest mean, is the stated one
        accuracy = (np.abs(s[:, None] - means[None, :]).argmin(axis=1) == y).mean()
        assert accuracy == pytest.approx(
            planted.accuracy_ceiling(planted.CLASS_SEVERITY, sd), abs=0.005
        )
    assert mauc(y, probs) > 0.999  # at the cohort's SD the bound is reached


def test_regression_floor_is_the_half_normal_mae_away_from_the_range_ends():
    # far from the ends the age given the severity is N(., sd / rate): MAE sd/rate * sqrt(2/pi)
    wide = planted.regression_floor((0.0, 2000.0), 0.1, 0.1)
    assert wide == pytest.approx(math.sqrt(2 / math.pi), abs=0.01)
    floor = planted.regression_floor()
    assert 0.7 < floor < math.sqrt(2 / math.pi)  # the ends know the age better


@pytest.fixture(scope="module")
def t1_cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {
        "classification": planted.classification_cohort(root / "c", n=9, seed=3),
        "regression": planted.regression_cohort(root / "r", n=8, seed=3),
    }


def csf_fraction(item):
    """The fraction of the brain darker than 0.4: CSF, which atrophy enlarges."""
    image = np.load(item["image"]).astype(np.float64)
    return float((image[image > 0] < 0.4).mean())


def test_t1_cohorts_carry_their_signal_in_the_image(t1_cohorts):
    cls = t1_cohorts["classification"]
    assert [i["label"] for i in cls.items] == [0, 1, 2] * 3
    assert [i["truth"]["diagnosis"] for i in cls.items[:3]] == ["CN", "MCI", "AD"]
    image = np.load(cls.items[0]["image"])
    assert image.shape == (1, 32, 38, 32) and image.dtype == np.float16
    # atrophy turns tissue into CSF: the dark fraction grows with the severity
    for cohort in t1_cohorts.values():
        severity = [i["truth"]["severity"] for i in cohort.items]
        rho = stats.spearmanr(severity, [csf_fraction(i) for i in cohort.items])[0]
        assert rho > 0.85, (cohort.task, rho)
    ages = sorted(i["label"] for i in t1_cohorts["regression"].items)
    lo, hi = planted.AGE_RANGE
    width = (hi - lo) / len(ages)
    assert all(lo + k * width <= a <= lo + (k + 1) * width for k, a in enumerate(ages))


def test_a_cohort_is_the_same_bytes_for_the_same_seed(tmp_path, t1_cohorts):
    again = planted.classification_cohort(tmp_path, n=9, seed=3)
    for a, b in zip(again.items, t1_cohorts["classification"].items):
        assert np.array_equal(np.load(a["image"]), np.load(b["image"]))
        assert a["truth"] == b["truth"]


def test_tumour_compartments_are_nested_sized_and_told_apart_by_contrast(tmp_path):
    cohort = planted.segmentation_cohort(tmp_path, n=3, seed=5)
    for item in cohort.items:
        image = np.load(item["image"]).astype(np.float64)
        wt, tc, et = np.load(item["seg"]).astype(bool)
        assert image.shape == (4, *planted.SEGMENTATION_SHAPE)
        assert (tc <= wt).all() and (et <= tc).all()  # WT ⊇ TC ⊇ ET
        necrosis, edema = tc & ~et, wt & ~tc
        lo, hi = planted.TUMOUR["core_radius"]
        volume = 4 / 3 * math.pi * np.array([lo, hi]) ** 3
        assert 0.5 * volume[0] < tc.sum() < 1.5 * volume[1]
        assert necrosis.sum() > 0 and et.sum() > 0 and edema.sum() > 0
        brain = image[0] > 0
        parts = {"tissue": brain & ~wt, "edema": edema, "rim": et, "necrosis": necrosis}
        means = {k: image[:, v].mean(axis=1) for k, v in parts.items()}
        noise = image[:, necrosis].std(axis=1).max()  # a flat compartment: noise only
        for a, b in (("tissue", "edema"), ("edema", "rim"), ("rim", "necrosis")):
            assert np.abs(means[a] - means[b]).max() > 8 * noise, (a, b)
    assert {c.best for c in cohort.ceilings.values()} == {1.0}
