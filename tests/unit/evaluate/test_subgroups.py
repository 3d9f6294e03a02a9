"""Subgroup metrics: per sex, site, age band and diagnosis, checked against
scikit-learn computed by hand on each group's rows; the bootstrap's seeding, the
minimum group size, the worst group and its flag, and the "## Subgroups" section.

Run folders are written as fine-tuning writes them (``test_tables.write_run``); the
attributes come from a scan table written like ``results/scans/<dataset>.tsv``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_absolute_error, roc_auc_score

from medtx.errors import MedtxError
from medtx.evaluate import figures, subgroups, tables
from medtx.evaluate.subgroups import (
    TABLE_COLUMNS,
    group_labels,
    subgroup_metrics,
    write_subgroup_tables,
)
from medtx.evaluate.summary import evaluate_runs
from medtx.evaluate.tables import collect_runs, format_mean_std
from medtx.evaluate.tables import table3 as real_table3
from tests.unit.evaluate.test_summary import history, save_checkpoint
from tests.unit.evaluate.test_tables import CLS, MT, REG, SEG, assert_png, write_run

DS, BRATS = "demo_adni", "demo_brats"
FAST = {"age_bands": [60, 70, 80], "min_group": 5, "bootstrap": 200, "seed": 7}
NUMBER_COLUMNS = subgroups.NUMBER_COLUMNS
IDENTITY = ["dataset", "backbone", "init", "label fraction (%)", "attribute", "group"]


# ---------------------------------------------------------------------------- builders


def scan_rows(subjects: list[dict]) -> pd.DataFrame:
    """A scan table as the workflow writes it (text; empty cells where nothing is known)."""
    rows = [
        {
            "dataset": s.get("dataset", DS),
            "kind": "bids",
            "subject": s["subject"],
            "session": "",
            "scan": f"sub-{s['subject']}",
            "diagnosis": s.get("diagnosis", ""),
            "age": s.get("age", ""),
            "sex": s.get("sex", ""),
            "site": s.get("site", ""),
            "status": "ok",
            "reason": "",
        }
        for s in subjects
    ]
    return pd.DataFrame(rows).astype(str)


def write_scans(path: Path, table: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, sep="\t", index=False)
    return path


def regression_study(root: Path, errors, *, folds: int = 3, per_fold: int = 12, seed: int = 0):
    """Regression runs; subject i of a fold: sex F (even i) or M, site A/B; and for
    i = 11 (3 subjects in all) site Z, sex not recorded. ``errors(subject, rng)``:
    years added to the true age. Returns (metrics paths, scan table)."""
    rng = np.random.default_rng(seed)
    paths, subjects = [], []
    for fold in range(folds):
        rows = []
        for i in range(per_fold):
            s = {
                "subject": f"r{fold}x{i}",
                "sex": "" if i == per_fold - 1 else "F" if i % 2 == 0 else "M",
                "site": "Z" if i == per_fold - 1 else "AB"[(i // 2) % 2],
                "age": f"{55 + 30 * rng.random():.1f}",
                "diagnosis": ["CN", "MCI", "AD"][i % 3],
            }
            subjects.append(s)
            age = float(s["age"])
            rows.append(
                {
                    "scan": f"sub-{s['subject']}",
                    "subject": s["subject"],
                    "label": age,
                    "prediction": age + errors(s, rng),
                }
            )
        paths.append(write_run(root, DS, REG, "pretrained", 100, fold, pd.DataFrame(rows)))
    return paths, scan_rows(subjects)


def classification_study(root: Path, *, folds: int = 2, per_fold: int = 30, seed: int = 1):
    """3-class runs with informative probabilities; sex alternates, site A/B in blocks."""
    rng = np.random.default_rng(seed)
    paths, subjects = [], []
    for fold in range(folds):
        y = np.arange(per_fold) % 3
        logits = rng.normal(size=(per_fold, 3)) + 1.2 * np.eye(3)[y]
        p = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 4)
        p[:, 2] = 1 - p[:, 0] - p[:, 1]
        ids = [f"c{fold}x{i}" for i in range(per_fold)]
        table = pd.DataFrame(
            {"scan": [f"sub-{s}" for s in ids], "subject": ids, "label": y, "prediction": 0}
        )
        for c in range(3):
            table[f"p_{c}"] = p[:, c]
        table["prediction"] = p.argmax(axis=1)
        paths.append(write_run(root, DS, CLS, "scratch", 100, fold, table))
        for i, s in enumerate(ids):
            subjects.append(
                {
                    "subject": s,
                    "sex": "MF"[(i // 3) % 2],
                    "site": "A" if i < per_fold // 2 else "B",
                    "age": str(58 + i),
                    "diagnosis": ["CN", "MCI", "AD"][y[i]],
                }
            )
    return paths, scan_rows(subjects)


def read_pooled(paths: list[Path], scans: pd.DataFrame) -> pd.DataFrame:
    """Every fold's predictions joined by hand to the scan table's attributes."""
    tables = []
    for fold, p in enumerate(paths):
        t = pd.read_csv(p.parent / "predictions.tsv", sep="\t", dtype={"scan": str})
        tables.append(t.assign(fold=fold))
    both = pd.concat(tables, ignore_index=True)
    return both.merge(scans[["scan", "sex", "site", "age", "diagnosis"]], on="scan", how="left")


def rows_of(table: pd.DataFrame, attribute: str, group: str) -> pd.Series:
    hit = table[(table["attribute"] == attribute) & (table["group"] == group)]
    assert len(hit) == 1, (attribute, group)
    return hit.iloc[0]


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    return table[[*TABLE_COLUMNS, "value", "ci_low", "ci_high"]]


def sex_effect(s, rng) -> float:
    """Women's ages predicted ~6 years off, men's ~1, site Z's 12 (but only 3 subjects)."""
    if s["site"] == "Z":
        return 12.0
    return float(rng.normal(6.0, 0.5) if s["sex"] == "F" else rng.normal(1.0, 0.3))


