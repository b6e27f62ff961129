"""Runs load shapes against a server: agent workflows, fixed concurrency, Poisson arrivals,
shared-prefix requests, and the agent-connection ramp. All are bounded in time and count.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx

from .client import ErrorClass, RequestRecord, StreamingClient
from ..promtext import sums
from .metrics import pcts, summarize
from .prompts import filler, reply_stub, tool_blob
from ..matrix import Workload as WorkloadSettings
from .roles import Role

#: Returns a reason to stop (server died, watchdog fired) or None.
AbortCheck = Callable[[], "str | None"]
#: Receives one progress line.
ProgressSink = Callable[[str], None]
#: Returns free device memory in MiB (for progress lines) or None.
FreeMemory = Callable[[], "float | None"]

SYSTEM_PROMPT = "You are a coding agent. Read the tool results and continue the task."
MESSAGE_OVERHEAD_TOKENS = 8
CONTEXT_FILL = 0.9


@dataclass
class RunResult:
    """Everything a load run produced; metrics are derived from ``records``."""

    records: list[RequestRecord]
    started: float
    measure_from: float
    ended: float
    aborted: str | None = None
    compactions: int = 0
    clipped_turns: int = 0
    server_metrics_before: dict[str, float] = field(default_factory=dict)
    server_metrics_after: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.measure_from)


@dataclass
class Conversation:
    """One agent's growing history, compacted before it outgrows the slot."""

    slot_ctx: int
    chars_per_token: float
    messages: list[dict[str, str]] = field(default_factory=lambda: [{"role": "system", "content": SYSTEM_PROMPT}])
    compactions: int = 0

    def tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(int(len(m["content"]) / self.chars_per_token) + MESSAGE_OVERHEAD_TOKENS for m in messages)

    def prepare(self, user: str, max_tokens: int) -> tuple[list[dict[str, str]], bool]:
        """Messages for the next turn: drop the oldest tool results (user/assistant pairs) first;
        clip the new tool result only if it alone cannot fit. Returns (messages, clipped)."""
        budget = int(self.slot_ctx * CONTEXT_FILL) - max_tokens
        new = {"role": "user", "content": user}
        while len(self.messages) > 1 and self.tokens(self.messages + [new]) > budget:
            del self.messages[1:3]
            self.compactions += 1
        clipped = False
        room = budget - self.tokens(self.messages) - MESSAGE_OVERHEAD_TOKENS
        if int(len(user) / self.chars_per_token) > room:
            new["content"] = user[: max(0, int(room * self.chars_per_token))]
            clipped = True
        return self.messages + [new], clipped

    def commit(self, user: dict[str, str], reply: str) -> None:
        self.messages += [user, {"role": "assistant", "content": reply}]


async def _scrape(url: str) -> dict[str, float]:
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(f"{url}/metrics")
            return sums(resp.text) if resp.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


async def _supervise(tasks: list[asyncio.Task[Any]], deadline: float, drain_s: float, abort: AbortCheck,
                     progress: Callable[[], None], interval_s: float) -> str | None:
    """Wait for tasks until the deadline plus drain; cancel the rest. Returns an abort reason."""
    hard = deadline + drain_s
    last = 0.0
    reason = None
    while not all(t.done() for t in tasks):
        now = time.monotonic()
        reason = abort()
        if reason or now >= hard:
            break
        if now - last >= interval_s:
            progress()
            last = now
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return reason


