"""The ramp names the limit it hit, read from recorded steps: one case per limit class, pure.

The steps are what a ramp records (percentiles, error classes, the server's queue gauges); the failed
turns carry the client's error class and detail as the streaming client writes them. The same records
then go through the record, the terminal line and the write-up's table.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pytest_gpucap.ramp_sections import LIMITS, RampEvidence, RampStep as StepSection
from pytest_gpucap.records import RampRecord, parse
from pytest_gpucap.report.tables import ramp_limit_line, ramp_table
from pytest_gpucap.workload.client import ErrorClass, RequestRecord
from pytest_gpucap.workload.ramp import RampContext, RampStep, ServerQueue, queue_knee, ramp_limit

SLOTS = 64
CTX = RampContext(ceiling=2048, slots=SLOTS, nofile_soft=4352, request_timeout_s=120.0)


def step(n: int, ttft_p95: float = 0.5, decode: float = 40.0, breach: str | None = None, **kw: Any) -> RampStep:
    base = dict(n=n, ok=n, errors=0, error_classes={}, create_p50_s=0.2, create_p95_s=ttft_p95, ttft_p50_s=0.3,
                ttft_p95_s=ttft_p95, turn_p50_s=0.5, turn_p95_s=ttft_p95 + 0.3, server_rss_mib=300.0,
                device_used_mib=None, breach=breach, decode_tps_p50=decode, client_busy=0.4,
                server_processing_max=float(min(n, SLOTS)), server_deferred_max=float(max(0, n - SLOTS)),
                server_in_max=float(n), metrics_polls=8, metrics_missed=0, host_available_mib=6000.0,
                host_total_mib=8000.0)
    return RampStep(**{**base, **kw})


def failed(count: int, error: ErrorClass, detail: str) -> list[RequestRecord]:
    return [RequestRecord(agent=i, role="ramp", turn=0, scheduled=0.0, error=error, detail=detail)
            for i in range(count)]


def clean_to(n: int) -> list[RampStep]:
    """Doubling steps to ``n``: flat TTFT up to the slots, then growing as agents queue, decode held."""
    out, k = [], 1
    while k <= n:
        out.append(step(k, ttft_p95=0.5 if k <= SLOTS else 0.5 * k / SLOTS))
        k *= 2
    return out


def breaching(n: int, **kw: Any) -> list[RampStep]:
    return clean_to(n // 2) + [step(n, breach=kw.pop("breach", "turn p95 40 s > budget 30 s"), **kw)]


def test_clean_to_the_ceiling_names_none_and_the_queue() -> None:
    steps = clean_to(2048)
    got = ramp_limit(steps, [], CTX)
    assert got["limit"] == "none"
    assert got["limit_detail"].startswith("none up to 2,048 agents")
    assert "queued for the 64 slots from N=128" in got["limit_detail"]
    assert got["limit_evidence"]["at_n"] == 2048 and got["limit_evidence"]["base_n"] == 64
    assert queue_knee(steps, SLOTS) == 128


def test_slots_when_agents_queue_past_the_slot_count() -> None:
    """Past 64 slots TTFT p95 grows ×8 over the full-slot step while decode per call holds."""
    steps = breaching(512, ttft_p95=4.0, server_deferred_max=448.0)
    got = ramp_limit(steps, [], CTX)
    assert got["limit"] == "slots", got
    assert "on 64 slots: up to 448 deferred" in got["limit_detail"]
    ev = got["limit_evidence"]
    assert ev["ttft_growth"] == 8.0 and ev["decode_ratio"] == 1.0 and ev["server_deferred_max"] == 448.0


def test_no_slot_queue_when_decode_slows_instead() -> None:
    """TTFT grows but per-call decode fell to a quarter and nothing was deferred: the server slowed,
    agents did not queue for slots."""
    steps = breaching(512, ttft_p95=4.0, decode=10.0, server_deferred_max=0.0, server_in_max=512.0,
                      server_processing_max=64.0)
    got = ramp_limit(steps, [], CTX)
    assert got["limit"] == "server", got
    assert got["limit_evidence"]["decode_ratio"] == 0.25


def test_file_descriptors() -> None:
    errors = failed(40, ErrorClass.CONNECT, "ClientConnectorError(OSError(24, 'Too many open files'))")
    got = ramp_limit(breaching(1024, breach="40 of 1024 turns failed", errors=40), errors, CTX)
    assert got["limit"] == "file descriptors", got
    assert "soft limit 4352" in got["limit_detail"]


def test_file_descriptors_from_the_soft_limit_alone() -> None:
    """Connects failed at an N within the margin of the client's soft limit: the client's fds."""
    errors = failed(10, ErrorClass.CONNECT, "ClientConnectorError(...)")
    got = ramp_limit(breaching(1024, errors=10), errors, replace(CTX, nofile_soft=1024))
    assert got["limit"] == "file descriptors", got


def test_timeouts() -> None:
    errors = failed(300, ErrorClass.TIMEOUT, "TimeoutError()")
    got = ramp_limit(breaching(2048, errors=300, server_deferred_max=1024.0), errors, CTX)
    assert got["limit"] == "timeouts", got
    assert got["limit_detail"].startswith("300 of 2,048 turns hit request_timeout_s = 120 s")
    assert "up to 1024 waited for one of 64 slots" in got["limit_detail"]
    assert got["limit_evidence"]["timeouts"] == 300


@pytest.mark.parametrize("case", ["low-host", "server-says"])
def test_memory(case: str) -> None:
    if case == "low-host":
        errors = failed(5, ErrorClass.HTTP_5XX, "boom")
        steps = breaching(256, errors=5, host_available_mib=200.0)
    else:
        errors = failed(5, ErrorClass.SERVER_ERROR, '{"message": "failed to allocate KV"}')
        steps = breaching(256, errors=5)
    got = ramp_limit(steps, errors, CTX)
    assert got["limit"] == "memory", got
    assert got["limit_detail"].startswith("memory at N=256")


def test_http_threads_when_connects_are_refused() -> None:
    errors = failed(371, ErrorClass.CONNECT, "ClientConnectorError(ConnectionRefusedError(111))")
    got = ramp_limit(breaching(4096, errors=371, server_processing_max=64.0), errors,
                     replace(CTX, ceiling=8192, nofile_soft=16640))
    assert got["limit"] == "http threads", got
    assert got["limit_detail"].startswith("371 connects failed at N=4,096 with at most 64 of 64 slots busy")
    assert got["limit_detail"].endswith("(mostly ClientConnectorError(ConnectionRefusedError(111)))")
    assert got["limit_evidence"]["common_error"] == "ClientConnectorError(ConnectionRefusedError(111))"


def test_http_threads_when_slots_sit_idle() -> None:
    """Connections waited (the step breached its budget) while at most 20 of 64 slots were busy and
    nothing was deferred: the HTTP pool, not the slots, held the agents back."""
    steps = breaching(256, ttft_p95=6.0, server_processing_max=20.0, server_deferred_max=0.0, server_in_max=22.0)
    got = ramp_limit(steps, [], CTX)
    assert got["limit"] == "http threads", got
    assert "at most 20 of 64 slots busy" in got["limit_detail"]
    assert "held at most 22 of 256 at once" in got["limit_detail"]


def test_client() -> None:
    got = ramp_limit(breaching(1024, client_busy=0.97), [], CTX)
    assert got["limit"] == "client" and "--gpucap-client-procs" in got["limit_detail"], got


def test_aborted_or_empty_names_nothing() -> None:
    assert ramp_limit([], [], CTX)["limit"] is None
    assert ramp_limit(clean_to(8), [], CTX)["limit"] is None  # clean, below the ceiling: stopped early


def test_every_name_is_a_declared_limit() -> None:
    cases = [ramp_limit(clean_to(2048), [], CTX), ramp_limit(breaching(1024, client_busy=0.97), [], CTX)]
    assert {c["limit"] for c in cases} <= set(LIMITS)


def test_server_queue_gauges() -> None:
    q = ServerQueue()
    q.observe({"llamacpp:requests_processing": 64.0, "llamacpp:requests_deferred": 100.0})
    q.observe(None)
    q.observe({"llamacpp:requests_processing": 30.0, "llamacpp:requests_deferred": 300.0})
    assert (q.polls, q.missed, q.processing_max, q.deferred_max, q.in_max) == (3, 1, 64.0, 300.0, 330.0)
    v = ServerQueue()
    v.observe({"vllm:num_requests_running": 8.0, "vllm:num_requests_waiting": 2.0})
    assert v.in_max == 10.0


def _record(steps: list[RampStep], got: dict[str, Any]) -> RampRecord:
    data = {"schema": 1, "kind": "ramp", "test": "t", "config_id": "cpu-n64-ctx256-f16", "profile": "cpu",
            "config": {}, "host": None, "server": {}, "boot_s": 1.0, "slo": {}, "ceiling": CTX.ceiling,
            "steps": [vars(s) for s in steps], "max_clean_n": steps[-1].n if got["limit"] == "none" else steps[-2].n,
            "knee_n": None, "queue_knee_n": queue_knee(steps, SLOTS), "slots": SLOTS, **got}
    record = parse(data)
    assert isinstance(record, RampRecord) and record.to_dict() == data  # typed, and round-trips
    return record


def test_the_record_the_terminal_and_the_table_name_the_limit() -> None:
    steps = breaching(512, ttft_p95=4.0, server_deferred_max=448.0)
    rec = _record(steps, ramp_limit(steps, [], CTX))
    assert rec.limit == "slots" and isinstance(rec.limit_evidence, RampEvidence) and rec.limit_evidence.at_n == 512
    assert isinstance(rec.steps[-1], StepSection) and rec.steps[-1].server_deferred_max == 448.0
    assert rec.summary_line().endswith("limit: slots at N=512")
    assert ramp_limit_line(rec).startswith("slots at N=512 (turn p95 40 s > budget 30 s at N=512 on 64 slots")
    table = ramp_table(rec)
    marks = [row[9].text for row in table.rows]
    assert marks[-1] == "limit: slots" and marks.count("queue knee") == 1 and marks[-2] == "max clean N"
    clean = clean_to(2048)
    rec = _record(clean, ramp_limit(clean, [], CTX))
    assert rec.summary_line().endswith("limit: none up to 2,048")
    assert [row[9].text for row in ramp_table(rec).rows][-1] == "max clean N, limit: none up to 2,048"
