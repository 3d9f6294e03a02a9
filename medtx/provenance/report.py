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
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medtx.errors import MedtxError
from medtx.io import link_or_copy, write_text
from medtx.provenance.qc import NOT_MEASURED, face_status, unmeasured
from medtx.provenance.report_assets import CSS, DETAILS_CSS, JS
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
from medtx.workflow.paths import PROVENANCE_SUFFIX

__all__ = [
    "INLINE_DETAILS_BYTES",
    "assets_dir",
    "build_report",
    "cohort_versions",
    "find_provenance_files",
    "load_scan_record",
    "load_scan_records",
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
PROVENANCE_GLOB = f"*{PROVENANCE_SUFFIX}"
# Per-scan details (commands, hashes: ~9 KB a scan) stay inline in the page up to
# this many bytes in all (~200 scans); beyond, each scan gets its own small page.
INLINE_DETAILS_BYTES = 2_000_000
THUMB_WIDTH = 170  # shown width of a thumbnail, px
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")

# ---------------------------------------------------------------------------
# Loading


def find_provenance_files(root: str | Path) -> list[Path]:
    """All ``*_provenance.json`` files under ``root`` (recursively), sorted."""
    root = Path(root)
    if not root.exists():
        raise MedtxError(f"provenance root does not exist: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob(PROVENANCE_GLOB) if p.is_file())


def load_scan_record(path: str | Path) -> dict[str, Any]:
    """One per-scan provenance record, checked to be a JSON object with steps."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MedtxError(f"provenance record does not exist: {path}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedtxError(f"{path}: not a readable provenance JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
        raise MedtxError(
            f"{path}: not a per-scan provenance record (expected an object "
            "with a 'steps' list, as medtx.provenance.records.merge_scan writes)"
        )
    return record


def load_scan_records(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load per-scan records from JSON files; a directory is searched recursively."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(find_provenance_files(p) if p.is_dir() else [p])
    return [load_scan_record(f) for f in files]


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
# Page pieces


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str = ".1f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "—"


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


def _thumbnail_html(record: Mapping[str, Any], base_dir: Path, folder: Path, href: str) -> str:
    """Link the scan's thumbnail into ``folder`` as ``<last part of href><suffix>`` and
    return its lazy ``<img>`` (``href``: that name's URL relative to the page), or a
    placeholder when the record names none or the file is gone."""
    thumb = record.get("thumbnail")
    if not thumb:
        return '<span class="missing">no thumbnail</span>'
    src = _resolve(thumb, base_dir)
    suffix = src.suffix.lower() if src.suffix.lower() in IMAGE_SUFFIXES else ".png"
    dst = folder / f"{href.rsplit('/', 1)[-1]}{suffix}"
    try:
        link_or_copy(src, dst)
    except OSError:
        return f'<span class="missing" title="{_e(thumb)}">thumbnail missing</span>'
    href += suffix
    size = _png_size(dst)
    dims = (
        f' width="{THUMB_WIDTH}" height="{round(size[1] * THUMB_WIDTH / size[0])}"' if size else ""
    )
    return (
        f'<img class="thumb" loading="lazy" decoding="async"{dims} '
        f'alt="QC thumbnail of {_e(record.get("scan"))}" title="{_e(thumb)}" src="{_e(href)}">'
    )


def _bounds(check: Mapping[str, Any]) -> str:
    lo = _num(check.get("min"), "g") if check.get("min") is not None else "−∞"
    hi = _num(check.get("max"), "g") if check.get("max") is not None else "∞"
    return f"{lo} … {hi}"


def _qc_html(record: Mapping[str, Any], i: int, metrics: Sequence[Metric]) -> str:
    """The row's QC cell: what is wrong (failed checks, robust outliers, metrics a
    threshold wants but the record lacks), then how many checks passed."""
    spans = []
    n_ok = 0
    thresholds = (record.get("qc") or {}).get("thresholds")
    thresholds = thresholds if isinstance(thresholds, Mapping) else {}
    for step in record.get("steps", []):
        qc = step.get("qc") or {}
        for c in qc.get("checks", []):
            if c.get("passed"):
                n_ok += 1
                continue
            spans.append(
                f'<span class="bad" title="{_e(step.get("step"))}: allowed '
                f'{_e(_bounds(c))}">✗ {_e(c.get("metric"))} '
                f"{_e(_num(c.get('value'), '.4g'))}</span>"
            )
        for metric in unmeasured(step, thresholds):
            spans.append(
                f'<span class="missing" title="{_e(step.get("step"))}: a threshold is set '
                f'but the step did not record the metric (an older record)">'
                f"{_e(metric)} {NOT_MEASURED}</span>"
            )
    for m in metrics:
        if i in m.outliers and i not in m.failed:
            spans.append(
                f'<span class="outl" title="{_e(m.step)}: robust outlier; cohort median '
                f'{_e(_num(m.median, ".4g"))}">~ {_e(m.name)} {_e(_num(m.values[i], ".4g"))}</span>'
            )
    if n_ok:
        spans.append(f'<span class="info">✓ {n_ok} check{"" if n_ok == 1 else "s"} passed</span>')
    return "".join(spans) or '<span class="missing">no checks</span>'


def _status_html(record: Mapping[str, Any], status: str) -> str:
    if status != "failed":
        extra = ' <span class="outl">outlier</span>' if status == "outlier" else ""
        return f'<span class="ok">pass</span>{extra}'
    failures = record.get("qc_failures") or []
    text = '<span class="bad">FAIL</span>'
    if failures:
        text += "<br><small>" + "<br>".join(_e(f) for f in failures) + "</small>"
    return text


def _metric_value(m: Metric, i: int) -> tuple[str, str]:
    """Scan ``i``'s value of ``m`` as text and its flag: ``!`` failed, ``~`` outlier."""
    value = m.values.get(i)
    if value is None:
        return "", ""
    return format(value, ".6g"), "!" if i in m.failed else "~" if i in m.outliers else ""


def _metric_label(m: Metric) -> str:
    return f"{m.name} ({m.step})"


def _face_html(record: Mapping[str, Any]) -> str:
    """The face column: the face check's verdict and its two judged figures."""
    face = face_status(record)
    status = face["status"]
    if status == NOT_MEASURED:
        return f'<span class="missing" title="{_e(face["note"])}">not measured</span>'
    figures = (
        f"<br><small>signal {_e(_num(face['face_signal'], '.3f'))}, "
        f"blob {_e(_num(face['face_component_ml'], '.0f'))} ml</small>"
    )
    cls = {"pass": "ok", "fail": "bad"}.get(status, "missing")
    label = {"pass": "pass", "fail": "FAIL"}.get(status, status)
    title = face["note"] or "face signal and largest face blob of the model-ready volume"
    return f'<span class="{cls}" title="{_e(title)}">{_e(label)}</span>{figures}'


def _call_text(call: Mapping[str, Any]) -> str:
    args = call.get("arguments") or {}
    inner = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in args.items())
    return f"{call.get('function')}({inner})"


def _files_html(title: str, files: list[Mapping[str, Any]]) -> str:
    if not files:
        return ""
    rows = "".join(
        f"<tr><td>{_e(f.get('role'))}</td><td>{_e(f.get('path'))}</td>"
        f"<td class=num>{_e(f.get('bytes'))}</td><td class=sha>{_e(f.get('sha256'))}</td></tr>"
        for f in files
    )
    return (
        f"<p><b>{_e(title)}</b></p><table><tr><th>role</th><th>path</th><th>bytes</th>"
        f"<th>sha256</th></tr>{rows}</table>"
    )


def _step_details(step: Mapping[str, Any]) -> str:
    tool = step.get("tool") or {}
    meta = [
        ("tool", f"{tool.get('name') or '—'} {tool.get('version') or ''}".strip()),
        ("backend", step.get("backend")),
        ("seed", step.get("seed")),
        ("host", step.get("host")),
        ("SLURM job", step.get("slurm_job_id") or "—"),
        ("start", step.get("start")),
        ("end", step.get("end")),
        ("duration", f"{_num(step.get('duration_s'), '.2f')} s"),
    ]
    out = [
        f"<h4>{_e(step.get('step'))}</h4><p>"
        + " · ".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in meta)
        + "</p>"
    ]
    if step.get("command"):
        where = f" (run from {_e(step['cwd'])})" if step.get("cwd") else ""
        out.append(f"<p><b>command</b>{where}</p><pre>{_e(step['command'])}</pre>")
    calls = step.get("calls") or (
        [{"function": step["function"], "arguments": step.get("arguments")}]
        if step.get("function")
        else []
    )
    if calls:
        out.append(
            "<p><b>function calls</b></p><pre>"
            + _e("\n".join(_call_text(c) for c in calls))
            + "</pre>"
        )
    if step.get("params"):
        out.append(
            "<p><b>parameters</b></p><pre>"
            + _e(json.dumps(step["params"], sort_keys=True, default=str))
            + "</pre>"
        )
    out.append(_files_html("inputs", step.get("inputs") or []))
    out.append(_files_html("outputs", step.get("outputs") or []))
    qc = step.get("qc") or {}
    if qc.get("metrics"):
        out.append(
            "<p><b>QC metrics</b></p><pre>"
            + _e(json.dumps(qc["metrics"], sort_keys=True, default=str))
            + "</pre>"
        )
    return "".join(out)


