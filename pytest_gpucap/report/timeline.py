"""Memory over time, one chart per booted config: the device readings of the ceiling record (boot, load,
hold) and of each workload run on the same server, on one time axis, with the phases shaded and the
minimum free memory marked.

The readings are the records' own (``memory.timeline``: ≤ 120 points each, t in seconds from the
server's first reading), so a chart shows what the records hold and nothing interpolated.
"""

from __future__ import annotations

from typing import Any

from ..records import CeilingRecord, Record, WorkloadRecord
from . import fmt
from .figures import Chart, Marker, Series, Span, slugify
from .tables import host_label, ident

CAPTION = ("Device memory from the server's first reading (t = 0, boot start): free (memory.timeline[].free_mib, "
           "solid) and used (dashed). Shaded: boot until ready (boot_s), load + hold (the ceiling record's "
           "readings), each workload run (its record's memory.timeline). ◆ the lowest free reading.")


def _points(timeline: Any, key: str) -> list[tuple[float, float]]:
    out = []
    for p in timeline or ():
        if isinstance(p, dict):
            t, v = fmt.as_float(p.get("t")), fmt.as_float(p.get(key))
            if t is not None and v is not None:
                out.append((t, v))
    return out


def _run_spans(r: Any) -> list[Span]:
    """A workload's stretch of the time axis; one per run when it was repeated (``run`` on each reading)."""
    runs: dict[Any, list[float]] = {}
    for p in r.memory.timeline or ():
        if isinstance(p, dict) and (t := fmt.as_float(p.get("t"))) is not None:
            runs.setdefault(p.get("run"), []).append(t)
    label = f"workload {r.workload.name}"
    return [Span(min(ts), max(max(ts), min(ts) + 1e-3), label if run is None else f"{label} run {run}")
            for run, ts in runs.items()]


def _server_key(r: Record) -> tuple[str, str, Any]:
    """One server instance: config, host and the time it took the device (a re-boot is another server)."""
    server = getattr(r, "server", None)
    return ident(r), host_label(r), getattr(server, "up_at", None)


def memory_timelines(records: list[Record]) -> list[Chart]:
    """One chart per server instance whose records hold a timeline (ceiling first, then its workloads)."""
    groups: dict[tuple[str, str, Any], list[Record]] = {}
    for r in records:
        timeline = r.memory.timeline if isinstance(r, (CeilingRecord, WorkloadRecord)) else None
        if timeline:
            groups.setdefault(_server_key(r), []).append(r)
    several_hosts = len({host for _, host, _ in groups}) > 1
    charts: list[Chart] = []
    seen: set[str] = set()
    for (cid, host, _), recs in groups.items():
        slug = "timeline-" + slugify(f"{cid}-{host}" if several_hosts else cid)
        while slug in seen:
            slug += "-x"
        seen.add(slug)
        chart = Chart(slug, f"Memory over time — {cid}" + (f" on {host}" if several_hosts else ""),
                      "seconds since the server's first reading", "MiB", caption=CAPTION)
        free: list[tuple[float, float]] = []
        used: list[tuple[float, float]] = []
        for r in sorted(recs, key=lambda r: not isinstance(r, CeilingRecord)):
            timeline = r.memory.timeline  # type: ignore[attr-defined]
            f, u = _points(timeline, "free_mib"), _points(timeline, "used_mib")
            free += f
            used += u
            if not f:
                continue
            start, end = min(t for t, _ in f), max(t for t, _ in f)
            if isinstance(r, CeilingRecord):
                boot = fmt.as_float(r.boot_s)
                if boot is not None and boot > 0:
                    chart.spans.append(Span(0.0, boot, f"boot {fmt.num(boot, 1)} s"))
                    start = max(start, boot)
                if end > start:
                    chart.spans.append(Span(start, end, "load + hold"))
            else:
                chart.spans += _run_spans(r)
        chart.series = [Series("free", sorted(free)), Series("used", sorted(used), dashed=True)]
        if free:
            t, v = min(free, key=lambda p: (p[1], p[0]))
            chart.markers.append(Marker(t, v, f"min free {fmt.mib(v)} MiB at {fmt.num(t, 1)} s"))
        if chart.has_points():
            charts.append(chart)
    return charts
