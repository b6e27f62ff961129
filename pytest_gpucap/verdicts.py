"""SLO verdicts: measured figures against budgets, one line per breach."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .matrix import SLO


@dataclass(frozen=True)
class Verdict:
    """One budget check: passing verdicts are recorded too."""

    name: str
    measured: float
    budget: float
    unit: str
    higher_is_better: bool = True

    @property
    def ok(self) -> bool:
        return self.measured >= self.budget if self.higher_is_better else self.measured <= self.budget

    @property
    def margin(self) -> float:
        return self.measured - self.budget if self.higher_is_better else self.budget - self.measured

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        state = "ok" if self.ok else "BREACH"
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.name}: measured {self.measured:.3g}{unit}, budget {op} {self.budget:.3g}{unit}, "
                f"margin {self.margin:+.3g}{unit} [{state}]")


def headroom(free_mib: float, slo: SLO) -> Verdict:
    """Free device memory after load against the headroom SLO."""
    return Verdict("headroom", free_mib / 1024, slo.headroom_gib, "GiB")


def headroom_class(free_gib: float, slo: SLO) -> str:
    """The study's verdict words: Comfortable at >= 2x the SLO, Marginal at >= the SLO, else Risky."""
    if free_gib >= 2 * slo.headroom_gib:
        return "Comfortable"
    if free_gib >= slo.headroom_gib:
        return "Marginal"
    return "Risky"


def assert_slos(verdicts: list[Verdict], context: str = "") -> None:
    """Fail the test with one line per breach (measured vs budget and margin)."""
    breaches = [v.line() for v in verdicts if not v.ok]
    if breaches:
        head = f"SLO breached{' for ' + context if context else ''}:"
        pytest.fail("\n".join([head, *("  " + b for b in breaches)]), pytrace=False)


def workload_verdicts(metrics: dict, slo: SLO) -> list[Verdict]:
    """Per-role p95 turn latency, TTFT p95, aggregate tokens/s and error rate against their budgets."""
    out: list[Verdict] = []
    for role, budget in slo.role_p95().items():
        measured = (metrics["roles"].get(role) or {}).get("p95_s")
        if measured is not None:
            out.append(Verdict(f"{role} p95 turn latency", measured, budget, "s", higher_is_better=False))
        elif role in metrics["roles"]:
            out.append(Verdict(f"{role} p95 turn latency (no turn finished)", float("inf"), budget, "s", False))
    if slo.ttft_p95_s is not None and metrics["ttft_s"]["p95"] is not None:
        out.append(Verdict("TTFT p95", metrics["ttft_s"]["p95"], slo.ttft_p95_s, "s", higher_is_better=False))
    if slo.min_agg_tps is not None:
        out.append(Verdict("aggregate tokens/s", metrics["agg_tps"], slo.min_agg_tps, "tok/s"))
    if slo.max_error_rate is not None:
        out.append(Verdict("error rate", metrics["error_rate"], slo.max_error_rate, "", higher_is_better=False))
    return out


def goodput(records: list, slo: SLO, since: float = 0.0) -> dict:
    """Turns that met every per-turn budget (role p95 budget as a per-turn limit, TTFT budget), as a
    fraction of finished turns and as a rate of good turns and good tokens per second of the window."""
    from .workload.client import ErrorClass

    roles = slo.role_p95()
    done = [r for r in records if r.scheduled >= since and r.error is not ErrorClass.CANCELLED]
    good = [r for r in done if r.ok
            and (r.role not in roles or (r.e2e_s or 0.0) <= roles[r.role])
            and (slo.ttft_p95_s is None or (r.ttft_s or 0.0) <= slo.ttft_p95_s)]
    start = min((r.sent for r in done if r.sent), default=0.0)
    end = max((r.end for r in done if r.end), default=start)
    window = end - start
    return {"good_turns": len(good), "finished_turns": len(done),
            "fraction": len(good) / len(done) if done else None,
            "turns_per_s": len(good) / window if window > 0 else 0.0,
            "tokens_per_s": sum(r.completion_tokens or 0 for r in good) / window if window > 0 else 0.0}
