"""The write-up's agent tables: per-role TTFT/TPOT/ITL cells and the per-turn prompt-cache table.

Latencies here are milliseconds (a tiny model's TPOT rounds to 0.00 s); each cell is p50 / p95 / p99.
"""

from __future__ import annotations

from typing import Any

from ..records import Record
from ..record_sections import Percentiles, RoleMetrics, number
from . import fmt
from .tables import Cell, Table, ident, of_kind, workload_parts

#: Columns ``role_latency_cells`` fills, for ``tables.roles_table``.
ROLE_LATENCY_COLUMNS = [("TTFT p50/p95/p99 (ms)", True), ("TPOT p50/p95/p99 (ms)", True),
                        ("ITL p50/p95/p99 (ms)", True), ("First reasoning / content p95 (ms)", True)]


def _ms(value: Any) -> str:
    v = number(value)
    return fmt.num(None if v is None else v * 1000, 1)


def _trio(p: Percentiles | None) -> str:
    if p is None or p.absent:
        return fmt.DASH
    return " / ".join(_ms(x) for x in (p.p50, p.p95, p.p99))


def role_latency_cells(m: RoleMetrics) -> list[Cell]:
    """TTFT, TPOT and ITL percentiles of one role, and the thinking split (— where not measured)."""
    split = fmt.DASH
    if m.ttft_reasoning_s is not None or m.ttft_content_s is not None:
        p95 = [_ms(p.p95 if p is not None else None) for p in (m.ttft_reasoning_s, m.ttft_content_s)]
        split = " / ".join(p95)
    return [Cell(_trio(m.ttft_s), "num"), Cell(_trio(m.tpot_s), "num"), Cell(_trio(m.itl_s), "num"),
            Cell(split, "num")]


def cache_turns_table(records: list[Record]) -> Table:
    """Per workflow run and turn index: prompt and cached tokens, hit rate, compactions before the turn."""
    cols = ["Config", "Workload", "Turn", "Turns", "Prompt tokens", "Cached tokens", "Hit rate", "Compactions"]
    rows = []
    for r in of_kind(records, "workload"):
        w, metrics, _ = workload_parts(r)
        for t in metrics.cache_turns:
            rate = fmt.DASH if t.hit_rate is None else f"{float(t.hit_rate):.0%}"
            rows.append([Cell(ident(r)), Cell(str(w.name or fmt.DASH)), Cell(fmt.integer(t.turn), "num"),
                         Cell(fmt.integer(t.n), "num"), Cell(fmt.integer(t.prompt_tokens), "num"),
                         Cell(fmt.integer(t.cached_tokens), "num"), Cell(rate, "num"),
                         Cell(fmt.integer(t.compactions), "num")])
    return Table(cols, rows, [False, False] + [True] * 6)
