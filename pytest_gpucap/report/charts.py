"""Small dependency-free SVG line charts.

The HTML must open with no network and the Markdown needs image files beside it, so charts are
plain SVG text: the same string is inlined in the HTML and written to ``charts/*.svg``. Every label
passes through ``markupsafe.escape`` because series names come from untrusted config ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from markupsafe import escape

from . import fmt

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
WIDTH, HEIGHT = 680, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 64
LEGEND_COLS, LEGEND_ROW = 3, 16


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False


@dataclass
class Chart:
    """One chart; ``slug`` names its file, ``x_kind`` picks tick labels (``ctx`` → 64k, ``int``, ``num``)."""

    slug: str
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    x_kind: str = "num"
    caption: str = ""

    @property
    def filename(self) -> str:
        return f"{self.slug}.svg"

    def has_points(self) -> bool:
        return any(s.points for s in self.series)


def slugify(text: str) -> str:
    """A file-name-safe slug (config ids are untrusted and may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "chart"


def _nice_step(span: float, target: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks


def _tick_label(value: float, kind: str) -> str:
    if kind == "ctx":
        return fmt.short_ctx(int(value)) if float(value).is_integer() else f"{value:g}"
    if kind == "int":
        return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def _x_scale(xs: list[float], kind: str) -> tuple[Callable[[float], float], list[float]]:
    """Log2 axis for context sizes (they double per step); linear otherwise.

    Returns (map to 0..1, ticks).
    """
    lo, hi = min(xs), max(xs)
    if lo > 0 and hi > lo and kind == "ctx":
        a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        b = max(b, a + 1)
        return (lambda x: (math.log2(x) - a) / (b - a)), [2.0 ** e for e in range(a, b + 1)]
    if hi == lo:
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    ticks = _linear_ticks(lo, hi) if not all(float(x).is_integer() for x in xs) or hi - lo > 12 else \
        [float(v) for v in range(int(math.floor(lo)), int(math.ceil(hi)) + 1)]
    t0, t1 = ticks[0], ticks[-1]
    return (lambda x: (x - t0) / (t1 - t0)), ticks


def to_svg(chart: Chart) -> str:
    """Standalone SVG text for one chart (also valid inline in HTML)."""
    pts = [p for s in chart.series for p in s.points]
    shown = [(i, s) for i, s in enumerate(chart.series) if s.points]
    legend_rows = max(1, math.ceil(len(shown) / LEGEND_COLS))
    w, h = WIDTH, HEIGHT + LEGEND_ROW * (legend_rows - 1)
    pw, ph = w - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f"<title>{escape(chart.title)}</title>",
           f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
           f"{escape(chart.title)}</text>"]
    if not pts:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xf, xticks = _x_scale(xs, chart.x_kind)
    y_hi = max(ys) if max(ys) > 0 else 1.0
    y_lo = min(0.0, min(ys))
    yticks = _linear_ticks(y_lo, y_hi * 1.05)
    y0, y1 = yticks[0], yticks[-1]

    def px(x: float) -> float:
        return round(LEFT + xf(x) * pw, 2)

    def py(y: float) -> float:
        return round(TOP + ph - (y - y0) / (y1 - y0) * ph, 2)

    out.append('<g class="axes" stroke="#888" stroke-width="1">')
    out.append(f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}"/></g>')
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + pw}" y2="{y}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4}" text-anchor="end">{escape(_tick_label(t, "num"))}</text>')
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x}" y1="{TOP + ph}" x2="{x}" y2="{TOP + ph + 5}" stroke="#888"/>')
        out.append(f'<text x="{x}" y="{TOP + ph + 18}" text-anchor="middle">'
                   f"{escape(_tick_label(t, chart.x_kind))}</text>")
    out.append(f'<text x="{LEFT + pw / 2}" y="{TOP + ph + 34}" text-anchor="middle">{escape(chart.x_label)}</text>')
    out.append(f'<text transform="translate(16 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               f"{escape(chart.y_label)}</text>")
    col_w = (w - LEFT - RIGHT) / LEGEND_COLS
    for k, (i, s) in enumerate(shown):
        color = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        pts_sorted = sorted(s.points)
        out.append(f'<g class="series" data-series="{escape(s.name)}">')
        if len(pts_sorted) > 1:
            line = " ".join(f"{px(x)},{py(y)}" for x, y in pts_sorted)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{line}"/>')
        for x, y in pts_sorted:
            out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="3.5" fill="{color}">'
                       f"<title>{escape(s.name)}: x={escape(_tick_label(x, chart.x_kind))}, y={y:,.2f}</title>"
                       "</circle>")
        out.append("</g>")
        lx = LEFT + (k % LEGEND_COLS) * col_w
        ly = TOP + ph + 54 + (k // LEGEND_COLS) * LEGEND_ROW
        label = s.name if len(s.name) <= 34 else s.name[:33] + "…"
        out.append(f'<line x1="{lx:.1f}" y1="{ly - 4}" x2="{lx + 18:.1f}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 22:.1f}" y="{ly}" font-size="11">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
