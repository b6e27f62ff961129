"""What the capacity search already knows: outcomes from saved result records, and which of an earlier
run's records may stand in for a boot (same host, build, model and fixed knobs).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from .matrix import SLO, CapacityConfig
from .records import CeilingRecord, Record, WorkloadRecord, as_record
from .search import Outcome
from .verdicts import ceiling_verdicts, workload_verdicts


def _recorded_verdicts(rec: Record) -> list[tuple[Any, Any, Any, bool]]:
    """(name, measured, budget, ok) of each verdict a record holds, as recorded. A list the typed
    record keeps verbatim in ``extra`` is read as written: an unmeasured record has no typed verdicts,
    and one whose recorded ``ok`` the typed ``Verdict`` would not reproduce keeps that ``ok``."""
    kept = rec.extra.get("verdicts")
    if isinstance(kept, list):
        return [(v.get("name"), v.get("measured"), v.get("budget"), bool(v.get("ok"))) for v in kept
                if isinstance(v, Mapping)]
    return [(v.name, v.measured, v.budget, v.ok) for v in getattr(rec, "verdicts", ())]


def _judged(rec: Record, slo: SLO | None) -> tuple[bool, list[str], list[str]] | None:
    """(ok, lines, failed names) of a record judged again against ``slo`` (None: keep its verdicts):
    a ceiling's free memory against the headroom, a workload's metrics against every workload budget."""
    if slo is None:
        return None
    if isinstance(rec, CeilingRecord) and rec.memory.free_mib is not None:
        kv = rec.memory.kv_headroom
        again = ceiling_verdicts(rec.memory.free_mib, slo, None if kv is None else kv.to_dict(), rec.config.n or 0)
    elif isinstance(rec, WorkloadRecord) and not rec.aborted and rec.metrics.turns_ok is not None:
        again = workload_verdicts(rec.metrics, slo)
    else:
        return None
    return (all(v.ok for v in again), [f"{v.line()} (re-judged)" for v in again], [v.name for v in again if not v.ok])


def _unjudgeable(rec: Record, slo: SLO | None) -> bool:
    """A workload record made before goodput was recorded cannot answer a goodput SLO either way."""
    return (slo is not None and slo.min_goodput is not None and isinstance(rec, WorkloadRecord)
            and rec.metrics.goodput is None)


def known_outcomes(records: Iterable[Record | Mapping[str, Any]], slo: SLO | None = None,
                   needs_workload: str | None = None) -> dict[str, Outcome]:
    """Outcomes from saved result records (``records.read_jsonl``), keyed by config id.

    A config passes when every verdict of every record for it passed. With ``slo``, ceiling and
    workload records are judged again against it (``verdicts.ceiling_verdicts``: free memory against
    its headroom, or the backend's KV capacity; ``workload_verdicts`` on the recorded metrics) instead
    of the budget they were run with. With ``needs_workload`` (the search's probe workflow) a pass is
    trusted only when a workload record of that name is among them: headroom alone says nothing about
    latency, throughput or goodput, so such a config is left for the search to boot. A fail is kept
    either way: a config that breaks one SLO breaks the all-SLO search too.
    """
    grouped: dict[str, list[tuple[Record | Mapping[str, Any], Record]]] = {}
    for given in records:
        rec = as_record(given)
        # A skipped test measured nothing (no binary, preflight): the search decides that config itself.
        if rec.config_id is not None and rec.outcome != "skipped":
            grouped.setdefault(rec.config_id, []).append((given, rec))
    out: dict[str, Outcome] = {}
    for cid, recs in grouped.items():
        lines: list[str] = []
        failed: list[str] = []
        ok = True
        recs = [(g, r) for g, r in recs if not _unjudgeable(r, slo)]
        if not recs:
            continue
        for _, rec in recs:
            again = _judged(rec, slo)
            if again is not None:
                ok &= again[0]
                lines += again[1]
                failed += again[2]
                continue
            verdicts = _recorded_verdicts(rec)
            for name, measured, budget, good in verdicts:
                ok &= good
                lines.append(f"{name}: measured {measured}, budget {budget} [{'ok' if good else 'BREACH'}]")
                if not good:
                    failed.append(str(name))
            if rec.outcome == "failed" and not verdicts:
                ok = False  # e.g. the boot failed: nothing was measured, and the config did not hold
                lines.append(f"failed: {rec.reason or 'no reason recorded'}")
                failed.append("boot")
        if ok and needs_workload and not any(isinstance(r, WorkloadRecord) and r.workload.name == needs_workload
                                             for _, r in recs):
            continue  # judged on headroom only: not a pass of every SLO
        out[cid] = Outcome(ok, reason="; ".join(lines) or "no verdicts recorded", verdicts=tuple(lines),
                           record=recs[-1][0], failed=tuple(dict.fromkeys(failed)))
    return out


def reusable_records(records: Iterable[Record | Mapping[str, Any]], base: CapacityConfig, host: Mapping[str, Any],
                     server_version: str, model: str, workload: str | None = None) -> list[Record | Mapping[str, Any]]:
    """Measured ceiling records of an earlier run that answer for this search, and with ``workload``
    (the probe's workflow) that workflow's workload records run without injected RTT.

    Only records from the same host, server build and model, of configs that differ from ``base``
    in the searched dimensions alone, can stand in for a boot.
    """
    searched = {"n", "ctx", "cache_type_k", "cache_type_v", "mmproj"}
    fixed = {k: v for k, v in asdict(base).items() if k not in searched}
    out = []
    for given in records:
        rec = as_record(given)
        if isinstance(rec, CeilingRecord):
            measured = bool(rec.memory.to_dict())
        else:
            measured = (workload is not None and isinstance(rec, WorkloadRecord) and rec.workload.name == workload
                        and not rec.workload.rtt_s and rec.metrics.turns_ok is not None)
        if (not measured or rec.config.absent
                or rec.host != dict(host) or rec.server.version != server_version or rec.server.model != model):
            continue
        cfg = rec.config.to_dict()  # the whole config: RecordConfig types only some of its keys
        if all(_same(cfg.get(k), v) for k, v in fixed.items()):
            out.append(given)
    return out


def _same(recorded: Any, current: Any) -> bool:
    """Equal after a JSON round trip (tuples come back as lists)."""
    return json.loads(json.dumps(recorded, default=str)) == json.loads(json.dumps(current, default=str))


__all__ = ["known_outcomes", "reusable_records"]
