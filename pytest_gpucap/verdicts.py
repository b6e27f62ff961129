"""Every judgement in one place: measured figures against budgets, one line per breach.

Headroom classes (Comfortable / Marginal / Risky and the 2x rule), the free-memory and KV-capacity
ceiling verdicts, workload SLO verdicts, goodput, and which breaches count against a config. The
report and the search call these; none re-implements them. ``Verdict`` itself lives in ``records``
(records hold verdicts) and is re-exported here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytest

from .matrix import COMFORTABLE_FACTOR, HEADROOM_CLASSES, SLO
from .records import CeilingRecord, KvHeadroom, Record, Verdict, WorkloadMetrics

HEADROOM_RULE = (f"{HEADROOM_CLASSES[0]} ≥ {COMFORTABLE_FACTOR:g}× the headroom SLO, {HEADROOM_CLASSES[1]} ≥ the SLO, "
                 f"{HEADROOM_CLASSES[2]} below")
#: The names of the two ceiling verdicts.
FREE_MEMORY_VERDICT = "headroom"
KV_CAPACITY_VERDICT = "KV capacity (concurrent full-length sequences)"


# ---------------------------------------------------------------- memory headroom

def headroom_bands(headroom_gib: float) -> tuple[tuple[str, float | None], ...]:
    """Each headroom class with the least free GiB it needs (None: anything below): the rule as the
    write-up states it. ``SLO.headroom_class`` applies it (the prediction, below this layer, needs it too)."""
    return ((HEADROOM_CLASSES[0], COMFORTABLE_FACTOR * headroom_gib), (HEADROOM_CLASSES[1], headroom_gib),
            (HEADROOM_CLASSES[2], None))


def headroom_class(free_gib: float, slo: SLO) -> str:
    """The study's verdict words: Comfortable at >= 2x the SLO, Marginal at >= the SLO, else Risky."""
    return slo.headroom_class(free_gib)


def headroom(free_mib: float, slo: SLO) -> Verdict:
    """Free device memory after load against the headroom SLO."""
    return Verdict(FREE_MEMORY_VERDICT, free_mib / 1024, slo.headroom_gib, "GiB")


def kv_capacity(kv_headroom: Mapping[str, Any] | KvHeadroom | None, n: int) -> Verdict | None:
    """A backend's KV pool against N: concurrent full-length sequences it holds (None: not reported)."""
    if isinstance(kv_headroom, Mapping):
        kv_headroom = KvHeadroom.from_dict(kv_headroom)
    seqs = kv_headroom.kv_capacity_sequences if kv_headroom is not None else None
    return None if seqs is None else Verdict(KV_CAPACITY_VERDICT, seqs, float(n), "seq")


def ceiling_verdicts(free_mib: float, slo: SLO, kv_headroom: Mapping[str, Any] | None, n: int) -> list[Verdict]:
    """The Phase-1 verdict: free memory against the headroom SLO, replaced by the KV-capacity verdict
    when the backend's headroom rule (``Backend.headroom``) reports a capacity: a server that
    pre-allocates its KV pool leaves little free memory by design, and N × ctx fits when the pool does."""
    kv = kv_capacity(kv_headroom, n)
    return [kv] if kv is not None else [headroom(free_mib, slo)]


def judged_by_kv_capacity(record: Record) -> bool:
    """Whether a ceiling's headroom is its backend's KV capacity rather than free memory (vLLM)."""
    if not isinstance(record, CeilingRecord):
        return getattr(getattr(record, "config", None), "backend", None) == "vllm"
    return record.config.backend == "vllm" or record.memory.kv_headroom is not None


def counted_breaches(record: Record) -> list[Verdict]:
    """The breached verdicts that count against a config: on a KV-capacity backend the free-memory
    verdict is no reason (it fills memory by design) once a KV-capacity verdict judges it."""
    verdicts = getattr(record, "verdicts", ())
    kv_judged = judged_by_kv_capacity(record) and any(v.name == KV_CAPACITY_VERDICT for v in verdicts)
    return [v for v in verdicts if not v.ok and not (kv_judged and v.name == FREE_MEMORY_VERDICT)]


# ---------------------------------------------------------------- workload

