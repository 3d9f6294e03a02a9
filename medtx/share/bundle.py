"""Self-describing model bundles: the format, and ``load_bundle``, which checks one.

A bundle is a folder another lab can use without this study's results folder
(``medtx export`` writes one, ``medtx.share.export``). It holds a fine-tuned
fold ensemble, for ``medtx predict``, or a pre-trained encoder, to fine-tune
from (``train: {init_from: ...}``):

- ``bundle.json``: what the models are and what their inputs must be (backbone
  and model arguments, task and label map, the preprocessing settings and
  backend that made the training inputs with the study's seed and QC
  thresholds, input shape and intensity convention, the training data's
  subject-list sha256, each fold's test metrics (and for brain age its
  validation-fitted age-bias correction), the code version and hashes); an
  encoder lists the sha256 of each pre-training subject's id instead of metrics;
- ``fold-<k>.safetensors`` (each fold's weights) or ``encoder.safetensors``;
- ``MANIFEST.sha256``: the sha256 of every other file, in ``sha256sum`` format
  (``sha256sum -c MANIFEST.sha256`` checks it without medtx).

Loading verifies the manifest first and refuses a bundle with a changed,
missing or unlisted file, naming it: weights that differ from their record
would give other predictions without saying so. This module imports no model
or training code, so the leakage firewall can read bundles without its code
hash following the models'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtx.errors import ConfigError, MedtxError

FORMAT = "medtx-bundle/1"
META = "bundle.json"
MANIFEST = "MANIFEST.sha256"
#: A bundle holds a fine-tuned fold ensemble (``medtx predict``) or a pre-trained
#: encoder (``train: {init_from: ...}``).
ENSEMBLE, ENCODER = "fold-ensemble", "pretrained-encoder"
ENCODER_WEIGHTS = "encoder.safetensors"


class BundleError(MedtxError):
    """A bundle that cannot be written or trusted; the message names the file."""


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]

    def require(self, kind: str) -> None:
        if self.meta.get("kind", ENSEMBLE) != kind:
            raise BundleError(
                f"{self.path}: holds a {self.meta.get('kind', ENSEMBLE)}, not a {kind}"
                + (" (export a pre-training checkpoint)" if kind == ENCODER else "")
            )

    def encoder_state(self) -> dict:
        """A pre-trained encoder's state dict, read from the verified weights."""
        from safetensors.torch import load_file

        self.require(ENCODER)
        return load_file(str(self.path / ENCODER_WEIGHTS))

    def as_checkpoint(self) -> dict[str, Any]:
        """The encoder as ``medtx.train.checkpoints.load_pretrained`` reads a checkpoint;
        its ``sha256`` is the manifest's, which covers every file."""
        from medtx.io import sha256

        keys = ("model_kwargs", "trained", "stage", "preset")
        return {
            "model": self.encoder_state(),
            "metadata": {k: self.meta.get(k) for k in keys},
            "sha256": sha256(self.path / MANIFEST),
        }


def encoder_bundles(paths: Any, backbones: Any) -> dict[str, str]:
    """``train/init_from``: backbone -> encoder bundle folder, each verified first."""
    out: dict[str, str] = {}
    for path in paths or []:
        bundle = load_bundle(path)
        bundle.require(ENCODER)
        backbone = str(bundle.meta.get("backbone"))
        if backbone in out:
            raise ConfigError(
                f"train/init_from: {path} and {out[backbone]} are both {backbone} encoders;"
                " give one per backbone"
            )
        if backbone not in backbones:
            raise ConfigError(
                f"train/init_from: {path} is a {backbone} encoder, but train/backbones is"
                f" {list(backbones)}"
            )
        out[backbone] = str(path)
    return out


def ensemble_bundles(paths: Any, preprocess_hash: str) -> dict[str, str]:
    """``predict/bundle``: name (the folder's) -> fold-ensemble bundle, each verified
    and trained on T1 inputs preprocessed as this config does (``preprocess_hash``),
    so the workflow's own model-ready volumes are what the bundle expects."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    out: dict[str, str] = {}
    for path in paths:
        bundle = load_bundle(path)
        bundle.require(ENSEMBLE)
        name = Path(path).name
        if name in out:
            raise ConfigError(f"predict/bundle: {path} and {out[name]} share the folder name")
        if bundle.meta["task"] == "segmentation":
            raise ConfigError(
                f"predict/bundle: {path} segments BraTS cases; run `medtx predict` on the case"
                " folders (the workflow predicts from T1 datasets)"
            )
        recorded = (bundle.meta.get("preprocessing") or {}).get("hash")
        if recorded != preprocess_hash:
            raise ConfigError(
                f"predict/bundle: {path} was trained on inputs preprocessed with settings hash"
                f" {recorded}, this config's is {preprocess_hash}: set `preprocess` as the"
                f" bundle's {META} records, or run `medtx predict` (it uses the bundle's)"
            )
        out[name] = str(path)
    return out


def check_predict_plan(datasets: Any, bundles: Mapping[str, str]) -> None:
    """Role predict and predict/bundle go together."""
    if datasets and not bundles:
        raise ConfigError(
            f"datasets {', '.join(datasets)} have role predict, but predict/bundle names no"
            " bundle (medtx export of a fine-tuned run)"
        )
    if bundles and not datasets:
        raise ConfigError("predict/bundle is set, but no dataset has role predict")


def subject_digest(subject: str) -> str:
    """sha256 of a ``dataset:subject`` id, as encoder bundles list their subjects."""
    return sha256_text(subject)


def sha256_text(text: str) -> str:

    return hashlib.sha256(text.encode()).hexdigest()


def load_bundle(path: str | Path) -> Bundle:
    """A verified bundle: the manifest first, then ``bundle.json``."""
    path = Path(path)
    verify_manifest(path)
    meta = read_json(path / META)
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path / META}: format {meta.get('format')!r}, not {FORMAT!r}")
    return Bundle(path, meta)


def verify_manifest(path: str | Path) -> None:
    """Refuse, naming the file, a bundle whose files differ from its manifest."""
    from medtx.io import sha256

    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; not a medtx bundle, or an incomplete copy")
    listed: dict[str, str] = {}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise BundleError(f"{manifest}: line {n} is not '<sha256>  <file>'")
        listed[name] = digest
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in {MANIFEST} but missing")
        if sha256(file) != digest:
            raise BundleError(f"{file}: changed since export (sha256 differs from {MANIFEST})")
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        raise BundleError(f"{path / extra[0]}: not in {MANIFEST}; a bundle holds only its files")


def write_manifest(out: Path) -> None:
    from medtx.io import sha256, write_text

    lines = [f"{sha256(p)}  {p.name}" for p in sorted(out.iterdir()) if p.name != MANIFEST]
    write_text("\n".join(lines) + "\n", out / MANIFEST)


def read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    return data
