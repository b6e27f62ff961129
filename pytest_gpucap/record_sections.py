"""The sections of a result record (the mechanism that maps them to and from JSON dicts is ``record_base``).

Each section is a frozen dataclass whose typed fields are what readers look at (the write-up, the
comparison, the tracked figures); ``from_dict`` → ``to_dict`` gives back the same dict, because keys not
typed here ride along in ``extra`` and a parsed section writes back the keys it was read with. The
record kinds themselves, the schema version and the results file are in ``records``.

``from_dict`` does not coerce values (a hand-edited file may hold anything); readers format through
tolerant helpers. A section that is not the expected shape is kept verbatim in ``extra`` and its
typed field holds what could be read (an empty section where one is required).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .record_agents import CacheTurn
from .record_base import Section, is_number, number, opt, sub  # noqa: F401 - re-exported to records

if TYPE_CHECKING:
    from .matrix import SLO, CapacityConfig


@dataclass(frozen=True, kw_only=True)
class RecordConfig(Section):
    """The config a record measured (``dataclasses.asdict(CapacityConfig)``), typed where readers look."""

    profile: str | None = None
    backend: str | None = None
    n: int | None = None
    ctx: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    mmproj: bool | None = None

    @classmethod
    def of(cls, cfg: "CapacityConfig") -> "RecordConfig":
        return cls.from_dict(asdict(cfg))


@dataclass(frozen=True, kw_only=True)
class ServerInfo(Section):
    """Which server ran: backend, binary or command, its version, argv, URL, model and slots."""

    backend: str | None
    binary: str | None
    version: str | None
    argv: list[str] | None
    url: str | None
    model: str | None
    total_slots: int | None
    n_ctx_slot: int | None
    device: str | None = opt()  # the device it occupied: host, gpu0, ...
    exclusive: bool | None = opt()  # False: the profile let other servers share the device
    device_wait_s: float | None = opt()  # waited for another worker's server to leave the device
    up_at: float | None = opt()  # wall-clock time the server took the device (epoch seconds)
    gpus: list[int] | None = opt()  # the cards it was pinned to, as the caller numbers them
    visible_devices: str | None = opt()  # the CUDA_VISIBLE_DEVICES it was given


@dataclass(frozen=True, kw_only=True)
class SloBudgets(Section):
    """The budgets a record was judged against (a ceiling records its headroom budget only)."""

    headroom_gib: float | None = opt()
    p95_s: dict[str, float] | None = opt()
    min_agg_tps: float | None = opt()
    max_error_rate: float | None = opt()
    ttft_p95_s: float | None = opt()
    ramp_p95_s: float | None = opt()
    queue_p95_s: float | None = opt()
    min_goodput: float | None = opt()
    tpot_p95_s: float | None = opt()
    min_depth_ratio: float | None = opt()
    min_depth_decode_tps: float | None = opt()

    @classmethod
    def of(cls, slo: "SLO") -> "SloBudgets":
        """Every budget of ``slo``, unset ones as null (workload and ramp records)."""
        return cls.from_dict({"headroom_gib": slo.headroom_gib, "p95_s": dict(slo.p95_s),
                              "min_agg_tps": slo.min_agg_tps, "max_error_rate": slo.max_error_rate,
                              "ttft_p95_s": slo.ttft_p95_s, "ramp_p95_s": slo.ramp_p95_s,
                              "queue_p95_s": slo.queue_p95_s,
                              **{k: v for k in ("min_goodput", "tpot_p95_s", "min_depth_ratio", "min_depth_decode_tps")
                                 if (v := getattr(slo, k)) is not None}})


# ---------------------------------------------------------------- ceiling

@dataclass(frozen=True, kw_only=True)
class ServerBuffers(Section):
    """``memory.server_report``: the buffers the server logged at load (MiB per device); backend-shaped."""

    kv_mib: float | None = opt()
    model_mib: dict[str, float] | None = opt()
    kv_buffer_mib: dict[str, float] | None = opt()
    compute_mib: dict[str, float] | None = opt()
    output_mib: dict[str, float] | None = opt()
    kv_lines: list[dict[str, Any]] | None = opt()


@dataclass(frozen=True, kw_only=True)
class Predicted(Section):
    """``memory.predicted``: the memory model's figures before boot (``Prediction.as_dict``)."""

    kv_mib: float | None = opt()
    kv_per_slot_mib: float | None = opt()
    compute_source: str | None = opt()
    total_mib: float | None = opt()
    calibrated: bool | None = opt()


