"""Tables that check one source of figures against another, and say in words where they disagree.

The headline tables show what was measured; these show how far to trust it: the memory model's
prediction against the server and the meter, the client's token count and decode rate against the
server's own counters, the measured decode rate against the bandwidth roofline, and (vLLM) whether
offered load queued on the server. Each section is empty, and left out, when no record carries its data.
"""

from __future__ import annotations

from typing import Any

from ..records import PredictionPart, QueueTimes, Record
from . import fmt
from .tables import (
    Cell, Table, _n, _table, ceiling_memory, ident, of_kind, reason_of, workload_label, workload_parts,
)

NO_PART = PredictionPart.from_dict({})
NO_QUEUE = QueueTimes.from_dict({})

#: Prediction error within this share of the measured total counts as on target (the issue's goal).
PREDICTION_GOAL_PCT = 5.0
#: Below this share of the bandwidth roofline a run is not bandwidth-bound.
LOW_EFFICIENCY = 0.5
#: Client vs server token counts further apart than this are called out.
TOKEN_RATIO_TOLERANCE = 0.02


def _signed(value: Any, digits: int = 1, suffix: str = "") -> str:
    """``+12.3`` / ``-4.0`` (an error's sign says over- or under-prediction); missing → ``—``."""
    if fmt.missing(value):
        return fmt.DASH
    f = fmt.as_float(value)
    return str(value) if f is None else f"{f:+,.{digits}f}{suffix}"


def _ratio(value: Any) -> str:
    return fmt.num(value, 3)


def _label(rec: Record) -> str:
    """``config (workload)`` for the sentences under a table."""
    cid = ident(rec)
    w = workload_parts(rec)[0]
    name = workload_label(str(w.name or ""), fmt.agents(w.agents))
    return f"{cid} ({name})" if name and name != fmt.DASH else cid


# ---------------------------------------------------------------- memory prediction

def _kv_match(kv: PredictionPart) -> Cell:
    """Exact when every predicted KV cache line equals the server's printed MiB, else the difference
    (a server that logs no per-cache lines can only be compared on the total)."""
    if fmt.missing(kv.server_mib):
        return Cell(fmt.DASH)
    if kv.exact:
        return Cell("exact", "ok")
    diff = fmt.as_float(kv.diff_mib)
    if not kv.lines_server and diff is not None and abs(diff) < 0.005:
        return Cell("equal total (no per-cache lines logged)", "ok")
    return Cell(f"off by {_signed(diff, 2)} MiB", "bad")


def _parts(rec: Record) -> tuple[PredictionPart, PredictionPart]:
    """The total and KV rows of ``memory.prediction_error``; empty when absent."""
    err = ceiling_memory(rec).prediction_error
    if err is None:
        return NO_PART, NO_PART
    return err.total or NO_PART, err.kv or NO_PART


def _error_cell(pct: float | None) -> Cell:
    if pct is None:
        return _n(fmt.DASH)
    return Cell(_signed(pct, 1, "%"), "num ok" if abs(pct) <= PREDICTION_GOAL_PCT else "num warn")


def prediction_table(records: list[Record]) -> Table:
    """Predicted vs server-reported vs measured total memory per config, and the KV cache agreement."""
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("Predicted total (MiB)", True),
            ("Server-reported total (MiB)", True), ("Measured (MiB)", True), ("Error (MiB)", True),
            ("Error (%)", True), ("KV predicted (MiB)", True), ("KV server (MiB)", True), ("KV match", False),
            ("Compute term", False)]
    rows, errors = [], []
    for r in of_kind(records, "ceiling"):
        pred = ceiling_memory(r).predicted
        if pred is None:
            continue
        total, kv = _parts(r)
        pct = fmt.as_float(total.error_pct)
        if pct is not None:
            errors.append((abs(pct), pct, ident(r)))
        source = fmt.text(pred.compute_source)
        if pred.calibrated and source != "calibrated":
            source += " (calibrated)"
        cfg = r.config  # type: ignore[attr-defined]
        rows.append([
            Cell(ident(r)), _n(fmt.integer(cfg.n)), _n(fmt.integer(cfg.ctx)),
            _n(fmt.mib(pred.total_mib if total.predicted_mib is None else total.predicted_mib)),
            _n(fmt.mib(total.server_mib)), _n(fmt.mib(total.measured_mib)),
            _n(_signed(total.error_mib)), _error_cell(pct),
            _n(fmt.mib(pred.kv_mib if kv.predicted_mib is None else kv.predicted_mib)), _n(fmt.mib(kv.server_mib)),
            _kv_match(kv), Cell(source),
        ])
    table = _table(cols, rows)
    table.notes = [
        "Predicted total = the memory model's figure before boot (memory.predicted.total_mib): weights + mmproj "
        "+ KV + the counted part of the compute buffer + output + calibrated overhead.",
        "Server-reported total = the buffers the server logged at load (model + KV + compute + output; on NVML "
        "records, device buffers only). Measured = used after load − baseline.",
        f"Error = predicted − measured, and as a share of measured; within ±{PREDICTION_GOAL_PCT:g}% is on "
        "target. Positive: the model over-predicts (safe side).",
        "KV match compares the predicted KV cache lines with the server's own (llama_kv_cache: size = …) "
        "to the printed MiB.",
    ]
    if errors:
        worst = max(errors)
        mean = sum(e[0] for e in errors) / len(errors)
        table.notes.insert(0, f"Mean absolute error {mean:.1f}% over {len(errors)} config"
                              f"{'s' if len(errors) != 1 else ''}; largest {worst[1]:+.1f}% ({worst[2]}).")
    return table


