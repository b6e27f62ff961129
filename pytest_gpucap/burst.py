"""The burst ceiling: every slot at once gets a prompt filling a share of its context, an image where
the config has a projector, and a long reply; the lowest free memory over the burst is the headroom.

Why: free memory at idle hides what a full slot costs (on the host, KV pages are only touched when
written; on a GPU, compute buffers grow with the batch). The study's headroom figure is "free after one
image + 5K-token response"; this measures it. Prompt lengths come from the server's own tokenizer and
are checked against the ``usage.prompt_tokens`` each reply reports. ``run_burst`` is a plain function so
the capacity search can run it on its probes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from .backends import ServerError, ServerHandle
from .budgets import SLO, Burst, Workload
from .depth import slot_context
from .record_burst import BurstInfo
from .records import Verdict
from .verdicts import FREE_MEMORY_VERDICT, headroom, headroom_class
from .vision import chat_once
from .workload import runner
from .workload.client import RequestRecord, StreamingClient
from .workload.depth import TokenCounter
from .workload.images import image_seeds, with_images
from .workload.prompts import calibrate, tool_blob

#: Tokens kept free in each slot beyond prompt and reply (the template's closing tokens, rounding).
SLOT_MARGIN_TOKENS = 32
#: The verdict on the burst's requests: every one must finish.
FAILED_VERDICT = "burst requests failed"
#: Agent numbers of the burst's prompts (distinct from any workload's, so no prompt-cache hit).
AGENT_BASE = 900_000


@dataclass(frozen=True)
class BurstResult:
    """What one burst sent and what it left free (MiB). ``min_free_mib`` is the headroom figure."""

    slots: int
    fill: float
    slot_ctx: int
    target_prompt_tokens: int
    reply_tokens: int
    image: bool
    prompt_tokens: tuple[int, ...] = ()
    completion_tokens: tuple[int, ...] = ()
    failed: int = 0
    errors: tuple[str, ...] = ()
    seconds: float = 0.0
    free_before_mib: float | None = None
    min_free_mib: float | None = None
    samples: int = 0
    aborted: str | None = None
    records: list[RequestRecord] = field(default_factory=list, repr=False, compare=False)

    @property
    def fill_reached(self) -> float | None:
        return min(self.prompt_tokens) / self.slot_ctx if self.prompt_tokens and self.slot_ctx else None

    def info(self) -> BurstInfo:
        """The record's ``burst`` section."""
        fill = self.fill_reached
        data: dict[str, Any] = {
            "slots": self.slots, "fill": self.fill, "target_prompt_tokens": self.target_prompt_tokens,
            "prompt_tokens": list(self.prompt_tokens), "fill_reached": None if fill is None else round(fill, 4),
            "reply_tokens": self.reply_tokens, "completion_tokens": list(self.completion_tokens),
            "image": self.image, "failed": self.failed, "seconds": round(self.seconds, 3),
            "free_before_mib": _r(self.free_before_mib), "min_free_mib": _r(self.min_free_mib),
            "samples": self.samples, "tokens_from": "server tokenizer; usage.prompt_tokens per slot"}
        if self.errors:
            data["errors"] = list(self.errors)
        if self.aborted:
            data["aborted"] = self.aborted
        return BurstInfo.from_dict(data)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _overhead(handle: ServerHandle, image: bool, seed: int) -> int:
    """Prompt tokens the chat template (and the image) add to a one-token user message."""
    try:
        usage, _, _ = chat_once(handle, with_images("x", image_seeds(seed, AGENT_BASE, 1, 1) if image else []))
        return max(0, int(usage["prompt_tokens"]) - 1)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return SLOT_MARGIN_TOKENS


def _prompt(count: Callable[[str], int | None], i: int, tokens: int, cpt: float, seed: int) -> str:
    """Slot ``i``'s text, sized on the server's tokenizer (one correction after the first count)."""
    text = tool_blob(seed, AGENT_BASE + i, 0, tokens, cpt)
    got = count(text)
    if got:
        text = tool_blob(seed, AGENT_BASE + i, 0, tokens, cpt * tokens / got)
        again = count(text)
        while again and again > tokens and len(text) > 16:  # never over the target: trim the tail
            text = text[: int(len(text) * tokens / again) - 1]
            again = count(text)
    return text


