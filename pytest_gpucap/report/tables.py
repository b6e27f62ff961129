"""Result records → display tables (pandas frames formatted into cells).

Every cell is either a recorded value (rounded per ``fmt.ROUNDING_NOTE``) or a derived figure
whose column header carries † and whose formula is stated in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from ..prediction import is_host_buffer
from . import fmt

VERDICT_CLASS = {"Comfortable": "ok", "Marginal": "warn", "Risky": "bad"}
OUTCOME_CLASS = {"passed": "ok", "failed": "bad", "skipped": "warn"}
LEAD_ROLE = "Dev"
FREE_MEMORY_VERDICT = "headroom"  # slo.headroom's name: free memory after load vs the SLO


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

    def __bool__(self) -> bool:
        return bool(self.rows)


def get(record: Any, path: str, default: Any = None) -> Any:
    """``get(rec, "memory.free_mib")``: nested lookup that tolerates missing levels."""
    cur = record
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return default
        cur = cur[key]
    return cur


def _num(record: Any, path: str) -> float | None:
    """A recorded figure as a float; None when absent or not a number (a hand-edited or foreign record)."""
    return fmt.as_float(get(record, path))


def of_kind(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if isinstance(r, dict) and r.get("kind") == kind]


def measured(record: dict[str, Any]) -> bool:
    """False for a record of a config that ended before measuring (skipped, boot failed): config and reason only."""
    return isinstance(record.get("memory"), dict) or isinstance(record.get("metrics"), dict)


def is_vllm(record: dict[str, Any]) -> bool:
    """vLLM pre-allocates its KV pool, so free memory after load is not its headroom."""
    return get(record, "config.backend") == "vllm" or isinstance(get(record, "memory.kv_headroom"), dict)


def _total(n: Any, ctx: Any) -> int | None:
    n, ctx = fmt.as_int(n), fmt.as_int(ctx)
    return n * ctx if n is not None and ctx is not None else None


def _table(columns: list[tuple[str, bool]], rows: list[list[Cell]]) -> Table:
    return Table([c for c, _ in columns], rows, [n for _, n in columns])


def _n(v: Any) -> Cell:
    return Cell(v if isinstance(v, str) else str(v), "num")


def _outcome(rec: dict[str, Any]) -> Cell:
    outcome = str(rec.get("outcome") or fmt.DASH)
    reason = rec.get("reason") or rec.get("skip_reason") or rec.get("error")
    text = f"{outcome}: {reason}" if reason else outcome
    return Cell(text, OUTCOME_CLASS.get(outcome, ""))


def failed_verdicts(rec: dict[str, Any]) -> list[str]:
    """One phrase per breached verdict, e.g. ``headroom 0.31 GiB below budget 0.50 GiB``."""
    out = []
    for v in rec.get("verdicts") or []:
        if not isinstance(v, dict) or v.get("ok", True):
            continue
        if v.get("name") == FREE_MEMORY_VERDICT and is_vllm(rec):
            continue  # vLLM fills memory by design; its KV-capacity verdict is the headroom check
        op = "below budget" if v.get("higher_is_better", True) else "above budget"
        unit = v.get("unit", "")
        out.append(f"{v.get('name')} {fmt.num(v.get('measured'), 2)} {unit} {op} {fmt.num(v.get('budget'), 2)} {unit}"
                   .replace("  ", " ").strip())
    return out


# ---------------------------------------------------------------- ceiling

def ceiling_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per ceiling record, numeric columns as recorded."""
    rows = []
    for r in of_kind(records, "ceiling"):
        n, ctx = fmt.as_int(get(r, "config.n")), fmt.as_int(get(r, "config.ctx"))
        rep = get(r, "memory.server_report")
        rep = rep if isinstance(rep, dict) else {}
        rows.append({
            "config_id": str(r.get("config_id", "?")), "profile": str(r.get("profile", "")),
            "n": n, "ctx": ctx, "total_ctx": _total(n, ctx),
            "cache_k": get(r, "config.cache_type_k"), "cache_v": get(r, "config.cache_type_v"),
            "mmproj": bool(get(r, "config.mmproj", False)),
            "probe": get(r, "memory.probe"),
            "used": _num(r, "memory.used_after_load_mib"), "free": _num(r, "memory.free_mib"),
            "baseline": _num(r, "memory.baseline_used_mib"), "boot": fmt.as_float(r.get("boot_s")),
            "headroom_class": r.get("headroom_class"), "slo": _num(r, "slo.headroom_gib"),
            "kv_per_slot": _num(r, "memory.kv_per_slot_mib"),
            "predicted": _num(r, "memory.predicted_kv_per_slot_mib"),
            "model_map": rep.get("model_mib"), "kv_map": rep.get("kv_buffer_mib"),
            "compute_map": rep.get("compute_mib"), "output_map": rep.get("output_mib"),
            "vllm": is_vllm(r), "kv_headroom": get(r, "memory.kv_headroom"), "measured": measured(r),
            "record": r,
        })
    return pd.DataFrame(rows)


