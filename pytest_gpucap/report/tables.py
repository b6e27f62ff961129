"""Result records → display tables (pandas frames formatted into cells).

Every cell is either a recorded value (rounded per ``fmt.ROUNDING_NOTE``) or a derived figure
whose column header carries † and whose formula is stated in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from ..prediction import is_host_buffer
from ..ramp_sections import limit_label
from ..records import (
    CeilingMemory, CeilingRecord, KvHeadroom, RampRecord, Record, SearchRecord, WorkloadInfo, WorkloadMemory, WorkloadMetrics,
    WorkloadRecord,
)
from ..verdicts import HEADROOM_CLASSES, counted_breaches, judged_by_kv_capacity
from . import fmt

VERDICT_CLASS = dict(zip(HEADROOM_CLASSES, ("ok", "warn", "bad")))
OUTCOME_CLASS = {"passed": "ok", "failed": "bad", "skipped": "warn"}
LEAD_ROLE = "Dev"
#: Stand-ins for the sections of a record that measured nothing (every figure reads as missing).
NO_CEILING = CeilingMemory.from_dict({})
NO_METRICS, NO_WORKLOAD, NO_WORKLOAD_MEMORY = (WorkloadMetrics.from_dict({}), WorkloadInfo.from_dict({}),
                                               WorkloadMemory.from_dict({}))


@dataclass(frozen=True)
class Cell:
    """One table cell: display text plus a CSS class (the HTML colours verdicts, Markdown ignores it)."""

    text: str
    cls: str = ""


@dataclass
class Table:
    """A rendered table: both templates print it as is."""

    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    numeric: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # per row, for the HTML host filter (empty: not filtered)

    def __bool__(self) -> bool:
        return bool(self.rows)


def of_kind(records: Iterable[Record], kind: str) -> list[Record]:
    """Records of one kind, measured or not (a ceiling test that was skipped is a ``ceiling`` too)."""
    return [r for r in records if r.kind == kind]


def ident(record: Record) -> str:
    return "?" if record.config_id is None else str(record.config_id)


def profile_of(record: Record) -> str:
    return "" if record.profile is None else str(record.profile)


def host_label(record: Record) -> str:
    """The host and GPU a record was measured on, as one label (the HTML host filter)."""
    host = getattr(record, "host", None)
    if not isinstance(host, dict):
        return ""
    name = host.get("hostname") or host.get("host") or ""
    gpu = host.get("gpu") or host.get("device") or ""
    return " · ".join(str(x) for x in (name, gpu) if x)


def reason_of(record: Record) -> Any:
    """Why a test did not pass (``skip_reason``/``error``: how records of earlier versions said it)."""
    return record.reason or record.extra.get("skip_reason") or record.extra.get("error")


def ceiling_memory(record: Record) -> CeilingMemory:
    return record.memory if isinstance(record, CeilingRecord) else NO_CEILING


def workload_parts(record: Record) -> tuple[WorkloadInfo, WorkloadMetrics, WorkloadMemory]:
    if isinstance(record, WorkloadRecord):
        return record.workload, record.metrics, record.memory
    return NO_WORKLOAD, NO_METRICS, NO_WORKLOAD_MEMORY


def _total(n: Any, ctx: Any) -> int | None:
    n, ctx = fmt.as_int(n), fmt.as_int(ctx)
    return n * ctx if n is not None and ctx is not None else None


def _table(columns: list[tuple[str, bool]], rows: list[list[Cell]]) -> Table:
    return Table([c for c, _ in columns], rows, [n for _, n in columns])


def _n(v: Any) -> Cell:
    return Cell(v if isinstance(v, str) else str(v), "num")


def _outcome(rec: Record) -> Cell:
    outcome = str(rec.outcome or fmt.DASH)
    reason = reason_of(rec)
    text = f"{outcome}: {reason}" if reason else outcome
    return Cell(text, OUTCOME_CLASS.get(outcome, ""))


def failed_verdicts(rec: Record) -> list[str]:
    """One phrase per breach that counts against the config, e.g. ``headroom 0.31 GiB below budget 0.50 GiB``."""
    out = []
    for v in counted_breaches(rec):
        if isinstance(v.measured, float) and math.isinf(v.measured):  # nothing to measure: the name says why
            out.append(f"{v.name}, budget {fmt.num(v.budget, 2)} {v.unit}".strip())
            continue
        op = "below budget" if v.higher_is_better else "above budget"
        out.append(f"{v.name} {fmt.num(v.measured, 2)} {v.unit} {op} {fmt.num(v.budget, 2)} {v.unit}"
                   .replace("  ", " ").strip())
    return out


# ---------------------------------------------------------------- ceiling

def ceiling_frame(records: list[Record]) -> pd.DataFrame:
    """One row per ceiling record, numeric columns as recorded."""
    rows = []
    for r in of_kind(records, "ceiling"):
        cfg, mem = r.config, ceiling_memory(r)  # type: ignore[attr-defined]
        n, ctx = fmt.as_int(cfg.n), fmt.as_int(cfg.ctx)
        rep = mem.server_report
        measured_rec = r if isinstance(r, CeilingRecord) else None
        rows.append({
            "config_id": ident(r), "profile": profile_of(r),
            "n": n, "ctx": ctx, "total_ctx": _total(n, ctx),
            "cache_k": cfg.cache_type_k, "cache_v": cfg.cache_type_v,
            "mmproj": bool(cfg.mmproj),
            "probe": mem.probe,
            "used": fmt.as_float(mem.used_after_load_mib), "free": fmt.as_float(mem.free_mib),
            "free_burst": fmt.as_float(mem.free_under_burst_mib),
            "baseline": fmt.as_float(mem.baseline_used_mib),
            "boot": fmt.as_float(measured_rec.boot_s) if measured_rec else None,
            "headroom_class": measured_rec.headroom_class if measured_rec else None,
            "slo": fmt.as_float(measured_rec.slo.headroom_gib) if measured_rec else None,
            "kv_per_slot": fmt.as_float(mem.kv_per_slot_mib),
            "predicted": fmt.as_float(mem.predicted_kv_per_slot_mib),
            "model_map": rep.model_mib, "kv_map": rep.kv_buffer_mib,
            "compute_map": rep.compute_mib, "output_map": rep.output_mib,
            "vllm": judged_by_kv_capacity(r), "kv_headroom": mem.kv_headroom, "measured": r.measured,
            "record": r,
        })
    return pd.DataFrame(rows)


def kv_capacity_text(kv_headroom: KvHeadroom | None, n: Any) -> Cell:
    """vLLM's headroom in its own terms: how many full-length sequences the pre-allocated KV pool holds vs N."""
    if not isinstance(kv_headroom, KvHeadroom):  # None, or NaN once it passed through a frame
        return Cell(fmt.DASH)
    seqs = kv_headroom.kv_capacity_sequences
    n = n if kv_headroom.n is None else kv_headroom.n
    if fmt.missing(seqs):
        return Cell(f"KV capacity not reported (N={fmt.integer(n)})", "warn")
    ok = kv_headroom.ok
    cls = "" if ok is None else ("ok" if ok else "bad")
    return Cell(f"KV pool holds {fmt.num(seqs)} full-length sequences for N={fmt.integer(n)}", cls)


