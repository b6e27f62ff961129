"""Recommended configurations: per use case, the largest config meeting every SLO, and one ranked table of the rest.

"Largest" is N×ctx first, then N (more agents at the same total context). A workload candidate must
pass its workload verdicts and, when the same config has a ceiling record, its memory verdicts too:
a config that is fast but leaves no headroom is not a recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..records import Record, workload_name
from . import fmt
from .tables import (
    Cell, Table, ceiling_memory, failed_verdicts, ident, of_kind, profile_of, reason_of, workload_label, workload_parts,
)


@dataclass(frozen=True)
class Candidate:
    config_id: str
    n: int | None
    ctx: int | None
    failures: tuple[str, ...]
    tiebreak: float | None
    efficiency: float | None = None  # agg TPS ÷ bandwidth roofline (metrics.efficiency), workload candidates

    @property
    def total_ctx(self) -> int:
        return (self.n or 0) * (self.ctx or 0)

    @property
    def size(self) -> str:
        return f"N={fmt.integer(self.n)} × {fmt.short_ctx(self.ctx)} = {fmt.short_ctx(self.total_ctx)}"

    def key(self) -> tuple[int, int, float]:
        return self.total_ctx, self.n or 0, self.tiebreak if self.tiebreak is not None else float("-inf")


@dataclass
class Recommendation:
    use_case: str
    rule: str
    pick: Candidate | None
    label: str = ""  # the workload label, or "memory ceiling only"
    profile: str = ""
    tiebreak_name: str = ""
    tiebreak_unit: str = ""
    candidates: list[Candidate] = field(default_factory=list)

    def ranked(self) -> Table:
        """Every candidate, largest first: the pick, the ones that pass, and why each other one failed."""
        t = Table(["#", "Config", "N", "ctx/slot", self.tiebreak_name, "Result"],
                  numeric=[True, False, True, True, True, False])
        for i, c in enumerate(sorted(self.candidates, key=Candidate.key, reverse=True), start=1):
            result = (Cell("pick", "ok pick") if c is self.pick else
                      Cell("; ".join(c.failures), "bad") if c.failures else Cell("passes", "ok"))
            t.rows.append([Cell(str(i), "num"), Cell(c.config_id), Cell(fmt.integer(c.n), "num"),
                           Cell(fmt.short_ctx(c.ctx), "num"), Cell(fmt.num(c.tiebreak), "num"), result])
        return t


def latest(records: list[Record], kind: str) -> list[Record]:
    """The last record per (config, workload): a re-run appended later supersedes the earlier one."""
    out: dict[tuple[str, str], Record] = {}
    for r in of_kind(records, kind):
        out[(str(r.config_id), workload_name(r))] = r
    return list(out.values())


def _failures(rec: Record, prefix: str = "") -> list[str]:
    fails = [prefix + f for f in failed_verdicts(rec)]
    outcome = rec.outcome
    if not fails and outcome not in (None, "passed"):
        reason = reason_of(rec)
        fails.append(f"{prefix}test {outcome}" + (f" ({reason})" if reason else ""))
    return fails


def _candidate(rec: Record, failures: list[str], tiebreak: Any) -> Candidate:
    cfg = rec.config  # type: ignore[attr-defined]
    eff = fmt.as_float(workload_parts(rec)[1].efficiency)
    return Candidate(ident(rec), fmt.as_int(cfg.n), fmt.as_int(cfg.ctx), tuple(failures), fmt.as_float(tiebreak), eff)


def _choose(use_case: str, rule: str, cands: list[Candidate], tiebreak_name: str, **about: str) -> Recommendation:
    passing = [c for c in cands if not c.failures]
    pick = max(passing, key=Candidate.key) if passing else None
    rec = Recommendation(use_case, rule, pick, tiebreak_name=tiebreak_name, candidates=list(cands), **about)
    return rec


def recommendations(records: list[Record]) -> list[Recommendation]:
    out: list[Recommendation] = []
    ceilings = {str(r.config_id): r for r in latest(records, "ceiling")}
    depths = {str(r.config_id): r for r in latest(records, "depth")}
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in latest(records, "workload"):
        w = workload_parts(r)[0]
        label = workload_label(str(w.name or ""), fmt.agents(w.agents))
        groups.setdefault((profile_of(r), label), []).append(r)
    for (profile, label), recs in groups.items():
        cands = []
        for r in recs:
            fails = _failures(r)
            ceiling = ceilings.get(str(r.config_id))
            if ceiling is not None:
                fails += _failures(ceiling, "ceiling: ")
            if (depth := depths.get(str(r.config_id))) is not None:
                fails += _failures(depth, "depth: ")  # a config too slow at depth is no pick
            cands.append(_candidate(r, fails, workload_parts(r)[1].agg_tps))
        out.append(_choose(f"Workload {label} (profile {profile})",
                           "largest N×ctx (then N) whose workload, depth-sweep and memory ceiling verdicts all pass",
                           cands, "Agg TPS", label=f"workload {label}", profile=profile, tiebreak_unit="tok/s"))
    by_profile: dict[str, list[Candidate]] = {}
    burst_seen: set[str] = set()
    for r in ceilings.values():
        mem = ceiling_memory(r)
        free = mem.free_under_burst_mib  # the figure the headroom verdict was judged on, where measured
        if free is None:
            free = mem.free_mib
        else:
            burst_seen.add(profile_of(r))
        by_profile.setdefault(profile_of(r), []).append(_candidate(r, _failures(r), free))
    for profile, cands in by_profile.items():
        free_label = "Free under burst (MiB)" if profile in burst_seen else "Free at idle (MiB)"
        out.append(_choose(f"Memory ceiling only (profile {profile})",
                           "largest N×ctx (then N) whose ceiling verdicts pass (headroom SLO; on vLLM, "
                           "KV capacity ≥ N); says nothing about speed", cands, free_label,
                           label="memory ceiling only", profile=profile, tiebreak_unit="MiB free"))
    return out