def kv_capacity_text(kv_headroom: Any, n: Any) -> Cell:
    """vLLM's headroom in its own terms: how many full-length sequences the pre-allocated KV pool holds vs N."""
    if not isinstance(kv_headroom, dict):
        return Cell(fmt.DASH)
    seqs = kv_headroom.get("kv_capacity_sequences")
    n = kv_headroom.get("n", n)
    if fmt.missing(seqs):
        return Cell(f"KV capacity not reported (N={fmt.integer(n)})", "warn")
    ok = kv_headroom.get("ok")
    cls = "" if ok is None else ("ok" if ok else "bad")
    return Cell(f"KV pool holds {fmt.num(seqs)} full-length sequences for N={fmt.integer(n)}", cls)


def _headroom_cells(row: Any) -> list[Cell]:
    """(SLO, verdict) cells: the free-memory class for llama.cpp, the KV-capacity verdict for vLLM."""
    if row.vllm:
        return [_n("n/a (vLLM)"), kv_capacity_text(row.kv_headroom, row.n)]
    verdict = fmt.text(row.headroom_class)
    return [_n(fmt.gib(row.slo)), Cell(verdict, VERDICT_CLASS.get(verdict, ""))]


def ceiling_table(records: list[dict[str, Any]]) -> Table:
    df = ceiling_frame(records)
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("total ctx", True),
            ("Used after load (MiB)", True), ("Free (MiB)", True), ("Boot (s)", True),
            ("Headroom SLO (GiB)", True), ("Headroom", False), ("Outcome", False)]
    rows = []
    for row in df.itertuples():
        rows.append([
            Cell(row.config_id), _n(fmt.integer(row.n)), _n(fmt.integer(row.ctx)), _n(fmt.integer(row.total_ctx)),
            _n(fmt.mib(row.used)), _n(fmt.mib(row.free)), _n(fmt.secs(row.boot)), *_headroom_cells(row),
            _outcome(row.record),
        ])
    return _table(cols, rows)


def _device_sum(mapping: Any, gpu_only: bool) -> float:
    if not isinstance(mapping, dict):
        return 0.0
    return sum(fmt.as_float(v) or 0.0 for k, v in mapping.items() if not (gpu_only and is_host_buffer(str(k))))




def kv_table(records: list[dict[str, Any]]) -> Table:
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