async def run_agents(url: str, roles: list[Role], settings: WorkloadSettings, slot_ctx: int,
                     chars_per_token: float, abort: AbortCheck = lambda: None,
                     progress: ProgressSink | None = None, free_mib: FreeMemory = lambda: None,
                     label: str = "", progress_interval_s: float = 10.0, api_key: str | None = None,
                     model: str = "gpucap") -> RunResult:
    """Multi-turn agents, one conversation each, for ``settings.duration_s`` (plus drain)."""
    records: list[RequestRecord] = []
    convs = [Conversation(slot_ctx, chars_per_token) for _ in roles]
    clipped = 0
    t0 = time.monotonic()
    deadline = t0 + settings.duration_s
    before = await _scrape(url)

    async def agent(idx: int, role: Role, client: StreamingClient) -> None:
        nonlocal clipped
        conv = convs[idx]
        turn = 0
        while settings.max_turns is None or turn < settings.max_turns:
            if role.cadence_s:
                scheduled = t0 + turn * role.cadence_s
                if scheduled >= deadline:
                    return
                await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            else:
                scheduled = time.monotonic()
                if scheduled >= deadline:
                    return
            user = tool_blob(settings.seed, idx, turn, role.tool_tokens, chars_per_token) + "\nContinue."
            messages, was_clipped = conv.prepare(user, role.max_tokens)
            clipped += was_clipped
            rec = RequestRecord(agent=idx, role=role.name, turn=turn, scheduled=scheduled)
            records.append(rec)
            await client.chat(rec, messages, role.max_tokens, role.thinking)
            n_reply = rec.completion_tokens or role.max_tokens
            conv.commit(messages[-1], reply_stub(settings.seed, idx, turn, n_reply, chars_per_token))
            turn += 1
            if not rec.ok:
                await asyncio.sleep(0.5)  # a failing server must not be hammered in a tight loop

    def report() -> None:
        if progress is None:
            return
        elapsed = time.monotonic() - t0
        done = [r for r in records if r.end is not None]
        toks = sum(r.completion_tokens or 0 for r in done if r.ok)
        free = free_mib()
        free_txt = f", free {free:.0f} MiB" if free is not None else ""
        progress(f"{label} {elapsed:5.0f}/{settings.duration_s:.0f} s, turns {len(done)} "
                 f"({sum(1 for r in done if not r.ok)} failed), {toks / max(elapsed, 1e-9):.1f} tok/s{free_txt}")

    async with StreamingClient(url, len(roles), settings.request_timeout_s, settings.rtt_s, api_key, model) as client:
        tasks = [asyncio.create_task(agent(i, r, client)) for i, r in enumerate(roles)]
        reason = await _supervise(tasks, deadline, _drain(settings), abort, report, progress_interval_s)
    report()
    result = RunResult(records, t0, t0 + settings.warmup_s, time.monotonic(), reason,
                       sum(c.compactions for c in convs), clipped)
    result.server_metrics_before, result.server_metrics_after = before, await _scrape(url)
    return result


def _drain(settings: WorkloadSettings) -> float:
    """How long in-flight turns may finish after the window closes before they are cut."""
    return max(10.0, settings.duration_s)


