"""The depth sweep's client side: one streamed request per fill of a slot's context.

Prompt lengths come from the server's own tokenizer: a filler text is cut until its token count is
what the depth asks (template tokens measured once with a tiny request and subtracted), and each depth
starts with its own header and filler so no depth reuses the previous one's cached prefix (llama.cpp
also gets ``cache_prompt: false``). The server's ``usage`` says what it really counted: asked vs got.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from .client import RequestRecord, StreamingClient
from .metrics import percentile
from .prompts import filler
from .runner import run

#: The study's depths: percent of the slot's context the prompt fills.
DEFAULT_DEPTHS = (0, 25, 50, 75, 95)
QUESTION = "\nSummarize the text above in one line."
Tokenize = Callable[[str], "tuple[str, dict[str, Any]] | None"]


@dataclass(frozen=True)
class DepthPlan:
    """What one sweep sends: where, which depths, how long a reply, and the fresh-cache switch."""

    url: str
    ctx_slot: int
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    max_tokens: int = 16
    seed: int = 0
    api_key: str | None = None
    model: str = "gpucap"
    no_cache: bool = True  # send cache_prompt: false (llama.cpp); other servers get fresh prefixes only
    timeout_s: float = 600.0


class TokenCounter:
    """Counts tokens with the server's tokenize endpoint (None when it has none)."""

    def __init__(self, url: str, request: Tokenize, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.url, self.request, self.timeout_s = url.rstrip("/"), request, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.calls = 0

    def __call__(self, text: str) -> int | None:
        call = self.request(text)
        if call is None:
            return None
        path, body = call
        self.calls += 1
        try:
            resp = httpx.post(self.url + path, json=body, headers=self.headers, timeout=self.timeout_s)
            resp.raise_for_status()
            data = resp.json()
        except (httpx.HTTPError, ValueError):
            return None
        tokens = data.get("tokens")
        return len(tokens) if isinstance(tokens, list) else data.get("count")


def fit_text(head: str, target: int, count: Callable[[str], int | None], rng: random.Random,
             chars_per_token: float = 3.5, tries: int = 12, tail: str = "") -> tuple[str, int | None]:
    """``head`` + filler + ``tail`` whose token count is ``target`` (or the closest of a few corrected
    cuts; never shorter than head + tail)."""
    text = head + filler(rng, int(max(target, 0) * chars_per_token * 1.5) + 256)
    n_chars = min(len(text), len(head) + int(max(target, 0) * chars_per_token))
    best: tuple[int, str, int | None] = (1 << 30, text[:n_chars] + tail, None)
    lo, hi = len(head), None  # cuts known to give fewer / more tokens than the target
    for _ in range(tries):
        got = count(text[:n_chars] + tail)
        if got is None:
            return text[:n_chars] + tail, None
        if abs(got - target) < best[0]:
            best = (abs(got - target), text[:n_chars] + tail, got)
        if got == target or (got > target and n_chars == len(head)):
            break  # hit, or head + tail alone are longer than the target (the floor)
        if got < target:
            lo = max(lo, n_chars)
        else:
            hi = n_chars if hi is None else min(hi, n_chars)
        guess = n_chars + round((target - got) * n_chars / max(got, 1))  # proportional correction ...
        while hi is None and guess > len(text) and len(text) < 64 * (target + 64):
            text += filler(rng, len(text))  # a tokenizer denser than assumed
        guess = min(guess, len(text))
        if not (lo < guess < (hi if hi is not None else len(text) + 1)):
            guess = (lo + (hi if hi is not None else len(text))) // 2  # ... else bisect the bracket
        if guess in (lo, hi):
            break
        n_chars = guess
    return best[1], best[2]


def _point(depth: float, asked: int, rec: RequestRecord) -> dict[str, Any]:
    """One depth's figures: the server's timings where it sends them, else the client's clock."""
    t = rec.timings or {}
    gaps = rec.itl_s
    decode = t.get("predicted_per_second")
    prefill = t.get("prompt_per_second")
    ttft = rec.ttft_s
    rates_from = "server timings" if decode is not None else "client clock"
    if decode is None and rec.decode_s and rec.completion_tokens and rec.completion_tokens > 1:
        decode = (rec.completion_tokens - 1) / rec.decode_s
    if prefill is None and ttft and rec.prompt_tokens:
        prefill = rec.prompt_tokens / ttft
    out: dict[str, Any] = {
        "depth_pct": depth, "asked_tokens": asked, "prompt_tokens": rec.prompt_tokens,
        "cached_tokens": rec.cached_tokens, "completion_tokens": rec.completion_tokens,
        "prefill_tps": prefill, "decode_tps": decode, "ttft_s": ttft,
        "itl_p50_s": percentile(gaps, 50), "itl_p95_s": percentile(gaps, 95), "rates_from": rates_from,
    }
    if not rec.ok:
        out["error"] = f"{rec.error.value if rec.error else 'error'}: {rec.detail}"[:300]
    return out


def _send(plan: DepthPlan, content: str, max_tokens: int) -> RequestRecord:
    async def one() -> RequestRecord:
        extra = {"cache_prompt": False} if plan.no_cache else None
        async with StreamingClient(plan.url, 1, timeout_s=plan.timeout_s, api_key=plan.api_key,
                                   model=plan.model) as client:
            rec = RequestRecord(agent=0, role="depth", turn=0, scheduled=time.monotonic())
            return await client.chat(rec, [{"role": "user", "content": content}], max_tokens, thinking=False,
                                     extra=extra)
    return run(one())


def target_tokens(depth: float, ctx_slot: int, max_tokens: int, floor: int) -> int:
    """The whole prompt (template included) a depth asks for: its share of the slot, leaving room for
    the reply, never under the smallest prompt the request can have."""
    return max(floor, min(round(depth / 100 * ctx_slot), ctx_slot - max_tokens - 8))


def sweep(plan: DepthPlan, count: Callable[[str], int | None], chars_per_token: float = 3.5,
          progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One request per depth, shallowest first; a point per depth (``DepthPoint`` keys)."""
    probe = _send(plan, f"[depth probe {plan.seed}]" + QUESTION, 1)  # unrecorded: template size, warm-up
    probe_content = count(f"[depth probe {plan.seed}]" + QUESTION)
    overhead = (probe.prompt_tokens - probe_content) if probe.prompt_tokens and probe_content is not None else 0
    points = []
    for i, depth in enumerate(sorted(plan.depths)):
        head = f"[depth sweep {plan.seed}.{i} at {depth:g}%]\n"
        floor = overhead + (count(head + QUESTION) or 0)
        asked = target_tokens(depth, plan.ctx_slot, plan.max_tokens, floor)
        rng = random.Random(f"depth:{plan.seed}:{i}")
        content, got = ((head + QUESTION, floor - overhead) if asked <= floor else
                        fit_text(head, asked - overhead, count, rng, chars_per_token, tail=QUESTION))
        rec = _send(plan, content, plan.max_tokens)
        point = _point(depth, asked, rec)
        if got is None:
            point["fitted_by"] = "characters per token (no tokenize endpoint)"
        points.append(point)
        if progress:
            progress(f"depth {depth:g}%: asked {asked}, got {rec.prompt_tokens} prompt tokens, "
                     f"decode {point['decode_tps'] or 0:.1f} tok/s")
    return points


def decode_ratio(points: list[dict[str, Any]]) -> float | None:
    """Decode tok/s at the deepest measured depth ÷ at the shallowest (None: fewer than two measured)."""
    ok = sorted((p for p in points if p.get("decode_tps") and not p.get("error")), key=lambda p: p["depth_pct"])
    if len(ok) < 2:
        return None
    return ok[-1]["decode_tps"] / ok[0]["decode_tps"]
