"""The workload split across client processes, each its own event loop with its own share of agents.

One Python process tops out near one core of client work per stream of tokens; past that the
harness measures itself. ``--gpucap-client-procs N`` runs N worker processes (spawned, so the
parent's threads and sockets stay behind), releases them together on the parent's clock, and merges
their records into one ``RunResult``. ``time.monotonic()`` reads one system-wide clock on every
platform CPython supports (Linux ``CLOCK_MONOTONIC``, macOS ``mach_absolute_time``, Windows
``QueryPerformanceCounter``), not a per-process one, so a worker's times are on the parent's clock
once it schedules from the parent's start time (``t0``), which the parent hands out at release.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import resource
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from . import runner
from .client import RequestRecord

#: Tokens a second one client process may carry while staying well under a core: measured
#: 0.07 CPU-s per 1k tokens (tests/test_client_benchmark.py) is ~14k tok/s a core; half of that.
TOKENS_PER_PROC_S = 7000.0
#: The most a spawned worker may take to import and report ready.
START_TIMEOUT_S = 120.0


def resolve_procs(setting: int | str | None, expected_tps: float | None, cores: int | None = None) -> int:
    """How many client processes: a number as given; ``auto`` from the expected token rate (the decode
    roofline) at ``TOKENS_PER_PROC_S`` each, never more than the cores less one left to the server."""
    if setting is None:
        return 1
    if setting != "auto":
        return int(setting)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = math.ceil(expected_tps / TOKENS_PER_PROC_S) if expected_tps else 1
    return max(1, min(want, cores - 1))


def shares(total: int, procs: int) -> list[tuple[int, int]]:
    """``(first, count)`` per process: contiguous, as even as can be, none empty."""
    procs = max(1, min(procs, total)) if total else 1
    base, extra = divmod(total, procs)
    out, first = [], 0
    for i in range(procs):
        count = base + (i < extra)
        out.append((first, count))
        first += count
    return out


@dataclass(frozen=True)
class Share:
    """One worker's part: which runner function, and its keyword arguments (all picklable)."""

    kind: str  # "agents", "fixed" or "ramp_step"
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class WorkerResult:
    result: runner.RunResult | None
    records: list[RequestRecord]
    cpu_s: float
    wall_s: float
    error: str | None = None


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker(share: Share, ready: Any, go: Any, stop: Any, clock: Any, out: Any) -> None:
    """A worker process: report ready, wait for the parent's start time, run its share, send records."""
    ready.put(os.getpid())
    go.wait(START_TIMEOUT_S)
    t0 = clock.value
    kw = dict(share.kwargs)
    abort = lambda: "stopped by the parent process" if stop.is_set() else None  # noqa: E731
    cpu0, wall0 = _cpu_s(), time.monotonic()
    try:
        if share.kind == "agents":
            res = runner.run(runner.run_agents(abort=abort, t0=t0, **kw))
            recs = res.records
        elif share.kind == "fixed":
            res = runner.run(runner.run_fixed(abort=abort, t0=t0, **kw))
            recs = res.records
        else:
            res, recs = None, runner.run(runner.ramp_step(**kw))
        out.put(WorkerResult(res, recs, _cpu_s() - cpu0, time.monotonic() - wall0))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as text
        out.put(WorkerResult(None, [], _cpu_s() - cpu0, time.monotonic() - wall0,
                             f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))


class ClientProcessError(RuntimeError):
    """A worker process failed to start or to send its records back."""


def run_split(parts: list[Share], abort: runner.AbortCheck = lambda: None,
              progress: Callable[[float], None] | None = None, interval_s: float = 10.0) -> list[WorkerResult]:
    """Run each share in its own spawned process, released together; abort stops them all.

    Returns one result per share. A worker that dies or errs raises ``ClientProcessError``.
    """
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    clock = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker, args=(p, ready, go, stop, clock, out), daemon=True) for p in parts]
    results: list[WorkerResult] = []
    try:
        for proc in procs:
            proc.start()
        _wait_ready(ready, procs)
        clock.value = time.monotonic() + 0.05
        t0 = clock.value
        go.set()
        last = time.monotonic()
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            reason = abort()
            if reason:
                stop.set()
            if any(r.result is not None and r.result.aborted for r in results):
                stop.set()  # one worker's stall check found the server hung: the others stop too
            if sum(p.exitcode is not None for p in procs) > len(results):
                try:  # an exited worker's records may still be in the pipe
                    results.append(out.get(timeout=1.0))
                    continue
                except queue.Empty:
                    raise ClientProcessError("a client process died without its records: " + ", ".join(
                        f"pid {p.pid} exit {p.exitcode}" for p in procs)) from None
            if progress and time.monotonic() - last >= interval_s:
                progress(time.monotonic() - t0)
                last = time.monotonic()
    finally:
        stop.set()
        go.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    failed = [r.error for r in results if r.error]
    if failed:
        raise ClientProcessError("a client process failed: " + failed[0])
    return results  # in finishing order: callers merge by agent number, not by position