def _headroom_cells(row: Any) -> list[Cell]:
    """(SLO, verdict) cells: the free-memory class for llama.cpp, the KV-capacity verdict for vLLM."""
    if row.vllm:
        return [_n("n/a (vLLM)"), kv_capacity_text(row.kv_headroom, row.n)]
    verdict = fmt.text(row.headroom_class)
    return [_n(fmt.gib(row.slo)), Cell(verdict, VERDICT_CLASS.get(verdict, ""))]


def ceiling_table(records: list[Record]) -> Table:
    df = ceiling_frame(records)
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("total ctx", True),
            ("Used after load (MiB)", True), ("Free at idle (MiB)", True), ("Free under burst (MiB)", True),
            ("Boot (s)", True),
            ("Headroom SLO (GiB)", True), ("Headroom", False), ("Outcome", False)]
    rows = []
    for row in df.itertuples():
        rows.append([
            Cell(row.config_id), _n(fmt.integer(row.n)), _n(fmt.integer(row.ctx)), _n(fmt.integer(row.total_ctx)),
            _n(fmt.mib(row.used)), _n(fmt.mib(row.free)), _n(fmt.mib(row.free_burst)), _n(fmt.secs(row.boot)),
            *_headroom_cells(row),
            _outcome(row.record),
        ])
    table = _table(cols, rows)
    table.hosts = [host_label(r) for r in df["record"]] if not df.empty else []
    return table


