#!/usr/bin/env python
"""Fold stability: how many subjects change fold when one subject is added.

The figures in ``medtx/folds/manifest.py``'s docstring come from here (60
subjects, 20 each CN/MCI/AD, 5 folds, 200 seeds; "moved" = existing subjects
whose fold index changed, and in brackets after the best relabelling of the new
folds onto the old ones):

    .venv/bin/python bench/folds.py [--method hash] [--task classification]
        [--seeds 200] [--age-bins 67 78]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from medtx.domain import DEFAULT_LABEL_MAP
from medtx.folds.manifest import make_manifest


def benchmark_stability(
    method: str,
    *,
    task: str = "classification",
    n_subjects: int = 60,
    n_folds: int = 5,
    seeds: Iterable[int] = range(200),
    age_bins: Sequence[float] | None = None,
) -> dict[str, float]:
    """Fraction of existing subjects whose fold changes when one subject is added.

    Returns mean and max over seeds of the plain fraction and of the fraction
    after the best relabelling of the new folds onto the old ones.
    """
    plain, relabelled = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        classes = list(DEFAULT_LABEL_MAP)
        rows = [
            {
                "dataset": "d",
                "subject": f"s{i:03d}",
                "session": "",
                "scan": f"sub-s{i:03d}",
                "diagnosis": classes[i % 3],
                "age": f"{rng.uniform(55, 90):.1f}",
                "status": "ok",
            }
            for i in range(n_subjects)
        ]
        rows.append(
            {
                **rows[0],
                "subject": "new",
                "scan": "sub-new",
                "diagnosis": classes[int(rng.integers(3))],
                "age": f"{rng.uniform(55, 90):.1f}",
            }
        )
        table = pd.DataFrame(rows)
        paths = {r["scan"]: "x" for r in rows}
        kw: dict[str, Any] = dict(
            dataset="d",
            task=task,
            n_folds=n_folds,
            seed=seed,
            paths=paths,
            method=method,
            age_bins=age_bins,
        )
        old, _ = make_manifest(table.iloc[:-1], **kw)
        new, _ = make_manifest(table, **kw)
        a = old.set_index("subject")["fold"]
        b = new.set_index("subject")["fold"].loc[a.index]
        plain.append(float((a != b).mean()))
        overlap = np.zeros((n_folds, n_folds))
        np.add.at(overlap, (a.to_numpy(), b.to_numpy()), 1)
        r, c = linear_sum_assignment(-overlap)
        relabelled.append(1 - overlap[r, c].sum() / len(a))
    return {
        "mean": float(np.mean(plain)),
        "max": float(np.max(plain)),
        "relabelled_mean": float(np.mean(relabelled)),
        "relabelled_max": float(np.max(relabelled)),
        "zero_moved": float(np.mean(np.array(plain) == 0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["hash", "sklearn"], default="hash")
    parser.add_argument(
        "--task", choices=["classification", "regression"], default="classification"
    )
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--age-bins", type=float, nargs="*", help="fixed age bin edges")
    args = parser.parse_args(argv)
    figures = benchmark_stability(
        args.method,
        task=args.task,
        n_subjects=args.subjects,
        n_folds=args.folds,
        seeds=range(args.seeds),
        age_bins=args.age_bins,
    )
    print(json.dumps({"method": args.method, "task": args.task, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