def _wait_ready(ready: Any, procs: list[Any]) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    for _ in procs:
        while True:
            try:
                ready.get(timeout=max(0.1, min(1.0, end - time.monotonic())))
                break
            except queue.Empty:
                if time.monotonic() >= end or any(p.exitcode is not None for p in procs):
                    raise ClientProcessError(f"client processes did not start within {START_TIMEOUT_S:g} s "
                                             f"(exit codes {[p.exitcode for p in procs]})") from None


def merge(results: list[WorkerResult], started: float, warmup_s: float, aborted: str | None) -> runner.RunResult:
    """One ``RunResult`` from the workers': records in agent order, counters summed, first abort reason."""
    runs = [r.result for r in results if r.result is not None]
    records = sorted((rec for r in results for rec in r.records), key=lambda rec: (rec.agent, rec.turn))
    reasons = [aborted] + [r.aborted for r in runs if r.aborted and "stopped by the parent" not in r.aborted]
    stalls = [r.stalls for r in runs if r.stalls]
    merged = runner.RunResult(
        records, started, started + warmup_s, max((r.ended for r in runs), default=time.monotonic()),
        next((x for x in reasons if x), None), sum(r.compactions for r in runs), sum(r.clipped_turns for r in runs),
        stalls="; ".join(stalls) if stalls else None, client_cpu_s=sum(r.cpu_s for r in results))
    return merged


def agents(procs: int, url: str, roles: list[Any], settings: Any, slot_ctx: int, chars_per_token: float,
           abort: runner.AbortCheck, progress: runner.ProgressSink | None, label: str,
           **client_kw: Any) -> runner.RunResult:
    """``runner.run_agents`` over ``procs`` processes, each with a contiguous share of the agents."""
    parts = [Share("agents", dict(url=url, roles=roles[first:first + n], settings=settings, slot_ctx=slot_ctx,
                                  chars_per_token=chars_per_token, label=label, first=first, **client_kw))
             for first, n in shares(len(roles), procs)]
    return _bracketed(url, parts, settings.warmup_s, abort, progress, label, settings.duration_s)


def fixed(procs: int, url: str, concurrency: int, n_requests: int, prompt_tokens: int, max_tokens: int,
          chars_per_token: float, settings: Any, shared_prefix_tokens: int, abort: runner.AbortCheck,
          **client_kw: Any) -> runner.RunResult:
    """``runner.run_fixed`` over ``procs`` processes: requests and concurrency split alike."""
    procs = max(1, min(procs, concurrency, n_requests))
    conc = dict(shares(concurrency, procs))
    parts = [Share("fixed", dict(url=url, concurrency=list(conc.values())[i], n_requests=n,
                                 prompt_tokens=prompt_tokens, max_tokens=max_tokens, chars_per_token=chars_per_token,
                                 settings=settings, shared_prefix_tokens=shared_prefix_tokens, first=first,
                                 **client_kw))
             for i, (first, n) in enumerate(shares(n_requests, procs))]
    return _bracketed(url, parts, 0.0, abort, None, "", settings.duration_s)


def _bracketed(url: str, parts: list[Share], warmup_s: float, abort: runner.AbortCheck,
               progress: runner.ProgressSink | None, label: str, duration_s: float) -> runner.RunResult:
    """The split run between the parent's own /metrics scrapes (the workers' cover only their share)."""
    before = runner.run(runner.scrape(url))
    started = time.monotonic()
    reason: list[str] = []

    def watched() -> str | None:
        r = abort()
        if r and not reason:
            reason.append(r)
        return r

    def tick(elapsed: float) -> None:
        if progress:
            progress(f"{label} {elapsed:5.0f}/{duration_s:.0f} s, {len(parts)} client processes running")

    results = run_split(parts, watched, tick)
    merged = merge(results, started, warmup_s, reason[0] if reason else None)
    hung = bool(merged.aborted and "not answering /health" in merged.aborted)  # a scrape would only wait
    merged.server_metrics_before, merged.server_metrics_after = before, {} if hung else runner.run(runner.scrape(url))
    return merged


def ramp_step(procs: int, url: str, n: int, settings: Any, chars_per_token: float,
              **client_kw: Any) -> tuple[list[RequestRecord], float]:
    """One ramp step of ``n`` agents over ``procs`` processes; returns the records and the busiest
    worker's CPU share of its wall time (near 1.0: the client, not the server, was the limit)."""
    parts = [Share("ramp_step", dict(url=url, n=count, settings=settings, chars_per_token=chars_per_token,
                                     first=first, **client_kw))
             for first, count in shares(n, procs)]
    results = run_split(parts)
    busy = max((r.cpu_s / r.wall_s for r in results if r.wall_s > 0), default=0.0)
    return sorted((rec for r in results for rec in r.records), key=lambda rec: rec.agent), busy