# ---------------------------------------------------------------------------- groups


def test_group_labels_bands_ages_and_keeps_unknown():
    attrs = pd.DataFrame(
        {
            "sex": ["F", "", "M", None, "n/a", "F"],
            "site": ["A", "B", "", "A", "B", "A"],
            "age": ["59.9", "60", "70.5", "80", "", "abc"],
            "diagnosis": ["CN", "AD", "", "MCI", "CN", "AD"],
        }
    )
    reg = group_labels(attrs, REG, [60, 70, 80])
    assert list(reg.columns) == ["sex", "site", "age", "diagnosis"]
    assert reg["age"].tolist() == [
        "age <60", "age 60–70", "age 70–80", "age ≥80", "unknown", "unknown",
    ]  # fmt: skip
    assert reg["sex"].tolist() == ["F", "unknown", "M", "unknown", "unknown", "F"]
    assert reg["diagnosis"].tolist()[2] == "unknown"
    # diagnosis is the classification target, not a subgroup
    assert list(group_labels(attrs, CLS, [60, 70, 80]).columns) == ["sex", "site", "age"]
    assert group_labels(attrs[["sex"]], SEG, [65])["age"].eq("unknown").all()
    assert subgroups.age_band_labels([65]) == ["age <65", "age ≥65"]


def test_weighted_metric_is_sklearns_on_the_repeated_rows():
    """The bootstrap's weighted metric equals scikit-learn on the resample written out."""
    rng = np.random.default_rng(3)
    n = 40
    y = np.arange(n) % 3
    p = rng.dirichlet(np.ones(3), size=n)
    p[:5] = p[5:10]  # ties across rows
    weights = rng.integers(0, 3, size=(6, n)).astype(float)
    data = subgroups._Data(CLS, y, p)
    got = subgroups.weighted_metric(data, weights)
    for w, value in zip(weights, got):
        rep = np.repeat(np.arange(n), w.astype(int))
        want = roc_auc_score(y[rep], p[rep], multi_class="ovo", average="macro")
        assert value == pytest.approx(want, abs=1e-12)
    # two classes: the AUC of p_1, as medtx.metrics.mauc
    p2 = np.c_[1 - p[:, 0], p[:, 0]]
    two = subgroups.weighted_metric(subgroups._Data(CLS, y % 2, p2), weights[:1])[0]
    rep = np.repeat(np.arange(n), weights[0].astype(int))
    assert two == pytest.approx(roc_auc_score((y % 2)[rep], p2[rep, 1]), abs=1e-12)
    # a class never drawn: not computable, NaN (dropped by the interval)
    none_of_2 = np.where(y == 2, 0.0, 1.0)[None]
    assert np.isnan(subgroups.weighted_metric(data, none_of_2)[0])
    err = rng.random(n)
    mae = subgroups.weighted_metric(subgroups._Data(REG, err), weights[:1])[0]
    assert mae == pytest.approx(err[rep].mean(), abs=1e-12)


# ---------------------------------------------------------------------------- by hand