def _details_body(record: Mapping[str, Any]) -> str:
    return "".join(_step_details(s) for s in record.get("steps", []))


def _verdict(record: Mapping[str, Any]) -> str:
    return "QC pass" if qc_passed(record) else "QC FAIL"


def _details_page(record: Mapping[str, Any], body: str, back: str) -> str:
    """One scan's own page (in the report's folder) with its steps' details."""
    name = f"{_e(record.get('dataset'))} / {_e(record.get('scan'))}"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{name} — provenance</title><style>{DETAILS_CSS}</style></head><body>"
        f'<p><a href="{_e(back)}">← back to the report</a></p>'
        f"<h1>{name} — {_e(_verdict(record))}</h1>{body}</body></html>\n"
    )


def _exclusions_html(exclusions: list[dict[str, Any]]) -> str:
    if not exclusions:
        return "<p>No scans were excluded.</p>"
    rows = "".join(
        f'<tr class="exclusion"><td>{_e(x.get("dataset"))}</td><td>{_e(x.get("subject"))}</td>'
        f"<td>{_e(x.get('session') or '—')}</td><td>{_e(x.get('path'))}</td>"
        f"<td>{_e(x.get('reason'))}</td></tr>"
        for x in sorted(
            exclusions,
            key=lambda x: (
                str(x.get("dataset") or ""),
                str(x.get("subject") or ""),
                str(x.get("session") or ""),
            ),
        )
    )
    return (
        "<table><tr><th>dataset</th><th>subject</th><th>session</th><th>path</th>"
        f"<th>reason</th></tr>{rows}</table>"
    )


