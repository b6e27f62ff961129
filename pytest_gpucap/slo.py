"""SLO verdicts: measured figures against budgets, one line per breach."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .config import SLO


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
        return (f"{self.name}: measured {self.measured:.2f} {self.unit}, budget {op} {self.budget:.2f} "
                f"{self.unit}, margin {self.margin:+.2f} {self.unit} [{state}]")


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
