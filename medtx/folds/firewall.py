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
) -> dict:
    """``medtx firewall``: fail, naming subjects, on any leak; else write the pass record."""
    from medtx.data.scans import usable_subjects

    manifests = {Path(p).name.removesuffix("_folds.tsv"): read_manifest(p) for p in manifest_paths}
    pretrain = usable_subjects(list(pretrain_tables))
    check_leakage(manifests, pretrain, identities)
    result = {
        "status": "passed",
        "manifests": sorted(manifests),
        "pretrain_subjects": len(set(pretrain)),
        "identities": dict(identities or {}),
    }
    write_json(result, out)
    return result
