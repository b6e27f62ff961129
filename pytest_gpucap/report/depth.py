"""The write-up's depth section: a table per depth-swept config, the study's allocated-context
question answered from the shallow point, and each config's capacity verdict in words.

Allocated context: configs that differ only in ctx (same profile, backend, N, KV type, mmproj) ran the
same shallow request (the 0 % depth), so their decode rates there say whether allocating more context,
not using it, slows decoding. A shallow rate under ``ALLOCATED_SLOWDOWN`` × the smallest ctx's counts
as "slows"; anything else as "no measurable slowdown".
"""

from __future__ import annotations

from typing import Any

from ..record_config_verdict import ConfigVerdictRecord
from ..record_depth import DepthRecord
from ..records import Record
from . import fmt
from .recommend import latest
from .tables import Cell, Table, failed_verdicts, ident

ALLOCATED_SLOWDOWN = 0.9


def _ms(value: Any) -> str:
    v = fmt.as_float(value)
    return fmt.DASH if v is None else f"{v * 1000:.1f}"


def depth_tables(records: list[Record]) -> list[dict[str, Any]]:
    """Per depth record: the table (one row per depth), the decode ratio and the breaches."""
    out = []
    for r in latest(records, "depth"):
        if not isinstance(r, DepthRecord):
            continue
        t = Table(["Depth %", "Asked tok", "Prompt tok", "Cached tok", "Prefill tok/s", "TTFT (s)", "Decode tok/s",
                   "ITL p50 (ms)", "ITL p95 (ms)"], numeric=[True] * 9)
        for p in r.points:
            t.rows.append([Cell(fmt.num(p.depth_pct, 0), "num"), Cell(fmt.integer(p.asked_tokens), "num"),
                           Cell(fmt.integer(p.prompt_tokens), "num"), Cell(fmt.integer(p.cached_tokens), "num"),
                           Cell(fmt.tps(p.prefill_tps), "num"), Cell(fmt.secs(p.ttft_s), "num"),
                           Cell(fmt.tps(p.decode_tps), "bad num" if p.error else "num"),
                           Cell(_ms(p.itl_p50_s), "num"), Cell(_ms(p.itl_p95_s), "num")])
        t.notes = [f"{p.depth_pct:g} %: {p.error}" for p in r.points if p.error]
        out.append({"config_id": ident(r), "table": t, "ratio": fmt.num(r.decode_ratio, 2),
                    "ctx_slot": fmt.integer(r.ctx_slot), "swept": fmt.integer(r.swept_ctx), "max_tokens": fmt.integer(r.max_tokens),
                    "breaches": failed_verdicts(r), "outcome": fmt.text(r.outcome)})
    return out


def _shallow(r: DepthRecord) -> float | None:
    pts = sorted((p for p in r.points if p.decode_tps and not p.error and p.depth_pct is not None),
                 key=lambda p: p.depth_pct)
    return fmt.as_float(pts[0].decode_tps) if pts else None


def allocated_context(records: list[Record]) -> list[dict[str, Any]]:
    """Per group of configs differing only in ctx (≥ 2 ctx values): shallow decode tok/s against
    allocated ctx, the ratio to the smallest ctx, and the answer in one sentence."""
    groups: dict[tuple[Any, ...], list[tuple[DepthRecord, float]]] = {}
    for r in latest(records, "depth"):
        rate = _shallow(r) if isinstance(r, DepthRecord) and r.config.ctx is not None else None
        if rate is not None:
            c = r.config
            key = (r.profile, c.backend, c.n, c.cache_type_k, c.cache_type_v, bool(c.mmproj))
            groups.setdefault(key, []).append((r, rate))  # type: ignore[arg-type]
    out = []
    for (profile, backend, n, k, v, mmproj), pairs in groups.items():
        pairs = sorted(pairs, key=lambda pr: pr[0].config.ctx)
        recs = [r for r, _ in pairs]
        if len({r.config.ctx for r in recs}) < 2:
            continue
        base = pairs[0][1]
        t = Table(["Config", "Allocated ctx/slot", "Shallow decode tok/s", "÷ smallest ctx"],
                  numeric=[False, True, True, True])
        for r, rate in pairs:
            t.rows.append([Cell(ident(r)), Cell(fmt.short_ctx(r.config.ctx), "num"), Cell(fmt.tps(rate), "num"),
                           Cell(fmt.num(rate / base, 2) if base else fmt.DASH, "num")])
        last = pairs[-1][1] / base if base else None
        span = f"{fmt.short_ctx(recs[0].config.ctx)} to {fmt.short_ctx(recs[-1].config.ctx)}"
        answer = (f"allocated context alone slows decoding: {fmt.num(last, 2)}× the shallow decode rate from {span}"
                  if last is not None and last < ALLOCATED_SLOWDOWN else
                  f"allocated context alone does not measurably slow decoding ({fmt.num(last, 2)}× from {span}; "
                  f"'slows' means under {ALLOCATED_SLOWDOWN:g}×)")
        label = f"{profile}, {backend}, N={n}, KV {k if k == v else f'{k}/{v}'}, {'with' if mmproj else 'without'} mmproj"
        out.append({"label": label, "table": t, "answer": answer})
    return out


def config_verdicts(records: list[Record]) -> Table:
    """One row per config: its capacity verdict (``capacity_verdict``) and why."""
    t = Table(["Config", "Verdict", "Why"], numeric=[False, False, False])
    for r in latest(records, "config-verdict"):
        if isinstance(r, ConfigVerdictRecord):
            cls = {"fits": "ok", "fits, too slow": "warn", "does not fit": "bad"}.get(str(r.verdict), "")
            t.rows.append([Cell(ident(r)), Cell(fmt.text(r.verdict), cls), Cell("; ".join(r.reasons) or fmt.DASH)])
    return t
