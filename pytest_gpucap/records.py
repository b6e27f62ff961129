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
from .verdicts import Verdict

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
