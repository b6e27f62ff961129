"""What a profile budgets and how it loads a server: SLOs, workload settings, preflight floors and
watchdog limits. Frozen dataclasses at the bottom layer, so the prediction, the verdicts and the
workload can read them without the matrix file's parsing; ``matrix`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The study's headroom words, best first; free memory of at least ``COMFORTABLE_FACTOR`` x the
#: headroom SLO is the first, at least the SLO the second, less the third (``SLO.headroom_class``).
HEADROOM_CLASSES = ("Comfortable", "Marginal", "Risky")
COMFORTABLE_FACTOR = 2.0


@dataclass(frozen=True)
class SLO:
    """Budgets a capacity test must meet; None means "not gated"."""

    headroom_gib: float = 1.5
    p95_s: tuple[tuple[str, float], ...] = ()  # per role: E2E turn latency p95 budget
    min_agg_tps: float | None = None
    max_error_rate: float | None = None
    ttft_p95_s: float | None = None
    queue_p95_s: float | None = None  # vLLM: server-side queue time p95 (from /metrics) budget
    ramp_p95_s: float | None = None  # per-step turn p95 budget in the agent-connection ramp
    # goodput: the least share of finished turns that met every per-turn budget (role E2E, TTFT, TPOT)
    min_goodput: float | None = None
    tpot_p95_s: float | None = None  # per-turn time per output token budget (a turn over it is not "good")
    min_depth_ratio: float | None = None  # depth sweep: decode tok/s at the deepest ÷ the shallowest depth
    min_depth_decode_tps: float | None = None  # depth sweep: decode tok/s floor at the deepest depth

    def headroom_class(self, free_gib: float) -> str:
        """The study's words for free memory against this SLO: Comfortable at >= 2x the headroom
        budget, Marginal at >= the budget, else Risky. The one definition of the rule: judgements go
        through ``verdicts.headroom_class``; the prediction (below verdicts) reads it here."""
        if free_gib >= COMFORTABLE_FACTOR * self.headroom_gib:
            return HEADROOM_CLASSES[0]
        if free_gib >= self.headroom_gib:
            return HEADROOM_CLASSES[1]
        return HEADROOM_CLASSES[2]

    def role_p95(self) -> dict[str, float]:
        return dict(self.p95_s)


@dataclass(frozen=True)
class Workload:
    """How long and how large workloads run on a profile (see workload.roles.WorkloadSettings)."""

    duration_s: float = 600.0
    warmup_s: float = 0.0
    token_scale: float = 1.0
    cadence_scale: float = 1.0
    max_turns: int | None = None
    seed: int = 0
    request_timeout_s: float = 900.0
    ramp_ceiling: int = 2048
    ramp_max_tokens: int = 16
    ramp_context_tokens: int = 0
    rtt_s: float = 0.0  # injected client round-trip per request (remote-agent penalty curve)
    depth_ctx_tokens: int = 0  # the context the depth sweep fills, at most (0: the slot's whole context)
    stall_s: float | None = None  # a stream silent this long is a failed "stalled" turn (default: from the SLO)


@dataclass(frozen=True)
class Preflight:
    """Floors checked before boot (skip) and after boot (skip the workload)."""

    min_available_gib: float = 0.0
    min_free_gib: float = 0.0
    post_boot_min_free_gib: float = 0.0


@dataclass(frozen=True)
class WatchdogLimits:
    """The watchdog stops a server when memory stays under these for ``window_s``."""

    min_available_gib: float = 0.0
    min_free_gib: float = 0.0
    window_s: float = 15.0
    interval_s: float = 0.5


@dataclass(frozen=True)
class Burst:
    """The burst ceiling (``[profiles.NAME.burst]``): after the hold, every slot at once gets a prompt
    filling ``fill`` of its context, an image where mmproj is on, and a ``reply_tokens`` reply (scaled by
    the workload's ``token_scale``), because headroom at idle is not headroom under load."""

    enabled: bool = True
    fill: float = 0.9
    reply_tokens: int = 5000
    image: bool = True
