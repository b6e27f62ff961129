"""The ``depth`` record: one request at several fills of a slot's context, and what each fill cost.

The study's surprise was a config that fits but decodes 13x slower when its slots are full; a
depth record holds, per depth, the prompt asked and the prompt the server counted, prefill and
decode rates from the server's own timings, TTFT and the inter-chunk gaps, and the decode-rate ratio
deepest ÷ shallowest that the ``min_depth_ratio`` SLO judges.
"""

from __future__ import annotations

from dataclasses import dataclass

from .record_sections import Section, SloBudgets, opt, sub
from .records import KINDS, MeasuredRecord, Verdict


@dataclass(frozen=True, kw_only=True)
class DepthPoint(Section):
    """One depth: asked vs got prompt tokens, and the rates the server reported for that request."""

    depth_pct: float | None = None
    asked_tokens: int | None = None  # the prompt the sweep built (server tokenizer, template included)
    prompt_tokens: int | None = None  # what the server counted (usage.prompt_tokens)
    cached_tokens: int | None = None  # prompt tokens served from cache (0 when the fill was fresh)
    completion_tokens: int | None = None
    prefill_tps: float | None = None  # timings.prompt_per_second
    decode_tps: float | None = None  # timings.predicted_per_second
    ttft_s: float | None = None
    itl_p50_s: float | None = None
    itl_p95_s: float | None = None
    error: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class DepthRecord(MeasuredRecord):
    """A depth sweep on one config: a point per depth, the decode ratio and its verdicts."""

    kind: str = "depth"
    ctx_slot: int | None = None  # the slot's context
    swept_ctx: int | None = None  # what the depth percentages are of (ctx_slot, or the profile's depth_ctx_tokens)
    max_tokens: int | None = None
    points: tuple[DepthPoint, ...] = sub(DepthPoint, many="list")
    decode_ratio: float | None = None  # decode tok/s at the deepest ÷ the shallowest depth
    slo: SloBudgets = sub(SloBudgets)
    verdicts: tuple[Verdict, ...] = sub(Verdict, many="list")

    def _summary(self, head: str) -> str:
        pts = "  ".join(f"{p.depth_pct:g}% {p.decode_tps or 0:.1f}" for p in self.points
                        if p.depth_pct is not None)
        ratio = f"{self.decode_ratio:.2f}" if self.decode_ratio is not None else "-"
        return f"{head} decode tok/s by depth: {pts}  deepest÷shallowest {ratio}"


KINDS["depth"] = DepthRecord

__all__ = ["DepthPoint", "DepthRecord"]
