"""Typed, versioned result records: what a capacity test measured, in the form reports are rendered from.

Records travel as plain JSON dicts: on the test report's ``user_properties`` (so they reach the
controller under pytest-xdist, which only carries plain data) and one per line in ``results.jsonl``.
The frozen dataclasses here (record kinds; their sections are in ``record_sections``) are how code
builds and reads them; ``from_dict`` → ``to_dict`` gives back the same dict. ``SCHEMA_VERSION`` is
checked whenever a results file is read: an older layout is migrated or refused, a newer one refused,
each with one line naming the file, the version found and what to do.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from .ramp_sections import RampEvidence, RampStep, limit_label
from .record_sections import (
    CeilingMemory, Crosscheck, Goodput, KvHeadroom, Percentiles, Predicted, PredictionCheck, PredictionPart,
    QueueTimes, RecordConfig, RepeatSpread, RoleMetrics, SearchProbe, Section, ServerBuffers, ServerInfo,
    ServerView, SloBudgets, WorkloadInfo, WorkloadMemory, WorkloadMetrics, is_number, number, opt, sub,
)
from .record_burst import BurstInfo
from .record_vision import VisionMetrics

from .record_search import SearchBoundary

if TYPE_CHECKING:
    from .backends import ServerHandle
    from .matrix import CapacityConfig

#: The version of the record layout. Bump it when a key changes meaning or moves, and add the step
#: from the old layout to ``MIGRATIONS`` (or let old files be refused with a one-line reason).
SCHEMA_VERSION = 1
#: ``MIGRATIONS[v]`` turns a version-``v`` record dict into a version-``v + 1`` one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
PROPERTY_KEY = "gpucap"
REASON_KEY = "gpucap:reason"  # why a config test did not pass, one line


# ---------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    """One budget check: passing verdicts are recorded too. (Judged in ``verdicts``; held by records.)"""

    name: str
    measured: float
    budget: float
    unit: str
    higher_is_better: bool = True

    @property
    def ok(self) -> bool:
        return self.measured >= self.budget if self.higher_is_better else self.measured <= self.budget

    @property
    def margin(self) -> float:
        return self.measured - self.budget if self.higher_is_better else self.budget - self.measured

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        state = "ok" if self.ok else "BREACH"
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.name}: measured {self.measured:.3g}{unit}, budget {op} {self.budget:.3g}{unit}, "
                f"margin {self.margin:+.3g}{unit} [{state}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok, "margin": self.margin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        if not isinstance(data, Mapping) or not all(is_number(data.get(k)) for k in ("measured", "budget")):
            raise TypeError("a verdict needs numeric measured and budget")
        return cls(str(data["name"]), data["measured"], data["budget"], str(data.get("unit", "")),
                   bool(data.get("higher_is_better", True)))


# ---------------------------------------------------------------- records

@dataclass(frozen=True, kw_only=True)
class Record(Section):
    """Fields every record has. ``outcome`` (and ``reason``) are added on the controller."""

    schema: int = SCHEMA_VERSION
    kind: str
    test: str | None
    config_id: str | None
    profile: str | None
    outcome: str | None = opt()
    reason: str | None = opt()

    #: Whether the record holds figures (False: a config that ended before measuring).
    measured: ClassVar[bool] = False

    def summary_line(self) -> str:
        """One terminal line: the figures and the verdict."""
        head = f"{str(self.config_id):<28} {str(self.kind):<8} {str(self.outcome):<7}"
        return f"{head} {self.reason}" if self.reason else self._summary(head)

    def _summary(self, head: str) -> str:
        return head


@dataclass(frozen=True, kw_only=True)
class MeasuredRecord(Record):
    """A record of a booted server: what ran, where, and on which server."""

    config: RecordConfig = sub(RecordConfig)
    host: dict[str, Any] | None
    server: ServerInfo = sub(ServerInfo)
    boot_s: float | None
    recorded_at: float | None = opt()  # wall-clock time the record was made (epoch seconds)

    measured: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class CeilingRecord(MeasuredRecord):
    """Phase 1: the memory a booted config holds, and its headroom verdicts."""

    kind: str = "ceiling"
    memory: CeilingMemory = sub(CeilingMemory)
    slo: SloBudgets = sub(SloBudgets)
    verdicts: tuple[Verdict, ...] = sub(Verdict, many="list")
    headroom_class: str | None
    search_probe: bool | None = opt()
    burst: BurstInfo | None = sub(BurstInfo, optional=True)  # the burst ceiling (record_burst)

    def _summary(self, head: str) -> str:
        mem = self.memory
        return (f"{head} used {mem.used_after_load_mib:>8.0f} MiB  free {mem.free_mib:>8.0f} MiB  "
                f"boot {self.boot_s:>5.2f} s  {self.headroom_class}")


@dataclass(frozen=True, kw_only=True)
class WorkloadRecord(MeasuredRecord):
    """Phase 2: one load run's metrics, memory during it, and its SLO verdicts."""

    kind: str = "workload"
    workload: WorkloadInfo = sub(WorkloadInfo)
    metrics: WorkloadMetrics = sub(WorkloadMetrics)
    memory: WorkloadMemory = sub(WorkloadMemory)
    aborted: str | None = None
    tokens_from: str | None = None
    slo: SloBudgets = sub(SloBudgets)
    verdicts: tuple[Verdict, ...] = sub(Verdict, many="list")
    repeat: RepeatSpread | None = sub(RepeatSpread, optional=True)  # --gpucap-repeat K > 1
    vision: VisionMetrics | None = sub(VisionMetrics, optional=True)  # image turns (record_vision)

    def _summary(self, head: str) -> str:
        m = self.metrics
        roles = "  ".join(f"{r} p50/p95 {v.p50_s or 0:.1f}/{v.p95_s or 0:.1f} s" for r, v in m.roles.items())
        return (f"{head} {self.workload.name}: {m.agg_tps:.1f} tok/s agg, {m.per_call_tps:.1f} per call, "
                f"turns {m.turns_ok} ok/{m.turns_failed} failed  {roles}")


