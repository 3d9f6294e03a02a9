"""The leakage firewall: no subject in two splits of a fold, none both pre-trained on
and evaluated.

Subject ids are compared as ``dataset:subject``: two datasets that use the same
id for different people never collide. Ids that are the same person in
different datasets are declared in ``identities`` (person -> ids), and the
check then treats them as one subject.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medtx.domain import SPLITS
from medtx.errors import CohortError, MedtxError
from medtx.folds.manifest import cell_text, read_manifest
from medtx.io import write_json


class LeakageError(CohortError):
    """A subject shared between pre-training and evaluation, or between a fold's splits."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, what="the fold manifests (subject leakage)")


_ROLE_COLUMN = re.compile(r"^role_(\d+)$")
_NS_ID = re.compile(r"^[^:\s]+:[A-Za-z0-9]+$")


def _identity_map(identities: Mapping[str, Sequence[str]] | None) -> dict[str, str]:
    """'dataset:subject' -> person key, checked."""
    alias: dict[str, str] = {}
    problems = []
    for person, ids in (identities or {}).items():
        if isinstance(ids, str):
            ids = [ids]
        for i in ids:
            if not _NS_ID.match(str(i)):
                problems.append(f"identity {person!r}: {i!r} is not 'dataset:subject'")
            elif alias.get(i, person) != person:
                problems.append(f"{i} is declared as both person {alias[i]!r} and {person!r}")
            else:
                alias[str(i)] = str(person)
    if problems:
        raise CohortError(problems, what="identities")
    return alias


def _named(
    manifests: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
) -> list[tuple[str, pd.DataFrame]]:
    if isinstance(manifests, Mapping):
        return [(f"manifest {name!r}", m) for name, m in manifests.items()]
    out = []
    for i, m in enumerate(manifests):
        datasets = sorted({cell_text(d) for d in m["dataset"]}) if "dataset" in m else []
        out.append((f"manifest {i} ({', '.join(datasets)})", m))
    return out


