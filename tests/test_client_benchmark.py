"""The client's own ceiling, side by side: the harness's client and a minimal httpx reference client
drive the same requests (64 streams × 64 tokens, 256 requests) at one real llama-server on the tiny
model; then the harness with 1 and 2 client processes; then the agent-connection ramp toward 8,192.

On CPU and unified-memory hosts every CPU-second the client spends is taken from the server it
measures, and on a fast GPU a client at one core per ~4k tokens/s measures itself. Counts are
asserted (every request finished, every token the server produced was counted); CPU-s per 1k tokens,
their ratio and tokens/s are printed and stored in ``benchmark.extra_info``, never asserted.

Both clients run their event loop on this thread, so "client CPU" is this thread's CPU time
(``time.thread_time``); "process CPU" adds the server handle's memory-sampler thread, which runs
whichever client drives the load.

    .venv/bin/python -m pytest tests/test_client_benchmark.py -s -p no:randomly
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import plugin_server
from pytest_gpucap.backends import ServerHandle
from pytest_gpucap.harness import Harness
from pytest_gpucap.matrix import SLO, CapacityConfig, Workload
from pytest_gpucap.ramp_sections import LIMITS
from pytest_gpucap.workload import runner
from pytest_gpucap.workload.prompts import calibrate, tool_blob

CONCURRENCY = 64
SLOT_CTX = 256
N_REQUESTS = 256
PROMPT_TOKENS = 32
MAX_TOKENS = 64
PREDICTED = "llamacpp:tokens_predicted_total"
RAMP_CEILING = 8192
SETTINGS = Workload(duration_s=300, request_timeout_s=300, stall_s=120)  # bounds, not expectations


@pytest.fixture(scope="module")
def wide_server(llama_server_bin: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """64 slots of 256 tokens (verified against /props and /slots at boot), ``--metrics`` on."""
    cfg = CapacityConfig(profile="cpu", n=CONCURRENCY, ctx=SLOT_CTX, threads=2, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("bench-logs")) as handle:
        yield handle


def _cpu_s(children: bool = False) -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = ru.ru_utime + ru.ru_stime
    if children:  # spawned client processes, once joined
        rc = resource.getrusage(resource.RUSAGE_CHILDREN)
        out += rc.ru_utime + rc.ru_stime
    return out


def _predicted(url: str) -> float:
    return runner.run(runner.scrape(url)).get(PREDICTED, 0.0)


def _messages(cpt: float) -> list[list[dict[str, str]]]:
    """The harness's fixed-run requests, rebuilt for the reference client (same prompts, same order)."""
    return [[{"role": "system", "content": runner.SYSTEM_PROMPT},
             {"role": "user", "content": tool_blob(SETTINGS.seed, i, 0, PROMPT_TOKENS, cpt)}] for i in range(N_REQUESTS)]


async def reference_client(url: str, messages: list[list[dict[str, str]]]) -> tuple[int, int]:
    """A minimal streaming client, plain httpx as a user would write it: (completion tokens, lost)."""
    tokens = lost = 0
    todo = list(messages)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens, lost
            while todo:
                body = {"model": "gpucap", "messages": todo.pop(0), "max_tokens": MAX_TOKENS, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True,
                        "chat_template_kwargs": {"enable_thinking": False}}
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                        async for line in resp.aiter_lines():
                            if line.startswith("data: {"):
                                usage = json.loads(line[6:]).get("usage")
                                tokens += usage["completion_tokens"] if usage else 0
                except httpx.HTTPError:
                    lost += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return tokens, lost


def _harness(handle: ServerHandle, procs: int | str | None = None, **changes: Any) -> tuple[Harness, list[dict]]:
    records: list[dict[str, Any]] = []
    settings = Workload(**{**vars(SETTINGS), **changes})
    return Harness(handle, SLO(), settings, {}, {}, "bench", records.append, print, client_procs=procs), records


def _per_1k(cpu_s: float, tokens: float) -> float | None:
    return round(cpu_s / (tokens / 1000), 4) if tokens else None


