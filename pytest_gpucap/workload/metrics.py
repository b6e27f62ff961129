"""Per-request records to the numbers people quote: tokens/s, TTFT, TPOT, E2E percentiles per role.

Rates are computed over the run's active window (first send to last end), not over the whole
command, so start-up cost never inflates or deflates them.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

from .client import ErrorClass, RequestRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def pcts(values: Iterable[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    return {"p50": percentile(vals, 50), "p95": percentile(vals, 95), "p99": percentile(vals, 99), "n": len(vals)}


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _per_call_rate(r: RequestRecord) -> float | None:
    """One request's decode rate: the server's own ``timings.predicted_per_second`` when it sends it,
    else tokens over the client's first-chunk-to-end time. Random-weight output makes llama-server hold
    back chunks (incomplete UTF-8), so client chunk timing can bunch; the server's figure cannot."""
    if r.timings and r.timings.get("predicted_per_second"):
        return float(r.timings["predicted_per_second"])
    return _rate(r.completion_tokens or 0, r.decode_s) if r.decode_s else None


def summarize(records: Sequence[RequestRecord], since: float = 0.0) -> dict[str, Any]:
    """Headline metrics of the records scheduled at or after ``since`` (warm-up excluded)."""
    recs = [r for r in records if r.scheduled >= since]
    finished = [r for r in recs if r.error is not ErrorClass.CANCELLED]
    ok = [r for r in finished if r.ok]
    failed = [r for r in finished if not r.ok]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    start = min((r.sent for r in recs if r.sent), default=0.0)
    end = max((r.end for r in recs if r.end), default=start)
    window = end - start
    per_call = [_per_call_rate(r) for r in ok]
    per_call = [v for v in per_call if v is not None]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    roles: dict[str, Any] = {}
    for role in sorted({r.role for r in recs}):
        mine_ok = [r for r in ok if r.role == role]
        e2e = pcts(r.e2e_s for r in mine_ok)
        roles[role] = {
            "p50_s": e2e["p50"], "p95_s": e2e["p95"], "p99_s": e2e["p99"],
            "turns_ok": len(mine_ok), "turns_failed": sum(1 for r in failed if r.role == role),
            "tps": _rate(sum(r.completion_tokens or 0 for r in mine_ok), window),
            "ttft_s": pcts(r.ttft_s for r in mine_ok), "tpot_s": pcts(r.tpot_s for r in mine_ok),
            "itl_s": pcts(g for r in mine_ok for g in r.itl_s),
        }
        thinking = [r for r in mine_ok if r.thinking and (r.first_reasoning or r.first_text)]
        if thinking:  # keep_text turns only: the TTFT of thinking-on turns, split where the server splits
            roles[role]["ttft_reasoning_s"] = pcts(r.ttft_reasoning_s for r in thinking)
            roles[role]["ttft_content_s"] = pcts(r.ttft_text_s for r in thinking)
        if any(r.reasoning_tokens is not None for r in mine_ok):
            roles[role]["reasoning_tokens"] = sum(r.reasoning_tokens or 0 for r in mine_ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    return {
        "agg_tps": _rate(tokens, window),
        "per_call_tps": sum(per_call) / len(per_call) if per_call else 0.0,
        "completion_tokens": tokens,
        "window_s": window,
        "ttft_s": pcts(r.ttft_s for r in ok),
        "e2e_s": pcts(r.e2e_s for r in ok),
        "tpot_s": pcts(r.tpot_s for r in ok),
        "itl_chunk_s": pcts(gaps),
        "roles": roles,
        "turns_ok": len(ok),
        "turns_failed": len(failed),
        "error_rate": len(failed) / len(finished) if finished else 0.0,
        "errors": dict(Counter(r.error.value for r in failed if r.error)),
        "cut_at_deadline": len(recs) - len(finished),
        "usage_missing": sum(1 for r in ok if r.completion_tokens is None),
        "prefix_cache_hit_rate": cached / prompt if prompt else None,
        **({"cache_turns": cache_turns(finished)} if any(r.turn > 0 for r in finished) else {}),
    }


#: The per-turn table keeps this many turn indices; later turns are folded into the last row.
MAX_TURN_ROWS = 24


def cache_turns(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per turn index across agents: turns (``n``), prompt and cached tokens, their hit rate and the
    compactions done before those turns (multi-turn runs only: a single-turn shape has no history; turns
    cut at the run deadline are left out, as everywhere in the summary).
    ``n`` counts the turns whose usage came (a turn that failed before it says nothing of the cache);
    turns past ``MAX_TURN_ROWS - 1`` share the last row (``turn`` is its first index)."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        t = min(r.turn, MAX_TURN_ROWS - 1)
        row = rows.setdefault(t, {"turn": t, "n": 0, "prompt_tokens": 0, "cached_tokens": 0, "compactions": 0})
        row["compactions"] += r.compactions
        if r.prompt_tokens is None:
            continue
        row["n"] += 1
        row["prompt_tokens"] += r.prompt_tokens
        row["cached_tokens"] += r.cached_tokens or 0
    for row in rows.values():
        row["hit_rate"] = row["cached_tokens"] / row["prompt_tokens"] if row["prompt_tokens"] else None
    return [rows[t] for t in sorted(rows)]


def server_crosscheck(records: Sequence[RequestRecord], since: float, before: dict[str, float],
                      after: dict[str, float], token_counter: str | None = None) -> dict[str, Any]:
    """The harness's token count and decode rate against the server's own counters.

    ``token_counter`` is the backend's generated-tokens counter (``Backend.metrics``); without one
    only the per-request ``timings`` are compared.
    """
    ok = [r for r in records if r.scheduled >= since and r.ok]
    client_tokens = sum(r.completion_tokens or 0 for r in ok)
    timing_tokens = sum((r.timings or {}).get("predicted_n", 0) for r in ok)
    server_rates = [r.timings["predicted_per_second"] for r in ok
                    if r.timings and r.timings.get("predicted_per_second")]
    client_rates = [_rate(r.completion_tokens or 0, r.decode_s or 0) for r in ok
                    if r.decode_s and r.timings and r.timings.get("predicted_per_second")]
    key = token_counter
    metric_delta = after.get(key, 0.0) - before.get(key, 0.0) if key and key in after else None
    out: dict[str, Any] = {
        "client_tokens": client_tokens, "server_timing_tokens": timing_tokens,
        "server_metrics_tokens": metric_delta,
        "token_ratio": client_tokens / timing_tokens if timing_tokens else None,
        "metrics_token_ratio": client_tokens / metric_delta if metric_delta else None,
        "decode_rate_ratio": (sum(client_rates) / sum(server_rates)) if server_rates else None,
    }
    ratio = out["decode_rate_ratio"]
    out["client_behind"] = ratio is not None and ratio < 0.9
    return out
