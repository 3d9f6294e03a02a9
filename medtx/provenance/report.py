"""The cohort provenance report: one entry page plus its ``<stem>_files/`` folder.

``build_report`` reads the per-scan provenance records (``merge_scan``'s
``<scan>_provenance.json``) and writes an HTML page that opens offline (inline
CSS, script and SVG; nothing is fetched) and stays small at thousands of scans:
counts, a methods paragraph from the settings actually used
(``report_methods``), a per-site summary, a distribution plot per QC metric
with the robust outliers flagged (``report_metrics``, ``report_plots``), a
sortable, filterable row per scan (durations, QC verdict and problems, face
check, a metric column, thumbnail), the exclusions, the tool versions, and per
scan the exact commands or function calls with the sha256 of every input and
output. Thumbnails are hard links in the sibling folder (``assets_dir``),
loaded lazily; the per-scan details are inline while they are small
(``INLINE_DETAILS_BYTES`` in all) and otherwise one small page per scan in that
folder, linked from its row.

The module gathers what the page shows; the page itself is Jinja2 templates in
``templates/`` (``report.html.j2`` and the pieces it includes; ``scan.html.j2`` for
a scan's own page), which escape every value they print, and the stylesheets and
script are static files beside them, inlined (``medtx.pages``). Reading the records
is ``medtx.provenance.records``' job (``load_scan_records``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from medtx.io import link_or_copy, write_text
from medtx.pages import html_environment
from medtx.provenance.qc import NOT_MEASURED, face_status, unmeasured
from medtx.provenance.records import load_scan_records
from medtx.provenance.report_folder import assets_dir, safe_name, staged_dir
from medtx.provenance.report_methods import methods_paragraph
from medtx.provenance.report_metrics import (
    OUTLIER_RULE,
    STATUSES,
    Metric,
    SiteSummary,
    cohort_metrics,
    qc_passed,
    scan_statuses,
    site_summaries,
)
from medtx.provenance.report_plots import strip_plot

__all__ = [
    "INLINE_DETAILS_BYTES",
    "assets_dir",
    "build_report",
    "cohort_versions",
    "methods_paragraph",
    "scan_sites",
    "write_report",
]

STEP_ORDER = ("bet", "flirt", "n4", "pool", "normalize")
STEP_TITLES = {
    "bet": "brain extraction",
    "flirt": "registration",
    "n4": "N4",
    "pool": "pooling",
    "normalize": "normalization",
}
# Per-scan details (commands, hashes: ~9 KB a scan) stay inline in the page up to
# this many bytes in all (~200 scans); beyond, each scan gets its own small page.
INLINE_DETAILS_BYTES = 2_000_000
THUMB_WIDTH = 170  # shown width of a thumbnail, px
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")

# ---------------------------------------------------------------------------
# Loading


def cohort_versions(records: list[dict[str, Any]]) -> dict[str, dict[str | None, int]]:
    """Tool -> version -> number of scans that used it (union over all steps)."""
    out: dict[str, dict[str | None, set[int]]] = defaultdict(lambda: defaultdict(set))
    for i, record in enumerate(records):
        for step in record.get("steps", []):
            for tool, version in (step.get("versions") or {}).items():
                out[tool][version].add(i)
            tool = step.get("tool") or {}
            if tool.get("name"):
                out[tool["name"]][tool.get("version")].add(i)
    return {t: {v: len(s) for v, s in vs.items()} for t, vs in out.items()}


def _paragraph_versions(versions: dict[str, dict[str | None, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, counts in versions.items():
        vals = sorted(v for v in counts if v is not None)
        out[tool] = vals[0] if len(vals) == 1 else (vals or None)
    return out


# ---------------------------------------------------------------------------
# Sites


def scan_sites(table_paths: Iterable[str | Path]) -> dict[tuple[str, str], str]:
    """(dataset, scan) -> site from the scan tables' ``site`` column (blank ones left out)."""
    from medtx.data.scans import read_scan_table

    out: dict[tuple[str, str], str] = {}
    for path in table_paths:
        table = read_scan_table(path)
        if not {"dataset", "scan", "site"} <= set(table.columns):
            continue
        for dataset, scan, site in zip(table["dataset"], table["scan"], table["site"]):
            if str(site).strip():
                out[(str(dataset), str(scan))] = str(site).strip()
    return out


