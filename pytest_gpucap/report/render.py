"""Render ``capacity.md`` and ``capacity.html`` (plus ``charts/*.svg``) from a saved ``results.jsonl``.

Reports are built from saved records only, so a crashed session can still be rendered and a
re-render gives the same files. Record strings are untrusted: HTML goes through jinja2 autoescaping
and the Markdown through ``md_escape`` (applied to every ``{{ }}`` by ``finalize``).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from .vision import vision_table
from ..capacity_verdict import verdict_records
from ..records import MeasuredRecord, RampRecord, Record, SchemaError, SearchRecord, as_record, read_records
from ..verdicts import HEADROOM_CLASSES, HEADROOM_RULE, headroom_bands, judged_by_kv_capacity
from . import fmt
from .answer import VERDICT_WORDS, gate
from .depth import allocated_context, config_verdicts, depth_tables
from .figures import Chart, to_svg
from .crosschecks import (
    crosscheck_flags, crosscheck_table, goodput_table, low_efficiency, not_measured_table, prediction_table,
    queueing_table,
)
from .hosts import first_screen, side_by_side
from .scaling import memory_chart, ramp_charts, workload_charts
from .timeline import memory_timelines
from .tables import (
    ceiling_memory, ceiling_table, host_label, ident, kv_table, of_kind, profile_of, ramp_limit_line, ramp_table,
    repeat_table, roles_table, scaling_tables, search_boundary_table, search_table, verdicts_table, workload_table,
)
from .agent_tables import cache_turns_table

#: Record kinds with a section of their own; any other kind is only counted.
SHOWN_KINDS = ("ceiling", "workload", "ramp", "search", "unmeasured", "depth", "config-verdict")
RESULTS_NAME = "results.jsonl"
SESSION_NAME = "session.json"
#: Column header → the formula or field behind it (HTML tooltips).
COLUMN_TIPS = {
    "Free at idle (MiB)": "memory.free_mib: the lowest free device memory from load through the hold window",
    "Free under burst (MiB)": "memory.free_under_burst_mib: the lowest free memory while every slot held a "
                              "near-full prompt (+ an image on mmproj) and a long reply; the headroom verdict",
    "Used after load (MiB)": "memory.used_after_load_mib",
    "Headroom": HEADROOM_RULE,
    "Measured KV/slot†": "(used after load − baseline − model − compute − output buffers on the GPU) ÷ N",
    "Overhead/slot†": "Measured KV/slot − Server KV/slot",
    "Unattributed†": "used after load − baseline − all server-reported buffers",
    "Efficiency": "Agg TPS ÷ Roofline TPS (metrics.efficiency)",
    "Roofline TPS": "bandwidth-bound ceiling of aggregate decode tokens/s (metrics.roofline_tps)",
    "Agg TPS": "metrics.agg_tps: completion tokens of all agents ÷ measured window",
    "Agg TPS vs smallest ctx†": "agg TPS ÷ agg TPS at the smallest ctx/slot of this group − 1",
    "Min free (MiB)": "memory.min_free_mib: the lowest free memory during the workload",
    "total ctx": "N × ctx/slot",
}
#: Extra sections from ``pytest_gpucap_report_sections`` hooks, saved so a re-render keeps them.
SECTIONS_NAME = "sections.json"
CHART_DIR = "charts"


class ReportError(Exception):
    """Nothing to render (missing or empty results file, or one of another schema version); the message
    is one line."""


class MdRaw(str):
    """Markdown that is already safe (built by a filter here) and must not be escaped again."""


_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")


def md_escape(value: Any) -> str:
    """Make untrusted text inert in Markdown: no raw HTML, no links, no table breaks."""
    if isinstance(value, MdRaw):
        return value
    text = "" if value is None else str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return re.sub(r"[\r\n]+", " ", text)


def md_codeblock(text: Any) -> MdRaw:
    """A fenced block longer than any backtick run in the text, so the text cannot close it."""
    text = str(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return MdRaw(f"{fence}text\n{text}\n{fence}")


def md_pieces(pieces: Any) -> MdRaw:
    """(text, is_name) pieces as one Markdown paragraph: all escaped, names (config ids, profiles) in bold."""
    return MdRaw("".join(f"**{md_escape(t)}**" if code else md_escape(t) for t, code in pieces))


def _environments() -> tuple[Environment, Environment]:
    loader = PackageLoader("pytest_gpucap.report", "templates")
    common: dict[str, Any] = {"loader": loader, "trim_blocks": True, "lstrip_blocks": True,
                              "undefined": StrictUndefined, "keep_trailing_newline": True}
    html = Environment(autoescape=True, **common)
    md = Environment(autoescape=False, finalize=md_escape, **common)
    md.filters["codeblock"] = md_codeblock
    md.filters["raw"] = MdRaw
    md.filters["pieces"] = md_pieces
    return md, html


def load_records(path: Path) -> list[Record]:
    """Records from ``results.jsonl`` (torn last line tolerated); ReportError when there are none or
    the file was written by a schema version this one cannot read."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file (run pytest with --gpucap-report DIR first)")
    try:
        records = read_records(path)
    except SchemaError as exc:
        raise ReportError(str(exc)) from None
    if not records:
        raise ReportError(f"{path}: no result records in the file")
    return records


