"""Charts drawn with matplotlib as SVG text: one string is inlined in the HTML and written to ``charts/*.svg``.

A chart is described as data first (``Chart`` with named ``Series``), so tests can check which series a
chart has and the Markdown and HTML cannot disagree; ``to_svg`` draws it. Text stays text in the SVG
(``svg.fonttype = none``; matplotlib escapes it), math parsing is off (``$`` in a config id is text),
and the SVG ids are salted with the chart's slug so a re-render writes the same bytes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from . import fmt

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
#: The capacity map's verdict colours (also the HTML map's CSS classes).
VERDICT_COLOURS = {"comfortable": "#b7e1c1", "marginal": "#ffe39a", "risky": "#f7b6a8", "no-fit": "#d9534f",
                   "no-fit-predicted": "#eea2a0", "too-slow": "#c3b3e6", "not-measured": "#eeeeee"}
RC = {"svg.fonttype": "none", "text.parse_math": False, "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False}


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False


@dataclass
class Marker:
    """A point called out on a chart (the knee, the minimum free memory), with its label."""

    x: float
    y: float
    label: str


@dataclass
class Span:
    """A shaded stretch of the x axis (a phase of a memory timeline: boot, hold, a workload), with its label."""

    x0: float
    x1: float
    label: str


@dataclass
class MapCell:
    """One capacity-map cell: grid position, verdict class and the text inside it."""

    row: int
    col: int
    verdict: str
    text: str
    knee: bool = False


@dataclass
class Chart:
    """One chart; ``slug`` names its file, ``x_kind`` picks the x axis (``ctx``: log2, 64k; ``log2``: log2, plain
    numbers; ``num``: linear).

    A capacity map has ``cells`` (with ``rows``/``cols`` labels) instead of series."""

    slug: str
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    x_kind: str = "num"
    caption: str = ""
    markers: list[Marker] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    cells: list[MapCell] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.slug}.svg"

    def has_points(self) -> bool:
        return bool(self.cells) or any(s.points for s in self.series)


def slugify(text: str) -> str:
    """A file-name-safe slug (config ids are untrusted and may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "chart"


def _tick(kind: str) -> FuncFormatter:
    def label(value: float, _pos: int) -> str:
        if kind == "ctx":
            return fmt.short_ctx(int(value)) if value > 0 and float(value).is_integer() else ""
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
    return FuncFormatter(label)


def _draw_spans(ax: Axes, chart: Chart) -> None:
    for i, sp in enumerate(chart.spans):
        ax.axvspan(sp.x0, sp.x1, color=PALETTE[(i + 4) % len(PALETTE)], alpha=0.12, linewidth=0).set_gid(
            f"span-{slugify(sp.label)}")
        ax.text((sp.x0 + sp.x1) / 2, 1.0, sp.label, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=7.5, color="#333")


def _draw_lines(ax: Axes, chart: Chart) -> None:
    _draw_spans(ax, chart)
    for i, s in enumerate(chart.series):
        if not s.points:
            continue
        pts = sorted(s.points)
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3.5,
                          linestyle="--" if s.dashed else "-", color=PALETTE[i % len(PALETTE)], label=s.name)
        line.set_gid(f"series-{i}-{slugify(s.name)}")
    for m in chart.markers:
        ax.annotate(m.label, (m.x, m.y), xytext=(6, 8), textcoords="offset points", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "#555"}).set_gid(f"marker-{slugify(m.label)}")
        ax.plot([m.x], [m.y], marker="D", color="#c5221f", markersize=6)
    xs = [p[0] for s in chart.series for p in s.points]
    if chart.x_kind in ("ctx", "log2") and xs and min(xs) > 0 and max(xs) > min(xs):
        ax.set_xscale("log", base=2)  # context sizes double per step
        ax.set_xticks(sorted(set(xs)))
        ax.minorticks_off()
    ax.xaxis.set_major_formatter(_tick(chart.x_kind))
    ax.yaxis.set_major_formatter(_tick("num"))
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    if any(s.points for s in chart.series):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)


def _draw_map(ax: Axes, chart: Chart) -> None:
    ax.set_xlim(0, len(chart.cols))
    ax.set_ylim(len(chart.rows), 0)
    for c in chart.cells:
        rect = Rectangle((c.col, c.row), 1, 1, facecolor=VERDICT_COLOURS.get(c.verdict, "#ffffff"),
                         edgecolor="#222" if c.knee else "#ffffff", linewidth=3 if c.knee else 1)
        rect.set_gid(f"cell-{c.row}-{c.col}-{c.verdict}{'-knee' if c.knee else ''}")
        ax.add_patch(rect)
        ax.text(c.col + 0.5, c.row + 0.5, c.text, ha="center", va="center", fontsize=7.5, wrap=True)
    ax.set_xticks([i + 0.5 for i in range(len(chart.cols))], chart.cols)
    ax.set_yticks([i + 0.5 for i in range(len(chart.rows))], chart.rows)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.tick_params(length=0)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)


def to_svg(chart: Chart) -> str:
    """Standalone SVG text for one chart (also valid inline in HTML: no XML declaration or doctype)."""
    with rc_context(RC | {"svg.hashsalt": chart.slug}):  # the Figure API: no pyplot state, no backend switch
        if chart.cells:
            size = (1.7 * max(2, len(chart.cols)) + 1.2, 0.85 * max(1, len(chart.rows)) + 1.4)
        else:
            size = (7.0, 4.6 + 0.18 * max(0, len([s for s in chart.series if s.points]) - 3) // 3)
        fig = Figure(figsize=size)
        ax = fig.subplots()
        if chart.cells:  # column labels sit on top: the title goes above them
            ax.set_title(chart.title, fontsize=11, fontweight="bold", pad=34)
        else:
            fig.suptitle(chart.title, fontsize=11, fontweight="bold")
        (_draw_map if chart.cells else _draw_lines)(ax, chart)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", buf.getvalue(), flags=re.S)  # names external vocabularies
    return text[text.index("<svg"):].replace("<svg ", '<svg class="chart" role="img" ', 1).strip()