# ---------------------------------------------------------------------------
# What the page shows (the templates in ``templates/`` say how)


def _num(value: Any, fmt: str = ".1f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "—"


PAGES = html_environment("medtx.provenance")
PAGES.filters["num"] = _num


def _text(value: Any) -> str:
    """A record's value as page text: None is blank."""
    return "" if value is None else str(value)


def _steps_in_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = [s.get("step") for r in records for s in r.get("steps", [])]
    names = [s for s in STEP_ORDER if s in seen]
    for s in seen:
        if s and s not in names:
            names.append(s)
    return names


def _resolve(path: str | Path, base_dir: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base_dir / path


def _png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's header; None for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return (width, height) if width and height else None


def _thumbnail(
    record: Mapping[str, Any], base_dir: Path, folder: Path, href: str
) -> dict[str, Any]:
    """Link the scan's thumbnail into ``folder`` as ``<last part of href><suffix>`` and
    return what its cell shows: the lazy image (``src``: that name's URL relative to
    the page), or only the recorded path (``title``) when the file is gone, or nothing
    when the record names none."""
    thumb = record.get("thumbnail")
    found = {"src": None, "title": thumb, "scan": record.get("scan"), "height": None}
    if not thumb:
        return found
    src = _resolve(thumb, base_dir)
    suffix = src.suffix.lower() if src.suffix.lower() in IMAGE_SUFFIXES else ".png"
    dst = folder / f"{href.rsplit('/', 1)[-1]}{suffix}"
    try:
        link_or_copy(src, dst)
    except OSError:
        return found
    size = _png_size(dst)
    found["src"] = href + suffix
    if size:
        found.update(width=THUMB_WIDTH, height=round(size[1] * THUMB_WIDTH / size[0]))
    return found


def _bounds(check: Mapping[str, Any]) -> str:
    lo = _num(check.get("min"), "g") if check.get("min") is not None else "−∞"
    hi = _num(check.get("max"), "g") if check.get("max") is not None else "∞"
    return f"{lo} … {hi}"


def _qc_items(
    record: Mapping[str, Any], i: int, metrics: Sequence[Metric]
) -> tuple[list[tuple[str, str, str]], int]:
    """The row's QC cell: what is wrong as (class, tooltip, text) (failed checks, robust
    outliers, metrics a threshold wants but the record lacks), and how many checks
    passed."""
    items = []
    n_ok = 0
    thresholds = (record.get("qc") or {}).get("thresholds")
    thresholds = thresholds if isinstance(thresholds, Mapping) else {}
    for step in record.get("steps", []):
        name = _text(step.get("step"))
        for c in (step.get("qc") or {}).get("checks", []):
            if c.get("passed"):
                n_ok += 1
                continue
            value = _num(c.get("value"), ".4g")
            items.append(
                ("bad", f"{name}: allowed {_bounds(c)}", f"✗ {_text(c.get('metric'))} {value}")
            )
        for metric in unmeasured(step, thresholds):
            why = f"{name}: a threshold is set but the step did not record the metric"
            items.append(("missing", f"{why} (an older record)", f"{metric} {NOT_MEASURED}"))
    for m in metrics:
        if i in m.outliers and i not in m.failed:
            title = f"{m.step}: robust outlier; cohort median {_num(m.median, '.4g')}"
            items.append(("outl", title, f"~ {m.name} {_num(m.values[i], '.4g')}"))
    return items, n_ok


def _metric_value(m: Metric, i: int) -> tuple[str, str]:
    """Scan ``i``'s value of ``m`` as text and its flag: ``!`` failed, ``~`` outlier."""
    value = m.values.get(i)
    if value is None:
        return "", ""
    return format(value, ".6g"), "!" if i in m.failed else "~" if i in m.outliers else ""


def _metric_label(m: Metric) -> str:
    return f"{m.name} ({m.step})"


def _face(record: Mapping[str, Any]) -> dict[str, Any]:
    """The face column: the face check's verdict and its two judged figures."""
    face = face_status(record)
    status = face["status"]
    if status == NOT_MEASURED:
        return {"measured": False, "title": face["note"]}
    return {
        "measured": True,
        "cls": {"pass": "ok", "fail": "bad"}.get(status, "missing"),
        "label": {"pass": "pass", "fail": "FAIL"}.get(status, status),
        "title": face["note"] or "face signal and largest face blob of the model-ready volume",
        "signal": face["face_signal"],
        "blob": face["face_component_ml"],
    }


def _call_text(call: Mapping[str, Any]) -> str:
    args = call.get("arguments") or {}
    inner = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in args.items())
    return f"{call.get('function')}({inner})"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _files(entries: Any) -> list[dict[str, Any]]:
    return [{k: f.get(k) for k in ("role", "path", "bytes", "sha256")} for f in entries or []]


def _step_view(step: Mapping[str, Any]) -> dict[str, Any]:
    """What a step's details show (``details.html.j2``)."""
    tool = step.get("tool") or {}
    calls = step.get("calls") or (
        [{"function": step["function"], "arguments": step.get("arguments")}]
        if step.get("function")
        else []
    )
    metrics = (step.get("qc") or {}).get("metrics")
    return {
        "name": step.get("step"),
        "meta": [
            ("tool", f"{tool.get('name') or '—'} {tool.get('version') or ''}".strip()),
            ("backend", step.get("backend")),
            ("seed", step.get("seed")),
            ("host", step.get("host")),
            ("SLURM job", step.get("slurm_job_id") or "—"),
            ("start", step.get("start")),
            ("end", step.get("end")),
            ("duration", f"{_num(step.get('duration_s'), '.2f')} s"),
        ],
        "command": step.get("command"),
        "cwd": step.get("cwd"),
        "calls": "\n".join(_call_text(c) for c in calls),
        "params": _json(step["params"]) if step.get("params") else None,
        "inputs": _files(step.get("inputs")),
        "outputs": _files(step.get("outputs")),
        "qc_metrics": _json(metrics) if metrics else None,
    }


def _details_body(record: Mapping[str, Any]) -> Markup:
    """A scan's steps in detail: inline in the page, or on the scan's own page."""
    steps = [_step_view(s) for s in record.get("steps", [])]
    return Markup(PAGES.get_template("details.html.j2").render(steps=steps))


def _verdict(record: Mapping[str, Any]) -> str:
    return "QC pass" if qc_passed(record) else "QC FAIL"


def _scan_name(record: Mapping[str, Any]) -> str:
    return f"{_text(record.get('dataset'))} / {_text(record.get('scan'))}"


def _details_page(record: Mapping[str, Any], body: Markup, back: str) -> str:
    """One scan's own page (in the report's folder) with its steps' details."""
    return PAGES.get_template("scan.html.j2").render(
        name=_scan_name(record), verdict=_verdict(record), back=back, body=body
    )


def _exclusions_in_order(exclusions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(x: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(x.get(k) or "") for k in ("dataset", "subject", "session"))

    fields = ("dataset", "subject", "session", "path", "reason")
    return [{k: x.get(k) for k in fields} for x in sorted(exclusions, key=key)]


def _versions_rows(versions: dict[str, dict[str | None, int]]) -> list[dict[str, Any]]:
    """A row per tool: its versions (several flag the row), with their scan counts."""
    rows = []
    for tool in sorted(versions):
        counts = versions[tool]
        rows.append(
            {
                "name": tool,
                "mixed": len(counts) > 1,
                "counts": [
                    (v if v is not None else "not installed / not recorded", n)
                    for v, n in sorted(counts.items(), key=lambda kv: str(kv[0]))
                ],
                "total": sum(counts.values()),
            }
        )
    return rows


def _plots(metrics: Sequence[Metric], labels: Sequence[str]) -> dict[str, Any]:
    """A strip plot per metric that varies (``plots``); the constant ones (``constant``)."""
    plots = []
    constant = []
    for m in metrics:
        svg = strip_plot(m, labels)
        if not svg:
            constant.append((_metric_label(m), next(iter(m.values.values()), None)))
            continue
        plots.append(
            {
                "key": m.key,
                "name": m.name,
                "step": m.step,
                "n": len(m.values),
                "median": m.median,
                "failed": len(m.failed),
                "outliers": len(m.outliers - m.failed),
                "svg": Markup(svg),  # strip_plot escapes the scans' names itself
            }
        )
    return {"plots": plots, "constant": constant, "outlier_rule": OUTLIER_RULE}


def _metrics_in_order(metrics: list[Metric], steps: Sequence[str]) -> list[Metric]:
    rank = {s: k for k, s in enumerate(steps)}
    return sorted(metrics, key=lambda m: rank.get(m.step, len(rank)))  # stable: first seen


def _sort_key(record: Mapping[str, Any]) -> tuple[str, str]:
    return (str(record.get("dataset") or ""), str(record.get("scan") or ""))


# ---------------------------------------------------------------------------
# The cohort, in page order


@dataclass(frozen=True)
class Cohort:
    """The scans in the page's default order (QC failures, then outliers, then the
    rest; each by dataset, scan) with what the page derives from them."""

    records: list[dict[str, Any]]
    statuses: list[str]  # per scan, one of STATUSES
    steps: list[str]  # step names, in STEP_ORDER first
    metrics: list[Metric]  # in step order
    groups: list[SiteSummary]  # per dataset and site

    @functools.cached_property
    def plotted(self) -> list[Metric]:
        return [m for m in self.metrics if not m.constant]

    @functools.cached_property
    def datasets(self) -> list[str]:
        return sorted({s.dataset for s in self.groups})

    @functools.cached_property
    def pick(self) -> int:
        """The metric column's first metric: the first that flags a scan, else the
        first plotted."""
        flagged = [k for k, m in enumerate(self.metrics) if m.failed or m.outliers]
        return flagged[0] if flagged else next((self.metrics.index(m) for m in self.plotted), 0)


def _cohort(scan_records: list[dict[str, Any]], sites: Mapping[tuple[str, str], str]) -> Cohort:
    records = sorted(scan_records, key=_sort_key)
    statuses = scan_statuses(records, cohort_metrics(records))
    records = [
        records[i]
        for i in sorted(range(len(records)), key=lambda i: (STATUSES.index(statuses[i]), i))
    ]
    steps = _steps_in_order(records)
    metrics = _metrics_in_order(cohort_metrics(records), steps)
    statuses = scan_statuses(records, metrics)
    plotted = [m for m in metrics if not m.constant]
    groups = site_summaries(records, statuses, plotted, sites)
    return Cohort(records, statuses, steps, metrics, groups)


def _scan_row(cohort: Cohort, i: int, group: int, link: str, thumb: dict) -> dict[str, Any]:
    """Scan ``i``'s row of the scan table (``scans.html.j2``)."""
    r = cohort.records[i]
    status = cohort.statuses[i]
    durations = {s.get("step"): s.get("duration_s") for s in r.get("steps", [])}
    values = [_metric_value(m, i) for m in cohort.metrics]
    value, flag = values[cohort.pick] if values else ("", "")
    qc, n_ok = _qc_items(r, i, cohort.metrics)
    return {
        "cls": {"failed": " failed", "outlier": " outlier"}.get(status, ""),
        "status": status,
        "status_rank": STATUSES.index(status),
        "failures": (r.get("qc_failures") or []) if status == "failed" else [],
        "ds": cohort.datasets.index(cohort.groups[group].dataset),
        "group": group,
        "m": ",".join(v + f for v, f in values),
        "dataset": r.get("dataset"),
        "link": link,
        "subject": r.get("subject") or r.get("scan"),
        "session": r.get("session"),
        "site": cohort.groups[group].site,
        "backend": r.get("backend"),
        "durations": [durations.get(s) for s in cohort.steps],
        "total": sum(float(d) for d in durations.values() if isinstance(d, (int, float))),
        "qc": qc,
        "n_ok": n_ok,
        "face": _face(r),
        "value": value,
        "mv_cls": {"!": " bad", "~": " outl"}.get(flag, ""),
        "thumb": thumb,
        "name": _scan_name(r),
        "verdict": _verdict(r),
    }


# ---------------------------------------------------------------------------
# The report's folder and page


def _fill_folder(
    cohort: Cohort, out: Path, folder: Path, base: Path, inline_details_bytes: int
) -> tuple[list[dict[str, Any]], int, bool]:
    """Link the thumbnails into ``folder`` and write the per-scan pages there when the
    details are too large for the page. Returns each scan's row (its ``details``
    among them), the details' size in bytes and whether they stay inline."""
    url = quote(assets_dir(out).name) + "/"
    records = cohort.records
    names = [f"{i:05d}-{safe_name(r.get('dataset'), r.get('scan'))}" for i, r in enumerate(records)]
    (folder / "thumbs").mkdir()
    thumbs = [
        _thumbnail(r, base, folder / "thumbs", f"{url}thumbs/{name}")
        for r, name in zip(records, names)
    ]
    details = [_details_body(r) for r in records]
    details_bytes = sum(len(d.encode()) for d in details)
    inline = details_bytes <= inline_details_bytes
    if inline:
        links = [f"#scan-{i}" for i in range(len(records))]
    else:
        (folder / "scans").mkdir()
        links = []
        for i, (r, body, name) in enumerate(zip(records, details, names)):
            back = f"../../{quote(out.name)}#row-{i}"
            page = _details_page(r, body, back)
            (folder / "scans" / f"{name}.html").write_text(page, encoding="utf-8")
            links.append(f"{url}scans/{name}.html")
    group_of = {i: g for g, s in enumerate(cohort.groups) for i in s.scans}
    rows = [_scan_row(cohort, i, group_of[i], links[i], thumbs[i]) for i in range(len(records))]
    for row, body in zip(rows, details):
        row["details"] = body
    return rows, details_bytes, inline


def build_report(
    scan_records: list[dict[str, Any]],
    exclusions: list[dict[str, Any]],
    settings: Mapping[str, Any],
    out_html: str | Path,
    *,
    title: str = "medtx preprocessing provenance",
    base_dir: str | Path | None = None,
    sites: Mapping[tuple[str, str], str] | None = None,
    inline_details_bytes: int = INLINE_DETAILS_BYTES,
) -> Path:
    """Write the cohort provenance report: the entry page and its folder.

    The page links its thumbnails (and, for large cohorts, per-scan pages) in
    ``assets_dir(out_html)``, which is rebuilt from scratch; the page itself is
    written atomically, last.

    Args:
        scan_records: per-scan records as ``merge_scan`` writes them.
        exclusions: ``{"dataset", "subject", "session", "path", "reason"}`` per
            excluded scan.
        settings: the ``preprocess`` config section with the resolved backend.
        out_html: the page to write.
        title: page title.
        base_dir: directory that relative paths in the records (thumbnails) are
            relative to; the current directory by default, as the workflow
            runs there.
        sites: (dataset, scan) -> site (``scan_sites`` of the scan tables); a
            scan not in it is counted under site ``unknown`` of its dataset.
        inline_details_bytes: the per-scan details stay inline in the page up to
            this size in all; beyond, each scan's go to its own page.

    Returns:
        ``Path(out_html)``.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out = Path(out_html)
    cohort = _cohort(scan_records, sites or {})
    records = cohort.records
    versions = cohort_versions(records)
    n_pass = sum(qc_passed(r) for r in records)
    with staged_dir(assets_dir(out)) as folder:
        rows, details_bytes, inline = _fill_folder(cohort, out, folder, base, inline_details_bytes)
        page = PAGES.get_template("report.html.j2").render(
            title=title,
            now=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            scans=rows,
            n_pass=n_pass,
            n_fail=len(records) - n_pass,
            n_outliers=cohort.statuses.count("outlier"),
            exclusions=_exclusions_in_order(exclusions),
            methods=methods_paragraph(settings, _paragraph_versions(versions)),
            groups=cohort.groups,
            plotted=cohort.plotted,
            datasets=cohort.datasets,
            metrics=cohort.metrics,
            pick=cohort.pick,
            step_titles=[STEP_TITLES.get(s, s) for s in cohort.steps],
            metric_head=_metric_label(cohort.metrics[cohort.pick]) if cohort.metrics else "metric",
            **_plots(cohort.metrics, [f"{r.get('dataset')}/{r.get('scan')}" for r in records]),
            versions=_versions_rows(versions),
            inline=inline,
            details_bytes=details_bytes,
            folder=assets_dir(out).name,
        )
    return write_text(page, out)


def write_report(
    record_paths: list[str],
    scan_tables: list[str],
    settings: Mapping[str, Any],
    out_html: str | Path,
) -> Path:
    """``medtx report``: the cohort report from the scans' records and scan tables
    (their exclusions, and each scan's site)."""
    from medtx.data.scans import excluded_scans

    records = load_scan_records(record_paths) if record_paths else []
    return build_report(
        records,
        excluded_scans(scan_tables),
        settings,
        out_html,
        sites=scan_sites(scan_tables),
    )