def _device_sum(mapping: Any, gpu_only: bool) -> float:
    if not isinstance(mapping, dict):
        return 0.0
    return sum(fmt.as_float(v) or 0.0 for k, v in mapping.items() if not (gpu_only and is_host_buffer(str(k))))




def kv_table(records: list[Record]) -> Table:
    """Per-slot KV: theoretical vs server-reported vs measured, plus the server's own breakdown."""
    df = ceiling_frame(records)
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("KV type (K/V)", False),
            ("Theoretical KV/slot", True), ("Server KV/slot", True),
            ("Measured KV/slot†", True), ("Overhead/slot†", True),
            ("Model", True), ("KV buffers", True), ("Compute", True),
            ("Used after load", True), ("Unattributed†", True)]
    rows = []
    for row in df.itertuples():
        if not row.measured:
            continue  # listed under "Not measured"; a row of dashes says nothing here
        model_total, model_txt = fmt.devices(row.model_map)
        kv_total, kv_txt = fmt.devices(row.kv_map)
        compute_total, compute_txt = fmt.devices(row.compute_map)
        measured = overhead = unattributed = None
        if not fmt.missing(row.used):
            base = fmt.as_float(row.baseline) or 0.0
            explained = sum(_device_sum(m, False) for m in (row.model_map, row.kv_map, row.compute_map, row.output_map))
            if explained:
                unattributed = float(row.used) - base - explained
            n_slots = fmt.as_int(row.n)
            if row.probe == "nvml" and n_slots and not fmt.missing(row.baseline) and not row.vllm:
                gpu_fixed = sum(_device_sum(m, True) for m in (row.model_map, row.compute_map, row.output_map))
                measured = (float(row.used) - base - gpu_fixed) / n_slots
                if not fmt.missing(row.kv_per_slot):
                    overhead = measured - float(row.kv_per_slot)
        k, v = fmt.text(row.cache_k), fmt.text(row.cache_v)
        kv_type = k if k == v else f"{k}/{v}"
        rows.append([
            Cell(row.config_id), _n(fmt.integer(row.n)), _n(fmt.integer(row.ctx)), Cell(kv_type),
            _n(fmt.mib(row.predicted)), _n(fmt.mib(row.kv_per_slot)), _n(fmt.mib(measured)), _n(fmt.mib(overhead)),
            Cell(model_txt, "num wrap"), Cell(kv_txt, "num wrap"), Cell(compute_txt, "num wrap"), _n(fmt.mib(row.used)), _n(fmt.mib(unattributed)),
        ])
    table = _table(cols, rows)
    table.notes = [
        "All figures in MiB. Theoretical KV/slot is the memory model's prediction "
        "(memory.predicted_kv_per_slot_mib), — when none was recorded.",
        "Server KV/slot is llama-server's own KV cache size divided by N (memory.kv_per_slot_mib); "
        "Model / KV buffers / Compute are the buffer sizes it logs at load, summed over devices.",
        "Measured KV/slot† = (used after load − baseline − model − compute − output buffers on the GPU) ÷ N, "
        "for GPU (NVML) records only: on host-memory profiles the measured figure is process RSS, which "
        "includes mapped weights and runtime, so no per-slot figure is derived.",
        "Overhead/slot† = Measured KV/slot − Server KV/slot (slot state, attention scratch, fragmentation).",
        "Unattributed† = used after load − baseline − all server-reported buffers (model + KV + compute + output); "
        "negative when buffers are reserved but not yet resident (untouched KV pages do not count in RSS).",
    ]
    if not df.empty and bool(df["vllm"].any()):
        table.notes.append("vLLM rows: Server KV/slot is the pre-allocated KV pool ÷ N; the pool is sized by "
                           "--gpu-memory-utilization or --kv-cache-memory-bytes, not by N × ctx, so no measured "
                           "per-slot figure is derived (see the KV-capacity verdict above).")
    return table


# ---------------------------------------------------------------- workload

