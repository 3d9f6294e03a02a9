"""Model cards: what each fine-tuned model is, what it saw, how well it does, what it is for.

A ``model.pt`` leaves the study without its context: which subjects trained it,
how its inputs were made, how it was selected, where it fails, and whether its
inputs could identify a person. Its card (``model_card.md`` beside it) says so,
from what the run recorded: the checkpoint's metadata and config, ``metrics.json``,
``predictions.tsv``, the fold manifest and its sidecar, the scan tables and each
scan's provenance record (the face check of its model-ready volume). A fact the
files do not hold is written "not recorded", never guessed. The study card
(``model_cards.md``) has a row per run group, linking every fold's card.

The wording is the templates' (``templates/model_card.md.j2``, ``study_card.md.j2``;
``medtx.pages``): the functions here gather each section's facts, and the templates
pass every free-text value through the ``md`` filter (``tables.md_text``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from medtx.data.templates import TEMPLATE_NAME
from medtx.domain import RunId
from medtx.errors import MedtxError
from medtx.evaluate import subgroups
from medtx.evaluate.figures import relative_link
from medtx.evaluate.tables import (
    HEADLINES,
    METRIC_KEYS,
    Markdown,
    format_mean_std,
    md_text,
    read_metrics_json,
    run_identity,
    to_markdown,
)
from medtx.folds.manifest import read_manifest
from medtx.io import sha256, write_text
from medtx.pages import markdown_environment
from medtx.provenance.qc import NOT_MEASURED, face_status
from medtx.train.checkpoints import load_state
from medtx.workflow.paths import preprocess_dir, t1_outputs

CARD_NAME = "model_card.md"
STUDY_CARD_NAME = "model_cards.md"
NOT_RECORDED = "not recorded"
UNREADABLE = "unreadable record"
# face-check statuses in table order; "unreadable record" is shown only where it occurs
FACE_STATUSES = ("pass", "fail", "not judged", NOT_MEASURED, NOT_RECORDED)
GROUP_KEYS = ["dataset", "task", "backbone", "init", "frac"]
SUBGROUP_COLUMNS = ["attribute", "group", "n subjects", "pooled", "95 % CI", "gap to all"]
SUBGROUP_COLUMNS += ["gap 95 % CI", "flag", "note"]


@dataclass(frozen=True)
class ModelCard:
    """One model's card and what the study card shows of it."""

    run_dir: Path
    run: RunId
    text: str
    train_subjects: int | None  # None: the checkpoint does not list them
    face: dict[str, str] = field(default_factory=dict)  # scan -> face check (train + test)

    @property
    def path(self) -> Path:
        return self.run_dir / CARD_NAME


# ---------------------------------------------------------------------------- sources


def results_root(cache_index: str | Path | None, dataset: str) -> Path | None:
    """The workflow's results folder of a run, from the cache index it recorded.

    ``medtx.workflow.paths.cache_index(results, dataset)`` is
    ``{results}/cache/{dataset}.index.tsv``; this inverts it. None when no index was
    recorded or its path is not of that form (a run trained outside the workflow):
    then nothing under the results folder (provenance records) can be found.
    """
    if not cache_index:
        return None
    path = Path(cache_index)
    if path.name != f"{dataset}.index.tsv" or path.parent.name != "cache":
        return None
    return path.parent.parent


def provenance_path(results: str | Path, dataset: str, scan: str) -> Path:
    """A scan's merged provenance record (T1 chain and BraTS alike)."""
    return Path(t1_outputs(preprocess_dir(str(results), dataset, scan), scan)["provenance"])


def face_check(results: Path | None, dataset: str, scan: str) -> str:
    """The face check of a scan's model-ready volume (``medtx.provenance.qc.face_status``):
    pass / fail / not judged / not measured; "not recorded" without a record."""
    if results is None:
        return NOT_RECORDED
    path = provenance_path(results, dataset, scan)
    if not path.is_file():
        return NOT_RECORDED
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return UNREADABLE
    if not isinstance(record, Mapping):
        return UNREADABLE
    return str(face_status(record)["status"])


def subjects_list_sha256(subjects: Sequence[str]) -> str:
    """sha256 of the sorted ``dataset:subject`` lines joined by newlines."""
    return hashlib.sha256("\n".join(sorted(subjects)).encode()).hexdigest()


