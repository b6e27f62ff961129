"""Tables that check one source of figures against another, and say in words where they disagree.

The headline tables show what was measured; these show how far to trust it: the memory model's
prediction against the server and the meter, the client's token count and decode rate against the
server's own counters, the measured decode rate against the bandwidth roofline, and (vLLM) whether
offered load queued on the server. Each section is empty, and left out, when no record carries its data.
"""

from __future__ import annotations

from typing import Any

from . import fmt
from .tables import Cell, Table, _n, _table, get, measured, of_kind, workload_label

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


def _label(rec: dict[str, Any]) -> str:
    """``config (workload)`` for the sentences under a table."""
    cid = str(rec.get("config_id", "?"))
    name = workload_label(str(get(rec, "workload.name", "") or ""), fmt.agents(get(rec, "workload.agents")))
    return f"{cid} ({name})" if name and name != fmt.DASH else cid


# ---------------------------------------------------------------- memory prediction

def _kv_match(kv: dict[str, Any]) -> Cell:
    """Exact when every predicted KV cache line equals the server's printed MiB, else the difference
    (a server that logs no per-cache lines can only be compared on the total)."""
    if fmt.missing(kv.get("server_mib")):
        return Cell(fmt.DASH)
    if kv.get("exact"):
        return Cell("exact", "ok")
    diff = fmt.as_float(kv.get("diff_mib"))
    if not kv.get("lines_server") and diff is not None and abs(diff) < 0.005:
        return Cell("equal total (no per-cache lines logged)", "ok")
    return Cell(f"off by {_signed(diff, 2)} MiB", "bad")


def _part(rec: dict[str, Any], name: str) -> dict[str, Any]:
    """One row of ``memory.prediction_error`` (total, kv, weights, compute); empty when absent."""
    part = get(rec, f"memory.prediction_error.{name}")
    return part if isinstance(part, dict) else {}


def _error_cell(pct: float | None) -> Cell:
    if pct is None:
        return _n(fmt.DASH)
    return Cell(_signed(pct, 1, "%"), "num ok" if abs(pct) <= PREDICTION_GOAL_PCT else "num warn")


