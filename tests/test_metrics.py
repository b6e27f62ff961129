"""Per-request records to numbers and verdicts: hand-made RequestRecords with known answers.

Everything here is pure except ``test_parse_prometheus_on_a_real_llama_server``, which reads the
counters of a real llama-server after one streamed request.
"""

from __future__ import annotations

from dataclasses import replace

import asyncio
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pytest_gpucap.matrix import SLO, CapacityConfig, HostProfile
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.backends import LaunchSpec, ServerHandle
from pytest_gpucap.verdicts import Verdict, assert_slos, workload_verdicts
from pytest_gpucap.workload.client import ErrorClass, RequestRecord, StreamingClient
from pytest_gpucap.backends.llamacpp import LlamaCpp
from pytest_gpucap.promtext import sums as parse_prometheus
from pytest_gpucap.workload.metrics import pcts, percentile, server_crosscheck, summarize

TOKENS = LlamaCpp.metrics.generated_tokens

T0 = 1000.0  # measurement starts here; anything scheduled earlier is warm-up


def ok_rec(role: str, scheduled: float, ttft: float, e2e: float, tokens: int, *, agent: int = 0, turn: int = 0,
           prompt: int = 100, cached: int = 0, timings: dict | None = None, chunks: int = 0) -> RequestRecord:
    """A finished turn: sent at ``scheduled``, first content after ``ttft``, done after ``e2e``."""
    first, end = scheduled + ttft, scheduled + e2e
    rec = RequestRecord(agent=agent, role=role, turn=turn, scheduled=scheduled, sent=scheduled,
                        headers=scheduled + ttft / 2, first_content=first, end=end, prompt_tokens=prompt,
                        completion_tokens=tokens, cached_tokens=cached, timings=timings, finish_reason="length",
                        status=200)
    if chunks:
        rec.chunk_times = list(np.linspace(first, end, chunks))
    return rec


def failed_rec(role: str, scheduled: float, error: ErrorClass, end: float | None = None,
               status: int | None = 200) -> RequestRecord:
    return RequestRecord(agent=9, role=role, turn=0, scheduled=scheduled, sent=scheduled, end=end,
                         status=status, error=error)


@pytest.fixture
def records() -> list[RequestRecord]:
    """Warm-up, OK turns of two roles, failures of three classes and turns cut at the deadline."""
    recs = [
        # warm-up (scheduled before T0): excluded everywhere, even though it is huge and slow
        ok_rec("Research", T0 - 5, 0.5, 50.0, 10_000, prompt=5000, cached=5000),
        failed_rec("Research", T0 - 1, ErrorClass.CONNECT),
        # measured OK turns
        ok_rec("Research", T0 + 0.0, 0.2, 2.0, 100, prompt=400, cached=300, chunks=50),
        ok_rec("Research", T0 + 1.0, 0.3, 4.0, 200, prompt=400, cached=0, chunks=10),
        ok_rec("Research", T0 + 2.0, 0.1, 3.0, 50, prompt=200, cached=100),
        ok_rec("Research", T0 + 3.0, 0.4, 7.0, 150, prompt=200, cached=100),
        ok_rec("Dev", T0 + 0.5, 1.0, 9.5, 300, prompt=800, cached=0),
        ok_rec("Dev", T0 + 4.0, 0.5, 6.0, 100, prompt=400, cached=400),
        # measured failures: three classes
        failed_rec("Research", T0 + 5.0, ErrorClass.HTTP_5XX, status=503),
        failed_rec("Dev", T0 + 5.5, ErrorClass.STREAM_CUT, end=T0 + 6.0),
        failed_rec("Dev", T0 + 6.0, ErrorClass.STREAM_CUT),
        failed_rec("Research", T0 + 6.5, ErrorClass.MALFORMED),
        # cut at the run's deadline: neither OK nor failed
        failed_rec("Research", T0 + 8.0, ErrorClass.CANCELLED, status=None),
        failed_rec("Dev", T0 + 8.5, ErrorClass.CANCELLED, status=None),
    ]
    return recs


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for size in (1, 2, 3, 10, 101, 1000):
        values = [rng.expovariate(1.0) for _ in range(size)]
        for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)
    assert percentile([], 50) is None
    got = pcts([3.0, None, 1.0, 2.0])  # None (no first token) is skipped, not counted as zero
    assert (got["p50"], got["n"]) == (2.0, 3)