def _manifest(meta: Mapping[str, Any]) -> pd.DataFrame | None:
    """The fold manifest the run recorded, if it can still be read (subjects, labels)."""
    path = meta.get("manifest")
    if not path or not Path(path).is_file():
        return None
    try:
        table = read_manifest(path)
    except MedtxError:
        return None
    return table if {"scan", "subject", "label"} <= set(table.columns) else None


def _scan_lookup(
    dataset: str, manifest: pd.DataFrame | None, attributes: pd.DataFrame | None
) -> dict[str, dict[str, str]]:
    """scan -> {"subject", "label" (manifest), sex, site, age, diagnosis (scan table)}."""
    out: dict[str, dict[str, str]] = {}
    if attributes is not None and "scan" in attributes.columns:
        rows = attributes[attributes["dataset"].astype(str) == dataset]
        index = subgroups.attribute_index(rows) if len(rows) else None
        if "subject" in rows.columns:
            for scan, subject in zip(rows["scan"].astype(str), rows["subject"].astype(str)):
                out.setdefault(scan, {})["subject"] = subject
        if index is not None:
            for key, values in index.iterrows():
                scan = str(key[1]) if isinstance(key, tuple) else str(key)
                out.setdefault(scan, {}).update({str(k): str(v) for k, v in values.items()})
    if manifest is not None:
        for scan, subject, label in zip(manifest["scan"], manifest["subject"], manifest["label"]):
            entry = out.setdefault(str(scan), {})
            entry["subject"] = str(subject)
            entry["label"] = str(label)
    return out


def _known(value: Any) -> str | None:
    """A cell's text, None where it says nothing ("", "n/a", NaN, ...)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in subgroups.MISSING_TEXT else text


def _subject(lookup: Mapping[str, Mapping[str, str]], scan: str) -> str:
    """A scan's subject; a scan whose subject is unknown counts as its own."""
    subject = _known(lookup.get(scan, {}).get("subject"))
    return f"subject {subject}" if subject is not None else f"scan {scan}"


def _order(attr: str, values: Sequence[str], age_bands: Sequence[float]) -> list[str]:
    """Groups as the subgroup tables order them: age bands by age, others
    alphabetically, "unknown" last."""
    present = set(values)
    if attr == "age":
        known = [b for b in subgroups.age_band_labels(age_bands) if b in present]
    else:
        known = sorted(present - {subgroups.UNKNOWN})
    return known + ([subgroups.UNKNOWN] if subgroups.UNKNOWN in present else [])


# ---------------------------------------------------------------------------- text helpers


def _value(v: Any) -> str:
    """A recorded value as Markdown text (``md_text``); None and "" are "not recorded"."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return NOT_RECORDED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else NOT_RECORDED
    return md_text(v)


def _hash(v: Any) -> str:
    """A recorded hash as a code span; anything but hex digits as text (a backtick in
    it would end the span early)."""
    text = str(v)
    return f"`{text}`" if re.fullmatch(r"[0-9a-fA-F]+", text) else md_text(text)


def _texts(values: Any) -> str:
    """Free-text values joined by commas, each ``md_text``."""
    return ", ".join(md_text(v) for v in values)


def md_link(target: str | Path, relative_to: str | Path) -> str:
    """A Markdown link target relative to ``relative_to``, percent-encoded: a space or
    a parenthesis in a folder name would end the link early."""
    return quote(relative_link(target, relative_to), safe="/")


PAGES = markdown_environment(
    "medtx.evaluate", {"md": md_text, "value": _value, "hash": _hash, "texts": _texts}
)
PAGES.globals.update(NOT_RECORDED=NOT_RECORDED, TEMPLATE_NAME=TEMPLATE_NAME)


def _mapping(v: Any) -> dict[str, Any]:
    return {str(k): x for k, x in v.items()} if isinstance(v, Mapping) else {}


def _number(v: Any) -> float | None:
    """A finite number from a cell, else None."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _table(df: pd.DataFrame) -> str:
    """``df`` as a Markdown table (its cells escaped by ``to_markdown``), no final newline."""
    return to_markdown(df).rstrip("\n")


# ---------------------------------------------------------------------------- sections


