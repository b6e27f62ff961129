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

from .client import ErrorClass, RequestRecord, StreamingClient, sleep_until
from ..promtext import sums
from .metrics import summarize
from .images import image_seeds, with_images
from .prompts import filler, tool_blob
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
#: A stream that receives nothing this long is stalled, when the workload settings name no ``stall_s``.
DEFAULT_STALL_S = 180.0
#: How long the /health check after a stall waits for an answer.
HEALTH_TIMEOUT_S = 3.0


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
    stalls: str | None = None  # "stalled: N turns, server ... /health" when any turn stalled
    client_cpu_s: float | None = None  # split runs: the client processes' CPU inside the run (start-up excluded)

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
        return sum(int((len(m["content"]) + len(m.get("reasoning_content", ""))) / self.chars_per_token)
                   + MESSAGE_OVERHEAD_TOKENS for m in messages)

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

    def commit(self, user: dict[str, str], reply: str, reasoning: str = "") -> None:
        """The turn into the history, the reply as the server sent it: a real agent's next prompt
        shares the server's cached prefix. A failed or cut turn commits what arrived (maybe nothing).
        Reasoning goes back as ``reasoning_content`` (a thinking template renders it where it was)."""
        reply_msg = {"role": "assistant", "content": reply}
        if reasoning:
            reply_msg["reasoning_content"] = reasoning
        self.messages += [user, reply_msg]


async def scrape(url: str) -> dict[str, float]:
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(f"{url}/metrics")
            return sums(resp.text) if resp.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def stall_s(settings: WorkloadSettings) -> float:
    return settings.stall_s if settings.stall_s else DEFAULT_STALL_S