# ---------------------------------------------------------------- client vs server

def crosscheck_table(records: list[Record]) -> Table:
    """The harness's token count and decode rate against the server's own counters, per workload run."""
    cols = [("Config", False), ("Workload", False), ("Client tokens", True), ("Server tokens (timings)", True),
            ("Server tokens (/metrics)", True), ("Token ratio", True), ("/metrics ratio", True),
            ("Decode-rate ratio", True), ("Tokens from", False), ("Client behind", False)]
    rows = []
    for r in of_kind(records, "workload"):
        w, m, _ = workload_parts(r)
        cc = m.crosscheck
        if cc is None:
            continue
        behind = bool(cc.client_behind)
        usage_missing = fmt.as_int(m.usage_missing) or 0
        rows.append([
            Cell(ident(r)), Cell(fmt.text(w.name), "text"),
            _n(fmt.integer(cc.client_tokens)), _n(fmt.integer(cc.server_timing_tokens or None)),
            _n(fmt.integer(cc.server_metrics_tokens)), _n(_ratio(cc.token_ratio)),
            _n(_ratio(cc.metrics_token_ratio)), _n(_ratio(cc.decode_rate_ratio)),
            Cell(fmt.text(getattr(r, "tokens_from", None)), "warn" if usage_missing else ""),
            Cell("yes" if behind else "no", "bad" if behind else "ok"),
        ])
    table = _table(cols, rows)
    table.notes = [
        "Token ratio = client-counted completion tokens (server usage) ÷ the server's per-request timings "
        "(predicted_n); /metrics ratio = the same ÷ the server's token counter delta over the run "
        "(it also counts requests cut at the deadline).",
        "Decode-rate ratio = client-timed decode rate ÷ the server's own (timings.predicted_per_second), over "
        "the requests that carry both; below 0.9 the client fell behind the server.",
    ]
    return table


def crosscheck_flags(records: list[Record]) -> list[str]:
    """One sentence per run whose figures the cross-check puts in doubt (or could not check)."""
    out = []
    for r in of_kind(records, "workload"):
        if not r.measured:
            continue
        m = workload_parts(r)[1]
        cc = m.crosscheck
        usage_missing = fmt.as_int(m.usage_missing) or 0
        turns_ok = fmt.as_int(m.turns_ok) or 0
        label = _label(r)
        if usage_missing:
            what = "any turn" if usage_missing >= turns_ok else f"{usage_missing} of {turns_ok} turns"
            out.append(f"{label}: the server gave no token usage on {what}: their tokens are not counted, "
                       "so TPS understates the run.")
        if cc is None:
            continue
        if cc.client_behind:
            out.append(f"{label}: client fell behind the server: figures understate it "
                       f"(decode-rate ratio {_ratio(cc.decode_rate_ratio)}); raise --gpucap-client-procs.")
        ratio = fmt.as_float(cc.token_ratio)
        if ratio is not None and abs(ratio - 1) > TOKEN_RATIO_TOLERANCE:
            out.append(f"{label}: client and server token counts disagree (ratio {_ratio(ratio)}).")
        if not cc.server_timing_tokens and fmt.missing(cc.server_metrics_tokens):
            out.append(f"{label}: the server reported no timings and no token counter: "
                       "the client's figures could not be cross-checked.")
    return out


def goodput_table(records: list[Record]) -> Table:
    """Turns that met every per-turn budget: the throughput that counts under the SLOs."""
    cols = [("Config", False), ("Workload", False), ("Good / finished turns", True), ("Goodput", True),
            ("Good turns/s", True), ("Good tokens/s", True), ("Agg TPS", True)]
    rows = []
    for r in of_kind(records, "workload"):
        w, m, _ = workload_parts(r)
        g = m.goodput
        if g is None:
            continue
        frac = fmt.as_float(g.fraction)
        pct = fmt.DASH if frac is None else f"{100 * frac:.0f}%"
        cls = "num" if frac is None else ("num ok" if frac >= 1 else "num warn")
        rows.append([Cell(ident(r)), Cell(fmt.text(w.name), "text"),
                     _n(f"{fmt.integer(g.good_turns)} / {fmt.integer(g.finished_turns)}"),
                     Cell(pct, cls), _n(fmt.num(g.turns_per_s, 3)), _n(fmt.tps(g.tokens_per_s)),
                     _n(fmt.tps(m.agg_tps))])
    table = _table(cols, rows)
    table.notes = ["A good turn finished without error, within its role's p95 budget (as a per-turn limit) "
                   "and within the TTFT budget; Goodput = good ÷ finished turns; rates are over the run's window."]
    return table