async def run_fixed(url: str, concurrency: int, n_requests: int, prompt_tokens: int, max_tokens: int,
                    chars_per_token: float, settings: WorkloadSettings, shared_prefix_tokens: int = 0,
                    abort: AbortCheck = lambda: None, extra: dict[str, Any] | None = None,
                    api_key: str | None = None, model: str = "gpucap") -> RunResult:
    """``n_requests`` single-turn requests kept ``concurrency`` in flight (the vLLM guide's shape).

    With ``shared_prefix_tokens`` every request starts with the same system prompt, so the server's
    prefix cache can serve it; the hit rate comes from ``cached_tokens``/``cache_n``.
    """
    prefix = filler(random.Random(f"prefix:{settings.seed}"), int(shared_prefix_tokens * chars_per_token))
    records: list[RequestRecord] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    t0 = time.monotonic()
    before = await _scrape(url)

    async def worker(client: StreamingClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            rec = RequestRecord(agent=i, role="fixed", turn=0, scheduled=time.monotonic())
            records.append(rec)
            messages = [{"role": "system", "content": prefix or SYSTEM_PROMPT},
                        {"role": "user", "content": tool_blob(settings.seed, i, 0, prompt_tokens, chars_per_token)}]
            await client.chat(rec, messages, max_tokens, thinking=False, extra=extra)

    async with StreamingClient(url, concurrency, settings.request_timeout_s, settings.rtt_s, api_key, model) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        reason = await _supervise(tasks, t0 + settings.duration_s, 0.0, abort, lambda: None, 1e9)
    result = RunResult(records, t0, t0, time.monotonic(), reason)
    result.server_metrics_before, result.server_metrics_after = before, await _scrape(url)
    return result


async def run_poisson(url: str, rate_per_s: float, n_requests: int, prompt_tokens: int, max_tokens: int,
                      chars_per_token: float, settings: WorkloadSettings, max_in_flight: int = 256,
                      abort: AbortCheck = lambda: None, api_key: str | None = None,
                      model: str = "gpucap") -> RunResult:
    """Open-loop arrivals at ``rate_per_s`` (seeded exponential gaps); latency counts from arrival."""
    rng = random.Random(f"poisson:{settings.seed}")
    records: list[RequestRecord] = []
    t0 = time.monotonic()

    async def one(client: StreamingClient, i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        rec = RequestRecord(agent=i, role="poisson", turn=0, scheduled=at)
        records.append(rec)
        messages = [{"role": "user", "content": tool_blob(settings.seed, i, 0, prompt_tokens, chars_per_token)}]
        await client.chat(rec, messages, max_tokens, thinking=False)

    at = t0
    async with StreamingClient(url, max_in_flight, settings.request_timeout_s, settings.rtt_s, api_key, model) as client:
        tasks = []
        for i in range(n_requests):
            at += rng.expovariate(rate_per_s)
            tasks.append(asyncio.create_task(one(client, i, at)))
        reason = await _supervise(tasks, t0 + settings.duration_s, 0.0, abort, lambda: None, 1e9)
    return RunResult(records, t0, t0, time.monotonic(), reason)


# ---------------------------------------------------------------- the agent-connection ramp

@dataclass
class RampStep:
    n: int
    ok: int
    errors: int
    error_classes: dict[str, int]
    create_p50_s: float | None
    create_p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    turn_p50_s: float | None
    turn_p95_s: float | None
    server_rss_mib: float | None
    device_used_mib: float | None
    breach: str | None = None


def raise_nofile(needed: int) -> dict[str, int]:
    """Raise the soft open-file limit towards ``needed`` (capped by the hard limit); say what it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return {"soft_before": soft, "hard": hard, "soft_after": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def ramp_steps(start: int, ceiling: int, factor: int = 2) -> list[int]:
    steps, n = [], max(1, start)
    while n < ceiling:
        steps.append(n)
        n *= factor
    return steps + [ceiling]


async def _ramp_step(url: str, n: int, settings: WorkloadSettings, chars_per_token: float,
                     api_key: str | None = None, model: str = "gpucap") -> list[RequestRecord]:
    """``n`` agents at once, each with its own connection and conversation, one turn each."""
    clients = [StreamingClient(url, 1, settings.request_timeout_s, settings.rtt_s, api_key, model) for _ in range(n)]
    records = [RequestRecord(agent=i, role="ramp", turn=0, scheduled=time.monotonic()) for i in range(n)]
    try:
        async def one(i: int) -> None:
            content = "Hello." if not settings.ramp_context_tokens else tool_blob(
                settings.seed, i, 0, settings.ramp_context_tokens, chars_per_token)
            await clients[i].chat(records[i], [{"role": "user", "content": content}],
                                  settings.ramp_max_tokens, thinking=False)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await _supervise(tasks, time.monotonic() + settings.request_timeout_s, 0.0, lambda: None, lambda: None, 1e9)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    return records


async def run_ramp(url: str, settings: WorkloadSettings, chars_per_token: float,
                   memory: Callable[[], tuple[float | None, float | None]],
                   p95_budget_s: float | None = None, abort: AbortCheck = lambda: None,
                   progress: ProgressSink | None = None, start: int = 1, api_key: str | None = None,
                   model: str = "gpucap") -> dict[str, Any]:
    """Double N up to the ceiling; stop at the first step with errors or an SLO breach.

    The knee is the first N whose p95 turn latency exceeds twice the single-agent p95: from there
    on, agents wait for each other instead of running side by side.
    """
    limits = raise_nofile(2 * settings.ramp_ceiling + 256)
    steps: list[RampStep] = []
    for n in ramp_steps(start, settings.ramp_ceiling):
        reason = abort()
        if reason:
            return {"steps": [vars(s) for s in steps], "aborted": reason, "nofile": limits,
                    **_ramp_summary(steps)}
        recs = await _ramp_step(url, n, settings, chars_per_token, api_key, model)
        ok = [r for r in recs if r.ok]
        failed = [r for r in recs if not r.ok]
        create = pcts((r.headers - r.scheduled) for r in ok if r.headers)
        ttft, turn = pcts(r.ttft_s for r in ok), pcts(r.e2e_s for r in ok)
        rss, used = memory()
        step = RampStep(n, len(ok), len(failed), _count(failed), create["p50"], create["p95"], ttft["p50"],
                        ttft["p95"], turn["p50"], turn["p95"], rss, used)
        if failed:
            step.breach = f"{len(failed)} of {n} turns failed ({step.error_classes})"
        elif p95_budget_s is not None and (turn["p95"] or 0) > p95_budget_s:
            step.breach = f"turn p95 {turn['p95']:.2f} s > budget {p95_budget_s:.2f} s"
        steps.append(step)
        if progress:
            progress(f"ramp N={n}: ok {len(ok)}, errors {len(failed)}, turn p95 "
                     f"{(turn['p95'] or 0):.2f} s{', ' + step.breach if step.breach else ''}")
        if step.breach:
            break
    return {"steps": [vars(s) for s in steps], "aborted": None, "nofile": limits, **_ramp_summary(steps)}


def _count(records: list[RequestRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        key = (r.error or ErrorClass.SERVER_ERROR).value
        out[key] = out.get(key, 0) + 1
    return out


def _ramp_summary(steps: list[RampStep]) -> dict[str, Any]:
    clean = [s.n for s in steps if s.breach is None]
    base = steps[0].turn_p95_s if steps and steps[0].turn_p95_s else None
    knee = next((s.n for s in steps if base and s.turn_p95_s and s.turn_p95_s > 2 * base), None)
    return {"max_clean_n": max(clean) if clean else 0, "knee_n": knee}


def run(coro: Awaitable[Any]) -> Any:
    """Run a workload coroutine from synchronous test code."""
    return asyncio.run(coro)  # type: ignore[arg-type]