@dataclass(frozen=True, kw_only=True)
class RampRecord(MeasuredRecord):
    """The agent-connection ramp: N agents doubling to ``ceiling``, the last clean N and the knee."""

    kind: str = "ramp"
    steps: tuple[RampStep, ...] = sub(RampStep, many="list")
    aborted: str | None = None
    nofile: dict[str, int] | None = None
    max_clean_n: int | None = None
    knee_n: int | None = None
    ceiling: int | None = None
    context_tokens: int | None = None
    max_tokens: int | None = None
    rtt_s: float | None = None
    slo: SloBudgets = sub(SloBudgets)
    limit: str | None = opt()  # one of ramp_sections.LIMITS: what stopped the ramp ("none": the ceiling, clean)
    limit_detail: str | None = opt()
    limit_evidence: RampEvidence | None = sub(RampEvidence, optional=True)
    queue_knee_n: int | None = opt()  # first N > slots where TTFT p95 grew while per-call decode held
    slots: int | None = opt()
    client_procs: int | None = opt()

    def _summary(self, head: str) -> str:
        named = "" if self.limit is None else f", limit: {limit_label(self.limit, self.ceiling, self.limit_evidence)}"
        return f"{head} max clean N {self.max_clean_n}, knee {self.knee_n or '-'} (ceiling {self.ceiling}){named}"


@dataclass(frozen=True, kw_only=True)
class SearchRecord(Record):
    """A capacity search: the knee, what it cost in boots, and every probe with its reason."""

    kind: str = "search"
    knee: str | None = None
    boots: int | None = None
    grid_size: int | None = None
    boot_fraction: float | None = None
    known_used: int | None = None
    assumption: str | None = None
    seconds: float | None = None
    probes: tuple[SearchProbe, ...] = sub(SearchProbe, many="list")
    binding_slo: str | None = opt()  # what failed at the first config past the knee
    boundary: tuple[SearchBoundary, ...] = sub(SearchBoundary, many="list")
    max_boots: int | None = opt()
    stopped_early: bool | None = opt()
    probe_workload: dict[str, Any] | None = opt()  # what each probe ran after its hold (search_space.ProbeWorkload)

    @classmethod
    def of(cls, test: str, profile: str, summary: Mapping[str, Any]) -> "SearchRecord":
        """From ``SearchResult.as_dict()``."""
        return cls.from_dict({"schema": SCHEMA_VERSION, "kind": "search", "test": test,
                              "config_id": f"{profile}-search", "profile": profile, **summary})

    def _summary(self, head: str) -> str:
        bound = f", bound by {self.binding_slo}" if self.binding_slo else ""
        return f"{head} knee {self.knee or '-'} with {self.boots} boots of a {self.grid_size}-config grid{bound}"


@dataclass(frozen=True, kw_only=True)
class UnmeasuredRecord(Record):
    """A config test that ended before measuring (skipped at preflight, boot failed): config and reason.

    ``kind`` is ``"ceiling"`` for a ceiling test, else ``"unmeasured"``."""

    kind: str = "unmeasured"
    config: RecordConfig = sub(RecordConfig)


@dataclass(frozen=True, kw_only=True)
class OtherRecord(Record):
    """A record of a kind this version does not know: counted, never shown."""


KINDS: dict[str, type[Record]] = {"ceiling": CeilingRecord, "workload": WorkloadRecord, "ramp": RampRecord,
                                  "search": SearchRecord, "unmeasured": UnmeasuredRecord}


