"""A config's capacity verdict from all of its records: "fits", "fits, too slow", "does not fit" or
"not measured", with the reasons.

The study's headline case is a config that fits in memory but whose throughput collapses: that is
"fits, too slow", not "does not fit". The rule lives here once: memory breaches (headroom, KV
capacity, headroom under load) or a boot that failed make "does not fit"; with memory passing, any
other counted breach (throughput ``min_agg_tps``, the depth ratio ``min_depth_ratio``, a role's p95,
TTFT, error rate) makes "fits, too slow"; a config with no measured record, or none that judged its
memory (no ceiling test ran), is "not measured". The
recorder writes one ``config-verdict`` record per config at session end, and the write-up's capacity
map and recommendations read ``speed_breaches`` / ``memory_breaches`` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .record_config_verdict import ConfigVerdictRecord
from .records import SCHEMA_VERSION, MeasuredRecord, Record, SearchRecord, UnmeasuredRecord, Verdict, as_record
from .verdicts import FREE_MEMORY_VERDICT, KV_CAPACITY_VERDICT, counted_breaches

FITS, TOO_SLOW, NO_FIT, NOT_MEASURED = "fits", "fits, too slow", "does not fit", "not measured"
VERDICTS = (FITS, TOO_SLOW, NO_FIT, NOT_MEASURED)
#: Verdict names that judge memory besides the ``headroom…`` ones; every other counted breach judges speed.
MEMORY_VERDICTS = (KV_CAPACITY_VERDICT, "burst requests failed", "concurrent image requests failed")


def is_memory(v: Verdict) -> bool:
    return v.name.startswith(FREE_MEMORY_VERDICT) or v.name in MEMORY_VERDICTS


def phrase(v: Verdict) -> str:
    """``name measured unit below/above budget B unit``: one breach in words."""
    if isinstance(v.measured, float) and math.isinf(v.measured):
        return f"{v.name}, budget {v.budget:.3g} {v.unit}".strip()
    op = "below budget" if v.higher_is_better else "above budget"
    return f"{v.name} {v.measured:.3g} {v.unit} {op} {v.budget:.3g} {v.unit}".replace("  ", " ").strip()


def memory_breaches(record: Record) -> list[Verdict]:
    return [v for v in counted_breaches(record) if is_memory(v)]


def speed_breaches(record: Record) -> list[Verdict]:
    return [v for v in counted_breaches(record) if not is_memory(v)]


@dataclass(frozen=True)
class ConfigVerdict:
    config_id: str
    verdict: str
    reasons: tuple[str, ...]
    records: int


def _where(r: Record) -> str:
    name = getattr(getattr(r, "workload", None), "name", None)
    return f"{r.kind} {name}" if name else str(r.kind)


def config_verdict(records: Sequence[Record], config_id: str | None = None) -> ConfigVerdict:
    """One config's verdict from its records (see the module docstring for the rule)."""
    recs = [as_record(r) for r in records]
    cid = config_id or next((str(r.config_id) for r in recs if r.config_id), "")
    measured = [r for r in recs if isinstance(r, MeasuredRecord)]
    memory = [f"{_where(r)}: {phrase(v)}" for r in measured for v in memory_breaches(r)]
    if memory:
        return ConfigVerdict(cid, NO_FIT, tuple(memory), len(recs))
    unmeasured = [r for r in recs if isinstance(r, UnmeasuredRecord)]
    no_boot = [str(r.reason or r.outcome) for r in unmeasured
               if r.outcome == "failed" or "predict" in str(r.reason or "").lower()]
    if not measured:
        if no_boot:
            return ConfigVerdict(cid, NO_FIT, tuple(no_boot), len(recs))
        return ConfigVerdict(cid, NOT_MEASURED, tuple(str(r.reason or r.outcome or "") for r in unmeasured
                                                     if r.reason or r.outcome), len(recs))
    slow = [f"{_where(r)}: {phrase(v)}" for r in measured for v in speed_breaches(r)]
    if not any(is_memory(v) for r in measured for v in getattr(r, "verdicts", ())):
        return ConfigVerdict(cid, NOT_MEASURED, ("memory not judged (no ceiling record)", *slow), len(recs))
    return ConfigVerdict(cid, TOO_SLOW if slow else FITS, tuple(slow), len(recs))


def by_config(records: Iterable[Record]) -> dict[str, list[Record]]:
    """The records of each config, in order (search records and verdict records are not a config's)."""
    out: dict[str, list[Record]] = {}
    for r in map(as_record, records):
        if r.config_id and not isinstance(r, (SearchRecord, ConfigVerdictRecord)):
            out.setdefault(str(r.config_id), []).append(r)
    return out


def verdict_records(records: Iterable[Record]) -> list[ConfigVerdictRecord]:
    """One ``config-verdict`` record per config of ``records``."""
    out = []
    for cid, recs in by_config(records).items():
        v = config_verdict(recs, cid)
        first = next((r for r in recs if getattr(r, "config", None) is not None), recs[0])
        cfg = getattr(first, "config", None)
        out.append(ConfigVerdictRecord.from_dict({
            "schema": SCHEMA_VERSION, "kind": "config-verdict", "test": None, "config_id": cid,
            "profile": first.profile, "config": cfg.to_dict() if cfg is not None else {},
            "verdict": v.verdict, "reasons": list(v.reasons), "records": v.records}))
    return out
