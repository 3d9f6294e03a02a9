#!/usr/bin/env python
"""The provenance report at cohort scale: the lazy, sortable page against the old one.

Clones the real per-scan provenance records of a demo run and their QC thumbnails
(``results/work/*/*/*_provenance.json``; ``make demo`` writes them) into a temporary
folder as N scans (default 2,000): each QC metric that varies among the real records
is drawn around its record's value with the real spread (and a small shift per
site), a few % of scans are pushed past a threshold (QC failures) and a few % far
from the rest but inside the thresholds (outliers), over several datasets and sites,
each scan with its own copy of a real thumbnail. Then times ``build_report`` and
prints, beside the old design's page (one HTML with every thumbnail embedded as
base64 and every scan's details inline; its size is computed, not built), the entry
page's size, its folder's, and, when Chromium is installed, how long headless
Chromium takes to lay out the page (navigation start to the scan table laid out and
the page's script done) and to sort once and filter once.

    .venv/bin/python bench/report.py [--scans 2000] [--records GLOB] [--keep DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import copy
import glob
import hashlib
import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medtx.provenance.records import load_scan_records  # noqa: E402
from medtx.provenance.report import (  # noqa: E402
    _details_body,
    assets_dir,
    build_report,
)

DEFAULT_RECORDS = ("results/work/*/*/*_provenance.json",)
DATASETS = ("cohortA", "cohortB", "cohortC")
SITES = ("site01", "site02", "site03", "site04", "site05", "site06", "site07", "site08")
SETTINGS = {"backend": "ants", "seed": 42, "deterministic": True}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Runs after the page's own script: times a forced layout, one sort by the
# total-seconds column and one text filter, then writes the figures into the DOM.
PROBE = r"""
<script>
(function () {
  var out = {};
  document.body.offsetHeight;
  out.laidOut = performance.now();
  var mark = performance.getEntriesByName("medtx-report-ready");
  out.ready = mark.length ? mark[0].startTime : null;
  var ths = document.querySelectorAll("#scans thead th"), th = null;
  for (var k = 0; k < ths.length; k++) if (ths[k].textContent === "total (s)") th = ths[k];
  var t = performance.now();
  th.click();
  document.body.offsetHeight;
  out.sort = performance.now() - t;
  var q = document.getElementById("filter");
  t = performance.now();
  q.value = "site03";
  q.dispatchEvent(new Event("input"));
  document.body.offsetHeight;
  out.filter = performance.now() - t;
  out.shown = document.getElementById("shown").textContent;
  out.rows = document.querySelectorAll("#scans tbody tr").length;
  document.body.insertAdjacentHTML("beforeend", '<pre id="probe-' + 'out">' +
    JSON.stringify(out) + "</pre>");
})();
</script>
"""


def real_records(patterns: list[str]) -> list[tuple[dict[str, Any], Path]]:
    """The real records and their thumbnails (paths relative to the repo, as recorded)."""
    files = sorted({f for p in patterns for f in glob.glob(str(REPO / p))})
    out = []
    for file in files:
        (record,) = load_scan_records([file])
        thumb = record.get("thumbnail")
        if not thumb:
            continue
        # as recorded (absolute, or relative to the run's folder), else beside the record
        for path in (REPO / thumb, Path(file).with_name(Path(thumb).name)):
            if path.is_file():
                out.append((record, path))
                break
    if not out:
        sys.exit(
            "bench/report.py: no provenance records with QC thumbnails under "
            f"{' or '.join(patterns)} in {REPO}; run `make demo` first "
            "(or point --records at a run's *_provenance.json)."
        )
    return out


def _numbers(record: dict[str, Any]) -> dict[tuple[str, str], float]:
    out = {}
    for step in record["steps"]:
        for name, value in ((step.get("qc") or {}).get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(step["step"], name)] = float(value)
    return out


def metric_spread(
    records: list[dict[str, Any]],
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(step, metric) -> (sd, low, high) over the real records: the spread to draw with
    (0 for a metric every record has the same value of) and a plausible range."""
    values: dict[tuple[str, str], list[float]] = {}
    for record in records:
        for key, value in _numbers(record).items():
            values.setdefault(key, []).append(value)
    out = {}
    for key, vs in values.items():
        sd = statistics.stdev(vs) if len(set(vs)) > 1 else 0.0
        low = 0.0 if min(vs) >= 0 else -np.inf
        high = 1.0 if 0 <= min(vs) and max(vs) <= 1 else np.inf
        out[key] = (sd, low, high)
    return out


