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

With ``MEDTX_PROVENANCE_KEY`` set at export, ``MANIFEST.sha256.hmac`` signs the
manifest as the provenance manifests sign their entries (HMAC-SHA256,
``medtx.provenance.manifest.signature``); it is no file of the manifest.

``load_bundle`` refuses, in one line naming the bundle and the entry, before any
scan is touched: a changed, missing or unlisted file (weights that differ from
their record would give other predictions without saying so); a file that is a
link out of the folder; a ``bundle.json`` without the keys and types the loader
reads, or with model arguments out of bounds (``MAX_OUTPUTS``, ``MAX_CHANNELS``);
weights named by anything but a file of the manifest (``..``, an absolute path);
a weights file whose safetensors header (read alone) is broken, or whose tensor
shapes are not the model's that ``model_kwargs`` build.

**What the manifest guarantees.** Without a key, only that the files are those
the manifest lists: it catches a truncated copy or an accidental edit, not a
sender (or anyone on the way) who edits the weights and recomputes the
manifest. With the key set when loading, a bundle must carry a signature the
key gives: an edited-and-relisted or unsigned bundle is refused. The key proves
who exported it only as far as the key is kept secret between the two labs.

This module imports no model or training code, so the leakage firewall can read
bundles without its code hash following the models'. The shape check builds the
model on torch's ``meta`` device (no memory) through ``_model_shapes``, which
loads the registry by name for that reason; the stages that run the models
(predict, finetune) import the registry themselves, so their code hashes do
follow it.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from medtx.domain import BACKBONES, REGION_NAMES, TASKS
from medtx.errors import ConfigError, MedtxError

FORMAT = "medtx-bundle/1"
META = "bundle.json"
MANIFEST = "MANIFEST.sha256"
#: The manifest's HMAC-SHA256 under ``MEDTX_PROVENANCE_KEY`` (written when set at export).
SIGNATURE = "MANIFEST.sha256.hmac"
#: A bundle holds a fine-tuned fold ensemble (``medtx predict``) or a pre-trained
#: encoder (``train: {init_from: ...}``).
ENSEMBLE, ENCODER = "fold-ensemble", "pretrained-encoder"
KINDS = (ENSEMBLE, ENCODER)
ENCODER_WEIGHTS = "encoder.safetensors"
#: Bounds on what a received bundle may ask the loader to build, far above any
#: study's (3 classes, 1 age, 3 regions from 4 BraTS contrasts), so that a typo or
#: a hostile ``bundle.json`` cannot make each fold allocate gigabytes.
MAX_OUTPUTS = 10_000
MAX_CHANNELS = 16
MAX_FOLDS = 100
MAX_DOWNSAMPLE = 64
#: The longest safetensors header read (ours are a few kB; safetensors' own cap is 100 MB).
MAX_HEADER = 16 * 2**20
#: What ``medtx.train.checkpoints.model_kwargs`` records: these, and per backbone its own.
MODEL_ARGS = ("backbone", "preset", "task", "num_outputs", "in_channels")
BACKBONE_ARGS: dict[str, dict[str, type]] = {
    "medical_transformer": {"use_transformer": bool},
    "pumit": {"pooling": str},
}
#: The backend that made a model's inputs ("auto" resolves to one of these).
RECORDED_BACKENDS = ("ants", "fsl")
#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    **dict.fromkeys(("F64", "I64", "U64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"), 1),
}


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

    def file(self, name: Any, entry: str) -> Path:
        """``name`` (bundle.json's ``entry``) as one of this bundle's own files: listed in
        its manifest and inside its folder, whoever made this ``Bundle``."""
        file = self.path / _listed(self.path, read_manifest(self.path), name, entry)
        _inside(self.path, file)
        return file

    def encoder_state(self) -> dict:
        """A pre-trained encoder's state dict, read from the verified weights."""
        from safetensors.torch import load_file

        self.require(ENCODER)
        return load_file(str(self.file(ENCODER_WEIGHTS, "the encoder weights")))

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
    """A bundle checked before anything reads a scan with it: its files against the
    manifest (and, with ``MEDTX_PROVENANCE_KEY`` set, the manifest against its
    signature), then ``bundle.json``, then each weights file's header against the
    model ``model_kwargs`` build."""
    path = Path(path)
    listed = verify_manifest(path)
    verify_signature(path)
    meta = read_json(path / META)
    weights = check_meta(path, meta, listed)
    check_weights(path, meta["model_kwargs"], weights)
    return Bundle(path, meta)


