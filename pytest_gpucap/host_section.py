"""The write-up's host-routine section: what was stopped and restored, the co-tenants before the
first boot, and the study's Phase 1 breakdown per config (co-tenants, other processes, the
server's model/KV/compute, unattributed), from the co-tenant memory each ceiling record carries."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .hookspec import ReportSection

TITLE = "Host routine: services, co-tenants and the Phase 1 breakdown"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _sum(values: Any) -> float:
    return sum(v for v in (values or {}).values() if isinstance(v, (int, float)))


def breakdown(record: Mapping[str, Any]) -> dict[str, float | None]:
    """Where a config's memory went. On a GPU, the pre-boot baseline is co-tenants + other processes
    and the server is what came on top; on a host profile the budget counts the server's RSS only,
    so co-tenants show beside it and "other processes" is not measured."""
    mem = record.get("memory") or {}
    gpu = mem.get("probe") == "nvml"
    cot = [c.get("device_mib") if gpu else c.get("rss_mib") for c in record.get("cotenants") or ()]
    cotenants = sum(c for c in cot if isinstance(c, (int, float)))
    report = mem.get("server_report") or {}
    model, kv, compute = _sum(report.get("model_mib")), report.get("kv_mib") or 0.0, _sum(report.get("compute_mib"))
    used, base = mem.get("used_after_load_mib"), mem.get("baseline_used_mib")
    if gpu and isinstance(used, (int, float)) and isinstance(base, (int, float)):
        other: float | None = base - cotenants
        server: float | None = used - base
    else:
        other, server = None, used if isinstance(used, (int, float)) else None
    return {"cotenants": cotenants, "other": other, "model": model, "kv": kv, "compute": compute,
            "unattributed": None if server is None else server - model - kv - compute, "free": mem.get("free_mib")}


def host_section(lines: Sequence[tuple[str, bool]], baseline: Mapping[str, Sequence[Mapping[str, Any]]],
                 records: Sequence[Mapping[str, Any]]) -> list[ReportSection] | None:
    ceilings = [r for r in records if r.get("kind") == "ceiling" and "cotenants" in r]
    if not lines and not ceilings:
        return None
    md = [f"- {'**' + line + '**' if loud else line}" for line, loud in lines]
    rows = [(profile, c) for profile, entries in baseline.items() for c in entries]
    if rows:
        md += ["", "Co-tenants before the first boot:", "",
               "| Profile | Co-tenant | State | PID | Host RSS MiB | Device MiB |", "|---|---|---|---:|---:|---:|"]
        md += [f"| {p} | {c['name']} | {c.get('state', '')} | {c.get('pid') or '—'} | {_mib(c.get('rss_mib'))} | "
               f"{_mib(c.get('device_mib'))} |" for p, c in rows]
    if ceilings:
        md += ["", "Phase 1 breakdown (MiB; on a host profile co-tenants are host RSS beside the server's budget):", "",
               "| Config | Co-tenants | Other processes | Model | KV | Compute | Unattributed | Free |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ceilings:
            b = breakdown(r)
            md.append(f"| {r.get('config_id')} | {_mib(b['cotenants'])} | {_mib(b['other'])} | {_mib(b['model'])} | "
                      f"{_mib(b['kv'])} | {_mib(b['compute'])} | {_mib(b['unattributed'])} | {_mib(b['free'])} |")
    return [ReportSection(TITLE, "\n".join(md))]