def test_regression_groups_equal_sklearn_by_hand(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    assert set(table["task"]) == {REG}
    pooled = read_pooled(paths, scans)
    pooled["band"] = group_labels(pooled, REG, FAST["age_bands"])["age"]

    def check(attribute, column, group, rows):
        row = rows_of(table, attribute, group)
        want = mean_absolute_error(rows["label"], rows["prediction"])
        assert row["value"] == pytest.approx(want, abs=1e-12)
        assert row["pooled"] == f"{want:.2f}"
        assert row["n subjects"] == str(rows["subject"].nunique())
        per_fold = [
            mean_absolute_error(f["label"], f["prediction"])
            for _, f in rows.groupby("fold")
            if f["subject"].nunique() >= FAST["min_group"]
        ]
        shown = format_mean_std(per_fold, 2) if per_fold else "— (no fold with 5 subjects)"
        assert row["mean ± std over folds"] == shown
        assert row["folds"] == f"{len(per_fold)} of 3"
        assert row["ci_low"] <= row["value"] <= row["ci_high"]

    check("all", None, "all", pooled)
    for attribute, column in (("sex", "sex"), ("diagnosis", "diagnosis"), ("age band", "band")):
        for group, rows in pooled.groupby(column):
            if rows["subject"].nunique() >= FAST["min_group"]:
                check(attribute, column, group, rows)
    for group in ("A", "B"):
        check("site", "site", group, pooled[pooled["site"] == group])
    # the bands present, in age order
    bands = table.loc[table["attribute"] == "age band", "group"].tolist()
    assert bands == [b for b in subgroups.age_band_labels([60, 70, 80]) if b in bands]


def test_classification_groups_equal_sklearn_by_hand(tmp_path):
    paths, scans = classification_study(tmp_path / "results")
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    pooled = read_pooled(paths, scans)
    probs = ["p_0", "p_1", "p_2"]
    assert "diagnosis" not in set(table["attribute"])  # the target
    for attribute, column in (("sex", "sex"), ("site", "site")):
        for group, rows in pooled.groupby(column):
            row = rows_of(table, attribute, group)
            want = roc_auc_score(rows["label"], rows[probs], multi_class="ovo", average="macro")
            assert row["value"] == pytest.approx(want, abs=1e-12)
            assert row["pooled"] == f"{want:.3f}"
            folds = [
                roc_auc_score(f["label"], f[probs], multi_class="ovo", average="macro")
                for _, f in rows.groupby("fold")
            ]
            assert row["mean ± std over folds"] == format_mean_std(folds, 3)
    everything = rows_of(table, "all", "all")
    want = roc_auc_score(pooled["label"], pooled[probs], multi_class="ovo", average="macro")
    assert everything["value"] == pytest.approx(want, abs=1e-12)


def test_a_group_missing_a_class_is_not_computable(tmp_path):
    paths, scans = classification_study(tmp_path / "results")
    # site C: only class-0 subjects (6 of them, enough), so no mAUC
    pooled = read_pooled(paths, scans)
    only0 = pooled.loc[pooled["label"] == 0, "scan"].tolist()[:6]
    scans.loc[scans["scan"].isin(only0), "site"] = "C"
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    row = rows_of(table, "site", "C")
    assert row["status"] == "not computable" and np.isnan(row["value"])
    for col in ("pooled", "95 % CI", "gap to all", "mean ± std over folds"):
        assert row[col] == "not computable: classes missing"
    assert "worst" not in row["flag"]


# ---------------------------------------------------------------------------- bootstrap


def test_the_bootstrap_is_seeded_and_independent_of_row_order(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    runs = collect_runs(paths)
    a = numbers(subgroup_metrics(runs, scans, **FAST))
    b = numbers(subgroup_metrics(runs, scans, **FAST))
    pd.testing.assert_frame_equal(a, b)
    other = numbers(subgroup_metrics(runs, scans, **{**FAST, "seed": 8}))
    assert (a["95 % CI"] != other["95 % CI"]).any()
    assert a["pooled"].equals(other["pooled"])  # only the intervals move
    # shuffled scan table, runs and prediction rows: the same table
    shuffled = scans.sample(frac=1.0, random_state=5)
    for p in paths:
        tsv = p.parent / "predictions.tsv"
        t = pd.read_csv(tsv, sep="\t", dtype=str)
        t.sample(frac=1.0, random_state=6).to_csv(tsv, sep="\t", index=False)
    c = numbers(subgroup_metrics(runs.iloc[::-1], shuffled, **FAST))
    pd.testing.assert_frame_equal(a.reset_index(drop=True), c.reset_index(drop=True))
    # a point estimate inside its interval, which has some width
    ok = a[a["value"].notna()]
    assert (ok["ci_low"] <= ok["value"]).all() and (ok["value"] <= ok["ci_high"]).all()
    assert (ok["ci_high"] > ok["ci_low"]).all()


# ---------------------------------------------------------------------------- small groups


def test_a_group_under_the_minimum_has_no_number_and_is_never_worst(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    z = rows_of(table, "site", "Z")  # 3 subjects with 12-year errors: the worst, if counted
    assert z["status"] == "too small"
    for col in NUMBER_COLUMNS:
        if col != "folds":
            assert z[col] == "too small (n=3 < 5)"
    cells = [str(z[c]) for c in TABLE_COLUMNS if c not in IDENTITY]
    cells += [str(z[c]) for c in ("status", "value", "ci_low", "ci_high")]
    stripped = [re.sub(r"too small \(n=\d+ < \d+\)", "", c) for c in cells]
    assert not any(re.search(r"\d", c) for c in stripped), stripped
    site = table[table["attribute"] == "site"].set_index("group")
    assert site.loc["A", "flag"].startswith("worst") or site.loc["B", "flag"].startswith("worst")
    assert "worst" not in z["flag"]
    # nor in the written table
    md = write_subgroup_tables(table, tmp_path / "out")[REG][1].read_text()
    line = next(x for x in md.splitlines() if "| site | Z |" in x)
    cells_md = line.split("|")[7:]
    assert not re.search(r"\d", re.sub(r"too small \(n=\d+ < \d+\)", "", "|".join(cells_md)))


def test_min_group_applies_per_fold_too(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    table = subgroup_metrics(collect_runs(paths), scans, **{**FAST, "min_group": 7})
    # 6 women per fold, 18 pooled: a pooled number but no fold reaches 7
    f = rows_of(table, "sex", "F")
    assert f["n subjects"] == "18" and f["folds"] == "0 of 3"
    assert f["mean ± std over folds"].startswith("—")


# ---------------------------------------------------------------------------- worst group


def test_the_clearly_worse_group_is_named_and_flagged(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    sex = table[table["attribute"] == "sex"].set_index("group")
    assert sex.loc["F", "flag"] == "worst; gap CI excludes 0"
    assert "worst" not in sex.loc["M", "flag"]
    everything = rows_of(table, "all", "all")
    gap = sex.loc["F", "value"] - everything["value"]
    assert sex.loc["F", "gap to all"] == f"{gap:+.2f}" and gap > 1
    low, high = (float(x) for x in sex.loc["F", "gap 95 % CI"].split(" to "))
    assert 0 < low <= gap <= high
    lines = subgroups.worst_lines(table, REG)
    line = next(x for x in lines if ", sex:" in x)
    assert "worst group F" in line and "**flagged**" in line


def test_equal_groups_are_not_flagged(tmp_path):
    # everyone's errors from one distribution: F and M differ by chance only
    def same(s, rng):
        return float(abs(rng.normal(2.0, 1.0)))

    paths, scans = regression_study(tmp_path / "results", same)
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    sex = table[table["attribute"] == "sex"].set_index("group")
    assert abs(sex.loc["F", "value"] - sex.loc["M", "value"]) < 0.5
    assert sum(f.startswith("worst") for f in sex["flag"]) == 1  # still named
    assert not any("excludes 0" in f for f in sex["flag"])
    low, high = (float(x) for x in sex.loc["F", "gap 95 % CI"].split(" to "))
    assert low < 0 < high
    line = next(x for x in subgroups.worst_lines(table, REG) if ", sex:" in x)
    assert "flagged" not in line


# ---------------------------------------------------------------------------- unknown, tables


def test_scans_absent_from_the_tables_are_unknown(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    first_fold = scans["subject"].str.startswith("r0x")
    table = subgroup_metrics(collect_runs(paths), scans[~first_fold], **FAST)
    unknown = rows_of(table, "sex", "unknown")
    assert unknown["n subjects"] == "14"  # fold 0, and site Z's subjects of folds 1, 2
    # BraTS-like: nothing recorded, one group "unknown" per attribute, said so
    table = subgroup_metrics(collect_runs(paths), scans.iloc[:0], **FAST)
    sex = table[table["attribute"] == "sex"]
    assert sex["group"].tolist() == ["unknown"] and "not recorded" in sex["note"].iloc[0]
    assert sex["pooled"].iloc[0] == rows_of(table, "all", "all")["pooled"]


def test_tables_are_written_per_task_with_their_settings(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    cls_paths, cls_scans = classification_study(tmp_path / "results")
    table = subgroup_metrics(collect_runs(paths + cls_paths), pd.concat([scans, cls_scans]), **FAST)
    written = write_subgroup_tables(table, tmp_path / "out")
    assert set(written) == {REG, CLS}
    md = written[REG][1].read_text()
    assert "200 resamples" in md and "seed 7" in md and "percentile" in md
    assert "fewer than 5" in md and "MAE (years), pooled" in md
    tsv = pd.read_csv(written[CLS][0], sep="\t", dtype=str)
    assert list(tsv.columns)[:6] == IDENTITY and "mAUC, pooled" in tsv.columns
    assert "value" not in tsv.columns  # plot numbers are not written


@pytest.mark.parametrize(
    "config, why",
    [
        ({"bootsrap": 10}, "unknown key"),
        ({"age_bands": [70, 60]}, "must increase"),
        ({"min_group": 0}, "min_group"),
        ({"bootstrap": 2.5}, "bootstrap"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_refused(config, why):
    with pytest.raises(MedtxError, match=why):
        subgroups.subgroup_settings(config)


def test_plot_shows_points_and_labelled_gaps(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    paths, scans = regression_study(tmp_path / "results", sex_effect)
    table = subgroup_metrics(collect_runs(paths), scans, **FAST)
    points, labels = [], []
    errorbar, text = Axes.errorbar, Axes.text

    def spy_errorbar(self, x, y, *args, **kwargs):
        points.extend(zip([self.get_title() or len(points)] * len(x), y))
        return errorbar(self, x, y, *args, **kwargs)

    def spy_text(self, x, y, s, *args, **kwargs):
        labels.append(s)
        return text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy_errorbar)
    monkeypatch.setattr(Axes, "text", spy_text)
    assert_png(figures.plot_subgroups(table, tmp_path / "sub.png", title="brain age"))
    ok = table[(table["status"] == "ok") & (table["attribute"] != "all")]
    attributes = table["attribute"].nunique() - 1
    assert len(points) == len(ok) + attributes  # each group with a number, "all" per panel
    drawn = sorted(round(y, 9) for _, y in points)
    shown = sorted(round(v, 9) for v in ok["value"]) + [round(table["value"].iloc[0], 9)] * 4
    assert drawn == sorted(shown)
    small = table[table["status"] == "too small"]
    assert labels.count("too small") == len(small) == 3  # sex unknown, site Z, age <60


# ---------------------------------------------------------------------------- evaluate_runs


@pytest.fixture
def no_params_table(monkeypatch):
    """Table 3 counts the models' parameters (seconds of building them): not needed here."""
    monkeypatch.setattr(tables, "table3", lambda rows=None: real_table3(rows=[]))


def test_evaluate_runs_adds_a_subgroups_section(tmp_path, no_params_table):
    paths, scans = regression_study(tmp_path / "results", sex_effect)
    for p in paths:
        save_checkpoint(p.parent / "model.pt", {}, history(2, val=True))
    scan_tsv = write_scans(tmp_path / "results" / "scans" / f"{DS}.tsv", scans)
    out = tmp_path / "tables"
    text = evaluate_runs(
        paths, out, attributes=[scan_tsv], subgroup_config={"bootstrap": 100}
    ).read_text()
    assert (out / "subgroups_regression.md").exists() and (
        out / "subgroups_regression.tsv"
    ).exists()
    section = text[text.index("## Subgroups") : text.index("## Figures")]
    assert "### regression" in section and "100 resamples" in section
    assert "| sex | F |" in section
    assert f"- {DS}, {MT}, pretrained, 100 % labels, sex: worst group F" in section
    assert "![subgroups_regression](subgroups/subgroups_regression.png)" in section
    assert_png(out / "subgroups" / "subgroups_regression.png")
    assert "subgroups_regression" not in text[text.index("## Figures") :]
    # without scan tables: no section, no subgroup files
    plain = evaluate_runs(paths, tmp_path / "plain").read_text()
    assert "## Subgroups" not in plain and not list((tmp_path / "plain").glob("subgroups*"))


def test_a_missing_or_foreign_scan_table_is_refused_naming_it(tmp_path):
    paths, scans = regression_study(tmp_path / "results", sex_effect, folds=2)
    missing = tmp_path / "scans" / "nope.tsv"
    with pytest.raises(MedtxError, match="scan table not found") as err:
        evaluate_runs(paths, tmp_path / "t", attributes=[missing])
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "t").exists()  # refused before anything was written
    foreign = write_scans(tmp_path / "scans" / "x.tsv", scans.drop(columns="scan"))
    with pytest.raises(MedtxError, match=r"without column\(s\) \['scan'\]") as err:
        evaluate_runs(paths, tmp_path / "t", attributes=[foreign])
    assert str(foreign) in str(err.value)