@dataclass(frozen=True, kw_only=True)
class PredictionPart(Section):
    """One row of ``memory.prediction_error``: predicted vs server-reported vs measured MiB."""

    predicted_mib: float | None = opt()
    server_mib: float | None = opt()
    diff_mib: float | None = opt()
    measured_mib: float | None = opt()
    error_mib: float | None = opt()
    error_pct: float | None = opt()
    exact: bool | None = opt()
    lines_server: list[str] | None = opt()


@dataclass(frozen=True, kw_only=True)
class PredictionCheck(Section):
    """``memory.prediction_error`` (``prediction_error``): the parts reports show are typed."""

    kv: PredictionPart | None = sub(PredictionPart, optional=True)
    total: PredictionPart | None = sub(PredictionPart, optional=True)


@dataclass(frozen=True, kw_only=True)
class KvHeadroom(Section):
    """A backend's own headroom rule (vLLM: concurrent full-length sequences its KV pool holds vs N)."""

    kind: str | None = opt()
    explain: str | None = opt()
    kv_capacity_sequences: float | None = opt()
    n: int | None = opt()
    spare_sequences: float | None = opt()
    ok: bool | None = opt()


@dataclass(frozen=True, kw_only=True)
class LlamaProjection(Section):
    """``memory.llama_projection``: llama.cpp's own projection (``llama-fit-params``) beside ours and the
    measured use (MiB); ``disagree`` when the two predictions differ by more than 5 %."""

    total_mib: float | None = opt()
    model_mib: float | None = opt()
    context_mib: float | None = opt()
    compute_mib: float | None = opt()
    predicted_mib: float | None = opt()
    measured_mib: float | None = opt()
    vs_prediction_pct: float | None = opt()  # (ours - llama.cpp's) / llama.cpp's
    vs_measured_pct: float | None = opt()  # (llama.cpp's - measured) / measured
    disagree: bool | None = opt()
    error: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class CeilingMemory(Section):
    """What the probe saw from load through the hold window, and the server's own account (MiB)."""

    probe: str | None
    device_total_mib: float | None
    baseline_used_mib: float | None
    used_after_load_mib: float | None
    free_after_load_mib: float | None
    free_mib: float | None  # the lowest free memory from load through the hold
    peak_used_mib: float | None
    server_rss_mib: float | None
    host_available_min_mib: float | None
    samples: int | None
    server_report: ServerBuffers = sub(ServerBuffers)
    kv_per_slot_mib: float | None
    predicted: Predicted | None = sub(Predicted, optional=True)
    predicted_kv_per_slot_mib: float | None = opt()
    prediction_error: PredictionCheck | None = sub(PredictionCheck, optional=True)
    kv_headroom: KvHeadroom | None = sub(KvHeadroom, optional=True)
    server_used_mib: float | None = opt()  # after load, what the device charges to the server's processes
    others_used_mib: float | None = opt()  # after load, used - server: co-tenants, desktop, driver
    device_samples: int | None = opt()  # fast device readings (every <= 100 ms) behind free_mib / peak
    timeline: list[dict[str, float]] | None = opt()  # those readings, downsampled (t from the first)
    llama_projection: LlamaProjection | None = sub(LlamaProjection, optional=True)
    free_idle_mib: float | None = opt()  # issue 12: the burst ceiling's two figures (idle = free_mib)
    free_under_burst_mib: float | None = opt()


# ---------------------------------------------------------------- workload

@dataclass(frozen=True, kw_only=True)
class Percentiles(Section):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    n: int | None = None


@dataclass(frozen=True, kw_only=True)
class RoleMetrics(Section):
    """One role's turns: end-to-end latency percentiles, counts, its decode rate, TTFT/TPOT/ITL (chunk
    gaps) percentiles and, for thinking-on turns, TTFT split into first reasoning and first content."""

    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    turns_ok: int | None = None
    turns_failed: int | None = None
    tps: float | None = None
    ttft_s: Percentiles | None = sub(Percentiles, optional=True)
    tpot_s: Percentiles | None = sub(Percentiles, optional=True)
    itl_s: Percentiles | None = sub(Percentiles, optional=True)
    ttft_reasoning_s: Percentiles | None = sub(Percentiles, optional=True)
    ttft_content_s: Percentiles | None = sub(Percentiles, optional=True)
    reasoning_tokens: int | None = opt()


