"""Cohorts with a planted signal and a known ceiling: can a backbone learn a task at all?

A GPU-day spent on a model that cannot learn is lost; these cohorts tell in a
minute on a CPU. Each is made from the demo generator's anatomy (the ICBM 2009c
template and its CerebrA labels, ``medtx.data.demo``) in template space, so no
preprocessing is needed, written as the training cache is (float16 .npy,
min-max inside the brain), and each states the best score any model can reach:

- **classification**: CN, MCI and AD differ only by an atrophy severity (cortex,
  hippocampus and amygdala, ventricles: ``demo.apply_atrophy``) of 0, 1.5 and 3, plus
  Gaussian noise of SD 0.3. The image depends on the diagnosis only through the
  severity, so no score tells two classes apart better than the severity itself,
  whose AUC is Φ(Δ/(σ√2)); averaged over the pairs as Hand and Till's mAUC is, that
  bounds every model's (``classification_ceiling``: 0.9999). mAUC ranks, and one
  severity axis ranks three ordered classes easily: accuracy, which must also place
  the boundaries, has its bound too (``accuracy_ceiling``: 0.992).
- **regression**: ages uniform in [55, 90]; severity 0.1 per year over 55 plus noise of
  SD 0.1, so the image knows the age to 1 year (SD); the best predictor, the median
  of the age given the severity, has the MAE of ``regression_floor`` (0.8 years).
- **segmentation**: one tumour per case in four modalities, a necrotic core inside an
  enhancing rim inside edema (BraTS labels 1/4/2, turned into WT/TC/ET by the
  pipeline's own ``regions_from_labels``), with the demo's contrasts
  (``demo.TUMOUR_CONTRAST``) and sizes stated in ``TUMOUR``, painted on the
  training grid itself without partial volume. Every compartment differs from its
  neighbours by many noise SDs in some modality, so the labels are a function of
  the image: Dice 1 is reachable.

Besides the signal, every volume has its own nuisance: Gaussian noise (SD
``NOISE`` of white matter) and a smooth multiplicative bias field, drawn
independently of the label, so they move no ceiling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from medtx.data import demo
from medtx.domain import BRATS_MODALITIES, REGION_NAMES, regions_from_labels
from medtx.errors import ConfigError
from medtx.preprocess.intensity import average_pool, minmax

#: The training grid: the template (1 mm) average-pooled by this factor. 6 gives the
#: demo's 32x38x32 input (its cache of 96x114x96 with ``downsample: 3``).
POOL = 6
#: Segmentation: a finer grid, cropped to the brain, so that the enhancing rim
#: is two voxels thick (4 mm voxels, 40x48x40).
SEGMENTATION_POOL = 4
SEGMENTATION_SHAPE = (40, 48, 40)

#: Classification: severity by diagnosis, and the SD of its per-subject noise.
CLASS_SEVERITY = {"CN": 0.0, "MCI": 1.5, "AD": 3.0}
CLASS_SEVERITY_SD = 0.3
#: Regression: the age range, severity per year over its start, and the noise SD.
AGE_RANGE = (55.0, 90.0)
SEVERITY_PER_YEAR = 0.1
AGE_SEVERITY_SD = 0.1
#: Nuisance on every volume: noise SD (white matter = 1) and the bias field's log peak.
NOISE = 0.03
BIAS_LOG_PEAK = 0.05
#: Tumour sizes, in voxels of the segmentation grid (4 mm): the core's radius, the
#: enhancing rim's thickness, the edema's reach beyond the core.
TUMOUR = {"core_radius": (4.0, 6.0), "rim": (2.0, 2.5), "edema": (2.0, 3.0)}

TASK_METRIC = {"classification": "mauc", "regression": "mae", "segmentation": "dice"}


class Ceiling(NamedTuple):
    """The best a metric can be on a cohort (a floor for an error), what a model that
    learned nothing scores, and why."""

    metric: str
    best: float
    chance: float
    why: str


class PlantedCohort(NamedTuple):
    """Items as ``medtx.train.data.manifest_items`` gives them ("scan", "subject",
    "image", "label" or "seg"), each with its drawn "truth"; and the ceilings."""

    task: str
    items: list[dict[str, Any]]
    ceilings: dict[str, Ceiling]


def classification_ceiling(
    severity: dict[str, float] = CLASS_SEVERITY, sd: float = CLASS_SEVERITY_SD
) -> float:
    """An upper bound on Hand and Till's mAUC of any model of the cohort.

    Two classes whose severities are N(μi, σ²) and N(μj, σ²) are best ranked by the
    severity itself (their likelihood ratio is monotone in it, and no ranking beats
    the likelihood ratio's AUC), which is P(s_j > s_i) = Φ(|μj - μi| / (σ√2)); mAUC
    averages its pairs. A model's one score per class cannot rank every pair that
    well at once, so the posterior falls a little short (at σ = 1: 0.864 against
    0.898; at the cohort's σ = 0.3: 0.9998 against 0.9999).
    """
    means = list(severity.values())
    pairs = [(a, b) for i, a in enumerate(means) for b in means[i + 1 :]]
    return float(np.mean([stats.norm.cdf(abs(a - b) / (sd * math.sqrt(2))) for a, b in pairs]))


def accuracy_ceiling(
    severity: dict[str, float] = CLASS_SEVERITY, sd: float = CLASS_SEVERITY_SD
) -> float:
    """The accuracy of the Bayes classifier that knows the severity (equal priors and
    SDs: the class whose mean is nearest), which no model of the images beats."""
    means = sorted(severity.values())
    edges = [-math.inf, *((a + b) / 2 for a, b in zip(means, means[1:])), math.inf]
    return float(
        np.mean(
            [
                stats.norm.cdf((hi - m) / sd) - stats.norm.cdf((lo - m) / sd)
                for m, lo, hi in zip(means, edges, edges[1:])
            ]
        )
    )


@functools.cache
def regression_floor(
    ages: tuple[float, float] = AGE_RANGE,
    per_year: float = SEVERITY_PER_YEAR,
    sd: float = AGE_SEVERITY_SD,
    draws: int = 200_000,
) -> float:
    """The MAE of the best brain-age predictor: the median age given the severity.

    With a uniform age prior the age given s is a normal of SD sd/per_year around
    (s/per_year + start), truncated to the range; its median's MAE is about
    0.8 x that SD inside the range and less near its ends. Computed over ``draws``
    fixed-seed draws (±0.01 year).
    """
    rng = np.random.default_rng(0)
    lo, hi = ages
    age = rng.uniform(lo, hi, draws)
    centre = lo + (per_year * (age - lo) + rng.normal(0.0, sd, draws)) / per_year
    scale = sd / per_year
    median = stats.truncnorm.median((lo - centre) / scale, (hi - centre) / scale, centre, scale)
    return float(np.mean(np.abs(age - median)))


def _check_size(n: int, least: int, what: str) -> None:
    if not isinstance(n, int) or n < least:
        raise ConfigError(f"a planted {what} cohort needs n >= {least}, not {n!r}")


@functools.cache
def _t1_grid(pool: int) -> np.ndarray:
    """The template brain's mask pooled to the training grid."""
    return average_pool(demo.template().mask.astype(np.float32), pool) > 0.5


def _nuisance(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth bias field and Gaussian noise, neither tied to any label."""
    field = np.exp(demo.smooth_field(image.shape, rng, 3, BIAS_LOG_PEAK))
    return image * field + np.float32(NOISE) * rng.standard_normal(image.shape, np.float32)


def _t1_volume(severity: float, rng: np.random.Generator, pool: int) -> np.ndarray:
    """The template brain after atrophy of ``severity``, on the training grid, (1, X, Y, Z)."""
    tpl = demo.template()
    t1, _ = demo.apply_atrophy(tpl.t1, tpl.labels, severity, demo.template_atrophy_maps())
    brain = _t1_grid(pool)
    image = _nuisance(average_pool(t1 * tpl.mask, pool) / np.float32(tpl.wm_t1), rng)
    return minmax(image, brain)[None]


def _save(out: Path, name: str, array: np.ndarray) -> str:
    path = out / f"{name}.npy"
    np.save(path, array)
    return str(path)


def _t1_cohort(
    task: str,
    out: str | Path,
    n: int,
    seed: int,
    pool: int,
    draw: Callable[[int, np.random.Generator], tuple[Any, float, dict[str, Any]]],
) -> list[dict[str, Any]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        scan = f"{task[:3]}{i:03d}"
        rng = demo.stream(seed, scan, f"planted-{task}")
        label, severity, truth = draw(i, rng)
        image = _t1_volume(severity, rng, pool).astype(np.float16)
        items.append(
            {
                "scan": scan,
                "subject": scan,
                "image": _save(out, scan, image),
                "label": label,
                "truth": {**truth, "severity": round(severity, 4)},
            }
        )
    return items


def classification_cohort(
    out: str | Path,
    *,
    n: int = 60,
    seed: int = 0,
    pool: int = POOL,
    severity: dict[str, float] = CLASS_SEVERITY,
) -> PlantedCohort:
    """CN/MCI/AD in equal shares, in turn (so any split by turn keeps them balanced);
    labels 0/1/2 in ``severity``'s order (a smaller gap between its values: a harder
    cohort, with its ceilings computed for it)."""
    _check_size(n, len(severity), "classification")
    names = list(severity)

    def draw(i: int, rng: np.random.Generator) -> tuple[Any, float, dict[str, Any]]:
        k = i % len(names)
        s = severity[names[k]] + rng.normal(0.0, CLASS_SEVERITY_SD)
        return k, max(s, 0.0), {"diagnosis": names[k]}

    items = _t1_cohort("classification", out, n, seed, pool, draw)
    why = f"severity {severity} + N(0, {CLASS_SEVERITY_SD}²): pairwise Φ(Δ/(σ√2)), averaged"
    return PlantedCohort(
        "classification",
        items,
        {
            "mauc": Ceiling("mauc", classification_ceiling(severity), 0.5, why),
            "accuracy": Ceiling(
                "accuracy",
                accuracy_ceiling(severity),
                1 / len(names),
                "the nearest class mean to the severity",
            ),
        },
    )


def regression_cohort(
    out: str | Path, *, n: int = 45, seed: int = 0, pool: int = POOL
) -> PlantedCohort:
    """Ages spread evenly over ``AGE_RANGE`` with a random offset each (so every
    split by turn spans the range); the label is the age in years."""
    _check_size(n, 2, "regression")
    lo, hi = AGE_RANGE
    order = np.random.default_rng(seed).permutation(n)

    def draw(i: int, rng: np.random.Generator) -> tuple[Any, float, dict[str, Any]]:
        age = round(float(lo + (order[i] + rng.uniform()) * (hi - lo) / n), 2)
        s = SEVERITY_PER_YEAR * (age - lo) + rng.normal(0.0, AGE_SEVERITY_SD)
        return age, max(s, 0.0), {"age": age}

    items = _t1_cohort("regression", out, n, seed, pool, draw)
    ages = np.array([i["label"] for i in items])
    why = (
        f"severity {SEVERITY_PER_YEAR}/year + N(0, {AGE_SEVERITY_SD}²): the median age "
        "given the severity"
    )
    return PlantedCohort(
        "regression",
        items,
        {
            "mae": Ceiling(
                "mae",
                regression_floor(),
                float(np.mean(np.abs(ages - np.median(ages)))),
                why,
            )
        },
    )


@functools.cache
def _segmentation_base() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Normal-brain contrasts on the cropped 4 mm grid, its brain, and the
    template-voxel -> grid-voxel map (the crop centred on the brain)."""
    tpl = demo.template()
    t2, _ = demo.template_t2()
    pool = SEGMENTATION_POOL
    mask = average_pool(tpl.mask.astype(np.float32), pool) > 0.5
    idx = np.argwhere(mask)
    centre = (idx.min(0) + idx.max(0) + 1) / 2.0
    start = np.round(centre - np.array(SEGMENTATION_SHAPE) / 2).astype(int)
    if (start < 0).any() or (start + SEGMENTATION_SHAPE > np.array(mask.shape)).any():
        raise ConfigError(f"the crop {SEGMENTATION_SHAPE} does not fit the pooled template")
    box = tuple(slice(a, a + s) for a, s in zip(start, SEGMENTATION_SHAPE))
    base = demo.brain_contrasts(
        average_pool(tpl.t1 * tpl.mask, pool)[box],
        average_pool(t2 * tpl.mask, pool)[box],
        mask[box],
    )
    to_grid = np.diag([1.0 / pool] * 3 + [1.0])
    to_grid[:3, 3] = -(pool - 1) / (2.0 * pool) - start
    return base, mask[box], to_grid


def _tumour(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """BraTS labels (0/1/2/4) of one tumour on the segmentation grid, and its draws."""
    base, brain, to_grid = _segmentation_base()
    sites = demo.tumour_sites()
    tpl = demo.template()
    world = sites[int(rng.integers(len(sites)))]
    centre = (to_grid @ np.linalg.inv(tpl.affine) @ [*world, 1.0])[:3]
    r = float(rng.uniform(*TUMOUR["core_radius"]))
    rim = float(rng.uniform(*TUMOUR["rim"]))
    reach = float(rng.uniform(*TUMOUR["edema"]))
    axes = rng.uniform(0.8, 1.2, 3)
    grid = np.moveaxis(np.indices(brain.shape), 0, -1).astype(np.float32) - centre
    rho = np.linalg.norm(grid / axes, axis=-1)  # voxels from the centre, axes stretched
    # edema spreads through tissue, not into the ventricles or sulci
    tissue = brain & (base["t1"] > demo.template().csf_t1 / tpl.wm_t1 + 0.3)
    seg = np.zeros(brain.shape, np.uint8)
    seg[(rho <= r + reach) & tissue] = demo.BRATS_LABELS["edema"]
    seg[(rho <= r) & brain] = demo.BRATS_LABELS["enhancing"]
    seg[(rho <= r - rim) & brain] = demo.BRATS_LABELS["necrosis"]
    draws = {
        "centre_voxel": np.round(centre, 2).tolist(),
        "core_radius": round(r, 3),
        "rim": round(rim, 3),
        "edema": round(reach, 3),
    }
    return seg, draws


def _paint(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(4, X, Y, Z) modalities: each compartment takes its demo contrast, no partial volume."""
    base, brain, _ = _segmentation_base()
    label = demo.BRATS_LABELS
    channels = []
    for m in BRATS_MODALITIES:
        ncr, enh, ed = demo.TUMOUR_CONTRAST[m]
        img = base[m].copy()
        img[seg == label["edema"]] *= ed
        img[seg == label["enhancing"]] = enh
        img[seg == label["necrosis"]] = ncr
        channels.append(minmax(_nuisance(img, rng), brain))
    return np.stack(channels)


def segmentation_cohort(out: str | Path, *, n: int = 36, seed: int = 0) -> PlantedCohort:
    """One tumour per case (``TUMOUR``'s sizes) on the 4 mm grid cropped to the brain."""
    _check_size(n, 1, "segmentation")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        scan = f"seg{i:03d}"
        rng = demo.stream(seed, scan, "planted-segmentation")
        seg, draws = _tumour(rng)
        regions = regions_from_labels(seg).astype(np.uint8)
        names = REGION_NAMES
        items.append(
            {
                "scan": scan,
                "subject": scan,
                "image": _save(out, scan, _paint(seg, rng).astype(np.float16)),
                "seg": _save(out, f"{scan}_regions", regions),
                "label": "",
                "truth": {**draws, **{f"{r}_voxels": int(v.sum()) for r, v in zip(names, regions)}},
            }
        )
    why = "each compartment has its own contrast, drawn on the training grid: Dice 1 reachable"
    return PlantedCohort(
        "segmentation",
        items,
        {f"dice_{r}": Ceiling(f"dice_{r}", 1.0, 0.0, why) for r in REGION_NAMES},
    )


COHORTS = {
    "classification": classification_cohort,
    "regression": regression_cohort,
    "segmentation": segmentation_cohort,
}