def _rejudge(record: dict[str, Any]) -> None:
    """Checks, step verdicts and the scan's verdict from the (changed) metric values."""
    failures = []
    for step in record["steps"]:
        qc = step.get("qc") or {}
        metrics = qc.get("metrics") or {}
        for check in qc.get("checks") or []:
            value = metrics.get(check["metric"], check.get("value"))
            check["value"] = value
            lo, hi = check.get("min"), check.get("max")
            check["passed"] = (lo is None or value >= lo) and (hi is None or value <= hi)
            if not check["passed"]:
                failures.append(f"{step['step']}: {check['metric']}={value:g}")
        if "checks" in qc:
            qc["passed"] = all(c["passed"] for c in qc["checks"])
    record["qc_passed"] = not failures
    record["qc_failures"] = failures


def synthetic_cohort(
    n: int, reals: list[tuple[dict[str, Any], Path]], work: Path, seed: int
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], str], list[Path]]:
    """``n`` scans cloned from ``reals`` (see the module); returns records, sites and
    the record files written under ``work``."""
    rng = np.random.default_rng(seed)
    spread = metric_spread([r for r, _ in reals])
    shift = {s: rng.normal(0, 0.5) for s in SITES}  # per-site offset, in sd
    records, sites, files = [], {}, []
    kinds = rng.choice(3, size=n, p=[0.94, 0.035, 0.025])  # plain, failure, outlier
    for k in range(n):
        template, thumb = reals[k % len(reals)]
        old = str(template["scan"])
        scan = f"sub-{k:05d}" if template["steps"][0]["step"] != "brats" else f"BraTS_{k:05d}"
        dataset = DATASETS[k % len(DATASETS)]
        site = SITES[int(rng.integers(len(SITES)))]
        record = json.loads(json.dumps(template).replace(old, scan))
        record["dataset"] = dataset
        for step in record["steps"]:
            step["dataset"] = dataset
            for f in (step.get("inputs") or []) + (step.get("outputs") or []):
                f["sha256"] = hashlib.sha256(f"{scan}/{f.get('path')}".encode()).hexdigest()
            metrics = (step.get("qc") or {}).get("metrics") or {}
            for name, value in metrics.items():
                sd, low, high = spread.get((step["step"], name), (0.0, 0.0, 0.0))
                if sd and isinstance(value, (int, float)) and not isinstance(value, bool):
                    drawn = value + sd * (rng.normal() + shift[site])
                    metrics[name] = round(float(np.clip(drawn, low, high)), 5)
            if "duration_s" in step:
                step["duration_s"] = round(step["duration_s"] * float(rng.lognormal(0, 0.25)), 2)
        checks = [
            (step, c)
            for step in record["steps"]
            for c in (step.get("qc") or {}).get("checks") or []
        ]
        if kinds[k] == 1 and checks:  # past a threshold
            step, c = checks[int(rng.integers(len(checks)))]
            bound = c["min"] if c.get("min") is not None else c["max"]
            sign = -1 if c.get("min") is not None else 1
            step["qc"]["metrics"][c["metric"]] = bound + sign * (0.1 * abs(bound) + 0.01)
        elif kinds[k] == 2:  # far from the rest, inside any threshold
            varying = [
                (step, name)
                for step in record["steps"]
                for name in (step.get("qc") or {}).get("metrics") or {}
                if spread.get((step["step"], name), (0.0,))[0] > 0
            ]
            if varying:
                step, name = varying[int(rng.integers(len(varying)))]
                sd, low, high = spread[(step["step"], name)]
                value = step["qc"]["metrics"][name]
                for sign in (1, -1):
                    moved = value + sign * 8 * sd
                    bounded = [c for c in step["qc"].get("checks") or [] if c["metric"] == name]
                    inside = all(
                        (c.get("min") is None or moved >= c["min"])
                        and (c.get("max") is None or moved <= c["max"])
                        for c in bounded
                    )
                    if inside and low <= moved <= high:
                        step["qc"]["metrics"][name] = round(moved, 5)
                        break
        _rejudge(record)
        png = work / "scans" / dataset / scan / f"{scan}_qc.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(thumb, png)  # each scan its own file, as in a real run
        record["thumbnail"] = str(png)
        path = png.with_name(f"{scan}_provenance.json")
        path.write_text(json.dumps(record))
        files.append(path)
        if rng.random() > 0.02:  # a few scans with no site in the tables
            sites[(dataset, scan)] = site
        records.append(record)
    return records, sites, files


def folder_size(path: Path) -> tuple[int, int]:
    """(apparent bytes, bytes of files not hard-linked from elsewhere)."""
    apparent = own = 0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            apparent += st.st_size
            own += st.st_size if st.st_nlink == 1 else 0
    return apparent, own


def old_page_bytes(records: list[dict[str, Any]]) -> int:
    """The old single page's size, at least: every thumbnail as a base64 data URI and
    every scan's details inline (its rows, CSS and sections not counted)."""
    total = 0
    for r in records:
        size = Path(r["thumbnail"]).stat().st_size
        total += len("data:image/png;base64,") + len(base64.b64encode(b"\0" * size))
        total += len(_details_body(r).encode())
    return total


def chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def browse(page: Path, browser: str, profile: Path, *, thumbnails: bool) -> dict[str, Any]:
    """Load a copy of the page (beside it) with PROBE in headless Chromium.

    Headless Chromium ignores ``loading="lazy"`` (it loads every image, so that
    screenshots are whole): ``thumbnails=False`` drops the thumbnails' ``src``,
    as a browser that honours it defers all but the first screenful.
    """
    probe = page.with_name(f"probe-{page.name}")
    text = page.read_text()
    if not thumbnails:
        text = re.sub(r'(<img class="thumb"[^>]*) src="[^"]*"', r"\1", text)
    probe.write_text(text.replace("</body>", PROBE + "</body>", 1))
    t = time.perf_counter()
    proc = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t
    probe.unlink()
    found = re.search(r'<pre id="probe-out">(.*?)</pre>', proc.stdout, flags=re.S)
    if proc.returncode or not found:
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return {**json.loads(html.unescape(found.group(1))), "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=2000, help="cohort size (default 2000)")
    parser.add_argument(
        "--records",
        action="append",
        help="glob of real *_provenance.json, relative to the repo (default: the demo's)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="builds and page loads to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures here (bench/record.py)")
    args = parser.parse_args()
    import record  # the commit and machine, as of this start

    reals = real_records(args.records or list(DEFAULT_RECORDS))
    work = args.keep or Path(tempfile.mkdtemp(prefix="medtx-bench-report-"))
    try:
        t = time.perf_counter()
        _, sites, files = synthetic_cohort(args.scans, reals, work, args.seed)
        made = time.perf_counter() - t
        t = time.perf_counter()
        records = load_scan_records(files)
        load_s = time.perf_counter() - t
        out = work / "reports" / "provenance.html"
        builds = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            build_report(copy.deepcopy(records), [], SETTINGS, out, sites=sites)
            builds.append(time.perf_counter() - t)
        page = out.stat().st_size
        apparent, own = folder_size(assets_dir(out))
        old = old_page_bytes(records)
        text = out.read_text()
        n_fail = text.count('data-status="failed"')
        n_out = text.count('data-status="outlier"')
        inline = "<details" in text

        browser = chromium()
        loads: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        if browser:
            for k in range(args.repeat):
                for thumbs in (False, True):
                    profile = work / f"profile-{k}-{thumbs}"
                    loads[thumbs].append(browse(out, browser, profile, thumbnails=thumbs))

        def med(key: str) -> str:
            out = []
            for thumbs in (False, True):
                vals = [float(x[key]) for x in loads[thumbs] if x.get(key) is not None]
                out.append(f"{statistics.median(vals):.0f}" if vals else "—")
            return " / ".join(out)

        mb = 1e6
        cohort = (
            f"{args.scans} scans cloned from {len(reals)} real records in {made:.1f} s: "
            f"{n_fail} failed QC, {n_out} outliers; {len(set(sites.values()))} sites "
            f"over {len(DATASETS)} datasets"
        )
        print(f"{cohort} (under {work})")
        rows = [
            ("entry page (MB)", f"{page / mb:.2f}", f"≥ {old / mb:.1f} (computed)"),
            (
                "page per scan (KB)",
                f"{page / args.scans / 1e3:.2f}",
                f"≥ {old / args.scans / 1e3:.1f}",
            ),
            (
                "_files folder (MB)",
                f"{apparent / mb:.1f} ({own / mb:.1f} not hard links)",
                "none",
            ),
            ("per-scan details", "inline" if inline else "own pages in _files", "inline"),
            ("load records (s)", f"{load_s:.2f}", "same"),
            (
                f"build_report (s, median of {len(builds)})",
                f"{statistics.median(builds):.2f}",
                "not built",
            ),
        ]
        if loads[True]:
            n = len(loads[True])
            rows += [
                (f"Chromium, median of {n} (ms): lazy / all {args.scans} thumbnails", "", ""),
                ("  page parsed, its script done", med("ready"), "—"),
                ("  table laid out", med("laidOut"), "—"),
                ("  sort once (total s)", med("sort"), "—"),
                ("  filter once (text)", med("filter"), "—"),
                (
                    "  whole run, start to exit (s)",
                    " / ".join(
                        f"{statistics.median(x['wall'] for x in loads[t]):.1f}"
                        for t in (False, True)
                    ),
                    "—",
                ),
                (
                    "  rows; after the filter",
                    f"{loads[True][0]['rows']}; {loads[True][0]['shown']}",
                    "",
                ),
            ]
        else:
            rows.append(("Chromium", "not installed (apt-get install chromium)", ""))
        width = max(len(r[0]) for r in rows)
        print(f"{'figure':<{width}}  {'new design':<34}  old design")
        for name, new, was in rows:
            print(f"{name:<{width}}  {new:<34}  {was}")
        table = [
            {"figure": n.strip(), "new design": new, "old single page": was} for n, new, was in rows
        ]
        record.write_record("report", {"the report": table}, args.json, notes=[cohort])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
