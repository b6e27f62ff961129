"""The agent-connection ramp: N agents doubling to a ceiling, and the limit it hit, named from evidence.

A ramp that stops says why, so its reader knows what to raise: the server's HTTP threads (connects
refused, or agents waiting while slots sat idle), its slots (queueing: past the slot count TTFT grows
while per-call decode holds), the client's file descriptors, the request timeout, memory, the client's
CPU, or the server itself; a ramp that reaches its ceiling clean says "none up to N". The evidence is
what the run has: per-step create/TTFT/turn percentiles and error classes, the server's slot count,
and its own ``/metrics`` gauges (requests in a slot, requests deferred for want of one) polled while
each step runs. One step's load is ``runner.ramp_step`` (or a split of it over client processes).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx

from ..matrix import Workload as WorkloadSettings
from ..promtext import sums
from .client import ErrorClass, RequestRecord
from .metrics import _per_call_rate, pcts
from .runner import AbortCheck, ProgressSink, raise_nofile, ramp_step, ramp_steps

#: A ramp step whose busiest client process used this share of a core was limited by the client.
CLIENT_BUSY = 0.9
#: Below this share of host memory available, a failing step is put down to memory.
LOW_MEMORY = 0.05
#: Queueing: TTFT p95 at least this many times the full-slot step's, while per-call decode stays
#: above ``DECODE_HOLDS`` of that step's rate (the slots are busy, not slower).
QUEUE_GROWTH = 1.5
DECODE_HOLDS = 0.67
#: File descriptors a step needs beyond one per agent (the server's, the poller's, Python's own).
FD_MARGIN = 64
#: The server's queue gauges, llama-server's then vLLM's names.
PROCESSING = ("llamacpp:requests_processing", "vllm:num_requests_running")
DEFERRED = ("llamacpp:requests_deferred", "vllm:num_requests_waiting")
POLL_S = 0.25
POLL_TIMEOUT_S = 2.0
#: Step runner: N agents -> (their records, the busiest client process's CPU share of its wall time).
StepRunner = Callable[[int], Awaitable["tuple[list[RequestRecord], float]"]]
#: Host memory (available MiB, total MiB), read right after each step.
HostMemory = Callable[[], "tuple[float | None, float | None]"]


@dataclass
class RampStep:
    """One step as the runner measures it (``ramp_sections.RampStep`` is how it is recorded)."""

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
    decode_tps_p50: float | None = None
    client_busy: float | None = None
    server_processing_max: float | None = None
    server_deferred_max: float | None = None
    server_in_max: float | None = None
    metrics_polls: int = 0
    metrics_missed: int = 0
    host_available_mib: float | None = None
    host_total_mib: float | None = None


@dataclass
class ServerQueue:
    """The server's queue gauges over one step: the most requests in a slot, the most deferred."""

    polls: int = 0
    missed: int = 0
    processing_max: float | None = None
    deferred_max: float | None = None
    in_max: float | None = None

    def observe(self, page: dict[str, float] | None) -> None:
        self.polls += 1
        if page is None:
            self.missed += 1
            return
        proc = next((page[k] for k in PROCESSING if k in page), None)
        deferred = next((page[k] for k in DEFERRED if k in page), None)
        if proc is None:
            return
        self.processing_max = max(self.processing_max or 0.0, proc)
        self.deferred_max = max(self.deferred_max or 0.0, deferred or 0.0)
        self.in_max = max(self.in_max or 0.0, proc + (deferred or 0.0))