# ---------------------------------------------------------------- roofline

def low_efficiency(records: list[Record]) -> list[str]:
    """Runs far below the bandwidth roofline: the study's "256K collapse" is not a bandwidth limit."""
    out = []
    for r in of_kind(records, "workload"):
        m = workload_parts(r)[1]
        eff = fmt.as_float(m.efficiency)
        if eff is None or eff >= LOW_EFFICIENCY:
            continue
        agg = fmt.as_float(m.agg_tps)
        roof = fmt.tps(m.roofline_tps)
        text = f"{_label(r)}: {100 * eff:.0f}% of the roofline ({fmt.tps(agg)} of {roof} tok/s)"
        full = fmt.as_float(m.roofline_full_slots_tps)
        if full and agg is not None:
            text += f"; {100 * agg / full:.0f}% of the all-slots-full ceiling ({fmt.tps(full)} tok/s)"
        out.append(text + ".")
    return out


# ---------------------------------------------------------------- vLLM queueing

def queueing_table(records: list[Record]) -> Table:
    """vLLM's own view of a run: offered load above --max-num-seqs shows as waiting, queue time, preemption."""
    cols = [("Config", False), ("Workload", False), ("Queue mean (s)", True), ("Queue p95 (s)", True),
            ("Max waiting", True), ("Waiting time share", True), ("Max running / max-num-seqs", True),
            ("Preemptions", True), ("Max KV usage", True), ("Prefix-cache hits", True), ("Overloaded", False)]
    rows = []
    for r in of_kind(records, "workload"):
        w, m, _ = workload_parts(r)
        s = m.server
        if s is None:
            continue
        if not s.samples:
            over = Cell(f"no /metrics samples ({fmt.integer(s.scrape_errors)} scrape errors)", "warn")
        else:
            over = Cell("yes" if s.overloaded else "no", "bad" if s.overloaded else "ok")
        cap = s.max_num_seqs
        running = fmt.integer(s.max_running) + (f" / {fmt.integer(cap)}" if not fmt.missing(cap) else "")
        queue = s.queue_time_s or NO_QUEUE
        rows.append([
            Cell(ident(r)), Cell(fmt.text(w.name), "text"),
            _n(fmt.secs(queue.mean)), _n(fmt.secs(queue.p95)),
            _n(fmt.integer(s.max_waiting)), _n(_share(s.waiting_fraction)),
            Cell(running, "num warn" if s.running_at_cap else "num"),
            Cell(fmt.integer(s.preemptions), "num bad" if s.preemptions else "num"),
            _n(_share(s.max_kv_cache_usage)), _n(_share(s.prefix_cache_hit_rate)), over,
        ])
    table = _table(cols, rows)
    table.notes = [
        "From the server's /metrics, scraped during the run: queue time from vllm:request_queue_time_seconds, "
        "waiting and running requests from vllm:num_requests_waiting / _running, preemptions from "
        "vllm:num_preemptions_total, KV usage from vllm:kv_cache_usage_perc.",
        "Overloaded = requests waited (any waiting, queue time, or a preemption): the offered concurrency "
        "exceeded what the server ran at once, so latency includes queueing.",
    ]
    return table


def _share(value: Any) -> str:
    """A 0..1 fraction as a percentage."""
    f = fmt.as_float(value)
    return fmt.DASH if f is None else f"{100 * f:.0f}%"


# ---------------------------------------------------------------- not measured

def not_measured_table(records: list[Record]) -> Table:
    """Configs with no figures (skipped at preflight, boot failed, failed before recording) and why."""
    cols = [("Config", False), ("Tests", False), ("Outcome", False), ("Reason", False)]
    # A config skipped at setup skips every test of it for one reason: one row lists them all.
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if r.kind not in ("unmeasured", "ceiling") or r.measured:
            continue
        reason = fmt.text(reason_of(r))
        key = (ident(r), str(r.outcome or fmt.DASH), reason)
        groups.setdefault(key, []).append(fmt.text(r.test))
    rows = [[Cell(cid), Cell(", ".join(tests), "text"), Cell(outcome, {"failed": "bad", "skipped": "warn"}.get(outcome, "")),
             Cell(reason, "text")] for (cid, outcome, reason), tests in groups.items()]
    return _table(cols, rows)