def workload_frame(records: list[Record]) -> pd.DataFrame:
    rows = []
    for r in of_kind(records, "workload"):
        cfg = r.config  # type: ignore[attr-defined]
        w, m, mem = workload_parts(r)
        n, ctx = fmt.as_int(cfg.n), fmt.as_int(cfg.ctx)
        errors = m.errors or {}
        lead = m.roles.get(LEAD_ROLE)
        rows.append({
            "config_id": ident(r), "profile": profile_of(r),
            "n": n, "ctx": ctx, "total_ctx": _total(n, ctx),
            "workload": str(w.name or ""), "agents": fmt.agents(w.agents),
            "agg_tps": fmt.as_float(m.agg_tps), "per_call_tps": fmt.as_float(m.per_call_tps),
            "ttft_p50": fmt.as_float(m.ttft_s.p50), "ttft_p95": fmt.as_float(m.ttft_s.p95),
            "e2e_p50": fmt.as_float(m.e2e_s.p50), "e2e_p95": fmt.as_float(m.e2e_s.p95),
            "lead_p50": fmt.as_float(lead.p50_s) if lead else None,
            "lead_p95": fmt.as_float(lead.p95_s) if lead else None,
            "turns_ok": fmt.as_float(m.turns_ok), "turns_failed": fmt.as_float(m.turns_failed),
            "errors": ", ".join(f"{k} {v}" for k, v in sorted(errors.items()) if v) if isinstance(errors, dict) else "",
            "free_at_boot": fmt.as_float(mem.free_at_boot_mib), "min_free": fmt.as_float(mem.min_free_mib),
            "duration": fmt.as_float(w.duration_s), "record": r,
            "roofline": fmt.as_float(m.roofline_tps), "efficiency": fmt.as_float(m.efficiency),
        })
    return pd.DataFrame(rows)


def _pct(value: Any) -> str:
    """Efficiency (measured / roofline) as a percentage; a dash when unknown."""
    try:
        return fmt.DASH if value is None or value != value else f"{100 * float(value):.0f}%"
    except (TypeError, ValueError):
        return fmt.DASH


def workload_label(name: str, agents: str) -> str:
    if name and agents != fmt.DASH:
        return f"{name} ({agents})"
    return name or agents


def workload_table(records: list[Record]) -> Table:
    df = workload_frame(records)
    cols = [("Config", False), ("Slots", True), ("ctx/slot", True), ("Workload", False), ("Agg TPS", True),
            ("Roofline TPS", True), ("Efficiency", True),
            ("Per-call TPS", True), (f"{LEAD_ROLE} p50 (s)", True), (f"{LEAD_ROLE} p95 (s)", True),
            ("E2E p95 (s)", True), ("TTFT p95 (s)", True), ("Free at boot (MiB)", True),
            ("Min free (MiB)", True), ("Turns ok/failed", True), ("Outcome", False)]
    rows = []
    for row in df.itertuples():
        turns = f"{fmt.integer(row.turns_ok)} / {fmt.integer(row.turns_failed)}"
        if row.errors:
            turns += f" ({row.errors})"
        rows.append([
            Cell(row.config_id), _n(fmt.integer(row.n)), _n(fmt.integer(row.ctx)),
            Cell(workload_label(row.workload, row.agents), "text"), _n(fmt.tps(row.agg_tps)),
            _n(fmt.tps(row.roofline)), _n(_pct(row.efficiency)),
            _n(fmt.tps(row.per_call_tps)), _n(fmt.secs(row.lead_p50)), _n(fmt.secs(row.lead_p95)),
            _n(fmt.secs(row.e2e_p95)), _n(fmt.secs(row.ttft_p95)), _n(fmt.mib(row.free_at_boot)),
            _n(fmt.mib(row.min_free)), Cell(turns, "num bad" if row.errors or row.turns_failed else "num"),
            _outcome(row.record),
        ])
    table = _table(cols, rows)
    table.hosts = [host_label(r) for r in df["record"]] if not df.empty else []
    return table