class StallWatch:
    """Asks ``/health`` when a turn stalls: a server that does not answer ends the run with the
    stall as its reason (a hung server fails within ``stall_s`` plus the check); one that answers
    leaves the stalled turns as failed turns and the run goes on."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.seen = 0
        self.note: str | None = None
        self.hung = False  # /health did not answer: later calls to this server would only wait too

    async def _health(self) -> str | None:
        """None when /health answered 200, else what it did instead."""
        try:
            async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S, headers=self.headers) as client:
                resp = await client.get(f"{self.url}/health")
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if resp.status_code == 200 else f"HTTP {resp.status_code}"

    async def check(self, records: list[RequestRecord]) -> str | None:
        """The abort reason when new stalls appeared and the server does not answer, else None."""
        n = sum(1 for r in records if r.error is ErrorClass.STALLED)
        if n <= self.seen:
            return None
        self.seen = n
        failed = await self._health()
        if failed is None:
            self.note = f"stalled: {n} turns, server answered /health"
            return None
        self.note = f"stalled: {n} turns, server not answering /health ({failed})"
        self.hung = True
        return self.note


async def _supervise(tasks: list[asyncio.Task[Any]], deadline: float, drain_s: float, abort: AbortCheck,
                     progress: Callable[[], None], interval_s: float,
                     watch: tuple[StallWatch, list[RequestRecord]] | None = None) -> str | None:
    """Wait for tasks until the deadline plus drain; cancel the rest. Returns an abort reason.

    With ``watch``, every new stalled turn triggers a /health check; turns still in flight at the
    end that made no progress for ``stall_s`` are recorded as stalled by the client, not cancelled.
    """
    hard = deadline + drain_s
    last = 0.0
    reason = None
    while not all(t.done() for t in tasks):
        now = time.monotonic()
        reason = abort() or (await watch[0].check(watch[1]) if watch else None)
        if reason or now >= hard:
            break
        if now - last >= interval_s:
            progress()
            last = now
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if watch and reason is None:
        await watch[0].check(watch[1])  # turns the cancellation found stalled
    return reason


async def run_agents(url: str, roles: list[Role], settings: WorkloadSettings, slot_ctx: int,
                     chars_per_token: float, abort: AbortCheck = lambda: None,
                     progress: ProgressSink | None = None, free_mib: FreeMemory = lambda: None,
                     label: str = "", progress_interval_s: float = 10.0, api_key: str | None = None,
                     model: str = "gpucap", first: int = 0, t0: float | None = None) -> RunResult:
    """Multi-turn agents, one conversation each, for ``settings.duration_s`` (plus drain).

    ``first`` numbers the agents (their prompts follow the number) and ``t0`` is the schedule's
    start: a worker process of a split run gets its share of agents and the parent's clock.
    """
    records: list[RequestRecord] = []
    convs = [Conversation(slot_ctx, chars_per_token) for _ in roles]
    clipped = 0
    t0 = time.monotonic() if t0 is None else t0
    deadline = t0 + settings.duration_s
    before = await scrape(url)

    async def agent(i: int, role: Role, client: StreamingClient) -> None:
        nonlocal clipped
        conv, idx = convs[i], first + i
        turn = compacted = 0
        while settings.max_turns is None or turn < settings.max_turns:
            if role.cadence_s:
                scheduled = t0 + turn * role.cadence_s
                if scheduled >= deadline:
                    return
                await sleep_until(scheduled)
            else:
                scheduled = time.monotonic()
                if scheduled >= deadline:
                    return
            user = tool_blob(settings.seed, idx, turn, role.tool_tokens, chars_per_token) + "\nContinue."
            messages, was_clipped = conv.prepare(user, role.max_tokens)
            clipped += was_clipped
            rec = RequestRecord(agent=idx, role=role.name, turn=turn, scheduled=scheduled)
            rec.compactions = conv.compactions - compacted
            compacted = conv.compactions
            records.append(rec)
            await client.chat(rec, _with_images(messages, role, settings.seed, idx, turn), role.max_tokens,
                              role.thinking, keep_text=True)
            conv.commit(messages[-1], rec.text or "", rec.reasoning_text or "")
            rec.text = rec.reasoning_text = None  # in the history now; records stay small
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

    watch = StallWatch(url, api_key)
    async with StreamingClient(url, len(roles), settings.request_timeout_s, settings.rtt_s, api_key, model,
                               stall_s(settings)) as client:
        tasks = [asyncio.create_task(agent(i, r, client)) for i, r in enumerate(roles)]
        reason = await _supervise(tasks, deadline, _drain(settings), abort, report, progress_interval_s,
                                  (watch, records))
    report()
    result = RunResult(records, t0, t0 + settings.warmup_s, time.monotonic(), reason,
                       sum(c.compactions for c in convs), clipped, stalls=watch.note)
    result.server_metrics_before, result.server_metrics_after = before, {} if watch.hung else await scrape(url)
    return result


def _with_images(messages: list[dict[str, Any]], role: Role, seed: int, agent: int, turn: int) -> list[dict[str, Any]]:
    """The turn as sent: on an image turn of the role, its images beside the new tool result (the history
    keeps the text only, so later turns resend no image; the harness strips images on text-only configs)."""
    n = role.images_on(turn)
    if not n:
        return messages
    last = dict(messages[-1], content=with_images(messages[-1]["content"], image_seeds(seed, agent, turn, n),
                                                  role.image_size))
    return messages[:-1] + [last]


def _drain(settings: WorkloadSettings) -> float:
    """How long in-flight turns may finish after the window closes before they are cut."""
    return max(10.0, settings.duration_s)


async def run_fixed(url: str, concurrency: int, n_requests: int, prompt_tokens: int, max_tokens: int,
                    chars_per_token: float, settings: WorkloadSettings, shared_prefix_tokens: int = 0,
                    abort: AbortCheck = lambda: None, extra: dict[str, Any] | None = None,
                    api_key: str | None = None, model: str = "gpucap", first: int = 0,
                    t0: float | None = None) -> RunResult:
    """``n_requests`` single-turn requests kept ``concurrency`` in flight (the vLLM guide's shape).

    With ``shared_prefix_tokens`` every request starts with the same system prompt, so the server's
    prefix cache can serve it; the hit rate comes from ``cached_tokens``/``cache_n``. Requests are
    numbered from ``first`` (a worker process's share of a split run).
    """
    prefix = filler(random.Random(f"prefix:{settings.seed}"), int(shared_prefix_tokens * chars_per_token))
    records: list[RequestRecord] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(first, first + n_requests):
        queue.put_nowait(i)
    t0 = time.monotonic() if t0 is None else t0
    before = await scrape(url)

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

    watch = StallWatch(url, api_key)
    async with StreamingClient(url, concurrency, settings.request_timeout_s, settings.rtt_s, api_key, model,
                               stall_s(settings)) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        reason = await _supervise(tasks, t0 + settings.duration_s, 0.0, abort, lambda: None, 1e9, (watch, records))
    result = RunResult(records, t0, t0, time.monotonic(), reason, stalls=watch.note)
    result.server_metrics_before, result.server_metrics_after = before, {} if watch.hung else await scrape(url)
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
        await sleep_until(at)
        rec = RequestRecord(agent=i, role="poisson", turn=0, scheduled=at)
        records.append(rec)
        messages = [{"role": "user", "content": tool_blob(settings.seed, i, 0, prompt_tokens, chars_per_token)}]
        await client.chat(rec, messages, max_tokens, thinking=False)

    at = t0
    watch = StallWatch(url, api_key)
    async with StreamingClient(url, max_in_flight, settings.request_timeout_s, settings.rtt_s, api_key, model,
                               stall_s(settings)) as client:
        tasks = []
        for i in range(n_requests):
            at += rng.expovariate(rate_per_s)
            tasks.append(asyncio.create_task(one(client, i, at)))
        reason = await _supervise(tasks, t0 + settings.duration_s, 0.0, abort, lambda: None, 1e9, (watch, records))
    return RunResult(records, t0, t0, time.monotonic(), reason, stalls=watch.note)


# ---------------------------------------------------------------- one ramp step (the ramp itself: ramp.py)

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


async def ramp_step(url: str, n: int, settings: WorkloadSettings, chars_per_token: float,
                     api_key: str | None = None, model: str = "gpucap", first: int = 0) -> list[RequestRecord]:
    """``n`` agents at once, each with its own connection and conversation, one turn each (agent ids
    from ``first``, so a step split across processes sends the same requests as one process)."""
    records = [RequestRecord(agent=first + i, role="ramp", turn=0, scheduled=time.monotonic()) for i in range(n)]
    async with StreamingClient(url, n, settings.request_timeout_s, settings.rtt_s, api_key, model,
                               stall_s(settings)) as client:
        async def one(i: int) -> None:
            content = "Hello." if not settings.ramp_context_tokens else tool_blob(
                settings.seed, first + i, 0, settings.ramp_context_tokens, chars_per_token)
            await client.chat(records[i], [{"role": "user", "content": content}],
                              settings.ramp_max_tokens, thinking=False)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await _supervise(tasks, time.monotonic() + settings.request_timeout_s, 0.0, lambda: None, lambda: None, 1e9)
    return records


def run(coro: Awaitable[Any]) -> Any:
    """Run a workload coroutine from synchronous test code, on uvloop where it is installed (its
    C event loop takes a measured share of the client's CPU per token off the host under test)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]