def workload_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in of_kind(records, "workload"):
        n, ctx = fmt.as_int(get(r, "config.n")), fmt.as_int(get(r, "config.ctx"))
        errors = get(r, "metrics.errors") or {}
        rows.append({
            "config_id": str(r.get("config_id", "?")), "profile": str(r.get("profile", "")),
            "n": n, "ctx": ctx, "total_ctx": _total(n, ctx),
            "workload": str(get(r, "workload.name", "") or ""), "agents": fmt.agents(get(r, "workload.agents")),
            "agg_tps": _num(r, "metrics.agg_tps"), "per_call_tps": _num(r, "metrics.per_call_tps"),
            "ttft_p50": _num(r, "metrics.ttft_s.p50"), "ttft_p95": _num(r, "metrics.ttft_s.p95"),
            "e2e_p50": _num(r, "metrics.e2e_s.p50"), "e2e_p95": _num(r, "metrics.e2e_s.p95"),
            "lead_p50": _num(r, f"metrics.roles.{LEAD_ROLE}.p50_s"),
            "lead_p95": _num(r, f"metrics.roles.{LEAD_ROLE}.p95_s"),
            "turns_ok": _num(r, "metrics.turns_ok"), "turns_failed": _num(r, "metrics.turns_failed"),
            "errors": ", ".join(f"{k} {v}" for k, v in sorted(errors.items()) if v) if isinstance(errors, dict) else "",
            "free_at_boot": _num(r, "memory.free_at_boot_mib"), "min_free": _num(r, "memory.min_free_mib"),
            "duration": _num(r, "workload.duration_s"), "record": r,
            "roofline": _num(r, "metrics.roofline_tps"), "efficiency": _num(r, "metrics.efficiency"),
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


def workload_table(records: list[dict[str, Any]]) -> Table:
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
    return _table(cols, rows)


def verdicts_table(records: list[dict[str, Any]]) -> Table:
    """Every SLO verdict of the workload records: measured vs budget, margin, ok or breach."""
    cols = [("Config", False), ("Workload", False), ("SLO", False), ("Measured", True), ("Budget", True),
            ("Margin", True), ("Unit", False), ("Result", False)]
    rows = []
    for r in of_kind(records, "workload"):
        for v in r.get("verdicts") or []:
            if not isinstance(v, dict):
                continue
            op = "≥" if v.get("higher_is_better", True) else "≤"
            ok = bool(v.get("ok"))
            rows.append([Cell(str(r.get("config_id", "?"))), Cell(fmt.text(get(r, "workload.name"))),
                         Cell(fmt.text(v.get("name"))), _n(fmt.num(v.get("measured"), 2)),
                         _n(f"{op} {fmt.num(v.get('budget'), 2)}"), _n(fmt.num(v.get("margin"), 2)),
                         Cell(fmt.text(v.get("unit"))), Cell("ok" if ok else "BREACH", "ok" if ok else "bad")])
    return _table(cols, rows)


def roles_table(records: list[dict[str, Any]]) -> Table:
    cols = [("Config", False), ("Workload", False), ("Role", False), ("p50 (s)", True), ("p95 (s)", True),
            ("Turns ok", True), ("Turns failed", True), ("TPS", True)]
    rows = []
    for r in of_kind(records, "workload"):
        roles = get(r, "metrics.roles") or {}
        if not isinstance(roles, dict):
            continue
        for role, m in roles.items():
            m = m if isinstance(m, dict) else {}
            rows.append([Cell(str(r.get("config_id", "?"))), Cell(str(get(r, "workload.name", "") or fmt.DASH)),
                         Cell(str(role)), _n(fmt.secs(m.get("p50_s"))), _n(fmt.secs(m.get("p95_s"))),
                         _n(fmt.integer(m.get("turns_ok"))), _n(fmt.integer(m.get("turns_failed"))),
                         _n(fmt.tps(m.get("tps")))])
    return _table(cols, rows)


def scaling_tables(records: list[dict[str, Any]]) -> list[tuple[str, Table]]:
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

def ramp_table(record: dict[str, Any]) -> Table:
    cols = [("N", True), ("Turns ok", True), ("Errors", True), ("TTFT p50 (s)", True), ("TTFT p95 (s)", True),
            ("Turn p50 (s)", True), ("Turn p95 (s)", True), ("Server RSS (MiB)", True),
            ("Device used (MiB)", True), ("", False)]
    knee, clean = record.get("knee_n"), record.get("max_clean_n")
    rows = []
    for s in record.get("steps") or []:
        if not isinstance(s, dict):
            continue
        marks = []
        if s.get("n") == clean:
            marks.append("max clean N")
        if s.get("n") == knee:
            marks.append("knee")
        rows.append([_n(fmt.integer(s.get("n"))), _n(fmt.integer(s.get("ok"))),
                     Cell(fmt.integer(s.get("errors")), "num bad" if s.get("errors") else "num"),
                     _n(fmt.secs(s.get("ttft_p50_s"))), _n(fmt.secs(s.get("ttft_p95_s"))),
                     _n(fmt.secs(s.get("turn_p50_s"))), _n(fmt.secs(s.get("turn_p95_s"))),
                     _n(fmt.mib(s.get("server_rss_mib"))), _n(fmt.mib(s.get("device_used_mib"))),
                     Cell(", ".join(marks), "warn" if "knee" in marks else "")])
    return _table(cols, rows)


def search_table(record: dict[str, Any]) -> Table:
    """Every probe of a capacity search: how it was decided (predicted, booted, known) and why."""
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("KV type", False), ("Decided by", False),
            ("Predicted free (MiB)", True), ("Boot #", True), ("Why", False)]
    knee = record.get("knee")
    rows = []
    for p in record.get("probes") or []:
        if not isinstance(p, dict):
            continue
        status = str(p.get("status", ""))
        css = "good" if p.get("config_id") == knee else ("bad" if "fail" in status or "no-fit" in status else "")
        rows.append([Cell(str(p.get("config_id", "?")), css), _n(fmt.integer(p.get("n"))),
                     _n(fmt.integer(p.get("ctx"))), Cell(fmt.text(p.get("cache_type"))), Cell(status),
                     _n(fmt.mib(p.get("predicted_free_mib"))), _n(fmt.integer(p.get("boot_order"))),
                     Cell(fmt.text(p.get("reason")), "text")])
    return _table(cols, rows)