def _versions_html(versions: dict[str, dict[str | None, int]]) -> str:
    if not versions:
        return '<p class="missing">No tool versions recorded.</p>'
    rows = []
    for tool in sorted(versions):
        counts = versions[tool]
        mixed = len(counts) > 1
        text = "<br>".join(
            f"{_e(v if v is not None else 'not installed / not recorded')}"
            + (f" ({n} scans)" if mixed else "")
            for v, n in sorted(counts.items(), key=lambda kv: str(kv[0]))
        )
        rows.append(
            f"<tr{' class=warn' if mixed else ''}><td>{_e(tool)}</td>"
            f"<td>{text}</td><td class=num>{sum(counts.values())}</td></tr>"
        )
    return (
        "<table><tr><th>tool</th><th>version</th><th>scans</th></tr>" + "".join(rows) + "</table>"
    )


def _sites_html(groups: Sequence[SiteSummary], plotted: Sequence[Metric]) -> str:
    """The per-site table: counts by status and each plotted metric's median."""
    head = "".join(
        f'<th data-sort="num" title="median, {_e(m.step)}">{_e(m.name)}</th>' for m in plotted
    )
    rows = []
    for g, s in enumerate(groups):
        medians = "".join(
            f"<td class=num>{_e(_num(s.medians[m.key], '.4g'))}</td>" for m in plotted
        )
        rows.append(
            f'<tr data-i="{g}"><td>{_e(s.dataset)}</td><td>{_e(s.site)}</td>'
            f"<td class=num>{len(s.scans)}</td><td class=num>{s.passed}</td>"
            f"<td class=num>{s.outliers}</td><td class=num>{s.failed}</td>{medians}</tr>"
        )
    return (
        '<p class="note">Scans per dataset and site (from the scan tables; a scan with no '
        "site is counted under <i>unknown</i>): passed QC with no outlier, passed but an "
        "outlier, failed QC; then the median of each plotted metric.</p>"
        '<div class="scroll"><table class="sortable" id="sites"><thead><tr>'
        '<th data-sort="text">dataset</th><th data-sort="text">site</th>'
        '<th data-sort="num">scans</th><th data-sort="num">passed</th>'
        f'<th data-sort="num">outliers</th><th data-sort="num">failed</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _plots_html(metrics: Sequence[Metric], labels: Sequence[str]) -> str:
    """A strip plot per metric that varies; the constant ones named in a line."""
    figures = []
    constant = []
    for m in metrics:
        svg = strip_plot(m, labels)
        if not svg:
            value = next(iter(m.values.values()), None)
            constant.append(f"{_e(_metric_label(m))} = {_e(_num(value, '.4g'))}")
            continue
        counts = [f"{len(m.values)} scans", f"median {_e(_num(m.median, '.4g'))}"]
        if m.failed:
            counts.append(f'<span class="bad">{len(m.failed)} failed</span>')
        if m.outliers - m.failed:
            counts.append(f'<span class="outl">{len(m.outliers - m.failed)} outliers</span>')
        figures.append(
            f'<figure class="plot" data-metric="{_e(m.key)}"><figcaption><b>{_e(m.name)}</b> '
            f"({_e(m.step)}) · {' · '.join(counts)}</figcaption>{svg}</figure>"
        )
    out = [
        '<p class="note legend">Each dot is a scan (hover for its name and value; click '
        "to find its row; hover or click a row of the scan table to highlight its dot in "
        'every plot).<i style="background:#d00"></i>failed this check'
        '<i style="background:#f08c00"></i>robust outlier: '
        f"{_e(OUTLIER_RULE)}. Red lines: the check's thresholds; dashed: the median; "
        "dotted: the outlier fences.</p>"
    ]
    if figures:
        out.append(f'<div id="plots">{"".join(figures)}</div>')
    else:
        out.append('<p class="missing">No QC metric varies across the scans.</p>')
    if constant:
        out.append(
            '<p class="note">The same in every scan (not plotted): ' + "; ".join(constant) + ".</p>"
        )
    return "".join(out)


def _controls_html(
    groups: Sequence[SiteSummary],
    datasets: Sequence[str],
    metrics: Sequence[Metric],
    pick: int,
    n: int,
) -> str:
    sites = "".join(
        f'<option value="g{g}">{_e(s.dataset)} / {_e(s.site)}</option>'
        for g, s in enumerate(groups)
    )
    per_dataset = "".join(
        f'<option value="d{d}">{_e(name)} (all sites)</option>' for d, name in enumerate(datasets)
    )
    options = "".join(
        f'<option value="{k}"{" selected" if k == pick else ""}>{_e(_metric_label(m))}</option>'
        for k, m in enumerate(metrics)
    )
    statuses = "".join(
        f'<option value="{v}">{label}</option>'
        for v, label in (
            ("all", "all"),
            ("failed", "failed"),
            ("outlier", "outliers"),
            ("passed", "passed"),
        )
    )
    return (
        '<div class="controls" hidden>'  # the page's script shows them
        '<input type="search" id="filter" placeholder="filter: scan, dataset, site, failure…" '
        'aria-label="filter the scans by text">'
        f'<label>status <select id="status-filter">{statuses}</select></label>'
        '<label>dataset / site <select id="site-filter"><option value="">all</option>'
        f'<optgroup label="datasets">{per_dataset}</optgroup>'
        f'<optgroup label="sites">{sites}</optgroup></select></label>'
        f'<label>metric column <select id="metric-pick">{options}</select></label>'
        '<label><input type="checkbox" id="show-thumbs" checked> thumbnails</label>'
        f'<span id="shown">{n} of {n} scans shown</span></div>'
    )


def _scan_table_html(
    records: Sequence[Mapping[str, Any]],
    statuses: Sequence[str],
    steps: Sequence[str],
    metrics: Sequence[Metric],
    pick: int,
    groups: Sequence[SiteSummary],
    links: Sequence[str],
    thumbs: Sequence[str],
) -> str:
    """The scan table: a row per scan (``row-<i>``, in the default order) whose
    attributes carry its status, dataset and site group (``d<k>``, ``g<k>``, as the
    filters' options) and every metric's value for the metric column."""
    datasets = sorted({s.dataset for s in groups})
    group_of = {i: g for g, s in enumerate(groups) for i in s.scans}
    rows = []
    for i, r in enumerate(records):
        durations = {s.get("step"): s.get("duration_s") for s in r.get("steps", [])}
        total = sum(float(d) for d in durations.values() if isinstance(d, (int, float)))
        cells = "".join(f"<td class=num>{_e(_num(durations.get(s)))}</td>" for s in steps)
        status = statuses[i]
        cls = {"failed": " failed", "outlier": " outlier"}.get(status, "")
        values = [_metric_value(m, i) for m in metrics]
        value, flag = values[pick] if values else ("", "")
        mv_cls = {"!": " bad", "~": " outl"}.get(flag, "")
        group = groups[group_of[i]]
        rows.append(
            f'<tr class="scan{cls}" id="row-{i}" data-i="{i}" data-status="{status}" '
            f'data-ds="d{datasets.index(group.dataset)}" data-site="g{group_of[i]}" '
            f'data-m="{_e(",".join(v + f for v, f in values))}">'
            f"<td>{_e(r.get('dataset'))}</td>"
            f'<td><a href="{_e(links[i])}">{_e(r.get("subject") or r.get("scan"))}</a></td>'
            f"<td>{_e(r.get('session') or '—')}</td>"
            f"<td>{_e(group.site)}</td><td>{_e(r.get('backend'))}</td>"
            f"{cells}<td class=num>{_e(_num(total))}</td>"
            f'<td data-v="{STATUSES.index(status)}">{_status_html(r, status)}</td>'
            f'<td class="qc">{_qc_html(r, i, metrics)}</td>'
            f'<td class="face">{_face_html(r)}</td>'
            f'<td class="num mv{mv_cls}" data-v="{_e(value)}">{_e(value or "—")}</td>'
            f'<td class="th">{thumbs[i]}</td></tr>'
        )
    head = "".join(f'<th data-sort="num">{_e(STEP_TITLES.get(s, s))} (s)</th>' for s in steps)
    metric_head = _e(_metric_label(metrics[pick])) if metrics else "metric"
    return (
        '<table class="sortable" id="scans"><thead><tr>'
        '<th data-sort="text">dataset</th><th data-sort="text">subject</th>'
        '<th data-sort="text">session</th><th data-sort="text">site</th>'
        f'<th data-sort="text">backend</th>{head}<th data-sort="num">total (s)</th>'
        '<th data-sort="num">QC</th><th>QC checks</th><th>face</th>'
        f'<th data-sort="num" id="metric-head">{metric_head}</th>'
        '<th class="th">thumbnail</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _metrics_in_order(metrics: list[Metric], steps: Sequence[str]) -> list[Metric]:
    rank = {s: k for k, s in enumerate(steps)}
    return sorted(metrics, key=lambda m: rank.get(m.step, len(rank)))  # stable: first seen


def _sort_key(record: Mapping[str, Any]) -> tuple[str, str]:
    return (str(record.get("dataset") or ""), str(record.get("scan") or ""))


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
    folder_url = quote(assets_dir(out).name) + "/"
    sites = sites or {}
    # Default order: QC failures, then outliers, then the rest; each by dataset, scan.
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
    datasets = sorted({s.dataset for s in groups})
    labels = [f"{r.get('dataset')}/{r.get('scan')}" for r in records]
    n_pass = sum(qc_passed(r) for r in records)
    n_fail = len(records) - n_pass
    n_out = statuses.count("outlier")
    versions = cohort_versions(records)
    methods = methods_paragraph(settings, _paragraph_versions(versions))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    flagged = [k for k, m in enumerate(metrics) if m.failed or m.outliers]
    pick = flagged[0] if flagged else next((metrics.index(m) for m in plotted), 0)

    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p>Generated {_e(now)}.</p>",
        '<p class="counts">'
        f'<span id="n-scans">{len(records)} scans processed</span>'
        f'<span class="ok" id="n-pass">{n_pass} passed QC</span>'
        f'<span class="{"bad" if n_fail else "ok"}" id="n-fail">{n_fail} failed QC</span>'
        f'<span class="{"outl" if n_out else "ok"}" id="n-outliers">{n_out} outliers '
        "(passed QC)</span>"
        f'<span id="n-excluded">{len(exclusions)} excluded</span></p>',
        "<h2>Methods</h2>",
        f'<p class="methods">{_e(methods)}</p>',
    ]
    with staged_dir(assets_dir(out)) as folder:
        names = [
            f"{i:05d}-{safe_name(r.get('dataset'), r.get('scan'))}" for i, r in enumerate(records)
        ]
        (folder / "thumbs").mkdir()
        thumbs = [
            _thumbnail_html(r, base, folder / "thumbs", f"{folder_url}thumbs/{name}")
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
                (folder / "scans" / f"{name}.html").write_text(
                    _details_page(r, body, back), encoding="utf-8"
                )
                links.append(f"{folder_url}scans/{name}.html")

        if records:
            parts += [
                "<h2>Sites</h2>",
                _sites_html(groups, plotted),
                "<h2>QC metric distributions</h2>",
                _plots_html(metrics, labels),
                "<h2>Scans</h2>",
                '<p class="note">Failures first, then outliers, then the rest; click a '
                "header to sort, type to filter.</p>",
                _controls_html(groups, datasets, metrics, pick, len(records)),
                _scan_table_html(records, statuses, steps, metrics, pick, groups, links, thumbs),
            ]
        else:
            parts += ["<h2>Scans</h2>", '<p class="missing">No scans were processed.</p>']

        parts += ["<h2>Exclusions</h2>", _exclusions_html(exclusions)]
        parts += ["<h2>Tool versions</h2>", _versions_html(versions)]
        parts.append("<h2>Per-scan details</h2>")
        if inline:
            for i, (r, body) in enumerate(zip(records, details)):
                parts.append(
                    f'<details id="scan-{i}"><summary>{_e(r.get("dataset"))} / '
                    f"{_e(r.get('scan'))} — {_e(_verdict(r))}</summary>{body}</details>"
                )
        else:
            parts.append(
                f'<p class="note">Each scan\'s commands, parameters and file hashes '
                f"({details_bytes / 1e6:.1f} MB in all, too much for this page) are on its "
                f"own page in <code>{_e(assets_dir(out).name)}/scans/</code>, linked from "
                "its subject in the scan table.</p>"
            )
        parts.append(f"<script>{JS}</script></body></html>\n")
    return write_text("".join(parts), out)


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
