"""Every output path of the workflow, written once for the rules and the library.

The ``.smk`` files build their patterns from these functions (with
``{dataset}``/``{scan}`` wildcards as arguments), and ``medtx preprocess``,
fine-tuning and evaluation use the same functions, so a file made either way
lands in the same place. File names follow BIDS derivatives where one applies.
"""

from __future__ import annotations

from pathlib import Path

from medtx.data.templates import TEMPLATE_NAME

SPACE = f"space-{TEMPLATE_NAME}"
# The T1 chain's steps, in order; each writes ``<scan>_step-<step>.json``.
T1_STEPS = ("bet", "flirt", "n4", "pool", "normalize")
# A scan's merged provenance record: ``<scan>_provenance.json``.
PROVENANCE_SUFFIX = "_provenance.json"


def t1_outputs(outdir: str | Path, scan: str) -> dict[str, str]:
    """Every file of the T1 chain for ``scan``, BIDS-derivatives style."""
    d = Path(outdir)
    p = f"{scan}_"
    names = {
        "bet_brain": f"{p}desc-brain_T1w.nii.gz",
        "bet_mask": f"{p}desc-brain_mask.nii.gz",
        "bet_xfm": f"{p}from-T1w_to-{TEMPLATE_NAME}_desc-init_xfm.mat",
        "bet_record": f"{p}step-bet.json",
        "flirt_brain": f"{p}{SPACE}_desc-brain_T1w.nii.gz",
        "flirt_mask": f"{p}{SPACE}_desc-brain_mask.nii.gz",
        "transform": f"{p}from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.mat",
        "flirt_record": f"{p}step-flirt.json",
        "n4": f"{p}{SPACE}_desc-n4_T1w.nii.gz",
        "n4_record": f"{p}step-n4.json",
        "pooled": f"{p}{SPACE}_res-2_desc-pooled_T1w.nii.gz",
        "brain_mask": f"{p}{SPACE}_res-2_desc-brain_mask.nii.gz",
        "pool_record": f"{p}step-pool.json",
        "preproc": f"{p}{SPACE}_res-2_desc-preproc_T1w.nii.gz",
        "normalize_record": f"{p}step-normalize.json",
        "provenance": f"{scan}{PROVENANCE_SUFFIX}",
        "qc_png": f"{p}qc.png",
    }
    return {k: str(d / v) for k, v in names.items()}


def step_records(files: dict[str, str]) -> list[str]:
    """The T1 chain's step records, in chain order (``t1_outputs``)."""
    return [files[f"{s}_record"] for s in T1_STEPS]


def record_manifest(outdir: str | Path, scan: str) -> str:
    """A scan's record manifest: the hash chain of its step records and merged record.

    It lives beside the records (``medtx.provenance.manifest`` says why one per scan).
    """
    return str(Path(outdir) / f"{scan}_manifest.jsonl")


def brats_outputs(outdir: str | Path, case: str) -> dict[str, str]:
    """Files the BraTS step and its provenance write for ``case``."""
    d = Path(outdir)
    names = {
        "image": f"{case}_desc-preproc_mri.nii.gz",
        "seg": f"{case}_desc-preproc_dseg.nii.gz",
        "record": f"{case}_step-brats.json",
        "provenance": f"{case}{PROVENANCE_SUFFIX}",
        "qc_png": f"{case}_qc.png",
    }
    return {k: str(d / v) for k, v in names.items()}


def preprocess_dir(results: str, dataset: str, scan: str) -> str:
    """A scan's working folder: every step's output, record and QC image (the
    audit reads them there)."""
    return f"{results}/work/{dataset}/{scan}"


def record_list(results: str, dataset: str) -> str:
    """A dataset's provenance records, one path per line: the one input the rules
    that read every scan depend on (medtx.workflow.argfile)."""
    return f"{results}/work/{dataset}.records.txt"


def derivatives(results: str, dataset: str) -> str:
    """A T1 dataset's BIDS-derivatives dataset: the chain's final images, linked
    from the working folders, with their sidecars."""
    return f"{results}/preprocess/{dataset}"


def scan_table(results: str, dataset: str) -> str:
    """The checked scan table of one dataset (and its per-file check cache)."""
    return f"{results}/scans/{dataset}.tsv"


def cache_paths(cache_dir: str | Path, dataset: str, scan: str) -> dict[str, str]:
    """A scan's training cache: the float16 image and (BraTS) the WT/TC/ET masks."""
    base = Path(cache_dir) / dataset / scan
    return {"image": f"{base}.npy", "regions": f"{base}_regions.npy"}


def cache_dir(results: str) -> str:
    return f"{results}/cache"


def cache_index(results: str, dataset: str) -> str:
    """The TSV that lists one dataset's caches: the one input fine-tuning depends on."""
    return f"{results}/cache/{dataset}.index.tsv"


def manifest(results: str, dataset: str, task: str) -> str:
    """A dataset x task fold manifest; its JSON sidecar has the same stem."""
    return f"{results}/folds/{dataset}_task-{task}_folds.tsv"


def manifest_sidecar(results: str, dataset: str, task: str) -> str:
    return f"{results}/folds/{dataset}_task-{task}_folds.json"


def firewall(results: str) -> str:
    return f"{results}/folds/firewall.json"


def pretrain_checkpoint(results: str, stage: str) -> str:
    """A pre-training stage's checkpoint (``medtx.domain.PRETRAIN_STAGES``: the names
    are unique across backbones)."""
    return f"{results}/pretrain/stage-{stage}.pt"


def finetune_dir(
    results: str,
    dataset: str,
    task: str,
    backbone: str,
    init: str,
    frac: str | int,
    fold: str | int,
) -> str:
    """One fine-tuning run: model.pt, predictions.tsv, metrics.json."""
    return (
        f"{results}/finetune/{dataset}/task-{task}/backbone-{backbone}"
        f"/init-{init}_frac-{frac}/fold-{fold}"
    )


def defaced(results: str, dataset: str, scan: str) -> dict[str, str]:
    """A scan's defaced native-space T1 for sharing and its provenance record."""
    base = f"{results}/share/{dataset}/{scan}/{scan}"
    return {"t1": f"{base}_desc-defaced_T1w.nii.gz", "record": f"{base}_step-deface.json"}


def tables_dir(results: str) -> str:
    return f"{results}/tables"


REPORT_INDEX = "index.html"


def report_dir(results: str) -> str:
    """The cohort provenance report: an entry page and the files it loads."""
    return f"{results}/reports/provenance"


def report(results: str) -> str:
    """The provenance report's entry page."""
    return f"{report_dir(results)}/{REPORT_INDEX}"
