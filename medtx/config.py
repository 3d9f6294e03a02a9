"""Config loading and validation against workflow/schemas/config.schema.yaml.

Errors name the key path (``preprocess/n4/shrink_factor``) and the allowed
values, and defaults from the schema are filled in, so code downstream reads
every key without guessing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medtx.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"


# libyaml's loader where PyYAML has it: read on every workflow start, 5x faster
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema() -> dict:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=_YAML_LOADER)


def _resolve_ref(schema: dict, root: dict) -> dict:
    """``schema`` with its local ``$ref`` (``#/$defs/...``) merged in, so shared blocks
    get their defaults filled too; the referring schema's own keywords win."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    if not ref.startswith("#/"):
        raise ConfigError(f"config schema: only local $ref (#/...) are supported, not {ref!r}")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    own = {k: v for k, v in schema.items() if k != "$ref"}
    return {**_resolve_ref(target, root), **own}


def _fill_defaults(node: Any, schema: dict, root: dict | None = None) -> None:
    """Fill ``default`` values of keys left out of ``node`` (``root``: the whole schema)."""
    root = schema if root is None else root
    schema = _resolve_ref(schema, root)
    if not isinstance(node, dict):
        return
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        sub = _resolve_ref(sub, root)
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in properties:
                _fill_defaults(value, extra, root)


def _increasing(validator, wanted, instance, schema):
    """The schema's ``increasing`` keyword: a [min, max] range or bin edges, in order.

    JSON Schema cannot compare an array's items with each other, and a range
    given backwards (``[2600, 700]``) would otherwise judge every scan a failure.
    """
    if not wanted or not validator.is_type(instance, "array"):
        return
    numbers = [x for x in instance if validator.is_type(x, "number")]
    if len(numbers) == len(instance) and any(a >= b for a, b in zip(numbers, numbers[1:])):
        what = "[min, max] with min < max" if len(instance) == 2 else "strictly increasing"
        yield jsonschema.ValidationError(f"{instance!r} must be {what}")


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"increasing": _increasing}
)


def _describe(err: jsonschema.ValidationError) -> str:
    key = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"config key '{key}': {err.message}{hint}"
    if err.validator == "enum":
        return f"config key '{key}': {err.instance!r} is not one of {err.validator_value}"
    if err.validator == "oneOf" and isinstance(err.instance, (str, list)):
        what = err.schema.get("description", "")
        return f"config key '{key}': {err.instance!r} is not a valid value ({what})"
    return f"config key '{key}': {err.message}"


def step_params(step: str, params: dict) -> dict:
    """``medtx step <step> --params`` with every key it leaves out set to the schema's
    default, as the workflow passes it: a partial section runs as the full one.

    n4 and brats get their preprocess section; bet and flirt a {backend: settings}
    mapping, pool_normalize the pool and normalize sections: only those given are
    filled. chain gets each of those steps' params by step name, and ``qc``.
    """
    if step == "chain":  # each step's params as above, and the qc thresholds as given
        return {
            key: step_params(key, value) if key != "qc" else copy.deepcopy(value)
            for key, value in params.items()
        }
    schema = load_schema()
    pre = schema["properties"]["preprocess"]["properties"]
    out = copy.deepcopy(params)
    if step in ("n4", "brats"):
        _fill_defaults(out, pre[step], schema)
        return out
    sections = _resolve_ref(pre[step], schema)["properties"] if step in ("bet", "flirt") else pre
    for key, node in out.items():
        if key in sections:
            _fill_defaults(node, sections[key], schema)
    return out