def parse(data: Mapping[str, Any]) -> Record:
    """The typed record of one record dict (a ceiling or workload without figures is unmeasured)."""
    kind = data.get("kind")
    section = {"ceiling": "memory", "workload": "metrics"}.get(kind)  # type: ignore[arg-type]
    if section and not isinstance(data.get(section), Mapping):
        return UnmeasuredRecord.from_dict(data)
    return KINDS.get(kind, OtherRecord).from_dict(data)  # type: ignore[arg-type]


def as_record(record: Record | Mapping[str, Any]) -> Record:
    return record if isinstance(record, Record) else parse(record)


def as_dict(record: Record | Mapping[str, Any]) -> dict[str, Any]:
    return record.to_dict() if isinstance(record, Record) else dict(record)


# ---------------------------------------------------------------- building

def header(handle: "ServerHandle", test_id: str) -> dict[str, Any]:
    """The constructor fields every measured record carries: what ran, where, and on which server."""
    cfg = handle.config
    spec = handle.spec
    return {
        "test": test_id, "config_id": cfg.id, "config": RecordConfig.of(cfg), "profile": handle.profile.name,
        "host": {"python": platform.python_version(), **handle.probe.describe()},
        "server": ServerInfo(
            backend=cfg.backend, binary=str(spec.binary or "") or " ".join(spec.command or ()),
            version=spec.binary_version, argv=handle.argv, url=handle.url, model=str(spec.model or ""),
            total_slots=handle.props.get("total_slots"), n_ctx_slot=handle.report.n_ctx_slot,
            device=handle.spec.device_key, exclusive=handle.profile.exclusive,
            gpus=list(spec.gpus) or None, visible_devices=spec.visible_devices,
            device_wait_s=None if handle.device_wait_s is None else round(handle.device_wait_s, 3),
            up_at=None if handle.up_at is None else round(handle.up_at, 3)),
        "boot_s": None if handle.boot_s is None else round(handle.boot_s, 3),
        "recorded_at": round(time.time(), 3),
    }


def outcome_record(cfg: "CapacityConfig", test_id: str, kind: str, reason: str) -> UnmeasuredRecord:
    """The record of a config test that ended before measuring: config and reason only, so the
    write-up can say why a config has no figures."""
    return UnmeasuredRecord(kind=kind, test=test_id, config_id=cfg.id, config=RecordConfig.of(cfg),
                            profile=cfg.profile, reason=reason)


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a skip or failure message, cut to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- results.jsonl

class SchemaError(ValueError):
    """A results file holds a record of a schema version this version cannot read; one line naming
    the file, the version found and what to do."""


def check_schema(record: dict[str, Any], where: str) -> dict[str, Any]:
    """``record`` in the current layout (migrated when older); SchemaError when it cannot be read."""
    found = record.get("schema")
    if found == SCHEMA_VERSION and is_number(found):
        return record
    reads = f"this pytest-gpucap reads schema {SCHEMA_VERSION}"
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise SchemaError(f"{where}: schema version {found!r} is not one pytest-gpucap writes ({reads}); "
                          "re-run the tests to write a new results.jsonl")
    if found > SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema version {found} is newer than {reads}; upgrade pytest-gpucap "
                          "(pip install -U pytest-gpucap) to read it")
    if any(v not in MIGRATIONS for v in range(found, SCHEMA_VERSION)):
        raise SchemaError(f"{where}: schema version {found} is older than {reads} and cannot be migrated; "
                          "re-run the tests to write a new results.jsonl, or render it with the release that "
                          "wrote it")
    for v in range(found, SCHEMA_VERSION):
        record = MIGRATIONS[v](record)
    return record


def append_jsonl(path: Path, record: Record | Mapping[str, Any]) -> None:
    """Append one record and flush, so an interrupted session keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(as_dict(record), sort_keys=True) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Record dicts from a results file, in the current layout. A torn line (crash mid-write) is
    ignored; a record of another schema version is migrated, or refused with SchemaError."""
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            records.append(check_schema(data, f"{path} line {n}"))
    return records


def read_records(path: Path) -> list[Record]:
    """Typed records from a results file (see ``read_jsonl``)."""
    return [parse(d) for d in read_jsonl(path)]


# ---------------------------------------------------------------- tracked figures

