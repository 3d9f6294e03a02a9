"""The fine-tuned models learn the demo's anatomy: a small run of the real stages.

Brains in template space with the demo generator's own atrophy draws skip the
preprocessing (about 25 s a scan), so 30 subjects train in seconds; their labels
follow the anatomy exactly as the demo cohort's do. A classifier that cannot beat
chance, or a brain-age model that cannot beat the training mean, fails here.
"""

import numpy as np
import pytest

from medtx.data import demo
from medtx.preprocess.intensity import average_pool, minmax
from medtx.train.finetune import finetune

pytestmark = pytest.mark.slow

LABELS = {"CN": 0, "MCI": 1, "AD": 2}
SPEC = {"n_subjects": 30, "seed": 5, "age": [55, 90], "prefix": "s"}
CONFIG = {
    "downsample": 4,
    "epochs": 20,
    "patience": 20,
    "lr": 3e-4,
    "batch_size": 2,
    "threads": 1,
    "num_workers": 0,  # 20 validations: worker start-up would dominate at this size
    "seed": 42,
    "label_map": LABELS,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(rows, items): one 96x114x96 float16 cache per subject; roles train/val/test by turn."""
    root = tmp_path_factory.mktemp("learn")
    tpl, maps = demo.template(), demo.template_atrophy_maps()
    brain = average_pool(tpl.mask.astype(np.float32), 2) > 0.5
    rows = demo.plan_t1_cohort(SPEC)
    items = {"train": [], "val": [], "test": []}
    for i, row in enumerate(rows):
        acq = demo.t1_acquisition(row, SPEC)
        t1, _ = demo.apply_atrophy(
            tpl.t1, tpl.labels, acq["severity"], maps, ventricle_severity=acq["ventricle_severity"]
        )
        volume = minmax(average_pool(t1 * tpl.mask, 2), brain)
        path = root / f"{row['subject']}.npy"
        np.save(path, volume[None].astype(np.float16))
        items[("train", "val", "test")[i % 3]].append(
            {"scan": row["subject"], "subject": row["subject"], "image": str(path), "row": row}
        )
    return root, items


def labelled(items, key):
    return [{**i, "label": key(i["row"])} for i in items]


def run(tmp_path, cohort, task, key):
    _, items = cohort
    sets = [labelled(items[r], key) for r in ("train", "val", "test")]
    result = finetune(
        task,
        *sets,
        out=tmp_path / f"{task}.pt",
        predictions_out=tmp_path / f"{task}.tsv",
        config=CONFIG,
        log=lambda _: None,
    )
    return sets, result.extra["metrics"]


def test_classifier_beats_chance(tmp_path, cohort):
    _, metrics = run(tmp_path, cohort, "classification", lambda r: LABELS[r["diagnosis"]])
    assert metrics["mauc"] > 0.6, metrics


def test_brain_age_beats_the_training_mean(tmp_path, cohort):
    (train, _, test), metrics = run(tmp_path, cohort, "regression", lambda r: r["age"])
    mean = np.mean([i["label"] for i in train])
    baseline = np.mean([abs(i["label"] - mean) for i in test])
    assert metrics["mae"] < baseline, (metrics, baseline)