def validate_config(config: dict) -> dict:
    """Validate in place (filling defaults) and return ``config``.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    schema = load_schema()
    validator = Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if len(errors) == 1:
        raise ConfigError(_describe(errors[0]))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ConfigError(f"invalid config ({len(errors)} problem(s)):\n{lines}")
    _fill_defaults(config, schema)
    _check_results_folder(config["results"])
    _check_results_outside_datasets(config["results"], config["datasets"])
    _check_registration_levels(config["preprocess"])
    fold_fractions = set(config["folds"]["fractions"]) | {100}
    missing = sorted(set(config["train"]["fractions"]) - fold_fractions)
    if missing:
        raise ConfigError(
            f"config key 'train/fractions': {missing} not in folds/fractions "
            f"{sorted(fold_fractions)}; manifests hold only those subsets"
        )
    for name, ds in config["datasets"].items():
        if isinstance(ds["role"], str):
            ds["role"] = [ds["role"]]
        if ds["kind"] == "csv" and "generate" in ds:
            raise ConfigError(
                f"config key 'datasets/{name}/generate': only bids and brats "
                "datasets can be generated"
            )
    return config


def _check_registration_levels(preprocess: dict) -> None:
    """The ants registration schedules: one iteration count, shrink factor and
    sigma per level (ANTs otherwise stops with a usage message mid-run)."""
    keys = ("aff_iterations", "aff_shrink_factors", "aff_smoothing_sigmas")
    for step in ("bet", "flirt"):
        ants = preprocess[step]["ants"]
        lengths = {key: len(ants[key]) for key in keys}
        if len(set(lengths.values())) > 1:
            given = ", ".join(f"{key} {ants[key]}" for key in keys)
            raise ConfigError(
                f"config key 'preprocess/{step}/ants': one entry per level in each of "
                f"{', '.join(keys)}; got {given}"
            )


def _check_results_folder(results: str) -> None:
    """``results`` must be a folder, or a path where one can be made.

    Found here, a file in the way is one line naming the key; found later, it
    is a NotADirectoryError from whichever step first writes there. Relative
    paths are relative to the working directory (Snakemake's ``-d``).
    """
    path = Path(results)
    for part in (path, *path.parents):
        if not part.exists() and not part.is_symlink():
            continue
        if not part.is_dir():
            kind = "a broken link" if not part.exists() else "a file"
            where = "is" if part == path else f"is under {str(part)!r}, which is"
            raise ConfigError(
                f"config key 'results': {results!r} {where} {kind}, not a folder; "
                "point it at a folder (one is made if missing)"
            )
        if not os.access(part, os.W_OK | os.X_OK):
            raise ConfigError(
                f"config key 'results': cannot write in {str(part)!r} to make {results!r}"
                if part != path
                else f"config key 'results': {results!r} is not writable"
            )
        return


def _check_results_outside_datasets(results: str, datasets: dict) -> None:
    """``results`` may not lie inside an input dataset, save a BIDS dataset's
    ``derivatives/<name>``.

    Elsewhere in a BIDS dataset medtx's outputs are files the BIDS validator
    (``bids_validate``) reports as not BIDS, and a ``sub-*`` folder is read as a
    subject. ``derivatives/`` is where BIDS puts processed data: the validator does
    not look in it and medtx.data.bids reads only ``sub-*``. The BraTS reader takes
    every folder of its dataset as a case, so nowhere inside one is safe; a CSV
    dataset is its table, and the folder around it is not read. Links are followed:
    the folder written to is what counts.
    """
    where = _absolute(results)
    for name, ds in datasets.items():
        if ds["kind"] == "csv":
            continue
        root = _absolute(ds["path"])
        if where != root and root not in where.parents:
            continue
        inside = where.relative_to(root).parts
        if ds["kind"] == "bids":
            if len(inside) >= 2 and inside[0] == "derivatives":
                continue
            why = (
                "the BIDS validator would report medtx's files and the reader take a sub-* "
                "folder for a subject; put it outside the dataset or under "
                f"{Path(ds['path']) / 'derivatives'}/<name>"
            )
        else:
            why = "the BraTS reader takes every folder there as a case; put it outside the dataset"
        raise ConfigError(
            f"config key 'results': {results!r} is inside dataset {name!r} ({ds['path']!r}): {why}"
        )


def _absolute(path: str) -> Path:
    """``path`` from the working directory, links resolved where they can be."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop
        return Path(os.path.abspath(path))


def load_config(path: str | Path | None = None) -> dict:
    """Read a YAML config (the repo's config.yaml by default) and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return validate_config(config)
