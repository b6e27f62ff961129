"""The client's own ceiling: 64 concurrent streams against a real llama-server on the tiny model.

On CPU and unified-memory hosts every CPU-second the harness spends is taken from the server it
measures, so the figures that matter are (1) whether the harness counts every token the server
produced (a count check: harness ÷ server ≥ 0.98, no request lost) and (2) how much CPU the client
burns per 1,000 tokens. Timings are printed and stored in ``benchmark.extra_info``, never asserted.

    .venv/bin/python -m pytest tests/test_client_benchmark.py -s -p no:randomly
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import plugin_server
from pytest_gpucap.matrix import CapacityConfig, Workload
from pytest_gpucap.backends import ServerHandle
from pytest_gpucap.workload import runner
from pytest_gpucap.backends.llamacpp import LlamaCpp
from pytest_gpucap.workload.metrics import server_crosscheck
from pytest_gpucap.workload.prompts import calibrate

CONCURRENCY = 64
SLOT_CTX = 256
N_REQUESTS = 256
PROMPT_TOKENS = 32
MAX_TOKENS = 64
PREDICTED = "llamacpp:tokens_predicted_total"


@pytest.fixture(scope="module")
def wide_server(llama_server_bin: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """64 slots of 256 tokens (verified against /props and /slots at boot), ``--metrics`` on."""
    cfg = CapacityConfig(profile="cpu", n=CONCURRENCY, ctx=SLOT_CTX, threads=2, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("bench-logs")) as handle:
        yield handle


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def test_client_ceiling_at_64_streams(benchmark: Any, wide_server: ServerHandle) -> None:
    cpt, source = calibrate(wide_server.url)
    assert source == "/tokenize"
    settings = Workload(duration_s=300, request_timeout_s=300)  # bounds, not expectations

    def drive() -> tuple[runner.RunResult, float]:
        cpu0 = _cpu_s()
        res = runner.run(runner.run_fixed(wide_server.url, CONCURRENCY, N_REQUESTS, PROMPT_TOKENS, MAX_TOKENS,
                                          cpt, settings))
        return res, _cpu_s() - cpu0

    res, cpu_s = benchmark.pedantic(drive, rounds=1, iterations=1)
    m = res.summary()
    cross = server_crosscheck(res.records, res.measure_from, res.server_metrics_before, res.server_metrics_after,
                              LlamaCpp.metrics.generated_tokens)
    harness_tokens = m["completion_tokens"]
    server_tokens = res.server_metrics_after[PREDICTED] - res.server_metrics_before.get(PREDICTED, 0.0)
    figures = {
        "concurrency": CONCURRENCY,
        "requests": N_REQUESTS,
        "max_tokens": MAX_TOKENS,
        "turns_ok": m["turns_ok"],
        "turns_failed": m["turns_failed"],
        "harness_tokens": harness_tokens,
        "server_tokens": server_tokens,
        "token_ratio": harness_tokens / server_tokens if server_tokens else None,
        "harness_agg_tps": round(m["agg_tps"], 1),
        "window_s": round(m["window_s"], 3),
        "client_cpu_s": round(cpu_s, 3),
        "client_cpu_s_per_1k_tokens": round(cpu_s / (harness_tokens / 1000), 4) if harness_tokens else None,
        "crosscheck_metrics_token_ratio": cross["metrics_token_ratio"],
        "decode_rate_ratio": cross["decode_rate_ratio"],
        "ttft_p50_s": m["ttft_s"]["p50"],
        "ttft_p99_s": m["ttft_s"]["p99"],
        "tpot_p50_s": m["tpot_s"]["p50"],
    }
    benchmark.extra_info.update(figures)
    print("\nclient ceiling: " + ", ".join(f"{k}={v}" for k, v in figures.items()))

    # Count checks (not timing): every request finished, every token the server produced was counted.
    assert m["turns_ok"] == N_REQUESTS and m["turns_failed"] == 0, m["errors"]
    assert m["usage_missing"] == 0
    assert harness_tokens == N_REQUESTS * MAX_TOKENS  # ignore_eos: every turn runs to max_tokens
    assert server_tokens > 0 and harness_tokens / server_tokens >= 0.98, figures