@dataclass(frozen=True, kw_only=True)
class Crosscheck(Section):
    """The client's token count and decode rate against the server's own counters."""

    client_tokens: int | None = None
    server_timing_tokens: int | None = None
    server_metrics_tokens: float | None = None
    token_ratio: float | None = None
    metrics_token_ratio: float | None = None
    decode_rate_ratio: float | None = None
    client_behind: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Goodput(Section):
    """Turns that met every per-turn budget, as a fraction of finished turns and as rates."""

    good_turns: int | None = None
    finished_turns: int | None = None
    fraction: float | None = None
    turns_per_s: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class QueueTimes(Section):
    mean: float | None = opt()
    p50: float | None = opt()
    p95: float | None = opt()
    p99: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class ServerView(Section):
    """``metrics.server``: the server's ``/metrics`` polled during the run (queueing, KV use, preemption)."""

    samples: int | None = None
    scrape_errors: int | None = None
    window_s: float | None = opt()
    max_waiting: float | None = opt()
    mean_waiting: float | None = opt()
    waiting_fraction: float | None = opt()
    max_running: float | None = opt()
    mean_running: float | None = opt()
    max_kv_cache_usage: float | None = opt()
    preemptions: float | None = opt()
    server_errors: float | None = opt()
    queue_time_s: QueueTimes | None = sub(QueueTimes, optional=True)
    prefix_cache_hit_rate: float | None = opt()
    overloaded: bool | None = opt()
    max_num_seqs: int | None = opt()
    running_at_cap: bool | None = opt()


@dataclass(frozen=True, kw_only=True)
class WorkloadMetrics(Section):
    """A load run's figures over its measured window (``workload.metrics.summarize`` and the harness's checks)."""

    agg_tps: float | None
    per_call_tps: float | None
    ttft_s: Percentiles = sub(Percentiles)
    e2e_s: Percentiles = sub(Percentiles)
    tpot_s: Percentiles | None = sub(Percentiles, optional=True)  # over all finished turns (the TPOT SLO)
    roles: dict[str, RoleMetrics] = sub(RoleMetrics, many="map")
    turns_ok: int | None
    turns_failed: int | None
    error_rate: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    usage_missing: int | None = None
    crosscheck: Crosscheck | None = sub(Crosscheck, optional=True)
    roofline_tps: float | None = opt()
    roofline_full_slots_tps: float | None = opt()
    efficiency: float | None = opt()
    goodput: Goodput | None = sub(Goodput, optional=True)
    server: ServerView | None = sub(ServerView, optional=True)
    cache_turns: tuple[CacheTurn, ...] = sub(CacheTurn, many="list", optional=True)  # multi-turn runs (record_agents)
    compactions: int | None = opt()


@dataclass(frozen=True, kw_only=True)
class WorkloadInfo(Section):
    """What load ran: its name, the agents (roles), and the settings it ran with."""

    name: str | None
    agents: list[str] | None
    duration_s: float | None = None
    warmup_s: float | None = None
    token_scale: float | None = None
    cadence_scale: float | None = None
    rtt_s: float | None = None
    seed: int | None = None
    chars_per_token: float | None = None
    calibration: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorkloadMemory(Section):
    free_at_boot_mib: float | None = None
    min_free_mib: float | None = None
    peak_server_rss_mib: float | None = None
    # the device readings during the run (≤ 120 per run; ``run`` 1..K with --gpucap-repeat), t on the ceiling
    # timeline's axis (seconds from the server's first reading)
    timeline: list[dict[str, float]] | None = opt()


@dataclass(frozen=True, kw_only=True)
class FigureSpread(Section):
    """One tracked figure over the ``--gpucap-repeat`` runs: the median the record reports, and its range."""

    median: float | None = None
    min: float | None = None
    max: float | None = None
    values: list[float] | None = None

    @property
    def spread_pct(self) -> float | None:
        """(max − min) relative to the median, in percent: how far this host's runs disagree."""
        lo, hi, mid = number(self.min), number(self.max), number(self.median)
        if lo is None or hi is None or not mid:
            return None
        return (hi - lo) / abs(mid) * 100


@dataclass(frozen=True, kw_only=True)
class RepeatSpread(Section):
    """A workload run ``runs`` times: the record's metrics are the median run's (by aggregate tok/s),
    ``figures`` the per-figure medians and ranges over all runs (the gate reads both)."""

    runs: int | None = None
    median_run: int | None = None  # 0-based index of the run whose metrics the record holds
    figures: dict[str, FigureSpread] = sub(FigureSpread, many="map")


# ---------------------------------------------------------------- search (the ramp's sections: ramp_sections)

@dataclass(frozen=True, kw_only=True)
class SearchProbe(Section):
    """One config a capacity search considered, and how it was decided."""

    config_id: str | None = None
    n: int | None = None
    ctx: int | None = None
    cache_type: str | None = None
    mmproj: bool | None = None
    status: str | None = None
    reason: str | None = None
    boot_order: int | None = None
    predicted_free_mib: float | None = None
    failed_verdicts: list[str] | None = opt()  # names of the verdicts a booted or known probe failed