def repeat_table(records: list[Record]) -> Table:
    """Workloads run K times (``--gpucap-repeat``): per gated figure the median the record reports and its range."""
    cols = [("Config", False), ("Workload", False), ("Runs", True), ("Figure", False), ("Median", True),
            ("Min", True), ("Max", True), ("Spread†", True)]
    rows = []
    for r in of_kind(records, "workload"):
        rep = getattr(r, "repeat", None)
        if rep is None:
            continue
        for name, fig in rep.figures.items():
            if name in ("agg_tps", "per_call_tps", "e2e_p95_s", "ttft_p95_s"):
                spread = fig.spread_pct
                rows.append([Cell(ident(r)), Cell(str(workload_parts(r)[0].name or ""), "text"),
                             _n(fmt.integer(rep.runs)), Cell(name), _n(fmt.num(fig.median, 2)),
                             _n(fmt.num(fig.min, 2)), _n(fmt.num(fig.max, 2)),
                             _n(fmt.DASH if spread is None else f"{spread:.1f}%")])
    table = _table(cols, rows)
    table.notes = ["Spread† = (max − min) ÷ median; the regression gate flags a change only beyond the larger of "
                   "its threshold and this spread."]
    return table


def verdicts_table(records: list[Record]) -> Table:
    """Every SLO verdict of the workload records: measured vs budget, margin, ok or breach."""
    cols = [("Config", False), ("Workload", False), ("SLO", False), ("Measured", True), ("Budget", True),
            ("Margin", True), ("Unit", False), ("Result", False)]
    rows = []
    for r in of_kind(records, "workload"):
        name = fmt.text(workload_parts(r)[0].name)
        for v in getattr(r, "verdicts", ()):
            op = "≥" if v.higher_is_better else "≤"
            rows.append([Cell(ident(r)), Cell(name), Cell(fmt.text(v.name)), _n(fmt.num(v.measured, 2)),
                         _n(f"{op} {fmt.num(v.budget, 2)}"), _n(fmt.num(v.margin, 2)),
                         Cell(fmt.text(v.unit)), Cell("ok" if v.ok else "BREACH", "ok" if v.ok else "bad")])
    return _table(cols, rows)


def roles_table(records: list[Record]) -> Table:
    from .agent_tables import ROLE_LATENCY_COLUMNS, role_latency_cells

    cols = [("Config", False), ("Workload", False), ("Role", False), ("p50 (s)", True), ("p95 (s)", True),
            ("Turns ok", True), ("Turns failed", True), ("TPS", True)] + ROLE_LATENCY_COLUMNS
    rows = []
    for r in of_kind(records, "workload"):
        w, metrics, _ = workload_parts(r)
        for role, m in metrics.roles.items():
            rows.append([Cell(ident(r)), Cell(str(w.name or fmt.DASH)),
                         Cell(str(role)), _n(fmt.secs(m.p50_s)), _n(fmt.secs(m.p95_s)),
                         _n(fmt.integer(m.turns_ok)), _n(fmt.integer(m.turns_failed)),
                         _n(fmt.tps(m.tps))] + role_latency_cells(m))
    return _table(cols, rows)


def scaling_tables(records: list[Record]) -> list[tuple[str, Table]]:
    """Per (profile, N, workload) with ≥ 2 context sizes: the reference's 'scaling curve' table."""
    df = workload_frame(records)
    out: list[tuple[str, Table]] = []
    if df.empty:
        return out
    cols = [("ctx/slot", True), ("Config", False), ("Agg TPS", True), ("Per-call TPS", True),
            (f"{LEAD_ROLE} p50 (s)", True), ("E2E p95 (s)", True), ("Agg TPS vs smallest ctx†", True)]
    for (profile, n, workload), group in df.groupby(["profile", "n", "workload"], sort=False, dropna=False):
        if group["ctx"].nunique() < 2:
            continue
        group = group.sort_values("ctx", kind="stable")
        first = group["agg_tps"].iloc[0]
        rows = []
        for row in group.itertuples():
            change = None
            if not fmt.missing(first) and first and not fmt.missing(row.agg_tps):
                change = (float(row.agg_tps) / float(first) - 1) * 100
            rows.append([_n(fmt.short_ctx(row.ctx)), Cell(row.config_id), _n(fmt.tps(row.agg_tps)),
                         _n(fmt.tps(row.per_call_tps)), _n(fmt.secs(row.lead_p50)), _n(fmt.secs(row.e2e_p95)),
                         _n(fmt.DASH if change is None else f"{change:+.1f}%")])
        label = f"N={n}, workload {workload_label(str(workload), group['agents'].iloc[0])}, profile {profile}"
        out.append((label, _table(cols, rows)))
    return out