def run_burst(handle: ServerHandle, burst: Burst, workload: Workload) -> BurstResult:
    """Every slot at once: a prompt of ``burst.fill`` x the slot's context (tokens counted by the server),
    one image where mmproj is on (and ``burst.image``), and ``burst.reply_tokens x token_scale`` reply
    tokens. Returns the minimum free memory over the burst (sampler timeline, start..end) and what went."""
    cfg = handle.config
    slot_ctx = slot_context(handle)
    image = bool(burst.image and cfg.mmproj)
    target = int(burst.fill * slot_ctx)  # the fill first; the reply gets what is left of the slot
    reply = max(1, min(round(burst.reply_tokens * workload.token_scale), slot_ctx - target - SLOT_MARGIN_TOKENS))
    cpt, _ = calibrate(handle.url, request=lambda text: handle.backend.tokenize_request(handle, text),
                       api_key=handle.api_key)
    text_tokens = max(1, target - _overhead(handle, image, workload.seed))
    # the depth sweep's counter, so both size prompts the same way
    count = TokenCounter(handle.url, lambda t: handle.backend.tokenize_request(handle, t), handle.api_key)
    prompts = [_prompt(count, i, text_tokens, cpt, workload.seed) for i in range(cfg.n)]
    before = handle.sampler.sample_device() if handle.sampler else None
    t0 = time.monotonic()
    records = [RequestRecord(agent=AGENT_BASE + i, role="burst", turn=0, scheduled=t0) for i in range(cfg.n)]

    async def all_at_once() -> None:
        kw = handle.backend.client_options(handle)
        async with StreamingClient(handle.url, cfg.n, workload.request_timeout_s, 0.0, kw.get("api_key"),
                                   kw.get("model", "gpucap"), runner.stall_s(workload)) as client:
            await asyncio.gather(*(client.chat(records[i], [{"role": "user", "content": with_images(
                prompts[i], image_seeds(workload.seed, AGENT_BASE + i, 0, 1) if image else [])}],
                reply, thinking=False) for i in range(cfg.n)))

    runner.run(all_at_once())
    t1 = time.monotonic()
    aborted = None
    try:
        handle.check_alive()
    except ServerError as exc:
        aborted = str(exc).splitlines()[0][:300]
    window = [p.free_mib for p in handle.sampler.timeline.between(t0, t1)] if handle.sampler else []
    if handle.sampler and aborted is None:
        window.append(handle.sampler.sample_device().free_mib)
    failed = [r for r in records if not r.ok]
    return BurstResult(
        slots=cfg.n, fill=burst.fill, slot_ctx=slot_ctx, target_prompt_tokens=target, reply_tokens=reply,
        image=image, prompt_tokens=tuple(r.prompt_tokens for r in records if r.prompt_tokens is not None),
        completion_tokens=tuple(r.completion_tokens for r in records if r.completion_tokens is not None),
        failed=len(failed), errors=tuple(f"{(r.error.value if r.error else 'failed')}: {r.detail[:120]}"
                                         for r in failed),
        seconds=t1 - t0, free_before_mib=before.free_mib if before else None,
        min_free_mib=min(window) if window else None, samples=len(window), aborted=aborted, records=records)


def burst_verdicts(verdicts: list[Verdict], result: BurstResult, slo: SLO) -> list[Verdict]:
    """The ceiling's verdicts with the free-memory headroom judged on the burst minimum (a backend judged
    by its KV capacity keeps that verdict), and one verdict that every burst request finished."""
    out = [headroom(result.min_free_mib, slo) if v.name == FREE_MEMORY_VERDICT and result.min_free_mib is not None
           else v for v in verdicts]
    return out + [Verdict(FAILED_VERDICT, float(result.failed), 0.0, "", higher_is_better=False)]


def burst_skip_reason(handle: ServerHandle, verdicts: list[Verdict]) -> str | None:
    """Why the burst is not sent to this booted config, or None."""
    if any(v.name == FREE_MEMORY_VERDICT and not v.ok for v in verdicts):
        return "headroom already breached at idle"
    if handle.backend.tokenize_request(handle, "x") is None:
        return f"the {handle.config.backend} backend has no tokenize endpoint to size the fill with"
    return None


def with_burst(handle: ServerHandle, record: dict[str, Any], verdicts: list[Verdict],
               slo: SLO) -> tuple[dict[str, Any], list[Verdict]]:
    """A ceiling record (dict) after the profile's burst: ``memory.free_idle_mib`` (the hold's figure),
    ``memory.free_under_burst_mib``, the ``burst`` section, and the verdicts judged on the burst.
    Unchanged when the profile's burst is disabled; skipped, with ``memory.burst_skipped`` saying why, when
    the config already breaches its headroom at idle (loading it further cannot change that verdict) or
    the server has no tokenizer endpoint to size the fill with (an external endpoint)."""
    settings = handle.profile.burst
    if not settings.enabled:
        return record, verdicts
    why = burst_skip_reason(handle, verdicts)
    if why:
        return dict(record, memory=dict(record["memory"], burst_skipped=why)), verdicts
    result = run_burst(handle, settings, handle.profile.workload)
    verdicts = burst_verdicts(verdicts, result, slo)
    memory = dict(record["memory"], free_idle_mib=record["memory"].get("free_mib"),
                  free_under_burst_mib=_r(result.min_free_mib))
    record = dict(record, memory=memory, burst=result.info().to_dict(), verdicts=[v.to_dict() for v in verdicts])
    if result.min_free_mib is not None and memory.get("kv_headroom") is None:
        record["headroom_class"] = headroom_class(result.min_free_mib / 1024, slo)
    return record, verdicts


__all__ = ["BurstResult", "burst_skip_reason", "burst_verdicts", "run_burst", "with_burst"]