def read_manifest(path: str | Path) -> dict[str, str]:
    """The manifest's file -> sha256; every name a plain file name of the folder."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; not a medtx bundle, or an incomplete copy")
    _inside(Path(path), manifest)
    listed: dict[str, str] = {}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        plain = name not in ("", ".", "..") and not set(name) & set("/\\\0")
        if len(digest) != 64 or not plain:
            raise BundleError(f"{manifest}: line {n} is not '<sha256>  <file>'")
        listed[name] = digest
    return listed


def verify_manifest(path: str | Path) -> dict[str, str]:
    """Refuse, naming the file, a bundle whose files differ from its manifest or
    lead out of its folder; the manifest's file -> sha256."""
    from medtx.io import sha256

    path = Path(path)
    listed = read_manifest(path)
    for name, digest in listed.items():
        file = path / name
        _inside(path, file)  # before reading it: a link could lead anywhere
        if not file.is_file():
            raise BundleError(f"{file}: listed in {MANIFEST} but missing")
        if sha256(file) != digest:
            raise BundleError(f"{file}: changed since export (sha256 differs from {MANIFEST})")
    own = {MANIFEST, SIGNATURE, *listed}
    extra = sorted(p.name for p in path.iterdir() if p.name not in own)
    if extra:
        raise BundleError(f"{path / extra[0]}: not in {MANIFEST}; a bundle holds only its files")
    return listed


def write_manifest(out: Path) -> None:
    """``MANIFEST.sha256`` of every file in ``out`` (unsigned: ``sign_manifest`` signs)."""
    from medtx.io import sha256, write_text

    files = [p for p in sorted(out.iterdir()) if p.name not in (MANIFEST, SIGNATURE)]
    write_text("".join(f"{sha256(p)}  {p.name}\n" for p in files), out / MANIFEST)


def sign_manifest(out: Path) -> bool:
    """With ``MEDTX_PROVENANCE_KEY`` set, sign ``out``'s manifest into ``SIGNATURE``
    as the provenance manifests sign an entry; whether it signed."""
    from medtx.io import sha256, write_json
    from medtx.provenance.manifest import provenance_key, signature

    key = provenance_key()
    if key is None:
        return False
    entry = {"format": FORMAT, "signs": MANIFEST, "sha256": sha256(out / MANIFEST)}
    write_json({**entry, "hmac": signature(entry, key)}, out / SIGNATURE)
    return True


def verify_signature(path: Path) -> None:
    """With ``MEDTX_PROVENANCE_KEY`` set, refuse a bundle whose manifest its signature
    does not vouch for: unsigned, forged, or edited and re-listed. Without the key
    nothing is checked here (the manifest then only catches accidents)."""
    from medtx.io import sha256
    from medtx.provenance.manifest import KEY_ENV, provenance_key, signature

    key = provenance_key()
    if key is None:
        return
    file = path / SIGNATURE
    if not file.is_file():
        raise BundleError(
            f"{path}: {SIGNATURE} is missing, but {KEY_ENV} is set (an unsigned bundle,"
            " or its signature removed)"
        )
    _inside(path, file)
    record = read_json(file)
    if not hmac.compare_digest(str(record.get("hmac")), signature(record, key)):
        raise BundleError(
            f"{file}: {KEY_ENV} does not give its signature: forged, edited, or signed"
            " with another key"
        )
    if record.get("sha256") != sha256(path / MANIFEST):
        raise BundleError(
            f"{path}: {MANIFEST} is not the one signed at export ({SIGNATURE}, checked with"
            f" {KEY_ENV}): files were changed and the manifest recomputed"
        )


def _inside(bundle: Path, file: Path) -> None:
    """Refuse a file of the bundle that is a link out of its folder."""
    try:
        target = file.resolve()
    except (OSError, RuntimeError) as err:  # a link loop
        raise BundleError(f"{file}: a link that leads nowhere ({err})") from err
    if not target.is_relative_to(bundle.resolve()):
        raise BundleError(
            f"{file}: a link to {target}, outside the bundle; a bundle holds its files"
        )


def _listed(bundle: Path, listed: Mapping[str, str], name: Any, entry: str) -> str:
    """A file name from bundle.json (``entry``) that the manifest lists, or a refusal."""
    if not isinstance(name, str) or name in (META, MANIFEST) or name not in listed:
        raise BundleError(
            f"{bundle / META}: {entry} {_show(name, 240)} is not in {MANIFEST}; a bundle"
            " loads only its own files"
        )
    return name