# ---------------------------------------------------------------- ramp

def ramp_table(record: RampRecord) -> Table:
    """One row per step; the marks column names the knees and, at the last step, the limit the ramp hit."""
    cols = [("N", True), ("Turns ok", True), ("Errors", True), ("TTFT p50 (s)", True), ("TTFT p95 (s)", True),
            ("Turn p50 (s)", True), ("Turn p95 (s)", True), ("Server RSS (MiB)", True),
            ("Device used (MiB)", True), ("", False), ("Decode/call (tok/s)", True), ("In slots (max)", True),
            ("Deferred (max)", True)]
    knee, clean, queue = record.knee_n, record.max_clean_n, record.queue_knee_n
    rows = []
    for i, s in enumerate(record.steps):
        marks = []
        if s.n == clean:
            marks.append("max clean N")
        if s.n == knee:
            marks.append("knee")
        if s.n == queue:
            marks.append("queue knee")
        if i == len(record.steps) - 1 and record.limit is not None:
            marks.append("limit: " + limit_label(record.limit, record.ceiling, None))
        rows.append([_n(fmt.integer(s.n)), _n(fmt.integer(s.ok)),
                     Cell(fmt.integer(s.errors), "num bad" if s.errors else "num"),
                     _n(fmt.secs(s.ttft_p50_s)), _n(fmt.secs(s.ttft_p95_s)),
                     _n(fmt.secs(s.turn_p50_s)), _n(fmt.secs(s.turn_p95_s)),
                     _n(fmt.mib(s.server_rss_mib)), _n(fmt.mib(s.device_used_mib)),
                     Cell(", ".join(marks), "warn" if "knee" in marks or record.limit not in (None, "none")
                          and i == len(record.steps) - 1 else ""),
                     _n(fmt.tps(s.decode_tps_p50)), _n(fmt.integer(s.server_processing_max)),
                     _n(fmt.integer(s.server_deferred_max))])
    return _table(cols, rows)


def ramp_limit_line(record: RampRecord) -> str:
    """The limit in words, for the line above the ramp table."""
    label = limit_label(record.limit, record.ceiling, record.limit_evidence)
    detail = record.limit_detail
    if detail is None:
        return label
    return str(detail) if str(detail).startswith(label) else f"{label} ({detail})"


def search_table(record: SearchRecord) -> Table:
    """Every probe of a capacity search: how it was decided (predicted, booted, known) and why."""
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("KV type", False), ("Decided by", False),
            ("Predicted free (MiB)", True), ("Boot #", True), ("Why", False)]
    knee = record.knee
    rows = []
    for p in record.probes:
        status = "" if p.status is None else str(p.status)
        css = "good" if p.config_id == knee else ("bad" if "fail" in status or "no-fit" in status else "")
        rows.append([Cell("?" if p.config_id is None else str(p.config_id), css), _n(fmt.integer(p.n)),
                     _n(fmt.integer(p.ctx)), Cell(fmt.text(p.cache_type)), Cell(status),
                     _n(fmt.mib(p.predicted_free_mib)), _n(fmt.integer(p.boot_order)),
                     Cell(fmt.text(p.reason), "text")])
    return _table(cols, rows)


def search_boundary_table(record: SearchRecord) -> Table:
    """The search's boundary (AIPerf's adaptive-search report): per family and axis, the last passing and
    first failing config and the SLO that failed there (the binding SLO)."""
    cols = [("Family", False), ("Axis", False), ("Last pass", False), ("First fail", False), ("Binding SLO", False),
            ("Failed verdicts", False)]
    rows = []
    for b in record.boundary:
        edge = "grid edge" if b.first_fail is None and b.last_pass is not None else fmt.text(b.first_fail_status)
        rows.append([Cell(fmt.text(b.family)), Cell("N" if b.axis == "n" else fmt.text(b.axis)),
                     Cell(fmt.text(b.last_pass), "good" if b.last_pass else ""),
                     Cell(fmt.text(b.first_fail) if b.first_fail else edge, "bad" if b.binding_slo else ""),
                     Cell(fmt.text(b.binding_slo), "warn" if b.binding_slo else ""),
                     Cell("; ".join(b.failed_verdicts or ()) or "—", "text")])
    return _table(cols, rows)
