"""A T1 dataset's preprocessing as a BIDS-derivatives dataset.

The chain works in one folder per scan (``paths.preprocess_dir``), where every
step's image, record and QC image sit side by side for the audit. What users and
other BIDS tools read is this dataset instead: the chain's final images in
``sub-<id>/[ses-<id>/]anat/``, hard-linked from the working folders (no second
copy on disk), each with the sidecar BIDS asks for (``SkullStripped``,
``Resolution``, ``Type``, ``Sources``), and a ``dataset_description.json`` whose
``GeneratedBy`` names medtx, its version and the code hash of the chain. The
transforms (ITK ``.mat``, a format BIDS does not list) and the QC figures are
kept and named in ``.bidsignore``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtx import __version__
from medtx.data.scan_ids import scan_identity
from medtx.data.scans import read_scan_table
from medtx.data.templates import TEMPLATE_NAME
from medtx.errors import MedtxError
from medtx.io import link_or_copy, write_json, write_text
from medtx.workflow.paths import PROVENANCE_SUFFIX, t1_outputs

BIDS_VERSION = "1.10.0"
FIGURES = "figures"
BIDSIGNORE = ("*_xfm.mat", f"**/{FIGURES}")  # the validator matches no trailing "/"
SPACE_NOTE = f"the {TEMPLATE_NAME} template (ICBM 2009c nonlinear symmetric), 1 mm grid"

# The chain's outputs that form the dataset: t1_outputs key -> what the image is.
# The pre-N4 registered brain and the pooled image before normalization are
# intermediate and stay in the working folder.
IMAGES: dict[str, str] = {
    "bet_brain": "Brain-extracted T1w in the scan's own space.",
    "bet_mask": "Brain mask in the scan's own space.",
    "flirt_mask": f"Brain mask registered to {SPACE_NOTE}.",
    "n4": f"Brain registered affinely to {SPACE_NOTE}, N4 bias-corrected.",
    "brain_mask": "Brain mask on the model's pooled grid.",
    "preproc": "The model-ready volume: the N4-corrected brain pooled and intensity-normalized.",
}
TRANSFORM = "transform"
# What each image was computed from: None is the raw scan.
SOURCES: dict[str, str | None] = {
    "bet_brain": None,
    "bet_mask": None,
    "n4": "bet_brain",
    "flirt_mask": "bet_mask",
    "brain_mask": "flirt_mask",
    "preproc": "n4",
}


def scan_folder(scan: str) -> str:
    """``sub-<id>[/ses-<id>]/anat``: where BIDS puts a scan's anatomical files."""
    who = scan_identity(scan)
    session = f"/ses-{who['session']}" if who["session"] else ""
    return f"sub-{who['subject']}{session}/anat"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(src, dst)


def _resolution(factor: int) -> str:
    mm = f"{factor} mm isotropic"
    return (
        f"{mm}: the 1 mm template grid average-pooled by {factor} (the label 'res-2' "
        "names the model's pooled grid, whatever its factor)"
    )


def _sidecar(key: str, source: str, work: Mapping[str, str], folder: str, factor: int) -> dict:
    """The sidecar of one linked image: what BIDS requires for its suffix and entities."""
    name = Path(work[key]).name
    side: dict[str, Any] = {"Description": IMAGES[key]}
    if name.endswith("_T1w.nii.gz"):
        side["SkullStripped"] = True
    else:
        side["Type"] = "Brain"
    if "_res-" in name:
        side["Resolution"] = _resolution(factor)
    if "_space-" not in name:
        side["SpatialReference"] = source
    parent = SOURCES[key]
    side["Sources"] = [source if parent is None else f"bids::{folder}/{Path(work[parent]).name}"]
    return side


def _source_uri(t1: str, root: Path | None) -> str:
    """The raw scan as a BIDS URI into the source dataset, or a file URI."""
    path = Path(t1).resolve()
    if root is not None and path.is_relative_to(root):
        return f"bids:raw:{path.relative_to(root).as_posix()}"
    return path.as_uri()