class _Entries:
    """bundle.json's entries, each read with its type; a refusal names the entry."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, entry: str, problem: str) -> NoReturn:
        raise BundleError(f"{self.file}: {entry} {problem}")

    def get(
        self, obj: Mapping, key: str, kind: type, where: str = "", required: bool = True
    ) -> Any:
        entry = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.fail(entry, "is missing")
            return None
        value = obj[key]
        if not _is(value, kind):
            self.fail(entry, f"is {_show(value)}, not {KIND_NAMES[kind]}")
        return value

    def size(self, obj: Mapping, key: str, where: str, limit: int) -> int:
        value = self.get(obj, key, int, where)
        if not 1 <= value <= limit:
            self.fail(f"{where}.{key}" if where else key, f"is {value}; it must be 1 to {limit}")
        return value

    def choice(self, obj: Mapping, key: str, choices: tuple[str, ...], where: str = "") -> str:
        value = self.get(obj, key, str, where)
        if value not in choices:
            entry = f"{where}.{key}" if where else key
            self.fail(entry, f"is {_show(value)}, not one of {list(choices)}")
        return value


KIND_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _show(value: Any, limit: int = 80) -> str:
    """A value as bundle.json writes it, its middle cut when long (one line)."""
    text = json.dumps(value, default=str)
    half = (limit - 3) // 2
    return text if len(text) <= limit else f"{text[:half]}...{text[-half:]}"


def check_meta(path: Path, meta: dict[str, Any], listed: Mapping[str, str]) -> list[str]:
    """Refuse a ``bundle.json`` without the keys and types its loader reads, or with
    model arguments out of bounds; the weights files it names (each listed)."""
    at = _Entries(path / META)
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path / META}: format {meta.get('format')!r}, not {FORMAT!r}")
    kind = meta.get("kind", ENSEMBLE)
    if kind not in KINDS:
        at.fail("kind", f"is {_show(kind)}, not one of {list(KINDS)}")
    kwargs = _check_model_kwargs(at, meta)
    if at.get(meta, "backbone", str) != kwargs["backbone"]:
        mine = f"model_kwargs.backbone is {_show(kwargs['backbone'])}"
        at.fail("backbone", f"is {_show(meta['backbone'])}, {mine}")
    prep = at.get(meta, "preprocessing", dict)
    at.choice(prep, "backend", RECORDED_BACKENDS, "preprocessing")
    at.get(prep, "hash", str, "preprocessing")
    settings = at.get(prep, "settings", dict, "preprocessing")
    training = at.get(meta, "training", dict, required=False) or {}
    for digest in at.get(training, "subject_id_sha256", list, "training", False) or []:
        if not isinstance(digest, str) or len(digest) != 64:
            at.fail("training.subject_id_sha256", f"holds {_show(digest)}, not a sha256")
    if kind == ENCODER:
        return [_listed(path, listed, ENCODER_WEIGHTS, "the encoder weights")]
    task = at.choice(meta, "task", TASKS)
    if kwargs["task"] != task:
        at.fail("model_kwargs.task", f"is {_show(kwargs['task'])}, task is {_show(task)}")
    _check_outputs(at, meta, task, kwargs, settings)
    folds = at.get(meta, "folds", list)
    if not folds or len(folds) > MAX_FOLDS:
        at.fail("folds", f"is {'empty' if not folds else len(folds)}; 1 to {MAX_FOLDS} folds")
    names, seen = [], set()
    for i, fold in enumerate(folds):
        where = f"folds[{i}]"
        if not isinstance(fold, dict):
            at.fail(where, f"is {_show(fold)}, not an object")
        k = at.get(fold, "fold", int, where)
        if k in seen:
            at.fail(f"{where}.fold", f"is {k}, as an earlier fold's")
        seen.add(k)
        names.append(_listed(path, listed, at.get(fold, "weights", str, where), f"{where}.weights"))
        if task == "regression":  # each fold's output is in its own training ages' units
            target = at.get(fold, "target", dict, where)
            at.get(target, "mean", float, f"{where}.target")
            if at.get(target, "std", float, f"{where}.target") <= 0:
                at.fail(f"{where}.target.std", f"is {target['std']}; it must be positive")
            if fold.get("age_bias") is not None:
                at.get(fold, "age_bias", dict, where)
    return names


def _check_model_kwargs(at: _Entries, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments: known ones only, each of its type, sizes within bounds."""
    kwargs = at.get(meta, "model_kwargs", dict)
    backbone = at.choice(kwargs, "backbone", BACKBONES, "model_kwargs")
    own = BACKBONE_ARGS[backbone]
    for key in kwargs:
        if key not in MODEL_ARGS and key not in own:
            at.fail(
                f"model_kwargs.{key}",
                f"is not a model argument a bundle can set ({', '.join([*MODEL_ARGS, *own])})",
            )
    at.get(kwargs, "preset", str, "model_kwargs")
    at.choice(kwargs, "task", TASKS, "model_kwargs")
    at.size(kwargs, "num_outputs", "model_kwargs", MAX_OUTPUTS)
    at.size(kwargs, "in_channels", "model_kwargs", MAX_CHANNELS)
    for key, kind in own.items():
        at.get(kwargs, key, kind, "model_kwargs", required=False)
    return kwargs


