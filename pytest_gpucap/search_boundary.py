"""The search's boundary, as AIPerf's adaptive search reports it: along each axis (N, ctx) of each
family (KV cache type, projector), the last passing and the first failing config, and which SLO failed
there (the binding SLO). A knee alone says where capacity ends; the boundary says *why* it ends there:
memory, a role's latency, throughput or goodput, so the next thing to change is clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from .search import Probe, SearchSpace

#: What a point decided without a boot failed on (its reason says more).
PREDICTED_BINDING = {"predicted-no-fit": "memory (predicted not to fit)",
                     "predicted-slo-miss": "headroom (predicted)"}


@dataclass(frozen=True)
class BoundaryPoint:
    """One axis of one family: the last pass, the first fail above it, and what failed there."""

    axis: str  # "n" or "ctx"
    family: str  # e.g. "q8_0" or "q8_0+mmproj"
    last_pass: str | None
    first_fail: str | None  # None: the grid ends here (nothing larger to fail)
    first_fail_status: str | None = None
    binding_slo: str | None = None
    failed_verdicts: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "family": self.family, "last_pass": self.last_pass, "first_fail": self.first_fail,
                "first_fail_status": self.first_fail_status, "binding_slo": self.binding_slo,
                "failed_verdicts": list(self.failed_verdicts)}


def family_name(cache_type: str, mmproj: bool) -> str:
    return cache_type + ("+mmproj" if mmproj else "")


def _why(probe: Probe, by_id: Mapping[str, Probe]) -> tuple[str | None, tuple[str, ...]]:
    """The binding SLO and failed verdict lines of a failed point: its own outcome when booted or known,
    the outcome of the point it was inferred from, or what the prediction said."""
    if probe.status in PREDICTED_BINDING:
        return PREDICTED_BINDING[probe.status], (probe.reason,) if probe.reason else ()
    seen = set()
    while probe.outcome is None and probe.source and probe.source not in seen and probe.source in by_id:
        seen.add(probe.source)
        probe = by_id[probe.source]
        if probe.status in PREDICTED_BINDING:
            return PREDICTED_BINDING[probe.status], (probe.reason,) if probe.reason else ()
    o = probe.outcome
    if o is None:
        return None, ()
    names = tuple(dict.fromkeys(o.failed))
    lines = tuple(v for v in o.verdicts if "BREACH" in v or "FAIL" in v) or ((o.reason,) if o.reason else ())
    return (", ".join(names) if names else (o.reason.split(":")[0] if o.reason else None)), lines


def boundary(probes: Sequence[Probe], space: SearchSpace) -> list[BoundaryPoint]:
    """Per family (in ``space.families()`` order) and axis (N, then ctx): last pass and first fail."""
    by_key = {(p.config.cache_type_k, p.config.mmproj, p.config.n, p.config.ctx): p for p in probes}
    by_id = {p.config.id: p for p in probes}
    out = []
    for cache, mm in space.families():
        fam = family_name(cache, mm)
        passes = [p for p in probes if (p.config.cache_type_k, p.config.mmproj) == (cache, mm) and p.passed]
        best = max(passes, key=lambda p: (p.config.n * p.config.ctx, p.config.n), default=None)
        for axis in ("n", "ctx"):
            if best is None:  # nothing passed: the smallest config is the first fail on both axes, if it failed
                nxt = by_key.get((cache, mm, space.ns[0], space.ctxs[0]))
                if nxt is not None and nxt.passed is None:  # never needed (another family holds the knee)
                    out.append(BoundaryPoint(axis, fam, None, None, nxt.status))
                    continue
            else:
                values = space.ns if axis == "n" else space.ctxs
                at = best.config.n if axis == "n" else best.config.ctx
                up = [v for v in values if v > at]
                if not up:
                    nxt = None
                elif axis == "n":
                    nxt = by_key.get((cache, mm, up[0], best.config.ctx))
                else:
                    nxt = by_key.get((cache, mm, best.config.n, up[0]))
            binding, lines = (None, ()) if nxt is None or nxt.passed is None else _why(nxt, by_id)
            out.append(BoundaryPoint(axis, fam, best.config.id if best else None, nxt.config.id if nxt else None,
                                     nxt.status if nxt else None, binding, lines))
    return out


def binding_slo(points: Sequence[BoundaryPoint], knee: Any) -> str | None:
    """The SLO that bounds the knee: what failed at the next N above it (concurrency, as AIPerf's
    search binds), else at the next ctx; without a knee, what failed at the smallest config."""
    family = family_name(knee.cache_type_k, knee.mmproj) if knee is not None else None
    for p in points:
        if (family is None or p.family == family) and p.binding_slo:
            return p.binding_slo
    return None


__all__ = ["BoundaryPoint", "PREDICTED_BINDING", "binding_slo", "boundary", "family_name"]