def load_session(path: Path) -> tuple[dict[str, Any] | None, str]:
    """Optional ``session.json`` written by the plugin; a note says why it is absent."""
    if not path.is_file():
        return None, f"{SESSION_NAME} not found: the command line, package versions and git revision were not recorded."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{SESSION_NAME} could not be read ({exc.__class__.__name__}); reproduction details are missing."
    if not isinstance(data, dict):
        return None, f"{SESSION_NAME} is not a JSON object; reproduction details are missing."
    return data, ""


def load_sections(path: Path) -> list[dict[str, Any]]:
    """Extra sections saved by the session (title, markdown, optional html); none when absent."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: extra report sections unreadable ({exc.__class__.__name__}: {exc})") from None
    out = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict) and isinstance(item.get("title"), str) and isinstance(item.get("markdown"), str):
            html = item.get("html")
            out.append({"title": item["title"], "markdown": item["markdown"],
                        "html": Markup(html) if isinstance(html, str) else None})
    return out


def _boot_share(fraction: Any) -> str:
    """The search's boots as a share of the grid's, e.g. "5 % of the grid's boots"."""
    value = fmt.as_float(fraction)
    return "share of the grid not recorded" if value is None else f"{100 * value:.0f} % of the grid's boots"


def _slo_rules(records: list[Record]) -> list[str]:
    """The free-memory rule per profile, from measured llama.cpp-style records (vLLM's rule is its own)."""
    seen: dict[tuple[str, Any], None] = {}
    for r in of_kind(records, "ceiling"):
        if not r.measured or judged_by_kv_capacity(r):
            continue
        seen[(profile_of(r), fmt.as_float(r.slo.headroom_gib))] = None  # type: ignore[attr-defined]
    rules = []
    for profile, slo in seen:
        if slo is None:
            rules.append(f"profile {profile}: no headroom SLO recorded")
            continue
        (top, top_gib), (mid, mid_gib), (low, _) = headroom_bands(slo)
        rules.append(f"profile {profile}: SLO {fmt.gib(slo)} GiB — {top} ≥ {fmt.gib(top_gib)} GiB free, "
                     f"{mid} ≥ {fmt.gib(mid_gib)} GiB, {low} below")
    return rules


def _vllm_notes(records: list[Record]) -> list[str]:
    """What "headroom" means on vLLM, said once however many vLLM configs there are."""
    notes: dict[str, None] = {}
    for r in of_kind(records, "ceiling"):
        if not r.measured or not judged_by_kv_capacity(r):
            continue
        kv = ceiling_memory(r).kv_headroom
        explain = kv.explain if kv is not None else None
        notes[str(explain) if explain else "vLLM pre-allocates its KV cache, so free memory after load is not "
              "headroom; no KV capacity was recorded for this config"] = None
    if notes:
        notes["vLLM rows: the verdict is KV capacity in concurrent full-length (ctx/slot) sequences ≥ N; "
              f"the {' / '.join(HEADROOM_CLASSES)} free-memory class does not apply"] = None
    return list(notes)


def _environment(records: list[Record], session: dict[str, Any] | None) -> dict[str, Any]:
    measured = [r for r in records if isinstance(r, MeasuredRecord)]
    hosts: dict[str, dict[str, Any]] = {}
    for r in measured:
        host = r.host
        if isinstance(host, dict):
            key = json.dumps(host, sort_keys=True, default=str)
            entry = hosts.setdefault(key, {"profiles": [], "facts": sorted((str(k), str(v)) for k, v in host.items())})
            if profile_of(r) not in entry["profiles"]:
                entry["profiles"].append(profile_of(r))
    servers = []
    seen: set[str] = set()
    for r in measured:
        srv = r.server
        cid = ident(r)
        if srv.absent or cid in seen:
            continue
        seen.add(cid)
        argv = srv.argv or []
        servers.append({
            "config_id": cid, "backend": fmt.text(srv.backend), "version": fmt.text(srv.version),
            "binary": fmt.text(srv.binary), "model": fmt.text(srv.model),
            "slots": fmt.integer(srv.total_slots), "n_ctx_slot": fmt.integer(srv.n_ctx_slot),
            "argv": shlex.join(str(a) for a in argv) if isinstance(argv, list) else str(argv),
        })
    sess: dict[str, Any] = {}
    if session:
        versions = session.get("versions")
        sess = {
            "command": session.get("command") if isinstance(session.get("command"), str)
            else shlex.join(str(a) for a in session.get("command") or []),
            "git": fmt.text(session.get("git")),
            "versions": sorted((str(k), str(v)) for k, v in versions.items()) if isinstance(versions, dict) else [],
            "extra": sorted((str(k), str(v)) for k, v in session.items()
                            if k not in ("command", "git", "versions") and not isinstance(v, (dict, list))),
        }
    return {"hosts": list(hosts.values()), "servers": servers, "session": sess}


def _host_names(records: list[Record]) -> list[str]:
    """One label per host and GPU the measured records came from (the HTML filter shows when there are several)."""
    return sorted({host_label(r) for r in records if isinstance(r, MeasuredRecord)} - {""})


def build_context(records: list[Record] | list[dict[str, Any]], session: dict[str, Any] | None = None,
                  session_note: str = "") -> tuple[dict[str, Any], list[Chart]]:
    """Everything both templates show, computed once so the Markdown and HTML cannot disagree."""
    records = [as_record(r) for r in records]
    if not any(r.kind == "config-verdict" for r in records):  # derived from the measured records (one rule)
        records += verdict_records(records)
    maps, recs, paragraph = first_screen(records)
    map_charts = [m.chart() for m in maps]
    charts: list[Chart] = list(map_charts)
    mem = memory_chart(records)
    if mem:
        charts.append(mem)
    timelines = memory_timelines(records)
    charts += timelines
    wl_charts = workload_charts(records)
    charts += wl_charts
    ramps = []
    for i, r in enumerate((r for r in records if isinstance(r, RampRecord)), start=1):
        rc = ramp_charts(r, i)
        charts += rc
        ramps.append({"config_id": ident(r), "table": ramp_table(r), "max_clean_n": fmt.integer(r.max_clean_n),
                      "knee_n": fmt.integer(r.knee_n), "charts": rc, "outcome": fmt.text(r.outcome),
                      "limit": ramp_limit_line(r)})
    searches = [{"profile": fmt.text(r.profile), "knee": fmt.text(r.knee),
                  "boots": fmt.integer(r.boots), "grid": fmt.integer(r.grid_size),
                  "assumption": fmt.text(r.assumption), "table": search_table(r),
                  "binding": fmt.text(r.binding_slo), "fraction": _boot_share(r.boot_fraction), "stopped": bool(r.stopped_early), "max_boots": fmt.integer(r.max_boots),
                  "boundary": search_boundary_table(r),
                  "outcome": fmt.text(r.outcome)} for r in records if isinstance(r, SearchRecord)]
    kinds: dict[str, int] = {}
    measured = [r for r in records if r.kind != "config-verdict"]  # verdicts live in verdicts.jsonl, derived
    for r in measured:
        kinds[str(r.kind)] = kinds.get(str(r.kind), 0) + 1
    profiles = sorted({str(r.profile) for r in records if r.profile})
    passed, gate_why = gate(records)
    context = {
        "maps": [{"map": m, "table": m.table(), "chart": c, "tips": m.tooltips()} for m, c in zip(maps, map_charts)],
        "verdict_words": VERDICT_WORDS, "paragraph": paragraph,
        "gate": {"passed": passed, "why": gate_why}, "hosts": _host_names(records), "tips": COLUMN_TIPS,
        "profiles": profiles, "n_records": len(measured), "kinds": sorted(kinds.items()),
        "other_kinds": sorted((k, v) for k, v in kinds.items() if k not in SHOWN_KINDS),
        "searches": searches, "headroom_rule": HEADROOM_RULE,
        "rounding_note": fmt.ROUNDING_NOTE,
        "ceiling": ceiling_table(records), "slo_rules": _slo_rules(records), "vllm_notes": _vllm_notes(records),
        "kv": kv_table(records), "prediction": prediction_table(records),
        "workload": workload_table(records), "low_efficiency": low_efficiency(records),
        "cache_turns": cache_turns_table(records),
        "roles": roles_table(records), "repeats": repeat_table(records), "verdicts": verdicts_table(records),
        "crosscheck": crosscheck_table(records), "crosscheck_flags": crosscheck_flags(records),
        "goodput": goodput_table(records), "queueing": queueing_table(records), "vision": vision_table(records),
        "not_measured": not_measured_table(records), "scaling": scaling_tables(records),
        "memory_chart": mem, "timelines": timelines, "workload_charts": wl_charts, "ramps": ramps,
        "across_hosts": side_by_side(records),
        "depths": depth_tables(records), "allocated": allocated_context(records),
        "config_verdicts": config_verdicts(records),
        "recommendations": recs, "env": _environment(records, session),
        "session_note": session_note, "chart_dir": CHART_DIR, "summary": False, "extra_sections": [],
    }
    return context, charts


def render_report(report_dir: Path) -> list[Path]:
    """Render DIR/capacity.md, DIR/capacity.html and DIR/charts/*.svg from DIR/results.jsonl.

    Returns the written paths. Raises ReportError when results.jsonl is missing or holds no records.
    """
    report_dir = Path(report_dir)
    records = load_records(report_dir / RESULTS_NAME)
    session, note = load_session(report_dir / SESSION_NAME)
    context, charts = build_context(records, session, note)
    context["extra_sections"] = load_sections(report_dir / SECTIONS_NAME)
    svgs = {c.slug: to_svg(c) for c in charts}
    chart_dir = report_dir / CHART_DIR
    chart_dir.mkdir(parents=True, exist_ok=True)
    for stale in chart_dir.glob("*.svg"):
        stale.unlink()
    written: list[Path] = []
    md_env, html_env = _environments()
    md_path = report_dir / "capacity.md"
    md_path.write_text(md_env.get_template("capacity.md.j2").render(**context), encoding="utf-8")
    written.append(md_path)
    html_path = report_dir / "capacity.html"
    inline = {slug: Markup(svg) for slug, svg in svgs.items()}  # escaped inside to_svg
    html_path.write_text(html_env.get_template("capacity.html.j2").render(**context, svg=inline), encoding="utf-8")
    written.append(html_path)
    for chart in charts:
        path = chart_dir / chart.filename
        path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + svgs[chart.slug] + "\n", encoding="utf-8")
        written.append(path)
    return written


def render_summary(report_dir: Path) -> str:
    """The first screen of capacity.md (verdict paragraph, gate, capacity maps) without images: for
    ``$GITHUB_STEP_SUMMARY``, where the chart files cannot be shown. Raises ReportError like ``render_report``."""
    report_dir = Path(report_dir)
    context, _ = build_context(load_records(report_dir / RESULTS_NAME))
    md_env, _ = _environments()
    return md_env.get_template("capacity.md.j2").render(**context | {"summary": True})