def _check_outputs(
    at: _Entries, meta: Mapping[str, Any], task: str, kwargs: Mapping[str, Any], settings: Mapping
) -> None:
    """An ensemble's outputs and inputs as predict reads them: the classes of the
    label map, one age or the BraTS regions; channels and the model-ready shape."""
    outputs = kwargs["num_outputs"]
    if task == "classification":
        labels = at.get(meta, "label_map", dict)
        if sorted(v for v in labels.values() if _is(v, int)) != list(range(len(labels))):
            at.fail("label_map", f"is {_show(labels)}; its classes must be 0 to {len(labels) - 1}")
        if len(labels) != outputs:
            at.fail(
                "label_map", f"has {len(labels)} classes, model_kwargs.num_outputs is {outputs}"
            )
    want = {"regression": 1, "segmentation": len(REGION_NAMES)}.get(task, outputs)
    if outputs != want:
        at.fail("model_kwargs.num_outputs", f"is {outputs}; a {task} bundle has {want}")
    if task == "segmentation":
        at.get(settings, "brats", dict, "preprocessing.settings")
    inp = at.get(meta, "input", dict)
    at.size(inp, "downsample", "input", MAX_DOWNSAMPLE)
    shape = at.get(inp, "model_ready_shape", list, "input")
    if len(shape) != 3 or not all(_is(s, int) and s > 0 for s in shape):
        at.fail("input.model_ready_shape", f"is {_show(shape)}, not 3 positive sizes")
    channels = at.get(inp, "channels", list, "input")
    if len(channels) != kwargs["in_channels"]:
        at.fail(
            "input.channels",
            f"names {len(channels)}, model_kwargs.in_channels is {kwargs['in_channels']}",
        )


def check_weights(path: Path, model_kwargs: Mapping[str, Any], names: list[str]) -> None:
    """Refuse a weights file whose tensors are not the model's ``model_kwargs`` build:
    it would fail in ``load_state_dict`` after every scan was preprocessed."""
    expected = _model_shapes(model_kwargs, path / META)
    for name in dict.fromkeys(names):
        file = path / name
        shapes = tensor_shapes(file)
        for key, shape in shapes.items():
            if key not in expected:
                raise BundleError(
                    f"{file}: tensor {key} is not in the model that {META}'s model_kwargs build"
                )
            if shape != expected[key]:
                raise BundleError(
                    f"{file}: tensor {key} has shape {list(shape)}, the model that {META}'s"
                    f" model_kwargs build has {list(expected[key])}"
                )
        missing = [key for key in expected if key not in shapes]
        if missing:
            raise BundleError(
                f"{file}: has no tensor {missing[0]} ({len(missing)} of the {len(expected)}"
                f" that {META}'s model_kwargs build are missing)"
            )


def _model_shapes(model_kwargs: Mapping[str, Any], at: Path) -> dict[str, tuple[int, ...]]:
    """Each state-dict tensor's shape of the model ``model_kwargs`` build, built on
    torch's ``meta`` device (no memory) with the random state left as it was. The
    registry is loaded by name: this module's code hash stays free of the models
    (the module docstring says why)."""
    import torch

    registry = importlib.import_module("medtx.models.registry")
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = registry.build(model_kwargs)
    except (ValueError, TypeError) as err:  # ConfigError is a ValueError
        problem = (str(err).splitlines() or [type(err).__name__])[0]
        raise BundleError(f"{at}: model_kwargs do not build a model: {problem}") from err
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read from its header alone (an
    8-byte little-endian length, then that much JSON), which must account for the
    file's data exactly, as safetensors itself requires when it loads the file."""

    def bad(problem: str) -> NoReturn:
        raise BundleError(f"{file}: not a safetensors file: {problem}")

    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            bad(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            bad(f"header length {n}, in a file of {size} bytes (at most {MAX_HEADER} read)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        bad("the header is not JSON")
    if not isinstance(header, dict):
        bad("the header is not a JSON object")
    shapes, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry: dict[str, Any] = info if isinstance(info, dict) else {}
        fields: list[Any] = [entry.get(k) for k in ("dtype", "shape", "data_offsets")]
        dtype, shape, offsets = fields
        if (
            dtype not in DTYPE_BYTES
            or not _sizes(shape)
            or not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1])
        ):
            bad(f"tensor {name} has no readable dtype, shape and data_offsets")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            bad(f"tensor {name} spans {offsets[1] - offsets[0]} bytes, its shape needs {need}")
        shapes[name] = tuple(shape)
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            bad(f"tensor {name} starts at data byte {start}, not {end}")
        end = stop
    if end != size - 8 - n:
        bad(f"its tensors hold {end} bytes, the file {size - 8 - n} after the header")
    return shapes


def _sizes(value: Any) -> bool:
    return isinstance(value, list) and all(_is(v, int) and v >= 0 for v in value)


def read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    return data