def leakage_report(
    manifests: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
    pretrain: Iterable[tuple[str, str] | str],
    identities: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Every subject that leaks, one line per subject and manifest; [] when clean.

    Subjects are compared as ``dataset:subject``; ids declared the same person
    in ``identities`` count as one subject. Finds (a) a subject in more than
    one of train/val/test in a fold, and (b) a pre-training subject in any
    validation or test set.
    """
    alias = _identity_map(identities)

    def who(ns: str) -> str:
        return f"person {alias[ns]!r}" if ns in alias else ns

    pre: dict[str, list[str]] = {}
    for item in pretrain:
        ds, subject = item.split(":", 1) if isinstance(item, str) else item
        ns = f"{cell_text(ds)}:{cell_text(subject)}"
        pre.setdefault(who(ns), []).append(ns)

    problems = []
    for name, m in _named(manifests):
        missing = [c for c in ("dataset", "subject") if c not in m.columns]
        folds = sorted(int(g.group(1)) for c in m.columns if (g := _ROLE_COLUMN.match(c)))
        if missing or not folds:
            raise MedtxError(
                f"{name}: not a fold manifest (missing {', '.join(missing) or 'role_<k> columns'})"
            )
        ns_ids = [f"{cell_text(d)}:{cell_text(s)}" for d, s in zip(m["dataset"], m["subject"])]
        shared: dict[str, list[str]] = {}
        evaluated: dict[str, list[str]] = {}
        for k in folds:
            roles: dict[str, dict[str, set[str]]] = {}
            for ns, r in zip(ns_ids, m[f"role_{k}"]):
                roles.setdefault(who(ns), {}).setdefault(cell_text(r), set()).add(ns)
                if who(ns) in pre and cell_text(r) in ("val", "test"):
                    evaluated.setdefault(who(ns), []).append(f"{cell_text(r)} of fold {k} as {ns}")
            for person, by_role in roles.items():
                if len(by_role) > 1:
                    parts = [
                        f"{r} ({', '.join(sorted(by_role[r]))})" for r in SPLITS if r in by_role
                    ]
                    parts += [f"{r!r}" for r in sorted(set(by_role) - set(SPLITS))]
                    shared.setdefault(person, []).append(f"fold {k}: {' and '.join(parts)}")
        for person in sorted(shared):
            problems.append(
                f"{person} is in more than one split of {name}: " + "; ".join(shared[person])
            )
        for person in sorted(evaluated):
            places = sorted(set(evaluated[person]), key=evaluated[person].index)
            problems.append(
                f"{person} is a pre-training subject (as "
                f"{', '.join(sorted(set(pre[person])))}) and is evaluated in "
                f"{name}: " + ", ".join(places)
            )
    return problems


def bundle_leaks(
    manifests: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
    bundle: str,
    digests: Iterable[str],
    identities: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Subjects evaluated here whom a received encoder was pre-trained on, one line each.

    An encoder bundle lists the sha256 of each pre-training subject's
    ``dataset:subject`` id (``medtx.bundle.subject_digest``). A validation or
    test subject leaks when its own id, or an id ``identities`` declares the same
    person, has one of those digests.
    """
    from medtx.bundle import subject_digest

    alias = _identity_map(identities)
    people: dict[str, list[str]] = {}
    for ns, person in alias.items():
        people.setdefault(person, []).append(ns)
    seen = set(digests)
    problems = []
    for name, m in _named(manifests):
        folds = sorted(int(g.group(1)) for c in m.columns if (g := _ROLE_COLUMN.match(c)))
        ns_ids = [f"{cell_text(d)}:{cell_text(s)}" for d, s in zip(m["dataset"], m["subject"])]
        found: dict[str, tuple[str, list[str]]] = {}
        for k in folds:
            for ns, r in zip(ns_ids, m[f"role_{k}"]):
                role = cell_text(r)
                if role not in ("val", "test"):
                    continue
                same = people.get(alias[ns], [ns]) if ns in alias else [ns]
                match = next((i for i in same if subject_digest(i) in seen), None)
                if match:
                    found.setdefault(ns, (match, []))[1].append(f"{role} of fold {k}")
        for ns, (match, places) in sorted(found.items()):
            via = "" if match == ns else f" (declared the same person as {match})"
            problems.append(
                f"{ns}{via} is a pre-training subject of the encoder bundle {bundle} "
                f"(sha256 of {match!r} listed there) and is evaluated in {name}: "
                + ", ".join(places)
            )
    return problems


def check_leakage(
    manifests: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
    pretrain: Iterable[tuple[str, str] | str],
    identities: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Raise ``LeakageError`` listing every leaking subject; return None when clean.

    Run before any training: a test score on a subject the model saw is
    meaningless, and such leaks do not show in the numbers.
    """
    problems = leakage_report(manifests, pretrain, identities)
    if problems:
        raise LeakageError(problems)


def run_firewall(
    manifest_paths: Sequence[str | Path],
    pretrain_tables: Sequence[str],
    identities: Mapping[str, Sequence[str]] | None,
    out: str | Path,
    bundles: Sequence[str | Path] = (),
    warn: Any = None,
) -> dict:
    """``medtx firewall``: fail, naming subjects, on any leak; else write the pass record.

    ``bundles`` are received encoders (``train: {init_from: ...}``), checked by
    their subject-id digests; one without them cannot be checked, and ``warn``
    (default: stderr) says so.
    """
    import sys

    from medtx.bundle import ENCODER, load_bundle
    from medtx.data.scans import usable_subjects

    manifests = {Path(p).name.removesuffix("_folds.tsv"): read_manifest(p) for p in manifest_paths}
    pretrain = usable_subjects(list(pretrain_tables))
    problems = leakage_report(manifests, pretrain, identities)
    received = []
    for path in bundles:
        bundle = load_bundle(path)
        bundle.require(ENCODER)
        digests = (bundle.meta.get("training") or {}).get("subject_id_sha256")
        if digests is None:
            line = (
                f"medtx: warning: the encoder bundle {path} lists no subject-id digests; "
                "an overlap of its pre-training subjects with the test sets cannot be checked"
            )
            (warn or (lambda text: print(text, file=sys.stderr)))(line)
        else:
            problems += bundle_leaks(manifests, str(path), digests, identities)
        received.append({"bundle": str(path), "checked": digests is not None})
    if problems:
        raise LeakageError(problems)
    result = {
        "status": "passed",
        "manifests": sorted(manifests),
        "pretrain_subjects": len(set(pretrain)),
        "bundles": received,
        "identities": dict(identities or {}),
    }
    write_json(result, out)
    return result
