"""The scaling views as charts: which records feed which chart, grouped into series."""

from __future__ import annotations

from typing import Any

from ..records import RampRecord, Record
from . import fmt
from .figures import Chart, Marker, Series, slugify
from .tables import ceiling_frame, ident, workload_frame, workload_label


def _points(frame: Any, x: str, y: str) -> list[tuple[float, float]]:
    pts = []
    for xv, yv in zip(frame[x], frame[y]):
        xf, yf = fmt.as_float(xv), fmt.as_float(yv)
        if xf is not None and yf is not None:
            pts.append((xf, yf))
    return pts


def memory_chart(records: list[Record]) -> Chart | None:
    """Used memory after load vs N×ctx, one series per profile and KV type (the slope is KV cost)."""
    df = ceiling_frame(records)
    if df.empty:
        return None
    chart = Chart("memory-vs-total-ctx", "Memory used after load vs N × ctx", "total context (N × ctx per slot)",
                  "MiB", x_kind="ctx",
                  caption="Solid: used after load (memory.used_after_load_mib). Dashed: server-reported "
                          "model + KV + compute buffers.")
    df = df.assign(kv=[fmt.text(k) if k == v else f"{fmt.text(k)}/{fmt.text(v)}"
                       for k, v in zip(df["cache_k"], df["cache_v"])])
    df["server_total"] = [sum(fmt.as_float(x) or 0.0 for m in maps if isinstance(m, dict) for x in m.values())
                          or None for maps in zip(df["model_map"], df["kv_map"], df["compute_map"])]
    for (profile, kv, mmproj), group in df.groupby(["profile", "kv", "mmproj"], sort=False):
        name = f"{profile} {kv}{' +mmproj' if mmproj else ''}"
        chart.series.append(Series(f"{name} used", _points(group, "total_ctx", "used")))
        chart.series.append(Series(f"{name} server buffers", _points(group, "total_ctx", "server_total"), True))
    return chart if chart.has_points() else None


def workload_charts(records: list[Record]) -> list[Chart]:
    """TPS and latency vs total context (the study's scaling curve): one series per (profile, N, workload)."""
    df = workload_frame(records)
    if df.empty:
        return []
    tps = Chart("tps-vs-ctx", "Throughput vs total context (N × ctx/slot)", "total context (tokens)",
                "tokens/s", x_kind="ctx", caption="Solid: aggregate TPS (metrics.agg_tps). "
                "Dashed: per-call TPS (metrics.per_call_tps).")
    lat = Chart("latency-vs-ctx", "Turn latency vs total context (N × ctx/slot)", "total context (tokens)",
                "seconds", x_kind="ctx", caption="Solid: end-to-end p95 (metrics.e2e_s.p95). "
                "Dashed: end-to-end p50.")
    for (profile, n, workload), group in df.groupby(["profile", "n", "workload"], sort=False, dropna=False):
        name = f"N={fmt.integer(n)} {workload_label(str(workload), group['agents'].iloc[0])}"
        if df["profile"].nunique() > 1:
            name = f"{profile} {name}"
        tps.series.append(Series(f"{name} agg", _points(group, "total_ctx", "agg_tps")))
        tps.series.append(Series(f"{name} per-call", _points(group, "total_ctx", "per_call_tps"), True))
        lat.series.append(Series(f"{name} p95", _points(group, "total_ctx", "e2e_p95")))
        lat.series.append(Series(f"{name} p50", _points(group, "total_ctx", "e2e_p50"), True))
    return [c for c in (tps, lat, rtt_chart(df)) if c is not None and c.has_points()]


def rtt_chart(df: Any) -> Chart | None:
    """Aggregate TPS vs the injected round trip (workload.rtt_s), when one config ran a workload at several RTTs;
    the break-even (where the curve falls through the workload's min_agg_tps budget) marked."""
    df = df.assign(rtt=[fmt.as_float(r.workload.rtt_s) for r in df["record"]])
    chart = Chart("tps-vs-rtt", "RTT penalty: throughput vs round-trip time", "round trip per turn (s)",
                  "tokens/s", caption="Aggregate TPS (metrics.agg_tps) per injected round trip (workload.rtt_s). "
                  "◆ break-even: the round trip at which the curve falls through the workload's budget "
                  "(slo.min_agg_tps), interpolated between the two measured round trips either side.")
    for (cid, workload), group in df.groupby(["config_id", "workload"], sort=False):
        if group["rtt"].nunique() >= 2:
            points = _points(group, "rtt", "agg_tps")
            chart.series.append(Series(f"{cid} {workload}", points))
            budgets = [b for r in group["record"] if (b := fmt.as_float(r.slo.min_agg_tps)) is not None]
            if budgets and (x := break_even(points, budgets[0])) is not None:
                chart.markers.append(Marker(x, budgets[0], f"break-even {fmt.num(x * 1000, 0)} ms"
                                                           f" ({cid} {workload}, min {fmt.tps(budgets[0])} tok/s)"))
    return chart if chart.has_points() else None


def break_even(points: list[tuple[float, float]], budget: float) -> float | None:
    """The first round trip at which throughput falls below ``budget`` (linear between the measured points);
    None when every measured round trip stays above it, or the curve starts below it."""
    pts = sorted(points)
    if not pts or pts[0][1] < budget:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 >= budget > y1:
            return x0 + (y0 - budget) / (y0 - y1) * (x1 - x0)
    return None


def ramp_charts(record: RampRecord, index: int) -> list[Chart]:
    """Latency and memory vs N for one ramp record."""
    steps = record.steps
    cid = ident(record)
    slug = f"ramp-{index}-{slugify(cid)}"

    def series(name: str, key: str, dashed: bool = False) -> Series:
        pts = [(fmt.as_float(s.n), fmt.as_float(getattr(s, key))) for s in steps]
        return Series(name, [(x, y) for x, y in pts if x is not None and y is not None], dashed)

    lat = Chart(f"{slug}-latency", f"Ramp latency vs N — {cid}", "concurrent agents (N)", "seconds", x_kind="log2",
                series=[series("turn p95", "turn_p95_s"), series("turn p50", "turn_p50_s", True),
                        series("TTFT p95", "ttft_p95_s"), series("TTFT p50", "ttft_p50_s", True)])
    knee = next((s for s in steps if record.knee_n is not None and s.n == record.knee_n), None)
    if knee is not None and fmt.as_float(knee.turn_p95_s) is not None:
        lat.markers.append(Marker(float(record.knee_n), float(knee.turn_p95_s), f"knee N={record.knee_n}"))
    mem = Chart(f"{slug}-memory", f"Ramp memory vs N — {cid}", "concurrent agents (N)", "MiB", x_kind="log2",
                series=[series("server RSS", "server_rss_mib"), series("device used", "device_used_mib")])
    used = next((s for s in steps if record.knee_n is not None and s.n == record.knee_n), None)
    if used is not None and fmt.as_float(used.device_used_mib) is not None:
        mem.markers.append(Marker(float(record.knee_n), float(used.device_used_mib), f"knee N={record.knee_n}"))
    return [c for c in (lat, mem) if c.has_points()]