def workload_verdicts(metrics: WorkloadMetrics | Mapping[str, Any], slo: SLO) -> list[Verdict]:
    """Per-role p95 turn latency, TTFT and TPOT p95, aggregate tokens/s, error rate, goodput and (when the
    server was polled) server queue time p95 against their budgets."""
    m = metrics if isinstance(metrics, WorkloadMetrics) else WorkloadMetrics.from_dict(metrics)
    out: list[Verdict] = []
    for role, budget in slo.role_p95().items():
        measured = m.roles[role].p95_s if role in m.roles else None
        if measured is not None:
            out.append(Verdict(f"{role} p95 turn latency", measured, budget, "s", higher_is_better=False))
        elif role in m.roles:
            out.append(Verdict(f"{role} p95 turn latency (no turn finished)", float("inf"), budget, "s", False))
    if slo.ttft_p95_s is not None and m.ttft_s.p95 is not None:
        out.append(Verdict("TTFT p95", m.ttft_s.p95, slo.ttft_p95_s, "s", higher_is_better=False))
    if slo.tpot_p95_s is not None and m.tpot_s is not None and m.tpot_s.p95 is not None:
        out.append(Verdict("TPOT p95", m.tpot_s.p95, slo.tpot_p95_s, "s", higher_is_better=False))
    if slo.min_agg_tps is not None:
        out.append(Verdict("aggregate tokens/s", m.agg_tps, slo.min_agg_tps, "tok/s"))
    if slo.max_error_rate is not None:
        out.append(Verdict("error rate", m.error_rate, slo.max_error_rate, "", higher_is_better=False))
    if slo.min_goodput is not None:
        out.append(goodput_verdict(m, slo.min_goodput))
    queue = m.server.queue_time_s if m.server is not None else None
    if slo.queue_p95_s is not None and queue is not None and queue.p95 is not None:
        out.append(Verdict("server queue time p95", queue.p95, slo.queue_p95_s, "s", higher_is_better=False))
    return out


GOODPUT_VERDICT = "goodput"


def goodput_verdict(metrics: WorkloadMetrics, minimum: float) -> Verdict:
    """The share of finished turns that met every per-turn budget against ``min_goodput``. A run with no
    finished turn measured no good turn: goodput 0, so a dead server cannot pass a goodput SLO."""
    g = metrics.goodput
    fraction = g.fraction if g is not None and isinstance(g.fraction, (int, float)) else 0.0
    return Verdict(GOODPUT_VERDICT, float(fraction), minimum, "")


def good_turn(record: Any, slo: SLO) -> bool:
    """A turn that succeeded within every per-turn budget: its role's E2E budget, TTFT and TPOT."""
    roles = slo.role_p95()
    tpot = record.tpot_s if slo.tpot_p95_s is not None else None
    return (record.ok and (record.role not in roles or (record.e2e_s or 0.0) <= roles[record.role])
            and (slo.ttft_p95_s is None or (record.ttft_s or 0.0) <= slo.ttft_p95_s)
            and (tpot is None or tpot <= (slo.tpot_p95_s or 0.0)))


def goodput(records: Sequence[Any], slo: SLO, since: float = 0.0) -> dict[str, Any]:
    """Turns that met every per-turn budget (``good_turn``: role p95 budget as a per-turn limit, TTFT
    and TPOT budgets), as a fraction of finished turns and as a rate of good turns and good tokens per
    second of the window (the ``Goodput`` section's keys)."""
    from .workload.client import ErrorClass

    done = [r for r in records if r.scheduled >= since and r.error is not ErrorClass.CANCELLED]
    good = [r for r in done if good_turn(r, slo)]
    start = min((r.sent for r in done if r.sent), default=0.0)
    end = max((r.end for r in done if r.end), default=start)
    window = end - start
    return {"good_turns": len(good), "finished_turns": len(done),
            "fraction": len(good) / len(done) if done else None,
            "turns_per_s": len(good) / window if window > 0 else 0.0,
            "tokens_per_s": sum(r.completion_tokens or 0 for r in good) / window if window > 0 else 0.0}


def assert_slos(verdicts: Sequence[Verdict], context: str = "") -> None:
    """Fail the test with one line per breach (measured vs budget and margin)."""
    breaches = [v.line() for v in verdicts if not v.ok]
    if breaches:
        head = f"SLO breached{' for ' + context if context else ''}:"
        pytest.fail("\n".join([head, *("  " + b for b in breaches)]), pytrace=False)


__all__ = ["COMFORTABLE_FACTOR", "FREE_MEMORY_VERDICT", "HEADROOM_CLASSES", "HEADROOM_RULE", "KV_CAPACITY_VERDICT",
           "GOODPUT_VERDICT", "Verdict", "assert_slos", "ceiling_verdicts", "counted_breaches", "good_turn", "goodput",
           "goodput_verdict", "headroom",
           "headroom_bands", "headroom_class", "judged_by_kv_capacity", "kv_capacity", "workload_verdicts"]
