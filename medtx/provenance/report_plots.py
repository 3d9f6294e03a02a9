"""Per-metric distribution plots for the report, drawn as inline SVG in Python.

The page must open offline and stay small, so there is no plotting library in
it: each QC metric becomes one SVG strip where every scan is a dot. Dots in the
same narrow bin of values are spread vertically (a sina-style strip: the
strip's height at a value follows how many scans have it), failures are red,
robust outliers orange, the check's thresholds solid lines, the median a
dashed one and the outlier fences dotted. Each dot's ``<title>`` names its scan
and value, and ``data-i`` is the scan's row (``row-<i>``) so the page's script
can highlight a scan in every plot.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from medtx.provenance.report_metrics import OUTLIER_Z, Metric

WIDTH = 560
HEIGHT = 100
LEFT = RIGHT = 10
TOP = 14  # threshold labels above the band
BAND = 58  # the dots' band
AXIS_Y = TOP + BAND + 6
RADIUS = 3
BIN_PX = 2 * RADIUS  # dots closer than this share a bin and are spread vertically


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _g(value: float) -> str:
    return format(value, ".4g")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values in [lo, hi]: 1, 2 or 5 times a power of ten apart,
    the one nearest ``(hi - lo) / (n - 1)``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = power * next(
        m for m, below in ((1, 1.5), (2, 3.0), (5, 7.0), (10, 11.0)) if raw / power < below
    )
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def _dot_positions(
    values: Mapping[int, float], x: Callable[[float], float]
) -> dict[int, tuple[float, float]]:
    """Each scan's dot: at its value across, stacked about the band's centre with
    the dots that share its ``BIN_PX`` column (ordered by value, then scan)."""
    bins: dict[int, list[int]] = defaultdict(list)
    for i, v in values.items():
        bins[int((x(v) - LEFT) // BIN_PX)].append(i)
    tallest = max(len(b) for b in bins.values())
    step = min(BIN_PX + 0.5, BAND / tallest)
    centre = TOP + BAND / 2
    pos: dict[int, tuple[float, float]] = {}
    for members in bins.values():
        members.sort(key=lambda i: (values[i], i))
        mid = (len(members) - 1) / 2
        for k, i in enumerate(members):
            pos[i] = (x(values[i]), centre + (k - mid) * step)
    return pos


def strip_plot(metric: Metric, labels: Sequence[str]) -> str:
    """The metric's SVG strip: a dot per scan that recorded it (``labels[i]`` names
    scan ``i`` in its tooltip), thresholds, median and outlier fences.

    A metric with one value for every scan has no spread to draw: ``""``.
    """
    values = metric.values
    if not values or metric.constant:
        return ""
    lo, hi = min(values.values()), max(values.values())
    pad = (hi - lo) * 0.04
    lo, hi = lo - pad, hi + pad
    span = WIDTH - LEFT - RIGHT

    def x(v: float) -> float:
        return LEFT + (v - lo) / (hi - lo) * span

    parts = [
        f'<svg class="strip" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{_e(metric.key)}: a dot per scan">',
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{AXIS_Y}" y2="{AXIS_Y}"/>',
    ]
    for t in nice_ticks(lo, hi):
        tx = x(t)
        parts.append(
            f'<line class="axis" x1="{tx:.1f}" x2="{tx:.1f}" y1="{AXIS_Y}" y2="{AXIS_Y + 4}"/>'
            f'<text x="{tx:.1f}" y="{AXIS_Y + 15}" text-anchor="middle">{_e(_g(t))}</text>'
        )
    if metric.median is not None:
        mx = x(metric.median)
        parts.append(
            f'<line class="med" x1="{mx:.1f}" x2="{mx:.1f}" y1="{TOP}" y2="{AXIS_Y}">'
            f"<title>median {_e(_g(metric.median))}</title></line>"
        )
        if metric.scale:
            for side in (-1, 1):
                fence = metric.median + side * OUTLIER_Z * metric.scale
                if lo <= fence <= hi:
                    fx = x(fence)
                    parts.append(
                        f'<line class="fence" x1="{fx:.1f}" x2="{fx:.1f}" y1="{TOP}" '
                        f'y2="{AXIS_Y}"><title>outlier fence {_e(_g(fence))}</title></line>'
                    )
    kinds: dict[float, list[str]] = defaultdict(list)  # a value both min and max: one line
    for kind, bound in sorted(metric.bounds, key=lambda kb: kb[0] != "min"):
        kinds[bound].append(kind)
    for bound, names in sorted(kinds.items()):
        label = f"{' = '.join(names)} {_g(bound)}"
        if lo <= bound <= hi:
            bx = x(bound)
            anchor = "start" if bx < WIDTH / 2 else "end"
            shift = 3 if anchor == "start" else -3
            parts.append(
                f'<line class="thr" x1="{bx:.1f}" x2="{bx:.1f}" y1="{TOP - 2}" y2="{AXIS_Y}"/>'
                f'<text class="thr" x="{bx + shift:.1f}" y="{TOP - 4}" '
                f'text-anchor="{anchor}">{_e(label)}</text>'
            )
        else:  # off the data's range: say where, without squeezing the dots
            left = bound < lo
            parts.append(
                f'<text class="thr" x="{LEFT if left else WIDTH - RIGHT}" y="{TOP - 4}" '
                f'text-anchor="{"start" if left else "end"}">'
                f"{_e(('◂ ' + label) if left else (label + ' ▸'))}</text>"
            )

    pos = _dot_positions(values, x)

    def rank(i: int) -> int:  # failures and outliers drawn last, on top
        return 2 if i in metric.failed else 1 if i in metric.outliers else 0

    for i in sorted(values, key=lambda i: (rank(i), i)):
        cx, cy = pos[i]
        r = rank(i)
        cls = ' class="f"' if r == 2 else ' class="o"' if r == 1 else ""
        note = " (failed)" if r == 2 else " (outlier)" if r == 1 else ""
        label = labels[i] if i < len(labels) else str(i)
        parts.append(
            f'<circle cx="{cx:.0f}" cy="{cy:.1f}" r="{RADIUS}" data-i="{i}"{cls}>'
            f"<title>{_e(label)}: {_e(_g(values[i]))}{note}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