@dataclass(frozen=True)
class Figure:
    """A figure tracked across runs: its name, which way is better, how it is read from a typed record,
    and whether the regression gate judges it (counts and per-role figures are reported, not gated)."""

    kind: str
    name: str  # "{role}" names one figure per role
    higher_is_better: bool
    read: Callable[[Any], Any]
    gated: bool = True

    def values(self, record: Record) -> dict[str, float | None]:
        """The figure(s) of one record: the median over the runs when the workload was repeated."""
        if not isinstance(record, KINDS[self.kind]):
            return {} if "{role}" in self.name else {self.name: None}
        got = self.read(record)
        got = {self.name.format(role=k): v for k, v in got.items()} if "{role}" in self.name else {self.name: got}
        spreads = _spreads(record)
        return {k: number(spreads[k].median) if k in spreads else number(v) for k, v in got.items()}

    def spread_pct(self, record: Record | None, name: str) -> float | None:
        """How far the repeated runs of ``record`` disagreed on figure ``name`` (None: run once)."""
        spread = _spreads(record).get(name) if record is not None else None
        return None if spread is None else spread.spread_pct


def _spreads(record: Record) -> dict[str, Any]:
    repeat = getattr(record, "repeat", None)
    return repeat.figures if repeat is not None else {}


#: The one list of tracked figures: JUnit properties and benchmark entries (``headline``) and the
#: regression gate (``compare``, the ``gated`` ones) both read it.
TRACKED: tuple[Figure, ...] = (
    Figure("ceiling", "used_after_load_mib", False, lambda r: r.memory.used_after_load_mib),
    Figure("ceiling", "free_mib", True, lambda r: r.memory.free_mib),
    Figure("ceiling", "boot_s", False, lambda r: r.boot_s),
    Figure("ceiling", "kv_per_slot_mib", False, lambda r: r.memory.kv_per_slot_mib, gated=False),
    Figure("workload", "agg_tps", True, lambda r: r.metrics.agg_tps),
    Figure("workload", "per_call_tps", True, lambda r: r.metrics.per_call_tps),
    Figure("workload", "e2e_p95_s", False, lambda r: r.metrics.e2e_s.p95),
    Figure("workload", "ttft_p95_s", False, lambda r: r.metrics.ttft_s.p95, gated=False),
    Figure("workload", "turns_ok", True, lambda r: r.metrics.turns_ok, gated=False),
    Figure("workload", "turns_failed", False, lambda r: r.metrics.turns_failed, gated=False),
    Figure("workload", "{role}_p95_s", False, lambda r: {k: v.p95_s for k, v in r.metrics.roles.items()},
           gated=False),
    Figure("ramp", "max_clean_n", True, lambda r: r.max_clean_n),
    Figure("ramp", "knee_n", True, lambda r: r.knee_n, gated=False),
)


def headline(record: Record | Mapping[str, Any]) -> dict[str, float]:
    """The tracked figures a record has (JUnit properties, benchmark entries)."""
    rec = as_record(record)
    out: dict[str, float] = {}
    for fig in TRACKED:
        if fig.kind == rec.kind:
            out |= {k: v for k, v in fig.values(rec).items() if v is not None}
    return out


def workload_name(record: Record) -> str:
    return str(record.workload.name or "") if isinstance(record, WorkloadRecord) else ""


def record_name(record: Record | Mapping[str, Any]) -> str:
    """A stable name for one record: config id, kind, and workload name when there is one."""
    rec = as_record(record)
    name = f"{rec.config_id}::{rec.kind}"
    workload = workload_name(rec)
    return f"{name}::{workload}" if workload else name


def summary_line(record: Record | Mapping[str, Any]) -> str:
    """One terminal line per record (the recorder's summary, the CI job summary without a report)."""
    return as_record(record).summary_line()


__all__ = [
    "MIGRATIONS", "PROPERTY_KEY", "REASON_KEY", "SCHEMA_VERSION", "TRACKED", "CeilingMemory", "CeilingRecord",
    "Crosscheck", "Figure", "Goodput", "KvHeadroom", "MeasuredRecord", "OtherRecord", "Percentiles", "Predicted",
    "PredictionCheck", "PredictionPart", "QueueTimes", "RampEvidence", "RampRecord", "RampStep", "Record",
    "RecordConfig",
    "RepeatSpread", "RoleMetrics", "SchemaError", "SearchProbe", "SearchRecord", "Section", "ServerBuffers",
    "ServerInfo", "ServerView", "SloBudgets", "UnmeasuredRecord", "Verdict", "WorkloadInfo", "WorkloadMemory",
    "WorkloadMetrics", "WorkloadRecord", "append_jsonl", "as_dict", "as_record", "check_schema", "header",
    "headline", "number", "one_line", "opt", "outcome_record", "parse", "read_jsonl", "read_records", "record_name",
    "sub", "summary_line", "workload_name",
]


# Record kinds defined in their own modules register themselves in KINDS (imported last: they build on this one).
from . import record_config_verdict as _record_config_verdict  # noqa: E402,F401
from . import record_depth as _record_depth  # noqa: E402,F401
