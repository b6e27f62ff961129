"""The ramp record's sections: one step's figures, and the evidence behind the limit the ramp names.

A ramp that stops must say what stopped it, so a reader knows what to raise (slots, the server's
HTTP threads, the client's file descriptors, the request timeout, memory, client processes); a ramp
that reaches its ceiling clean says "none up to N". The classifier is ``workload.ramp.ramp_limit``;
these sections are how its answer and its evidence are recorded and read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .record_sections import Section, is_number, opt

#: Every ``limit`` a ramp record may name. "none": the ceiling was reached with every turn clean.
LIMITS = ("none", "http threads", "slots", "file descriptors", "timeouts", "memory", "client", "server")


@dataclass(frozen=True, kw_only=True)
class RampStep(Section):
    """One ramp step: N agents at once, one turn each, and the server's queue while it ran."""

    n: int | None = None
    ok: int | None = None
    errors: int | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    turn_p50_s: float | None = None
    turn_p95_s: float | None = None
    server_rss_mib: float | None = None
    device_used_mib: float | None = None
    error_classes: dict[str, int] | None = opt()
    create_p50_s: float | None = opt()  # scheduled -> response headers (llama-server sends them with the first token)
    create_p95_s: float | None = opt()
    breach: str | None = opt()
    decode_tps_p50: float | None = opt()  # per-call decode rate (server timings), median over the step's turns
    client_busy: float | None = opt()  # the busiest client process's CPU share of its wall time
    server_processing_max: float | None = opt()  # most requests in a slot at once (/metrics)
    server_deferred_max: float | None = opt()  # most requests queued for a slot at once (/metrics)
    server_in_max: float | None = opt()  # most requests the server held at once (in a slot or deferred)
    metrics_polls: int | None = opt()
    metrics_missed: int | None = opt()  # polls /metrics did not answer in time (its HTTP pool full)
    host_available_mib: float | None = opt()
    host_total_mib: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class RampEvidence(Section):
    """What the limit was read from, at the step that named it (the last step)."""

    at_n: int | None = None
    slots: int | None = opt()
    error_classes: dict[str, int] | None = opt()
    timeouts: int | None = opt()  # turns that hit request_timeout_s (or stalled)
    request_timeout_s: float | None = opt()
    nofile_soft: int | None = opt()
    client_busy: float | None = opt()
    host_available_mib: float | None = opt()
    host_total_mib: float | None = opt()
    server_processing_max: float | None = opt()
    server_deferred_max: float | None = opt()
    server_in_max: float | None = opt()
    metrics_missed: int | None = opt()
    base_n: int | None = opt()  # the full-slot step the queue is measured against (largest N <= slots)
    ttft_growth: float | None = opt()  # TTFT p95 here / at base_n
    decode_ratio: float | None = opt()  # per-call decode rate here / at base_n (about 1: decode held)
    common_error: str | None = opt()  # the most frequent failure detail at this step


def limit_label(limit: Any, ceiling: Any, evidence: RampEvidence | None) -> str:
    """Short words for the terminal and the write-up: "none up to 2,048", "slots at N=512"."""
    if limit is None:
        return "-"
    if limit == "none":
        return f"none up to {ceiling:,}" if is_number(ceiling) else "none"
    at = evidence.at_n if evidence is not None else None
    return f"{limit} at N={at:,}" if is_number(at) else str(limit)