def test_summary_excludes_warmup_and_separates_failures_from_cuts(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    assert m["turns_ok"] == 6
    assert m["turns_failed"] == 4  # the two turns cancelled at the deadline are not failures ...
    assert m["cut_at_deadline"] == 2  # ... but are counted
    assert m["errors"] == {"http_5xx": 1, "stream_cut": 2, "malformed_chunk": 1}  # warm-up CONNECT excluded
    assert m["error_rate"] == pytest.approx(4 / 10)
    assert m["completion_tokens"] == 100 + 200 + 50 + 150 + 300 + 100  # warm-up's 10,000 excluded
    assert m["usage_missing"] == 0
    # since=0 takes the warm-up in: it changes the figures
    everything = summarize(records, since=0.0)
    assert everything["turns_ok"] == 7 and everything["errors"]["connect"] == 1


def test_summary_percentiles_overall_and_per_role(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    measured_ok = [r for r in records if r.scheduled >= T0 and r.ok]
    e2e = [r.e2e_s for r in measured_ok]
    ttft = [r.ttft_s for r in measured_ok]
    for key, values in (("e2e_s", e2e), ("ttft_s", ttft)):
        for q in (50, 95, 99):
            assert m[key][f"p{q}"] == pytest.approx(np.percentile(values, q))
    research = [2.0, 4.0, 3.0, 7.0]
    dev = [9.5, 6.0]
    roles = m["roles"]
    assert set(roles) == {"Research", "Dev"}
    assert roles["Research"]["p50_s"] == pytest.approx(np.percentile(research, 50))
    assert roles["Research"]["p95_s"] == pytest.approx(np.percentile(research, 95))
    assert roles["Dev"]["p50_s"] == pytest.approx(np.percentile(dev, 50))
    assert roles["Dev"]["p95_s"] == pytest.approx(np.percentile(dev, 95))
    assert (roles["Research"]["turns_ok"], roles["Research"]["turns_failed"]) == (4, 2)
    assert (roles["Dev"]["turns_ok"], roles["Dev"]["turns_failed"]) == (2, 2)


def test_rates_over_the_active_window(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    # Active window: first send (T0 + 0.0) to last end (Dev at T0 + 4.0 + 6.0 = T0 + 10.0); the
    # warm-up turn's send (T0 - 5) does not stretch it, and the command's start-up never enters.
    assert m["window_s"] == pytest.approx(10.0)
    assert m["agg_tps"] == pytest.approx(900 / 10.0)
    assert m["roles"]["Dev"]["tps"] == pytest.approx(400 / 10.0)
    # per-call tokens/s: completion tokens over each turn's own decode time (first content to end)
    per_call = [100 / 1.8, 200 / 3.7, 50 / 2.9, 150 / 6.6, 300 / 8.5, 100 / 5.5]
    assert m["per_call_tps"] == pytest.approx(sum(per_call) / len(per_call))


def test_tpot_excludes_the_first_token() -> None:
    rec = ok_rec("Dev", T0, ttft=1.0, e2e=2.0, tokens=11)  # 10 tokens after the first one, in 1.0 s
    assert rec.tpot_s == pytest.approx(0.1)
    assert ok_rec("Dev", T0, 1.0, 2.0, tokens=1).tpot_s is None  # a single token has no TPOT
    m = summarize([rec, ok_rec("Dev", T0, 0.5, 3.5, tokens=31)], since=T0)
    assert m["tpot_s"]["p50"] == pytest.approx((0.1 + 0.1) / 2)
    # TTFT counts from the scheduled time, so client-side queueing is never hidden
    queued = ok_rec("Dev", T0, 1.0, 2.0, tokens=11)
    queued.sent = T0 + 0.9
    assert queued.ttft_s == pytest.approx(1.0)


def test_chunk_gaps_are_reported_as_chunk_itl(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    gaps = list(np.diff(records[2].chunk_times)) + list(np.diff(records[3].chunk_times))
    assert m["itl_chunk_s"]["n"] == len(gaps) == 49 + 9
    assert m["itl_chunk_s"]["p50"] == pytest.approx(np.percentile(gaps, 50))


def test_prefix_cache_hit_rate(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    cached = 300 + 0 + 100 + 100 + 0 + 400
    prompt = 400 + 400 + 200 + 200 + 800 + 400
    assert m["prefix_cache_hit_rate"] == pytest.approx(cached / prompt)
    assert summarize([], since=0)["prefix_cache_hit_rate"] is None


def test_usage_missing_is_counted() -> None:
    rec = ok_rec("Dev", T0, 0.1, 1.0, tokens=5)
    rec.completion_tokens = None
    m = summarize([rec, ok_rec("Dev", T0, 0.1, 1.0, tokens=5)], since=T0)
    assert m["usage_missing"] == 1 and m["completion_tokens"] == 5


def test_server_crosscheck_ratios() -> None:
    timings = {"predicted_n": 100, "predicted_per_second": 100.0, "cache_n": 0}
    # decode 1.0 s for 100 tokens: the client sees the server's rate
    agree = [ok_rec("Dev", T0 + i, 0.1, 1.1, 100, timings=dict(timings)) for i in range(3)]
    before = {"llamacpp:tokens_predicted_total": 1000.0}
    after = {"llamacpp:tokens_predicted_total": 1300.0}
    out = server_crosscheck(agree, T0, before, after, TOKENS)
    assert out["client_tokens"] == 300 and out["server_timing_tokens"] == 300
    assert out["server_metrics_tokens"] == 300
    assert out["token_ratio"] == pytest.approx(1.0) and out["metrics_token_ratio"] == pytest.approx(1.0)
    assert out["decode_rate_ratio"] == pytest.approx(1.0)
    # the server produced tokens the client never counted (a lost request): the ratio says so
    short = server_crosscheck(agree, T0, before, {"llamacpp:tokens_predicted_total": 1400.0}, TOKENS)
    assert short["metrics_token_ratio"] == pytest.approx(0.75)
    assert out["client_behind"] is False
    # the client reads each stream at half the server's pace: flagged
    behind = [ok_rec("Dev", T0 + i, 0.1, 2.1, 100, timings=dict(timings)) for i in range(3)]
    out = server_crosscheck(behind, T0, before, after, TOKENS)
    assert out["decode_rate_ratio"] == pytest.approx(0.5) and out["client_behind"] is True
    # a server without timings or /metrics gives no ratio (and no false alarm)
    bare = [ok_rec("Dev", T0, 0.1, 1.1, 100)]
    out = server_crosscheck(bare, T0, {}, {}, TOKENS)
    assert out["token_ratio"] is None and out["decode_rate_ratio"] is None
    assert out["server_metrics_tokens"] is None and out["metrics_token_ratio"] is None
    assert out["client_behind"] is False


def test_parse_prometheus_sums_labelled_samples() -> None:
    text = (
        "# HELP x_total a counter\n# TYPE x_total counter\n"
        'x_total{slot="0"} 2\nx_total{slot="1"} 3.5\n'
        "y_gauge 1e3\nbroken line here\n"
    )
    assert parse_prometheus(text) == {"x_total": 5.5, "y_gauge": 1000.0}


def test_parse_prometheus_on_a_real_llama_server(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The counters the cross-check relies on, read from the text a real llama-server serves."""
    cfg = CapacityConfig(profile="cpu", n=1, ctx=512, threads=1, cache_ram_mib=0)
    spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=tmp_path,
                      command=(str(llama_server_bin),), model=tiny_model, boot_timeout_s=60, hold_s=0.2)
    handle = ServerHandle(spec, HostProbe(2048))
    try:
        handle.boot()
        before = parse_prometheus(httpx.get(f"{handle.url}/metrics").text)

        async def one() -> RequestRecord:
            async with StreamingClient(handle.url, 1) as client:
                rec = RequestRecord(agent=0, role="probe", turn=0, scheduled=time.monotonic())
                return await client.chat(rec, [{"role": "user", "content": "count to ten"}], max_tokens=7)

        rec = asyncio.run(one())
        text = httpx.get(f"{handle.url}/metrics").text
    finally:
        handle.stop()
    assert rec.ok, rec.detail
    after = parse_prometheus(text)
    for name in ("llamacpp:tokens_predicted_total", "llamacpp:n_decode_total", "llamacpp:prompt_tokens_total",
                 "llamacpp:requests_processing"):
        assert name in after, f"{name} missing from:\n{text}"
    assert not any(k.startswith("#") for k in after)
    assert rec.completion_tokens == 7
    assert after["llamacpp:tokens_predicted_total"] - before.get("llamacpp:tokens_predicted_total", 0) == 7
    assert after["llamacpp:prompt_tokens_total"] - before.get("llamacpp:prompt_tokens_total", 0) == rec.prompt_tokens
    cross = server_crosscheck([rec], 0.0, before, after, TOKENS)
    assert cross["server_metrics_tokens"] == 7 and cross["token_ratio"] == pytest.approx(1.0)
    assert cross["metrics_token_ratio"] == pytest.approx(1.0)


# ---------------------------------------------------------------- SLO verdicts and the breach message

def test_workload_verdicts_and_breach_message(records: list[RequestRecord]) -> None:
    m = summarize(records, since=T0)
    slo = SLO(p95_s=(("Dev", 100.0), ("QA", 1.0), ("Research", 0.5)), min_agg_tps=1000.0,
              max_error_rate=0.5, ttft_p95_s=10.0, tpot_p95_s=10.0)
    verdicts = workload_verdicts(m, slo)
    by_name = {v.name: v for v in verdicts}
    # QA ran no turn in this workload: no verdict for it
    assert set(by_name) == {"Dev p95 turn latency", "Research p95 turn latency", "TTFT p95", "TPOT p95",
                            "aggregate tokens/s", "error rate"}
    assert by_name["Dev p95 turn latency"].ok and by_name["TTFT p95"].ok and by_name["error rate"].ok
    assert by_name["TPOT p95"].ok and by_name["TPOT p95"].measured == pytest.approx(m["tpot_s"]["p95"])
    tight = {v.name: v for v in workload_verdicts(m, replace(slo, tpot_p95_s=m["tpot_s"]["p95"] / 2))}
    assert not tight["TPOT p95"].ok  # the budget a config's decode pace must meet
    research, agg = by_name["Research p95 turn latency"], by_name["aggregate tokens/s"]
    assert not research.ok and not agg.ok
    assert research.margin == pytest.approx(0.5 - m["roles"]["Research"]["p95_s"])
    assert agg.margin == pytest.approx(m["agg_tps"] - 1000.0)

    with pytest.raises(pytest.fail.Exception) as info:
        assert_slos(verdicts, "cpu-n3-ctx1k-f16 B")
    lines = str(info.value).splitlines()
    assert lines[0] == "SLO breached for cpu-n3-ctx1k-f16 B:"
    assert len(lines) == 3  # one line per breach, passing verdicts stay out of the message
    research_line = next(ln for ln in lines if "Research p95 turn latency" in ln)
    assert research_line == (f"  Research p95 turn latency: measured {research.measured:.3g} s, "
                             f"budget <= 0.5 s, margin {research.margin:+.3g} s [BREACH]")
    agg_line = next(ln for ln in lines if "aggregate tokens/s" in ln)
    assert agg_line == (f"  aggregate tokens/s: measured {m['agg_tps']:.3g} tok/s, budget >= 1e+03 tok/s, "
                        f"margin {agg.margin:+.3g} tok/s [BREACH]")
    assert not info.value.pytrace  # a budget breach is a message, not our stack

    assert_slos([v for v in verdicts if v.ok], "all within budget")  # passes silently


def test_a_role_with_no_finished_turn_breaches_its_budget() -> None:
    recs = [failed_rec("Dev", T0, ErrorClass.HTTP_5XX, status=503), ok_rec("TL", T0, 0.1, 1.0, 10)]
    (dev,) = [v for v in workload_verdicts(summarize(recs, T0), SLO(p95_s=(("Dev", 60.0),))) if "Dev" in v.name]
    assert not dev.ok and "no turn finished" in dev.name


def test_verdict_margin_sign() -> None:
    assert Verdict("x", 5.0, 3.0, "s", higher_is_better=False).margin == -2.0
    assert Verdict("x", 5.0, 3.0, "tok/s").margin == 2.0
    assert "[ok]" in Verdict("x", 5.0, 3.0, "tok/s").line()


def test_per_call_rate_prefers_the_servers_own_decode_rate() -> None:
    """Client chunk timing bunches when llama-server holds back incomplete UTF-8; its timings do not."""
    bunched = RequestRecord(agent=0, role="Dev", turn=0, scheduled=0.0, sent=0.0, first_content=9.9, end=10.0,
                            completion_tokens=100, timings={"predicted_per_second": 12.5})
    plain = RequestRecord(agent=1, role="Dev", turn=0, scheduled=0.0, sent=0.0, first_content=1.0, end=3.0,
                          completion_tokens=100)
    m = summarize([bunched, plain])
    assert m["per_call_tps"] == pytest.approx((12.5 + 50.0) / 2)


def test_goodput_counts_turns_within_every_budget() -> None:
    from pytest_gpucap.matrix import SLO
    from pytest_gpucap.verdicts import goodput

    def rec(role: str, e2e: float, ttft: float, ok: bool = True) -> RequestRecord:
        r = RequestRecord(agent=0, role=role, turn=0, scheduled=0.0, sent=0.0, first_content=ttft, end=e2e,
                          completion_tokens=10)
        if not ok:
            r.error = ErrorClass.HTTP_5XX
        return r

    records = [rec("Dev", 5.0, 1.0), rec("Dev", 15.0, 1.0), rec("QA", 4.0, 3.0), rec("TL", 2.0, 0.5, ok=False)]
    g = goodput(records, SLO(p95_s=(("Dev", 10.0),), ttft_p95_s=2.0))
    # Dev 5 s ok; Dev 15 s over its budget; QA over the TTFT budget; TL failed
    assert (g["good_turns"], g["finished_turns"]) == (1, 4)
    assert g["fraction"] == 0.25 and g["tokens_per_s"] == pytest.approx(10 / 15.0)