def _model_facts(
    run: RunId,
    ckpt: Mapping[str, Any],
    meta: Mapping[str, Any],
    stored: Mapping[str, Any],
    model_pt: Path,
    n_folds: Any,
) -> dict[str, Any]:
    """The card's "Model" section: the network, its initialisation, fold and weights."""
    kwargs = _mapping(meta.get("model_kwargs"))
    init = meta.get("init")
    state = ckpt.get("model")
    if isinstance(state, Mapping):
        tensors = [t for t in state.values() if hasattr(t, "numel")]
        total = sum(int(t.numel()) for t in tensors)
        params = f"{total} (all {len(tensors)} tensors of the saved state)"
    else:
        params = NOT_RECORDED
    return {
        "backbone": kwargs.get("backbone", run.backbone),
        "preset": meta.get("preset"),
        "init": _mapping(init) if isinstance(init, Mapping) else None,
        "use_transformer": stored.get("use_transformer"),
        "n_folds": _int(n_folds),
        "params": params,
        "seed": meta.get("seed", ckpt.get("seed")),
        "device": ckpt.get("device"),
        "world_size": ckpt.get("world_size"),
        "torch_version": ckpt.get("torch_version"),
        "weights": model_pt.name,
        "sha256": sha256(model_pt),
    }


def _label_facts(
    task: str,
    scans: Sequence[str],
    lookup: Mapping[str, Mapping[str, str]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """The training label distribution (``kind``: segmentation, classes, ages, or
    None where it is not recorded); for ages also their (min, max) as ``range``."""
    if task == "segmentation":
        return {"kind": "segmentation"}
    labels = [_number(lookup.get(s, {}).get("label")) for s in scans]
    if task == "classification":
        label_map = meta.get("label_map")
        classes = [int(x) for x in labels if x is not None and x == int(x)]
        if not isinstance(label_map, Mapping) or len(classes) != len(scans):
            return {"kind": None}
        names: dict[int, list[str]] = {}
        for name, index in label_map.items():
            names.setdefault(int(index), []).append(str(name))
        counts = Counter(classes)
        subjects = {
            c: len({_subject(lookup, s) for s, x in zip(scans, classes) if x == c}) for c in counts
        }
        rows = [
            ("/".join(names.get(c, [f"class {c}"])), c, counts.get(c, 0), subjects.get(c, 0))
            for c in sorted(set(names) | set(counts))
        ]
        return {"kind": "classes", "classes": rows}
    ages = [x for x in labels if x is not None]
    if not ages or len(ages) != len(scans):
        return {"kind": None}
    return {
        "kind": "ages",
        "ages": format_mean_std(ages, 1),
        "n": len(ages),
        "range": (min(ages), max(ages)),
    }


def _composition(
    task: str,
    scans: Sequence[str],
    lookup: Mapping[str, Mapping[str, str]],
    age_bands: Sequence[float],
) -> pd.DataFrame:
    """Training subjects and scans per group of sex, site, age band (and diagnosis)."""
    found = pd.DataFrame(
        [{a: lookup.get(s, {}).get(a) for a in subgroups.ATTRIBUTES} for s in scans]
    )
    groups = subgroups.group_labels(found, task, age_bands)
    units = [_subject(lookup, s) for s in scans]
    rows = []
    for attr in subgroups.attributes_of(task):
        labels = groups[attr].tolist()
        for g in _order(attr, labels, age_bands):
            members = [u for u, x in zip(units, labels) if x == g]
            rows.append(
                {
                    "attribute": subgroups.ATTRIBUTE_TITLES[attr],
                    "group": g,
                    "subjects": len(set(members)),
                    "scans": len(members),
                }
            )
    return pd.DataFrame(rows, columns=["attribute", "group", "subjects", "scans"])


def _data_facts(
    run: RunId,
    meta: Mapping[str, Any],
    lookup: Mapping[str, Mapping[str, str]],
    *,
    have_attributes: bool,
    label_source: str,
    age_bands: Sequence[float],
) -> tuple[dict[str, Any], tuple[float, float] | None, pd.DataFrame | None]:
    """The card's "Training data" section; and the training ages' range and the
    composition table, which the limits section reads again."""
    subjects = [str(s) for s in meta.get("subjects") or []]
    train = [str(s) for s in meta.get("train_scans") or []]
    val = [str(s) for s in meta.get("val_scans") or []]
    known = all(_known(lookup.get(s, {}).get("subject")) for s in val)
    sidecar = meta.get("folds_sidecar")
    facts: dict[str, Any] = {
        "datasets": sorted({s.split(":", 1)[0] for s in subjects}) or [run.dataset],
        "n_subjects": len(subjects),
        "n_train": len(train),
        "n_val": len(val),
        "n_val_subjects": len({_subject(lookup, s) for s in val}) if known else NOT_RECORDED,
        "labels": None,
        "subjects_sha256": subjects_list_sha256(subjects),
        "sidecar": sidecar
        if isinstance(sidecar, Mapping) and sidecar.get("subjects_sha256")
        else None,
        "table": None,
    }
    if not train:
        return facts, None, None
    facts["labels"] = _label_facts(run.task, train, lookup, meta)
    facts["label_source"] = label_source
    age_range = facts["labels"].get("range")
    if not have_attributes:
        return facts, age_range, None
    table = _composition(run.task, train, lookup, age_bands)
    facts["table"] = _table(table)
    return facts, age_range, table


def _code_facts(ckpt: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The card's "Preprocessing and code" section: the hashes that made the model."""
    return {
        "preprocess_hash": meta.get("preprocess_hash"),
        "backend": meta.get("backend"),
        "code": _mapping(ckpt.get("config")).get("code"),
        "config_hash": ckpt.get("config_hash"),
        "downsample": meta.get("downsample"),
        "loss": meta.get("loss"),
        "manifest": meta.get("manifest"),
        "cache_index": meta.get("cache_index"),
    }


def _selection_facts(
    ckpt: Mapping[str, Any], meta: Mapping[str, Any], stored: Mapping[str, Any]
) -> dict[str, Any]:
    """The card's "Selection" section: the checkpoint kept, and by what."""
    index = _int(ckpt.get("best_epoch", stored.get("best_epoch")))  # 0-based, -1: none
    return {
        "selected_by": meta.get("selected_by") or stored.get("selected_by"),
        "best": ckpt.get("best_metric", stored.get("val_metric")),
        "epoch": NOT_RECORDED if index is None else "none" if index < 0 else str(index + 1),
        "epochs_done": ckpt.get("epochs_done", stored.get("epochs_done")),
        "status": ckpt.get("status", stored.get("status")),
    }


def _subgroup_table(
    run: RunId, predictions: Path, attributes: pd.DataFrame | None, settings: Mapping[str, Any]
) -> pd.DataFrame:
    """This run's subgroup metrics on its own test scans (``subgroups.subgroup_metrics``)."""
    runs = pd.DataFrame(
        [{**run.as_dict(), "predictions_path": str(predictions) if predictions.is_file() else ""}]
    )
    scans = attributes if attributes is not None else subgroups.read_scan_tables([])
    return subgroups.subgroup_metrics(runs, scans, **settings)


def _metrics_facts(run: RunId, stored: Mapping[str, Any], table: pd.DataFrame) -> dict[str, Any]:
    """The card's "Test metrics" section: metrics.json's pooled values, then the
    subgroup table (``everything``: its row over all test scans; None without
    predictions)."""
    metric = subgroups.METRICS[run.task]
    headline = {k for k, _, _ in HEADLINES[run.task]}
    facts = {
        "n": stored.get("n"),
        "stored": [
            (key, stored[key], key in headline)
            for key in METRIC_KEYS
            if key != "n" and stored.get(key) is not None
        ],
        "label": metric.label,
        "everything": None,
        "table": None,
    }
    if not table.empty:
        rows = table[table["attribute"] != subgroups.ALL][SUBGROUP_COLUMNS]
        facts["everything"] = table[table["attribute"] == subgroups.ALL].iloc[0].to_dict()
        facts["table"] = _table(rows.rename(columns={"pooled": metric.label}))
    return facts


def _limits_facts(
    run: RunId,
    meta: Mapping[str, Any],
    composition: pd.DataFrame | None,
    table: pd.DataFrame,
    age_range: tuple[float, float] | None,
) -> dict[str, Any]:
    """The card's "Intended use and known limits" section: what the model saw, and how
    little the subgroup results rest on."""
    subjects = meta.get("subjects") or []
    datasets = sorted({str(s).split(":", 1)[0] for s in subjects}) or [run.dataset]
    sites: list[str] = []
    if composition is not None:
        site = composition["attribute"] == "site"
        sites = composition[site & (composition["group"] != "unknown")]["group"].tolist()
    small = table[(table["attribute"] != subgroups.ALL) & (table["status"] == "too small")]
    numbered = table[(table["attribute"] != subgroups.ALL) & (table["status"] == "ok")]
    return {
        "n_subjects": len(subjects),
        "datasets": datasets,
        "sites": sites,
        "demo": any(d.startswith("demo") for d in datasets + [run.dataset]),
        "age_range": age_range,
        "fewest": min((int(n) for n in numbered["n subjects"]), default=None),
        "n_small": len(small),
    }


def _face_table(face: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    statuses = list(FACE_STATUSES)
    if any(UNREADABLE in v.values() for v in face.values()):
        statuses.append(UNREADABLE)
    rows = []
    for role, by_scan in face.items():
        counts = Counter(by_scan.values())
        rows.append({"scans": role, "n": len(by_scan), **{s: counts.get(s, 0) for s in statuses}})
    return pd.DataFrame(rows, columns=["scans", "n", *statuses])


def _privacy_facts(
    run: RunId,
    meta: Mapping[str, Any],
    results: Path | None,
    face: Mapping[str, Mapping[str, str]],
) -> dict[str, Any]:
    """The card's "Privacy" section: where the face checks come from, and their counts."""
    return {
        "records": None
        if results is None
        else str(provenance_path(results, run.dataset, "<scan>")),
        "table": _table(_face_table(face)),
        "n_subjects": len(meta.get("subjects") or []),
    }


# ---------------------------------------------------------------------------- cards


def _labelled_lookup(
    run: RunId,
    meta: Mapping[str, Any],
    manifest: pd.DataFrame | None,
    attributes: pd.DataFrame | None,
) -> dict[str, dict[str, str]]:
    """``_scan_lookup``; without a fold manifest, the labels from the scan tables
    (diagnosis through the run's label map, or age)."""
    lookup = _scan_lookup(run.dataset, manifest, attributes)
    if manifest is None and attributes is not None and run.task in ("classification", "regression"):
        column = "diagnosis" if run.task == "classification" else "age"
        label_map = _mapping(meta.get("label_map"))
        for entry in lookup.values():
            text = _known(entry.get(column)) or ""
            if run.task == "classification":
                entry["label"] = str(label_map[text]) if text in label_map else ""
            else:
                entry["label"] = text
    return lookup


def _face_checks(
    meta: Mapping[str, Any], results: Path | None, dataset: str, predictions: Path
) -> dict[str, dict[str, str]]:
    """role (training, validation, test) -> scan -> its face check."""
    test_scans: list[str] = []
    if predictions.is_file():
        test_scans = pd.read_csv(predictions, sep="\t", dtype={"scan": str})["scan"].tolist()
    return {
        role: {s: face_check(results, dataset, s) for s in scans}
        for role, scans in (
            ("training", [str(s) for s in meta.get("train_scans") or []]),
            ("validation", [str(s) for s in meta.get("val_scans") or []]),
            ("test", test_scans),
        )
    }


def build_model_card(
    run_dir: str | Path,
    *,
    attributes: pd.DataFrame | None,
    subgroup_settings: Mapping[str, Any] | None = None,
) -> ModelCard:
    """A run folder's card (model.pt, metrics.json, predictions.tsv) and what the study
    card needs of it. ``attributes``: the scan tables (``subgroups.read_scan_tables``),
    None when none were given; ``subgroup_settings``: over ``SUBGROUP_DEFAULTS``."""
    run_dir = Path(run_dir)
    settings = subgroups.subgroup_settings(subgroup_settings)
    metrics_path = run_dir / "metrics.json"
    stored = read_metrics_json(metrics_path)
    run = run_identity(stored, metrics_path)
    ckpt = load_state(run_dir / "model.pt")
    meta = _mapping(ckpt.get("metadata"))
    manifest = _manifest(meta)
    lookup = _labelled_lookup(run, meta, manifest, attributes)
    predictions = run_dir / "predictions.tsv"
    results = results_root(meta.get("cache_index"), run.dataset)
    face = _face_checks(meta, results, run.dataset, predictions)
    table = _subgroup_table(run, predictions, attributes, settings)
    data, age_range, composition = _data_facts(
        run,
        meta,
        lookup,
        have_attributes=attributes is not None,
        label_source="fold manifest" if manifest is not None else "scan tables",
        age_bands=settings["age_bands"],
    )
    n_folds = _mapping(meta.get("folds_sidecar")).get("n_folds")
    text = PAGES.get_template("model_card.md.j2").render(
        run=run,
        settings=settings,
        have_attributes=attributes is not None,
        model=_model_facts(run, ckpt, meta, stored, run_dir / "model.pt", n_folds),
        data=data,
        code=_code_facts(ckpt, meta),
        selection=_selection_facts(ckpt, meta, stored),
        metrics=_metrics_facts(run, stored, table),
        limits=_limits_facts(run, meta, composition, table, age_range),
        privacy=_privacy_facts(run, meta, results, face),
    )
    subjects = meta.get("subjects")
    return ModelCard(
        run_dir=run_dir,
        run=run,
        text=text.rstrip("\n") + "\n",
        train_subjects=len(subjects) if subjects else None,
        face={**face["training"], **face["test"]},
    )


def model_card(
    run_dir: str | Path,
    *,
    attributes: pd.DataFrame | None,
    subgroup_settings: Mapping[str, Any] | None = None,
) -> str:
    """The Markdown card of the fine-tuned model in ``run_dir`` (``build_model_card``)."""
    return build_model_card(
        run_dir, attributes=attributes, subgroup_settings=subgroup_settings
    ).text


def write_model_cards(
    runs: pd.DataFrame,
    *,
    attributes: pd.DataFrame | None,
    subgroup_settings: Mapping[str, Any] | None = None,
) -> list[ModelCard]:
    """``model_card.md`` in every run's folder (``runs``: runs.tsv's table, its
    ``metrics_path`` naming the folder), each written atomically; the cards in
    ``runs``' order (``card.path`` is the file)."""
    cards = []
    for metrics_path in runs["metrics_path"]:
        card = build_model_card(
            Path(metrics_path).parent, attributes=attributes, subgroup_settings=subgroup_settings
        )
        write_text(card.text, card.path)
        cards.append(card)
    return cards


def _headline(task: str, group: pd.DataFrame) -> str:
    return "; ".join(
        f"{label} {format_mean_std(group[key], digits)}"
        for key, label, digits in HEADLINES.get(task, ())
        if key in group.columns
    )


def study_card(runs: pd.DataFrame, cards: Sequence[ModelCard], *, relative_to: str | Path) -> str:
    """The study-level card: a row per run group (dataset x task x backbone x init x label
    fraction) with its folds' pooled headline test metric (mean ± std over folds),
    training subjects per fold, the face check of the distinct training and test scans
    of its models, and a link to each fold's card relative to ``relative_to``."""
    by_dir = {c.run_dir.resolve(): c for c in cards}
    rows = []
    for key, group in runs.groupby(GROUP_KEYS, sort=True):
        dataset, task, backbone, init, frac = (str(k) for k in key)
        group = group.sort_values("fold")
        found = [
            (int(f), by_dir.get(Path(p).parent.resolve()))
            for f, p in zip(group["fold"], group["metrics_path"])
        ]
        face: dict[str, str] = {}
        for _, c in found:
            if c is not None:
                face.update(c.face)
        counts = Counter(face.values())
        statuses = [s for s in (*FACE_STATUSES, UNREADABLE) if counts.get(s)]
        rows.append(
            {
                "dataset": dataset,
                "task": task,
                "backbone": backbone,
                "init": init,
                "label fraction (%)": frac,
                "folds": len(group),
                "test metric, mean ± std over folds": _headline(task, group),
                "training subjects per fold": ", ".join(
                    NOT_RECORDED if c is None or c.train_subjects is None else str(c.train_subjects)
                    for _, c in found
                ),
                "face check (training + test scans)": ", ".join(
                    f"{s} {counts[s]}" for s in statuses
                )
                or "no scans",
                "cards": Markdown(
                    ", ".join(
                        f"[fold {f}]({md_link(c.path, relative_to)})"
                        if c is not None
                        else f"fold {f}: no card"
                        for f, c in found
                    )
                ),
            }
        )
    datasets = sorted(runs["dataset"].astype(str).unique())
    return PAGES.get_template("study_card.md.j2").render(
        n_runs=len(runs),
        n_groups=len(rows),
        datasets=datasets,
        demo=any(d.startswith("demo") for d in datasets),
        table=_table(pd.DataFrame(rows)) if rows else None,
    )


def write_study_card(runs: pd.DataFrame, cards: Sequence[ModelCard], out_dir: str | Path) -> Path:
    """``out_dir``/model_cards.md (``study_card``), its links relative to ``out_dir``."""
    path = Path(out_dir) / STUDY_CARD_NAME
    return write_text(study_card(runs, cards, relative_to=path.parent), path)