def _readme(dataset: str, n: int, factor: int) -> str:
    example = t1_outputs(".", "sub-X")
    names = "\n".join(
        f"- `{Path(example[k]).name}`: {IMAGES.get(k, 'the affine to the template (ITK)')}"
        for k in (*IMAGES, TRANSFORM)
    )
    return (
        f"# medtx preprocessing of `{dataset}`\n\n"
        f"{n} T1-weighted scans, preprocessed by medtx {__version__}. Per scan, in "
        "`sub-<id>/[ses-<id>/]anat/` (shown for a scan `sub-X`):\n\n"
        f"{names}\n\n"
        f"The pooled grid (`res-2`) is {factor} mm. Each image's sidecar says what it is "
        "and what it was computed from. The `.mat` transforms are in ITK's format (ANTs, "
        f"antspyx); `sub-<id>/{FIGURES}/` holds the QC images. The provenance of every "
        "step (commands, versions, checksums, QC metrics) is in the working folders "
        "(`results/work/`), where `medtx audit` checks it.\n"
    )


def build_derivatives(
    dataset: str,
    records: list[str],
    scan_table: str | Path,
    out_dir: str | Path,
    *,
    source_root: str | Path | None,
    factor: int,
    code: str,
) -> Path:
    """Write ``out_dir`` as the BIDS-derivatives dataset of ``dataset``'s scans.

    Args:
        dataset: the dataset's name in the config.
        records: each scan's ``<scan>_provenance.json``, in its working folder.
        scan_table: the dataset's checked scan table (each scan's raw file).
        out_dir: the dataset to write (Snakemake removes it before a rerun).
        source_root: the raw BIDS dataset's root, for ``Sources`` as BIDS URIs;
            None for a table-listed dataset (file URIs).
        factor: the pooling factor (the ``res-2`` grid's voxel size in mm).
        code: the code hash of the chain that made the images.
    """
    out = Path(out_dir)
    table = read_scan_table(scan_table).set_index("scan")
    root = Path(source_root).resolve() if source_root else None
    for record in map(Path, records):
        scan = record.name.removesuffix(PROVENANCE_SUFFIX)
        if scan not in table.index:
            raise MedtxError(f"{record}: scan {scan} is not in {scan_table}")
        work = t1_outputs(record.parent, scan)
        folder = scan_folder(scan)
        source = _source_uri(table.at[scan, "t1"], root)
        for key in (*IMAGES, TRANSFORM):
            src = Path(work[key])
            if not src.is_file():
                raise MedtxError(
                    f"{src}: missing (scan {scan} of {dataset}); run again with --forcerun"
                    f" {record}: its job rebuilds the missing files and keeps the others"
                )
            dst = out / folder / src.name
            _link(src, dst)
            if key in IMAGES:
                sidecar = _sidecar(key, source, work, folder, factor)
                write_json(sidecar, str(dst).removesuffix(".nii.gz") + ".json")
        thumbnail = Path(work["qc_png"])
        if thumbnail.is_file():
            _link(thumbnail, out / Path(folder).parent / FIGURES / thumbnail.name)

    description: dict[str, Any] = {
        "Name": f"medtx preprocessing of {dataset}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "medtx",
                "Version": __version__,
                "Description": "T1 chain: brain extraction, affine registration, N4, "
                "pooling, intensity normalization",
                "CodeHash": code,
            }
        ],
    }
    if root is not None:
        description["SourceDatasets"] = [{"URL": root.as_uri()}]
        description["DatasetLinks"] = {"raw": root.as_uri()}
    write_json(description, out / "dataset_description.json")
    write_text(_readme(dataset, len(records), factor), out / "README.md")
    write_text("\n".join(BIDSIGNORE) + "\n", out / ".bidsignore")
    return out


def pool_factor(settings: Mapping[str, Any]) -> int:
    """The pooling factor of the preprocessing settings (``pool: {factor: 2}``)."""
    try:
        return int(settings["pool"]["factor"])
    except (KeyError, TypeError, ValueError) as err:
        raise MedtxError(f"preprocess settings: no integer pool/factor ({err})") from err