def test_harness_client_beside_a_minimal_httpx_client(benchmark: Any, wide_server: ServerHandle) -> None:
    cpt, source = calibrate(wide_server.url)
    assert source == "/tokenize"
    harness, _ = _harness(wide_server)
    messages = _messages(harness.chars_per_token)
    harness.warm_up(concurrency=CONCURRENCY, n_requests=CONCURRENCY)

    def drive() -> dict[str, Any]:
        out: dict[str, Any] = {}
        before, cpu0, th0 = _predicted(wide_server.url), _cpu_s(), time.thread_time()
        out["ref_tokens"], out["ref_lost"] = asyncio.run(reference_client(wide_server.url, messages))
        out["ref_cpu_s"], out["ref_proc_cpu_s"] = time.thread_time() - th0, _cpu_s() - cpu0
        out["ref_server_tokens"] = _predicted(wide_server.url) - before
        before, cpu0, th0 = _predicted(wide_server.url), _cpu_s(), time.thread_time()
        res = harness.fixed(CONCURRENCY, N_REQUESTS, PROMPT_TOKENS, MAX_TOKENS, name="bench-harness")
        out["harness_cpu_s"], out["harness_proc_cpu_s"] = time.thread_time() - th0, _cpu_s() - cpu0
        out["harness_server_tokens"] = _predicted(wide_server.url) - before
        out["harness"] = res.metrics
        return out

    got = benchmark.pedantic(drive, rounds=1, iterations=1)
    m = got.pop("harness")
    figures = {
        "requests": N_REQUESTS, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS,
        "ref_tokens": got["ref_tokens"], "ref_lost": got["ref_lost"], "ref_server_tokens": got["ref_server_tokens"],
        "ref_cpu_s_per_1k_tokens": _per_1k(got["ref_cpu_s"], got["ref_tokens"]),
        "ref_process_cpu_s_per_1k_tokens": _per_1k(got["ref_proc_cpu_s"], got["ref_tokens"]),
        "harness_tokens": m["completion_tokens"], "harness_lost": m["turns_failed"] + m["cut_at_deadline"],
        "harness_server_tokens": got["harness_server_tokens"],
        "harness_cpu_s_per_1k_tokens": _per_1k(got["harness_cpu_s"], m["completion_tokens"]),
        "harness_process_cpu_s_per_1k_tokens": _per_1k(got["harness_proc_cpu_s"], m["completion_tokens"]),
        "harness_agg_tps": round(m["agg_tps"], 1),
    }
    if figures["ref_cpu_s_per_1k_tokens"] and figures["harness_cpu_s_per_1k_tokens"]:
        figures["cpu_ratio_harness_to_ref"] = round(figures["harness_cpu_s_per_1k_tokens"]
                                                    / figures["ref_cpu_s_per_1k_tokens"], 3)
    benchmark.extra_info.update(figures)
    print("\nclient side by side: " + ", ".join(f"{k}={v}" for k, v in figures.items()))

    expected = N_REQUESTS * MAX_TOKENS  # ignore_eos: every request runs to max_tokens
    assert got["ref_lost"] == 0 and got["ref_tokens"] == expected == got["ref_server_tokens"], figures
    assert m["turns_ok"] == N_REQUESTS and m["turns_failed"] == 0 and m["cut_at_deadline"] == 0, m["errors"]
    assert m["usage_missing"] == 0
    assert m["completion_tokens"] == expected == got["harness_server_tokens"], figures


