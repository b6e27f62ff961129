"""Versioned result records: what a capacity test measured, in a form reports are rendered from.

Records are plain JSON-able dicts carried on the test report (``user_properties``), so they reach
the controller under pytest-xdist and are written as soon as each config finishes.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .backends import ServerHandle
from .verdicts import Verdict, headroom, headroom_class

SCHEMA_VERSION = 1
PROPERTY_KEY = "gpucap"
REASON_KEY = "gpucap:reason"  # why a config test did not pass, one line


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def header(handle: ServerHandle, test_id: str, kind: str) -> dict[str, Any]:
    """Fields every record carries: what ran, where, and on which server."""
    cfg = handle.config
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "test": test_id,
        "config_id": cfg.id,
        "config": asdict(cfg),
        "profile": handle.profile.name,
        "host": {"python": platform.python_version(), **handle.probe.describe()},
        "server": {
            "backend": cfg.backend, "binary": str(handle.spec.binary or "") or " ".join(handle.spec.command or ()),
            "version": handle.spec.binary_version, "argv": handle.argv, "url": handle.url,
            "model": str(handle.spec.model or ""),
            "total_slots": handle.props.get("total_slots"), "n_ctx_slot": handle.report.n_ctx_slot,
        },
        "boot_s": None if handle.boot_s is None else round(handle.boot_s, 3),
    }


def outcome_record(cfg: Any, test_id: str, kind: str, reason: str) -> dict[str, Any]:
    """The record of a config test that ended before measuring (skipped at preflight, boot failed).

    It carries the config and the reason only, so the write-up can say why a config has no figures.
    """
    return {"schema": SCHEMA_VERSION, "kind": kind, "test": test_id, "config_id": cfg.id, "config": asdict(cfg),
            "profile": cfg.profile, "reason": reason}


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a skip or failure message, cut to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def verdict_dicts(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) | {"ok": v.ok, "margin": v.margin} for v in verdicts]


def ceiling_record(handle: ServerHandle, test_id: str) -> tuple[dict[str, Any], list[Verdict]]:
    """The Phase-1 record for one booted config, and its headroom verdict.

    ``free_mib`` is the lowest free device memory seen from load through the hold window, so a
    brief dip is not hidden by a later reading.
    """
    cfg, prof = handle.config, handle.profile
    assert handle.after_load is not None and handle.sampler is not None
    tl = handle.sampler.timeline
    after = handle.after_load.device
    free_mib = min(after.free_mib, tl.min_free_mib if tl.min_free_mib is not None else after.free_mib)
    verdict = headroom(free_mib, prof.slo)
    verdicts = [verdict]
    kv_headroom = None
    if cfg.backend == "vllm":
        # vLLM pre-allocates its KV pool, so free memory after load says nothing about N x ctx:
        # the pool's capacity in concurrent full-length sequences must reach N.
        from .backends import vllm

        # Free memory is still recorded; it is the verdict only when vLLM did not report its pool.
        kv_headroom = vllm.headroom(handle.report, cfg)  # type: ignore[arg-type]
        if kv_headroom["kv_capacity_sequences"] is not None:
            verdicts = [Verdict("KV capacity (concurrent full-length sequences)",
                                kv_headroom["kv_capacity_sequences"], float(cfg.n), "seq")]
    record = header(handle, test_id, "ceiling")
    record |= {
        "memory": {
            "probe": handle.probe.kind,
            "device_total_mib": _mib(after.total_mib),
            "baseline_used_mib": _mib(handle.baseline.device.used_mib if handle.baseline else None),
            "used_after_load_mib": _mib(after.used_mib),
            "free_after_load_mib": _mib(after.free_mib),
            "free_mib": _mib(free_mib),
            "peak_used_mib": _mib(tl.peak_used_mib),
            "server_rss_mib": _mib(handle.after_load.server_rss_mib),
            "host_available_min_mib": _mib(tl.min_host_available_mib),
            "samples": len(tl.samples),
            "server_report": handle.report.as_dict(),
            "kv_per_slot_mib": handle.report.kv_per_slot_mib(cfg.n),
        },
        "slo": {"headroom_gib": prof.slo.headroom_gib},
        "verdicts": verdict_dicts(verdicts),
        "headroom_class": headroom_class(free_mib / 1024, prof.slo),
    }
    if handle.prediction is not None:
        from .memory_model import prediction_error

        record["memory"]["predicted"] = handle.prediction.as_dict()
        record["memory"]["predicted_kv_per_slot_mib"] = record["memory"]["predicted"].get("kv_per_slot_mib")
        record["memory"]["prediction_error"] = prediction_error(handle.prediction, record)
    if kv_headroom is not None:
        record["memory"]["kv_headroom"] = kv_headroom
    return record, verdicts


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record and flush, so an interrupted session keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records from a results file; a torn last line (crash mid-write) is ignored."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def headline(record: dict[str, Any]) -> dict[str, float]:
    """The few figures people track across runs (JUnit properties, benchmark entries, summaries)."""
    out: dict[str, float | None] = {}
    if record["kind"] == "ceiling" and record.get("memory"):
        mem = record["memory"]
        out = {"boot_s": record.get("boot_s"), "used_after_load_mib": mem.get("used_after_load_mib"),
               "free_mib": mem.get("free_mib"), "kv_per_slot_mib": mem.get("kv_per_slot_mib")}
    elif record["kind"] == "workload" and record.get("metrics"):
        m = record["metrics"]
        out = {"agg_tps": m["agg_tps"], "per_call_tps": m["per_call_tps"], "ttft_p95_s": m["ttft_s"]["p95"],
               "e2e_p95_s": m["e2e_s"]["p95"], "turns_ok": m["turns_ok"], "turns_failed": m["turns_failed"]}
        out |= {f"{role}_p95_s": v["p95_s"] for role, v in m["roles"].items()}
    elif record["kind"] == "ramp":
        out = {"max_clean_n": record.get("max_clean_n"), "knee_n": record.get("knee_n")}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def record_name(record: dict[str, Any]) -> str:
    """A stable name for one record: config id, kind, and workload name when there is one."""
    name = f"{record['config_id']}::{record['kind']}"
    workload = (record.get("workload") or {}).get("name")
    return f"{name}::{workload}" if workload else name
