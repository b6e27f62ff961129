"""The write-up's first screen: per profile, KV type and mmproj variant a capacity map (N down, ctx across,
each cell a config coloured by verdict), one paragraph of plain verdicts, and the session's gate result.

Every figure here is copied from a record field (no arithmetic on them), so a reader can find each
number of the paragraph in results.jsonl; config ids, profiles and workload labels are ``code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import CeilingRecord, Record, SearchRecord, UnmeasuredRecord, WorkloadRecord
from ..capacity_verdict import TOO_SLOW, phrase, speed_breaches
from ..verdicts import headroom_bands
from . import fmt
from .crosschecks import LOW_EFFICIENCY
from .figures import Chart, MapCell
from .recommend import Candidate, Recommendation, latest
from .tables import Cell, Table, failed_verdicts, ident, profile_of, reason_of, workload_label, workload_parts

#: Verdict class → the word a reader sees (the classes are also CSS classes and map colours).
VERDICT_WORDS = {"comfortable": "Comfortable", "marginal": "Marginal", "risky": "Risky",
                 "no-fit": "Does not fit (measured)", "no-fit-predicted": "Does not fit (predicted, not booted)",
                 "too-slow": TOO_SLOW.capitalize(), "not-measured": "Not measured"}
FITS = ("comfortable", "marginal")
__all__ = ["VERDICT_WORDS", "capacity_maps", "gate", "verdict_paragraph"]


@dataclass
class MapEntry:
    """One config in the map: its verdict class, why, and the figures shown in its cell."""

    config_id: str
    n: int
    ctx: int
    verdict: str = "not-measured"
    why: str = ""
    free_mib: float | None = None
    burst_free_mib: float | None = None
    tps: list[tuple[str, float]] = field(default_factory=list)
    knee: bool = False

    def lines(self) -> list[str]:
        out = [VERDICT_WORDS[self.verdict] + (" · knee" if self.knee else "")]
        if self.free_mib is not None:
            out.append(f"{fmt.mib(self.free_mib)} MiB free idle")
        if self.burst_free_mib is not None:
            out.append(f"{fmt.mib(self.burst_free_mib)} MiB free under load")
        out += [f"{fmt.tps(t)} tok/s ({w})" if w else f"{fmt.tps(t)} tok/s" for w, t in self.tps]
        return out


@dataclass
class CapacityMap:
    """One (profile, KV type, mmproj) grid."""

    profile: str
    kv: str
    mmproj: bool
    entries: dict[tuple[int, int], MapEntry] = field(default_factory=dict)
    host: str = ""  # set when the records come from several hosts: one map per host (``hosts.first_screen``)

    @property
    def title(self) -> str:
        return (f"profile {self.profile}, KV {self.kv}, {'with' if self.mmproj else 'without'} mmproj (vision)"
                + (f" — {self.host}" if self.host else ""))

    @property
    def slug(self) -> str:
        from .figures import slugify
        return "capacity-map-" + slugify(f"{self.profile}-{self.kv}-{'mmproj' if self.mmproj else 'text'}"
                                         + (f"-{self.host}" if self.host else ""))

    @property
    def ns(self) -> list[int]:
        return sorted({n for n, _ in self.entries})

    @property
    def ctxs(self) -> list[int]:
        return sorted({c for _, c in self.entries})

    def table(self) -> Table:
        """N down, ctx/slot across; an empty grid position is a config nobody asked for."""
        t = Table(["N \\ ctx/slot", *(fmt.short_ctx(c) for c in self.ctxs)],
                  numeric=[False] * (len(self.ctxs) + 1))
        for n in self.ns:
            row = [Cell(f"N={n}")]
            for c in self.ctxs:
                e = self.entries.get((n, c))
                row.append(Cell(fmt.DASH) if e is None else
                           Cell("; ".join(e.lines()), f"map {e.verdict}{' knee' if e.knee else ''}"))
            t.rows.append(row)
        return t

    def tooltips(self) -> dict[tuple[int, int], str]:
        return {k: f"{e.config_id}: {e.why}" if e.why else e.config_id for k, e in self.entries.items()}

    def chart(self) -> Chart:
        ns, ctxs = self.ns, self.ctxs
        cells = [MapCell(ns.index(n), ctxs.index(c), e.verdict, "\n".join(e.lines()), e.knee)
                 for (n, c), e in self.entries.items()]
        return Chart(self.slug, f"Capacity map — {self.title}", "context per slot", "N (slots)", cells=cells,
                     rows=[f"N={n}" for n in ns], cols=[fmt.short_ctx(c) for c in ctxs],
                     caption="Cells coloured by verdict; the knee (largest config that fits with headroom) outlined.")


def _kv(k: object, v: object) -> str:
    k, v = fmt.text(k), fmt.text(v)
    return k if k == v else f"{k}/{v}"


def _memory_class(free_mib: float | None, headroom_gib: float | None) -> str | None:
    if free_mib is None or headroom_gib is None:
        return None
    (_, top), (_, mid), _ = headroom_bands(headroom_gib)
    free = free_mib / 1024
    return "comfortable" if free >= (top or 0) else ("marginal" if free >= (mid or 0) else "risky")


def _entry(maps: dict[tuple[str, str, bool], CapacityMap], r: Record, kv: str | None = None,
           mmproj: bool | None = None, n: object = None, ctx: object = None) -> MapEntry | None:
    cfg = getattr(r, "config", None)
    n = fmt.as_int(n if cfg is None else cfg.n)
    ctx = fmt.as_int(ctx if cfg is None else cfg.ctx)
    if n is None or ctx is None:
        return None
    kv = kv if cfg is None else _kv(cfg.cache_type_k, cfg.cache_type_v)
    mmproj = bool(mmproj if cfg is None else cfg.mmproj)
    key = (profile_of(r), str(kv), mmproj)
    grid = maps.setdefault(key, CapacityMap(*key))
    return grid.entries.setdefault((n, ctx), MapEntry(ident(r) if cfg is not None else "", n, ctx))


def _mark_slow(e: MapEntry, r: Record, where: str) -> None:
    """A config that fits but breaches a speed SLO reads "Fits, too slow" (``capacity_verdict``'s rule)."""
    slow = [phrase(v) for v in speed_breaches(r)]
    if slow and e.verdict in FITS:
        e.verdict = "too-slow"
    if slow:
        e.why = "; ".join(x for x in (e.why, f"{where}: " + "; ".join(slow)) if x)


def capacity_maps(records: list[Record]) -> list[CapacityMap]:
    """The maps, built from measured records first, then unmeasured ones and search probes for the gaps."""
    maps: dict[tuple[str, str, bool], CapacityMap] = {}
    judged: set[int] = set()
    for r in latest(records, "ceiling"):
        e = _entry(maps, r)
        if e is None:
            continue
        if isinstance(r, CeilingRecord):
            kvh = r.memory.kv_headroom
            e.free_mib = fmt.as_float(r.memory.free_mib)
            burst = fmt.as_float(r.memory.free_under_burst_mib)  # the burst ceiling (issue 12)
            if burst is not None:
                e.burst_free_mib = burst if e.burst_free_mib is None else min(e.burst_free_mib, burst)
            if kvh is not None and kvh.ok is not None:
                e.verdict = "comfortable" if kvh.ok else "risky"
            else:
                e.verdict = str(r.headroom_class or "").lower() if str(r.headroom_class or "").lower() in \
                    VERDICT_WORDS else _memory_class(e.free_mib, fmt.as_float(r.slo.headroom_gib)) or "not-measured"
            e.why = "; ".join(f"{v.name} {fmt.num(v.measured, 2)} {v.unit} vs budget {fmt.num(v.budget, 2)}"
                              for v in r.verdicts)
            judged.add(id(e))
    for r in latest(records, "workload"):
        e = _entry(maps, r)
        if e is None or not isinstance(r, WorkloadRecord):
            continue
        w, m, mem = workload_parts(r)
        if (agg := fmt.as_float(m.agg_tps)) is not None:
            e.tps.append((str(w.name or ""), agg))
        burst = fmt.as_float(mem.min_free_mib)
        if burst is not None:
            e.burst_free_mib = burst if e.burst_free_mib is None else min(e.burst_free_mib, burst)
        if e.free_mib is None:
            e.free_mib = fmt.as_float(mem.free_at_boot_mib)
        if id(e) not in judged:
            e.verdict = _memory_class(e.burst_free_mib, fmt.as_float(r.slo.headroom_gib)) or "not-measured"
            judged.add(id(e))
        _mark_slow(e, r, f"workload {w.name}")
    for r in latest(records, "depth"):  # the depth sweep's speed SLOs (min_depth_ratio) judge too
        if (e := _entry(maps, r)) is not None:
            _mark_slow(e, r, "depth sweep")
    for r in records:
        if isinstance(r, UnmeasuredRecord) and (e := _entry(maps, r)) is not None and id(e) not in judged:
            reason = str(reason_of(r) or r.outcome or "")
            e.verdict = ("no-fit-predicted" if "predict" in reason.lower() else
                         "no-fit" if r.outcome == "failed" else "not-measured")
            e.why = reason
            judged.add(id(e))
    for r in records:
        if not isinstance(r, SearchRecord):
            continue
        for p in r.probes:
            e = _entry(maps, r, p.cache_type, p.mmproj, p.n, p.ctx)
            if e is None or id(e) in judged:
                continue
            e.config_id = e.config_id or fmt.text(p.config_id)
            status = str(p.status or "")
            e.verdict = ("no-fit-predicted" if status == "predicted-no-fit" else
                         "no-fit" if status.endswith("fail") and not status.startswith("inferred") else
                         "not-measured")
            e.why = f"search: {status}" + (f" ({p.reason})" if p.reason else "")
    knees = {(str(r.profile), str(r.knee)) for r in records if isinstance(r, SearchRecord) and r.knee}
    for grid in maps.values():
        for e in grid.entries.values():
            e.knee = (grid.profile, e.config_id) in knees  # the search's knee, when one searched this profile
        if not any(e.knee for e in grid.entries.values()):
            fits = [e for e in grid.entries.values() if e.verdict in FITS]
            if fits:
                max(fits, key=lambda e: (e.n * e.ctx, e.n)).knee = True
    return sorted(maps.values(), key=lambda g: (g.profile, g.kv, g.mmproj))


# ---------------------------------------------------------------- the paragraph

Piece = tuple[str, bool]  # (text, shown as code)


def _binding(failures: tuple[str, ...]) -> str:
    kinds = []
    for f in failures:
        low = f.lower()
        kind = ("memory" if low.startswith(("ceiling:", "headroom", "kv capacity")) else
                "the depth ratio" if "depth" in low else
                "throughput" if "tps" in low or "tokens/s" in low else
                "a role's p95" if "p95" in low or "latency" in low or "turns ok" in low else "a failed test")
        if kind not in kinds:
            kinds.append(kind)
    return " and ".join(kinds)


def _size(c: Candidate) -> str:
    return f"N={fmt.integer(c.n)} × {fmt.short_ctx(c.ctx)}"


def _cheapest(cand: Candidate, ceilings: dict[str, CeilingRecord], records: list[Record]) -> list[Piece]:
    """What would move the next step: the same N × ctx without mmproj (when measured), a smaller KV type."""
    out: list[Piece] = []
    rec = ceilings.get(cand.config_id)
    if rec is None:
        return out
    cfg = rec.config
    if cfg.mmproj:
        twin = next((r for r in ceilings.values() if not r.config.mmproj and r.profile == rec.profile and
                     (r.config.n, r.config.ctx, r.config.cache_type_k) == (cfg.n, cfg.ctx, cfg.cache_type_k)), None)
        if twin is not None and twin.memory.free_mib is not None and rec.memory.free_mib is not None:
            out += [(" Without mmproj the same N × ctx leaves ", False),
                    (f"{fmt.mib(twin.memory.free_mib)} MiB free (", False), (ident(twin), True),
                    (f"), against {fmt.mib(rec.memory.free_mib)} MiB with it.", False)]
    kv_mib = fmt.as_float(rec.memory.server_report.kv_mib)
    smaller = {"f16": "q8_0", "bf16": "q8_0", "q8_0": "q4_0"}.get(str(cfg.cache_type_k))
    if kv_mib is not None and smaller and cfg.cache_type_k == cfg.cache_type_v:
        out.append((f" Its KV cache takes {fmt.mib(kv_mib)} MiB as {cfg.cache_type_k}; {smaller} KV would "
                    "roughly halve that.", False))
    return out


def _sentence(rec: Recommendation, ceilings: dict[str, CeilingRecord], records: list[Record]) -> list[Piece]:
    head: list[Piece] = [(rec.label, True), (" on ", False), (rec.profile, True), (": ", False)]
    if rec.pick is None:
        out = head + [("no configuration met every SLO", False)]
        if rec.candidates:
            least = min(rec.candidates, key=Candidate.key)
            out += [("; the smallest, ", False), (least.config_id, True),
                    (f" ({_size(least)}), is bound by {_binding(least.failures)}: {'; '.join(least.failures)}", False)]
        return out + [(".", False)]
    pick = rec.pick
    out = head + [(pick.config_id, True), (f" ({_size(pick)}) is the pick", False)]
    figs = [f"{fmt.num(pick.tiebreak, 1)} {rec.tiebreak_unit}"] if pick.tiebreak is not None else []
    out.append((f", {', '.join(figs)}." if figs else ".", False))
    bigger = [c for c in rec.candidates if c.key() > pick.key()]
    if not bigger:
        return out + [(" Nothing larger was measured.", False)]
    nxt = min(bigger, key=Candidate.key)
    out += [(" The next step up, ", False), (nxt.config_id, True),
            (f" ({_size(nxt)}), is bound by {_binding(nxt.failures)}: {'; '.join(nxt.failures)}.", False)]
    if nxt.efficiency is not None and 0 < nxt.efficiency < LOW_EFFICIENCY:
        out.append((f" It decodes at {fmt.num(nxt.efficiency, 2)} of its bandwidth roofline: not bandwidth-bound, "
                    "the study's collapse at depth.", False))
    return out + _cheapest(nxt, ceilings, records)


def verdict_paragraph(records: list[Record], recs: list[Recommendation]) -> list[Piece]:
    """Plain verdicts, as the study wrote them: the pick per use case, what binds the next step, what would move it."""
    ceilings = {ident(r): r for r in latest(records, "ceiling") if isinstance(r, CeilingRecord)}
    out: list[Piece] = []
    for rec in recs:
        if out:
            out.append((" ", False))
        out += _sentence(rec, ceilings, records)
    return out or [("No measured configuration to judge.", False)]


def gate(records: list[Record]) -> tuple[bool, list[Piece]]:
    """The session's result: passed when every config test that ran passed; else which did not and why."""
    bad = [r for r in records if r.outcome == "failed" and r.kind != "search"]
    if not bad:
        return True, [("every config test that ran passed (skipped configs are listed as not measured).", False)]
    out: list[Piece] = [("these config tests failed: ", False)]
    for i, r in enumerate(bad):
        why = "; ".join(f for f in (workload_label(str(workload_parts(r)[0].name or ""), fmt.DASH)
                                    if isinstance(r, WorkloadRecord) else "",) if f)
        reasons = failed_verdicts(r) or [str(reason_of(r) or "test failed")]
        out += [(" · " if i else "", False), (ident(r), True),
                (f"{' (' + why + ')' if why else ''} — {'; '.join(reasons)}", False)]
    out.append((".", False))
    return False, out