@pytest.mark.parametrize("procs", [1, 2])
def test_harness_with_client_processes(benchmark: Any, wide_server: ServerHandle, procs: int) -> None:
    harness, records = _harness(wide_server, procs)
    harness.warm_up(concurrency=CONCURRENCY, n_requests=CONCURRENCY)

    def drive() -> tuple[Any, float, float, float]:
        cpu0, th0, t0 = _cpu_s(children=True), time.thread_time(), time.monotonic()
        res = harness.fixed(CONCURRENCY, N_REQUESTS, PROMPT_TOKENS, MAX_TOKENS, name=f"bench-procs{procs}")
        return res, _cpu_s(children=True) - cpu0, time.thread_time() - th0, time.monotonic() - t0

    res, cpu_s, thread_s, wall_s = benchmark.pedantic(drive, rounds=1, iterations=1)
    m, cc = res.metrics, res.metrics["crosscheck"]
    in_run = res.run.client_cpu_s if res.run.client_cpu_s is not None else thread_s
    figures = {
        "client_procs": procs, "tokens": m["completion_tokens"], "server_tokens": cc["server_metrics_tokens"],
        "agg_tps": round(m["agg_tps"], 1), "command_tps": round(m["completion_tokens"] / wall_s, 1),
        "client_cpu_s_per_1k_tokens": _per_1k(in_run, m["completion_tokens"]),
        "command_cpu_s_per_1k_tokens": _per_1k(cpu_s, m["completion_tokens"]), "turns_failed": m["turns_failed"],
    }
    benchmark.extra_info.update(figures)
    print(f"\nclient processes {procs}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert records[-1]["workload"]["client_procs"] == procs
    assert m["turns_ok"] == N_REQUESTS and m["turns_failed"] == 0, m["errors"]
    assert m["completion_tokens"] == N_REQUESTS * MAX_TOKENS == cc["server_metrics_tokens"], figures
    assert sorted(r.agent for r in res.run.records) == list(range(N_REQUESTS))


def test_agent_ramp_toward_8192_with_client_processes(benchmark: Any, wide_server: ServerHandle) -> None:
    """The harness's agent-connection ramp, doubling to 8,192 agents over 2 client processes: how far
    it got, and the limit its record names."""
    harness, records = _harness(wide_server, 2, ramp_ceiling=RAMP_CEILING, ramp_max_tokens=4)
    t0 = time.monotonic()
    record = benchmark.pedantic(harness.ramp, rounds=1, iterations=1)
    assert records == [record]
    steps = record["steps"]
    figures = {"reached_n": max(s["n"] for s in steps), "max_clean_n": record["max_clean_n"],
               "limit": record["limit"], "limit_detail": record["limit_detail"],
               "client_procs": record["client_procs"], "wall_s": round(time.monotonic() - t0, 1),
               "steps": [(s["n"], s["ok"], s["errors"], s["turn_p95_s"] and round(s["turn_p95_s"], 2),
                          s["server_rss_mib"] and round(s["server_rss_mib"])) for s in steps]}
    benchmark.extra_info.update(figures)
    print("\nramp: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert record["client_procs"] == 2 and record["limit"] in LIMITS, record
    assert (record["limit"] == "none") == (record["max_clean_n"] == RAMP_CEILING), record
    assert [s["n"] for s in steps] == [2 ** i for i in range(len(steps))], steps
    assert all(s["ok"] + s["errors"] == s["n"] for s in steps), steps


def test_keep_text_cost(benchmark: Any, wide_server: ServerHandle) -> None:
    """What decoding the reply costs the client (agent workflows keep it for the history): the same
    requests with ``keep_text`` off and on, client CPU-s per 1k tokens of each, printed, not asserted."""
    from pytest_gpucap.workload.client import RequestRecord, StreamingClient

    n = CONCURRENCY * 2
    messages = _messages(calibrate(wide_server.url)[0])[:n]

    async def drive(keep: bool) -> list[RequestRecord]:
        recs = [RequestRecord(agent=i, role="bench", turn=0, scheduled=time.monotonic()) for i in range(n)]
        async with StreamingClient(wide_server.url, CONCURRENCY, 300.0) as client:
            await asyncio.gather(*(client.chat(r, m, MAX_TOKENS, thinking=False, keep_text=keep)
                                   for r, m in zip(recs, messages)))
        return recs

    def both() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for keep in (False, True, False, True):  # interleaved: a contended host drifts between runs
            th0 = time.thread_time()
            recs = runner.run(drive(keep))
            tokens = sum(r.completion_tokens or 0 for r in recs)
            out.setdefault(keep, []).append((time.thread_time() - th0, tokens, recs))
        return out

    got = benchmark.pedantic(both, rounds=1, iterations=1)
    figures = {}
    for keep, runs in got.items():
        cpu, tokens = sum(c for c, _, _ in runs), sum(t for _, t, _ in runs)
        figures[f"keep_text_{'on' if keep else 'off'}_cpu_s_per_1k_tokens"] = _per_1k(cpu, tokens)
        assert tokens == 2 * n * MAX_TOKENS, (keep, tokens)
        assert all(r.ok for _, _, recs in runs for r in recs)
        assert all((r.text is not None) == keep for _, _, recs in runs for r in recs)
    benchmark.extra_info.update(figures)
    print("\nkeep_text: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
