"""Two runs side by side as one self-contained HTML page: each run's capacity maps and verdicts next to each
other, then every tracked figure's delta coloured by direction, regressions first.

The deltas come from ``compare.compare_records`` (the gate's own rows), so the page and the gate agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..records import Record, as_record
from .answer import VERDICT_WORDS, gate
from .hosts import first_screen
from .render import COLUMN_TIPS, _environments
from .tables import Cell, Table


def _side(records: list[Record], label: str) -> dict[str, Any]:
    maps, _, paragraph = first_screen(records)  # per host when a run's records come from several
    passed, why = gate(records)
    return {"label": label, "maps": [{"map": m, "table": m.table(), "tips": m.tooltips()} for m in maps],
            "paragraph": paragraph,
            "gate": {"passed": passed, "why": why}}


def _direction(row: Any) -> str:
    if row.regression:
        return "bad"
    if row.worse:
        return "warn"
    return "ok" if row.delta else ""


def delta_table(rows: list[Any]) -> Table:
    """Every tracked figure of both runs: regressions first, then worse, better, unchanged."""
    from ..compare import _fmt, _fmt_pct

    order = sorted(rows, key=lambda r: (not r.regression, not r.worse, not r.delta, r.config_id))
    t = Table(["Config", "Kind", "Workload", "Figure", "Old", "New", "Δ", "Δ%", ""],
              numeric=[False, False, False, False, True, True, True, True, False])
    for r in order:
        cls = _direction(r)
        t.rows.append([Cell(r.config_id), Cell(r.kind), Cell(r.workload or "—"),
                       Cell(r.metric + (" ↑" if r.higher_is_better else " ↓")), Cell(_fmt(r.old), "num"),
                       Cell(_fmt(r.new), "num"), Cell("—" if r.delta is None else f"{r.delta:+,.2f}", f"num {cls}"),
                       Cell(_fmt_pct(r.delta_pct), f"num {cls}"), Cell(r.marker, cls)])
    return t


def render_comparison(old: list[Any], new: list[Any], rows: list[Any], threshold_pct: float,
                      names: tuple[str, str], out: Path) -> Path:
    """Write the side-by-side page to ``out``."""
    from ..compare import spread_note

    old_recs, new_recs = [as_record(r) for r in old], [as_record(r) for r in new]
    _, html_env = _environments()
    text = html_env.get_template("compare.html.j2").render(
        sides=[_side(old_recs, names[0]), _side(new_recs, names[1])], deltas=delta_table(rows),
        regressions=sum(r.regression for r in rows), threshold=threshold_pct, spread_note=spread_note(rows),
        verdict_words=VERDICT_WORDS,
        tips=COLUMN_TIPS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