async def watch_queue(url: str, queue: ServerQueue, api_key: str | None = None, every_s: float = POLL_S) -> None:
    """Poll ``/metrics`` until cancelled. An unanswered poll is counted: the server's HTTP pool may
    be full, which is evidence too."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=POLL_TIMEOUT_S, headers=headers) as client:
        while True:
            try:
                resp = await client.get(f"{url}/metrics")
                queue.observe(sums(resp.text) if resp.status_code == 200 else None)
            except httpx.HTTPError:
                queue.observe(None)
            await asyncio.sleep(every_s)


def host_memory() -> tuple[float | None, float | None]:
    import psutil

    vm = psutil.virtual_memory()
    return vm.available / 2**20, vm.total / 2**20


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_ramp(url: str, settings: WorkloadSettings, chars_per_token: float,
                   memory: Callable[[], tuple[float | None, float | None]],
                   p95_budget_s: float | None = None, abort: AbortCheck = lambda: None,
                   progress: ProgressSink | None = None, start: int = 1, api_key: str | None = None,
                   model: str = "gpucap", step_runner: StepRunner | None = None, slots: int | None = None,
                   host: HostMemory = host_memory, poll_s: float = POLL_S) -> dict[str, Any]:
    """Double N up to the ceiling; stop at the first step with errors or an SLO breach.

    The knee is the first N whose p95 turn latency exceeds twice the single-agent p95: from there
    on, agents wait for each other instead of running side by side; the queue knee is the first
    N > ``slots`` whose TTFT p95 grew while per-call decode held. ``limit`` names what the ramp hit
    (``ramp_limit``). ``step_runner`` runs a step elsewhere (split across client processes).
    """
    limits = raise_nofile(2 * settings.ramp_ceiling + 256)

    async def here(n: int) -> tuple[list[RequestRecord], float]:
        cpu0, wall0 = _cpu_s(), time.monotonic()
        recs = await ramp_step(url, n, settings, chars_per_token, api_key, model)
        return recs, (_cpu_s() - cpu0) / max(time.monotonic() - wall0, 1e-9)

    steps: list[RampStep] = []
    failed: list[RequestRecord] = []
    aborted = None
    for n in ramp_steps(start, settings.ramp_ceiling):
        aborted = abort()
        if aborted:
            break
        queue = ServerQueue()
        poller = asyncio.create_task(watch_queue(url, queue, api_key, poll_s))
        try:
            recs, busy = await (step_runner or here)(n)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        step, failed = _step(n, recs, busy, memory(), host(), queue)
        if failed:
            step.breach = f"{len(failed)} of {n} turns failed ({step.error_classes})"
        elif p95_budget_s is not None and (step.turn_p95_s or 0) > p95_budget_s:
            step.breach = f"turn p95 {step.turn_p95_s:.2f} s > budget {p95_budget_s:.2f} s"
        steps.append(step)
        if progress:
            progress(f"ramp N={n}: ok {step.ok}, errors {step.errors}, TTFT p95 {(step.ttft_p95_s or 0):.2f} s, "
                     f"turn p95 {(step.turn_p95_s or 0):.2f} s, decode/call {(step.decode_tps_p50 or 0):.1f} tok/s, "
                     f"in slots {_int(step.server_processing_max)}, deferred {_int(step.server_deferred_max)}, "
                     f"client busy {busy:.0%}" + (f", {step.breach}" if step.breach else ""))
        if step.breach:
            break
    context = RampContext(settings.ramp_ceiling, slots, limits["soft_after"], settings.request_timeout_s)
    limit = ramp_limit(steps, failed, context) if not aborted else {"limit": None, "limit_detail": None}
    if progress and limit["limit"]:
        progress(f"ramp limit: {limit['limit']}: {limit['limit_detail']}")
    return {"steps": [vars(s) for s in steps], "aborted": aborted, "nofile": limits, "slots": slots,
            **_ramp_summary(steps, slots), **limit}


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _step(n: int, recs: list[RequestRecord], busy: float, memory: tuple[float | None, float | None],
          host: tuple[float | None, float | None], queue: ServerQueue) -> tuple[RampStep, list[RequestRecord]]:
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok]
    create = pcts((r.headers - r.scheduled) for r in ok if r.headers)
    ttft, turn = pcts(r.ttft_s for r in ok), pcts(r.e2e_s for r in ok)
    step = RampStep(n, len(ok), len(failed), dict(_error_classes(failed)), create["p50"], create["p95"], ttft["p50"],
                    ttft["p95"], turn["p50"], turn["p95"], memory[0], memory[1],
                    decode_tps_p50=pcts(_per_call_rate(r) for r in ok)["p50"], client_busy=round(busy, 3),
                    server_processing_max=queue.processing_max, server_deferred_max=queue.deferred_max,
                    server_in_max=queue.in_max, metrics_polls=queue.polls, metrics_missed=queue.missed,
                    host_available_mib=host[0], host_total_mib=host[1])
    return step, failed


@dataclass(frozen=True)
class RampContext:
    """What the limit is judged against besides the steps."""

    ceiling: int
    slots: int | None = None
    nofile_soft: int | None = None
    request_timeout_s: float | None = None


def _base(steps: list[RampStep], slots: int | None) -> RampStep | None:
    """The full-slot step (largest N <= slots): queueing is measured against it."""
    if not slots:
        return None
    under = [s for s in steps if s.n <= slots and s.ttft_p95_s and s.decode_tps_p50]
    return under[-1] if under else None


def _queueing(step: RampStep, base: RampStep | None) -> tuple[float | None, float | None, bool]:
    """(TTFT growth, decode ratio, queued?) of ``step`` against the full-slot step."""
    if base is None or step.n <= base.n or not step.ttft_p95_s or not step.decode_tps_p50:
        return None, None, False
    growth = step.ttft_p95_s / base.ttft_p95_s  # type: ignore[operator]
    ratio = step.decode_tps_p50 / base.decode_tps_p50  # type: ignore[operator]
    return round(growth, 2), round(ratio, 2), growth >= QUEUE_GROWTH and ratio >= DECODE_HOLDS


def queue_knee(steps: list[RampStep], slots: int | None) -> int | None:
    """The first N > slots where TTFT p95 grew while per-call decode held: agents queue for a slot."""
    base = _base(steps, slots)
    return next((s.n for s in steps if _queueing(s, base)[2]), None)


def ramp_limit(steps: list[RampStep], failed: list[RequestRecord], context: RampContext) -> dict[str, Any]:
    """What the ramp hit at its last step: ``limit`` (one of ``ramp_sections.LIMITS``), one line of
    ``limit_detail``, and ``limit_evidence`` (the figures it was read from). None without steps."""
    if not steps:
        return {"limit": None, "limit_detail": None}
    step, slots = steps[-1], context.slots
    base = _base(steps, slots)
    growth, ratio, queued = _queueing(step, base)
    classes = _error_classes(failed)
    timeouts = classes["timeout"] + classes["stalled"]
    evidence = {"at_n": step.n, "slots": slots, "error_classes": dict(classes), "timeouts": timeouts,
                "request_timeout_s": context.request_timeout_s, "nofile_soft": context.nofile_soft,
                "client_busy": step.client_busy, "host_available_mib": step.host_available_mib,
                "host_total_mib": step.host_total_mib, "server_processing_max": step.server_processing_max,
                "server_deferred_max": step.server_deferred_max, "server_in_max": step.server_in_max,
                "metrics_missed": step.metrics_missed, "base_n": base.n if base else None,
                "ttft_growth": growth, "decode_ratio": ratio, "common_error": _common(failed)}
    if step.breach is None and step.n < context.ceiling:
        return {"limit": None, "limit_detail": None}  # stopped early (aborted): nothing was hit
    name, detail = _classify(step, failed, context, classes, queue_knee(steps, slots), queued, growth, ratio)
    return {"limit": name, "limit_detail": detail, "limit_evidence": {k: v for k, v in evidence.items()
                                                                      if v is not None}}


def _classify(step: RampStep, failed: list[RequestRecord], ctx: RampContext, classes: Counter[str],
              knee: int | None, queued: bool, growth: float | None, ratio: float | None) -> tuple[str, str]:
    n, slots = step.n, ctx.slots
    in_server = (f"; the server held at most {step.server_in_max:.0f} of {n:,} at once"
                 if step.server_in_max is not None else "")
    queue_txt = (f"TTFT p95 x{growth:g} over the full-slot step while decode per call held (x{ratio:g})"
                 if growth is not None else "")
    if step.breach is None:
        tail = f"; agents queued for the {slots} slots from N={knee:,}" if knee else ""
        return "none", f"none up to {ctx.ceiling:,} agents (the ramp's ceiling, every turn clean){tail}{in_server}"
    details = " ".join(r.detail for r in failed)
    if "Too many open files" in details or "EMFILE" in details or (
            ctx.nofile_soft and classes["connect"] and n + FD_MARGIN > ctx.nofile_soft):
        return "file descriptors", (f"the client ran out of file descriptors at N={n:,} "
                                    f"(soft limit {ctx.nofile_soft}): raise ulimit -n")
    avail, total = step.host_available_mib, step.host_total_mib
    low = avail is not None and total and avail < LOW_MEMORY * total
    if low or any(m in details for m in ("MemoryError", "Cannot allocate memory", "out of memory",
                                          "failed to allocate")):
        have = f": {avail:.0f} MiB available of {total:.0f} MiB" if avail is not None and total else ""
        rss = f", server RSS {step.server_rss_mib:.0f} MiB" if step.server_rss_mib is not None else ""
        return "memory", f"memory at N={n:,}{have}{rss}"
    if (step.client_busy or 0) >= CLIENT_BUSY:
        return "client", (f"a client process used {step.client_busy:.0%} of a core at N={n:,}: "
                          "raise --gpucap-client-procs")
    timeouts = classes["timeout"] + classes["stalled"]
    if failed and timeouts >= len(failed) / 2:
        waited = (f"; up to {step.server_deferred_max:.0f} waited for one of {slots} slots"
                  if step.server_deferred_max else "")
        return "timeouts", (f"{timeouts} of {n:,} turns hit request_timeout_s = "
                            f"{ctx.request_timeout_s:g} s at N={n:,}{waited}")
    slots_idle = (slots and n >= slots and step.server_processing_max is not None
                  and step.server_processing_max < slots and not step.server_deferred_max)
    if (failed and classes["connect"] >= len(failed) / 2) or slots_idle:
        busy = (f"at most {step.server_processing_max:.0f} of {slots} slots busy"
                if step.server_processing_max is not None and slots else "slots unknown")
        how = f"{classes['connect']} connects failed" if classes["connect"] else "agents waited"
        mostly = f" (mostly {_common(failed)})" if failed else ""
        return "http threads", (f"{how} at N={n:,} with {busy}: the server's HTTP front (--threads-http, "
                                f"listen backlog) took in too few{in_server}{mostly}")
    if slots and n > slots and (queued or step.server_deferred_max):
        deferred = f"up to {step.server_deferred_max:.0f} deferred; " if step.server_deferred_max else ""
        return "slots", f"{step.breach} at N={n:,} on {slots} slots: {deferred}{queue_txt or 'agents queued'}"
    common = _common(failed)
    return "server", (f"{step.breach} at N={n:,} with the client {(step.client_busy or 0):.0%} busy"
                      + (f", mostly {common}" if common else ""))


def _common(failed: list[RequestRecord]) -> str | None:
    """The most frequent failure detail (its first 120 characters), as the client wrote it."""
    common = Counter(r.detail[:120] for r in failed if r.detail).most_common(1)
    return common[0][0] if common else None


def _error_classes(failed: list[RequestRecord]) -> Counter[str]:
    """Failed turns per error class (a failure without a class counts as a server error)."""
    return Counter((r.error or ErrorClass.SERVER_ERROR).value for r in failed)


def _ramp_summary(steps: list[RampStep], slots: int | None = None) -> dict[str, Any]:
    clean = [s.n for s in steps if s.breach is None]
    base = steps[0].turn_p95_s if steps and steps[0].turn_p95_s else None
    knee = next((s.n for s in steps if base and s.turn_p95_s and s.turn_p95_s > 2 * base), None)
    return {"max_clean_n": max(clean) if clean else 0, "knee_n": knee, "queue_knee_n": queue_knee(steps, slots)}