def prediction_table(records: list[dict[str, Any]]) -> Table:
    """Predicted vs server-reported vs measured total memory per config, and the KV cache agreement."""
    cols = [("Config", False), ("N", True), ("ctx/slot", True), ("Predicted total (MiB)", True),
            ("Server-reported total (MiB)", True), ("Measured (MiB)", True), ("Error (MiB)", True),
            ("Error (%)", True), ("KV predicted (MiB)", True), ("KV server (MiB)", True), ("KV match", False),
            ("Compute term", False)]
    rows, errors = [], []
    for r in of_kind(records, "ceiling"):
        pred = get(r, "memory.predicted")
        if not isinstance(pred, dict):
            continue
        total, kv = _part(r, "total"), _part(r, "kv")
        pct = fmt.as_float(total.get("error_pct"))
        if pct is not None:
            errors.append((abs(pct), pct, str(r.get("config_id", "?"))))
        source = fmt.text(pred.get("compute_source"))
        if pred.get("calibrated") and source != "calibrated":
            source += " (calibrated)"
        rows.append([
            Cell(str(r.get("config_id", "?"))), _n(fmt.integer(get(r, "config.n"))),
            _n(fmt.integer(get(r, "config.ctx"))), _n(fmt.mib(total.get("predicted_mib", pred.get("total_mib")))),
            _n(fmt.mib(total.get("server_mib"))), _n(fmt.mib(total.get("measured_mib"))),
            _n(_signed(total.get("error_mib"))), _error_cell(pct),
            _n(fmt.mib(kv.get("predicted_mib", pred.get("kv_mib")))), _n(fmt.mib(kv.get("server_mib"))),
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

def crosscheck_table(records: list[dict[str, Any]]) -> Table:
    """The harness's token count and decode rate against the server's own counters, per workload run."""
    cols = [("Config", False), ("Workload", False), ("Client tokens", True), ("Server tokens (timings)", True),
            ("Server tokens (/metrics)", True), ("Token ratio", True), ("/metrics ratio", True),
            ("Decode-rate ratio", True), ("Tokens from", False), ("Client behind", False)]
    rows = []
    for r in of_kind(records, "workload"):
        cc = get(r, "metrics.crosscheck")
        if not isinstance(cc, dict):
            continue
        behind = bool(cc.get("client_behind"))
        usage_missing = fmt.as_int(get(r, "metrics.usage_missing")) or 0
        rows.append([
            Cell(str(r.get("config_id", "?"))), Cell(fmt.text(get(r, "workload.name")), "text"),
            _n(fmt.integer(cc.get("client_tokens"))), _n(fmt.integer(cc.get("server_timing_tokens") or None)),
            _n(fmt.integer(cc.get("server_metrics_tokens"))), _n(_ratio(cc.get("token_ratio"))),
            _n(_ratio(cc.get("metrics_token_ratio"))), _n(_ratio(cc.get("decode_rate_ratio"))),
            Cell(fmt.text(r.get("tokens_from")), "warn" if usage_missing else ""),
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


def crosscheck_flags(records: list[dict[str, Any]]) -> list[str]:
    """One sentence per run whose figures the cross-check puts in doubt (or could not check)."""
    out = []
    for r in of_kind(records, "workload"):
        if not measured(r):
            continue
        cc = get(r, "metrics.crosscheck")
        usage_missing = fmt.as_int(get(r, "metrics.usage_missing")) or 0
        turns_ok = fmt.as_int(get(r, "metrics.turns_ok")) or 0
        label = _label(r)
        if usage_missing:
            what = "any turn" if usage_missing >= turns_ok else f"{usage_missing} of {turns_ok} turns"
            out.append(f"{label}: the server gave no token usage on {what}: their tokens are not counted, "
                       "so TPS understates the run.")
        if not isinstance(cc, dict):
            continue
        if cc.get("client_behind"):
            out.append(f"{label}: client fell behind the server: figures understate it "
                       f"(decode-rate ratio {_ratio(cc.get('decode_rate_ratio'))}).")
        ratio = fmt.as_float(cc.get("token_ratio"))
        if ratio is not None and abs(ratio - 1) > TOKEN_RATIO_TOLERANCE:
            out.append(f"{label}: client and server token counts disagree (ratio {_ratio(ratio)}).")
        if not cc.get("server_timing_tokens") and fmt.missing(cc.get("server_metrics_tokens")):
            out.append(f"{label}: the server reported no timings and no token counter: "
                       "the client's figures could not be cross-checked.")
    return out


def goodput_table(records: list[dict[str, Any]]) -> Table:
    """Turns that met every per-turn budget: the throughput that counts under the SLOs."""
    cols = [("Config", False), ("Workload", False), ("Good / finished turns", True), ("Goodput", True),
            ("Good turns/s", True), ("Good tokens/s", True), ("Agg TPS", True)]
    rows = []
    for r in of_kind(records, "workload"):
        g = get(r, "metrics.goodput")
        if not isinstance(g, dict):
            continue
        frac = fmt.as_float(g.get("fraction"))
        pct = fmt.DASH if frac is None else f"{100 * frac:.0f}%"
        cls = "num" if frac is None else ("num ok" if frac >= 1 else "num warn")
        rows.append([Cell(str(r.get("config_id", "?"))), Cell(fmt.text(get(r, "workload.name")), "text"),
                     _n(f"{fmt.integer(g.get('good_turns'))} / {fmt.integer(g.get('finished_turns'))}"),
                     Cell(pct, cls), _n(fmt.num(g.get("turns_per_s"), 3)), _n(fmt.tps(g.get("tokens_per_s"))),
                     _n(fmt.tps(get(r, "metrics.agg_tps")))])
    table = _table(cols, rows)
    table.notes = ["A good turn finished without error, within its role's p95 budget (as a per-turn limit) "
                   "and within the TTFT budget; Goodput = good ÷ finished turns; rates are over the run's window."]
    return table


# ---------------------------------------------------------------- roofline

def low_efficiency(records: list[dict[str, Any]]) -> list[str]:
    """Runs far below the bandwidth roofline: the study's "256K collapse" is not a bandwidth limit."""
    out = []
    for r in of_kind(records, "workload"):
        eff = fmt.as_float(get(r, "metrics.efficiency"))
        if eff is None or eff >= LOW_EFFICIENCY:
            continue
        agg = fmt.as_float(get(r, "metrics.agg_tps"))
        roof = fmt.tps(get(r, "metrics.roofline_tps"))
        text = f"{_label(r)}: {100 * eff:.0f}% of the roofline ({fmt.tps(agg)} of {roof} tok/s)"
        full = fmt.as_float(get(r, "metrics.roofline_full_slots_tps"))
        if full and agg is not None:
            text += f"; {100 * agg / full:.0f}% of the all-slots-full ceiling ({fmt.tps(full)} tok/s)"
        out.append(text + ".")
    return out


# ---------------------------------------------------------------- vLLM queueing

def _hist(server: dict[str, Any], key: str, q: str) -> Any:
    h = server.get(key)
    return h.get(q) if isinstance(h, dict) else None


def queueing_table(records: list[dict[str, Any]]) -> Table:
    """vLLM's own view of a run: offered load above --max-num-seqs shows as waiting, queue time, preemption."""
    cols = [("Config", False), ("Workload", False), ("Queue mean (s)", True), ("Queue p95 (s)", True),
            ("Max waiting", True), ("Waiting time share", True), ("Max running / max-num-seqs", True),
            ("Preemptions", True), ("Max KV usage", True), ("Prefix-cache hits", True), ("Overloaded", False)]
    rows = []
    for r in of_kind(records, "workload"):
        s = get(r, "metrics.server")
        if not isinstance(s, dict):
            continue
        if not s.get("samples"):
            over = Cell(f"no /metrics samples ({fmt.integer(s.get('scrape_errors'))} scrape errors)", "warn")
        else:
            over = Cell("yes" if s.get("overloaded") else "no", "bad" if s.get("overloaded") else "ok")
        cap = s.get("max_num_seqs")
        running = fmt.integer(s.get("max_running")) + (f" / {fmt.integer(cap)}" if not fmt.missing(cap) else "")
        share, kv, hits = s.get("waiting_fraction"), s.get("max_kv_cache_usage"), s.get("prefix_cache_hit_rate")
        rows.append([
            Cell(str(r.get("config_id", "?"))), Cell(fmt.text(get(r, "workload.name")), "text"),
            _n(fmt.secs(_hist(s, "queue_time_s", "mean"))), _n(fmt.secs(_hist(s, "queue_time_s", "p95"))),
            _n(fmt.integer(s.get("max_waiting"))), _n(_share(share)),
            Cell(running, "num warn" if s.get("running_at_cap") else "num"),
            Cell(fmt.integer(s.get("preemptions")), "num bad" if s.get("preemptions") else "num"),
            _n(_share(kv)), _n(_share(hits)), over,
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

def not_measured_table(records: list[dict[str, Any]]) -> Table:
    """Configs with no figures (skipped at preflight, boot failed, failed before recording) and why."""
    cols = [("Config", False), ("Tests", False), ("Outcome", False), ("Reason", False)]
    # A config skipped at setup skips every test of it for one reason: one row lists them all.
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if not isinstance(r, dict) or r.get("kind") not in ("unmeasured", "ceiling") or measured(r):
            continue
        reason = fmt.text(r.get("reason") or r.get("skip_reason") or r.get("error"))
        key = (str(r.get("config_id", "?")), str(r.get("outcome") or fmt.DASH), reason)
        groups.setdefault(key, []).append(fmt.text(r.get("test")))
    rows = [[Cell(cid), Cell(", ".join(tests), "text"), Cell(outcome, {"failed": "bad", "skipped": "warn"}.get(outcome, "")),
             Cell(reason, "text")] for (cid, outcome, reason), tests in groups.items()]
    return _table(cols, rows)
