"""The workload engine against real llama-server instances on generated models.

Prompts and the compaction policy are checked pure; the client, the runner, the ramp and the
plugin's workload fixture run against real servers (on the CPU). One fault a real server cannot be
made to produce — a malformed SSE chunk — is injected by a small stub, and only that one.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import CapacityRun, matrix_toml
from pytest_gpucap.matrix import CapacityConfig, HostProfile, Workload
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.backends import LaunchSpec, ServerHandle
from pytest_gpucap.backends.process import free_port
from pytest_gpucap.workload import ramp as ramps
from pytest_gpucap.workload import runner
from pytest_gpucap.workload.client import ErrorClass, RequestRecord, StreamingClient
from pytest_gpucap.workload.prompts import DEFAULT_CHARS_PER_TOKEN, calibrate, reply_stub, tool_blob
from pytest_gpucap.workload.runner import CONTEXT_FILL, SYSTEM_PROMPT, Conversation

SLOT_CTX = 512


def boot(binary: Path, model: Path, cfg: CapacityConfig, log_dir: Path) -> ServerHandle:
    """A real llama-server through the plugin's own launcher (own session, group kill on stop)."""
    spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=log_dir,
                      command=(str(binary),), model=model, boot_timeout_s=60, hold_s=0.2)
    handle = ServerHandle(spec, HostProbe(2048))
    try:
        return handle.boot()
    except BaseException:
        handle.stop()
        raise


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, tiny_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One 8-slot server for the tests that leave it running."""
    cfg = CapacityConfig(profile="cpu", n=8, ctx=SLOT_CTX, threads=2, cache_ram_mib=0)
    handle = boot(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("server-logs"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def cpt(server: ServerHandle) -> float:
    """Chars per token of the generated model's tokenizer (prompts sized in real tokens)."""
    return calibrate(server.url)[0]


def count_tokens(url: str, text: str) -> int:
    resp = httpx.post(f"{url}/tokenize", json={"content": text}, timeout=10)
    resp.raise_for_status()
    return len(resp.json()["tokens"])


# ---------------------------------------------------------------- deterministic prompts

def test_prompts_are_deterministic_per_seed_agent_and_turn() -> None:
    """A seed reproduces the exact request stream: same (seed, agent, turn) → same text; any change → other text."""
    args = (42, 1, 3, 200, 3.5)
    assert tool_blob(*args) == tool_blob(*args)
    assert reply_stub(*args) == reply_stub(*args)
    others = [(43, 1, 3), (42, 2, 3), (42, 1, 4)]
    blobs = {tool_blob(s, a, t, 200, 3.5) for s, a, t in others} | {tool_blob(*args)}
    stubs = {reply_stub(s, a, t, 200, 3.5) for s, a, t in others} | {reply_stub(*args)}
    assert len(blobs) == 4 and len(stubs) == 4
    assert tool_blob(*args) != reply_stub(*args)
    assert tool_blob(*args).startswith("[TOOL RESULT 1.3]\n")
    # sized in tokens through chars-per-token (the header counts towards the size)
    assert len(tool_blob(42, 1, 3, 200, 3.5)) == 700
    assert len(reply_stub(42, 1, 3, 200, 3.5)) == 700
    assert len(tool_blob(42, 1, 3, 1000, 2.0)) == 2000


def test_calibrate_falls_back_without_a_tokenizer_endpoint() -> None:
    port = free_port()  # nothing listens there
    assert calibrate(f"http://127.0.0.1:{port}", timeout_s=2) == (DEFAULT_CHARS_PER_TOKEN, "default (no /tokenize)")


@pytest.mark.parametrize("n_tokens", [200, 1000])
def test_blob_sized_by_calibration_tokenizes_to_n(server: ServerHandle, n_tokens: int) -> None:
    """``calibrate`` measures chars per token with /tokenize; a blob for N tokens is N ± 10 %."""
    cpt, source = calibrate(server.url)
    assert source == "/tokenize"
    assert 0.5 < cpt < 10 and cpt != DEFAULT_CHARS_PER_TOKEN
    for agent, turn in [(0, 0), (1, 3), (2, 7)]:
        got = count_tokens(server.url, tool_blob(0, agent, turn, n_tokens, cpt))
        assert abs(got - n_tokens) <= 0.1 * n_tokens, (agent, turn, got)


# ---------------------------------------------------------------- compaction policy (pure)

def test_compaction_keeps_the_prompt_under_the_slot_and_drops_oldest_first() -> None:
    cpt, max_tokens, tool_tokens = 3.5, 64, 100
    conv = Conversation(slot_ctx=SLOT_CTX, chars_per_token=cpt)
    budget = int(SLOT_CTX * CONTEXT_FILL) - max_tokens
    for turn in range(30):
        user = tool_blob(0, 0, turn, tool_tokens, cpt)
        messages, clipped = conv.prepare(user, max_tokens)
        assert not clipped
        assert conv.tokens(messages) <= budget, turn
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}  # never dropped
        assert messages[-1]["content"] == user  # the new tool result is whole
        roles = [m["role"] for m in messages[1:]]
        assert roles == ["user", "assistant"] * ((len(roles) - 1) // 2) + ["user"]
        # what is left of the history is the most recent turns, in order: the oldest went first
        kept = [int(m["content"].split("[TOOL RESULT 0.", 1)[1].split("]", 1)[0])
                for m in messages[1:] if m["role"] == "user"]
        assert kept == list(range(turn - len(kept) + 1, turn + 1))
        conv.commit(messages[-1], reply_stub(0, 0, turn, max_tokens, cpt))
        # every drop is one user/assistant pair, and every dropped pair was counted
        assert conv.compactions == turn + 1 - (len(conv.messages) - 1) // 2
    assert conv.compactions > 20  # the slot holds only a few turns: compaction ran all along
    assert len(conv.messages) < 10


def test_a_tool_result_larger_than_the_slot_is_clipped() -> None:
    cpt, max_tokens = 3.5, 64
    conv = Conversation(slot_ctx=SLOT_CTX, chars_per_token=cpt)
    conv.commit({"role": "user", "content": "small"}, "reply")
    huge = tool_blob(0, 0, 0, 5 * SLOT_CTX, cpt)
    messages, clipped = conv.prepare(huge, max_tokens)
    assert clipped
    assert conv.tokens(messages) <= int(SLOT_CTX * CONTEXT_FILL) - max_tokens
    assert messages[-1]["content"] and huge.startswith(messages[-1]["content"])
    assert messages[0]["content"] == SYSTEM_PROMPT and len(messages) == 2  # history went first
    assert conv.compactions == 1


# ---------------------------------------------------------------- a server that dies mid-stream

def test_server_killed_mid_stream_is_a_stream_cut_record(llama_server_bin: Path, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    """SIGKILL to the server's process group while it streams: ``chat`` returns a record with the
    error class (stream_cut; connect if the socket was never answered), it does not raise."""
    cfg = CapacityConfig(profile="cpu", n=1, ctx=32768, threads=1, cache_ram_mib=0)
    handle = boot(llama_server_bin, tiny_model, cfg, tmp_path)
    try:
        assert handle.process is not None and handle.process.pgid is not None
        pgid = handle.process.pgid

        async def scenario() -> tuple[RequestRecord, int]:
            async with StreamingClient(handle.url, 1) as client:
                rec = RequestRecord(agent=0, role="victim", turn=0, scheduled=time.monotonic())
                task = asyncio.create_task(
                    client.chat(rec, [{"role": "user", "content": "write forever"}], max_tokens=30000))
                deadline = time.monotonic() + 30
                while rec.first_content is None and not task.done() and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                assert rec.first_content is not None, f"no content before the kill: {rec}"
                chunks_at_kill = len(rec.chunk_times)
                os.killpg(pgid, signal.SIGKILL)
                return await asyncio.wait_for(task, timeout=30), chunks_at_kill

        rec, chunks_at_kill = asyncio.run(scenario())
    finally:
        handle.stop()
    # the response had started (status 200, chunks read), so this is a cut stream, not a connect error
    assert rec.error is ErrorClass.STREAM_CUT and rec.status == 200, (rec.error, rec.detail)
    assert not rec.ok and rec.completion_tokens is None and rec.finish_reason is None
    assert len(rec.chunk_times) >= chunks_at_kill >= 1
    assert rec.detail  # what httpx said, for the report


DIES_DURING_WORKFLOW = '''
import threading


def test_workflow_b(gpucap_server, gpucap_workload):
    timer = threading.Timer(2.0, gpucap_server.process.kill_leader)
    timer.start()
    try:
        gpucap_workload.workflow("B")
    finally:
        timer.cancel()
'''

WORKLOAD_CONFIG = """
    [[profiles.cpu.configs]]
    n = 3
    ctx = 2048
"""

SMALL_TURNS = """
    [profiles.cpu.workload]
    duration_s = 60
    token_scale = 0.01
"""


def test_server_dying_during_a_workflow_fails_clearly_and_keeps_the_results(capacity_run: CapacityRun,
                                                                          tiny_model: Path) -> None:
    """The leader is SIGKILLed ~2 s into a 60 s workflow: the test fails at once with a message that
    says the workload stopped and why, and the turns finished before are in results.jsonl."""
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(tiny_model, WORKLOAD_CONFIG, extra=SMALL_TURNS),
                              "--gpucap-report", "rep", "-v", test_src=DIES_DURING_WORKFLOW)
    elapsed = time.monotonic() - t0
    out = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert elapsed < 50, f"the run did not stop when the server died ({elapsed:.0f} s)"
    result.stdout.fnmatch_lines([
        "*workload B on cpu-n3-ctx2k-f16 stopped after * turns ok, * failed (all recorded): "
        "llama-server for cpu-n3-ctx2k-f16 exited with code -9 while tests were using it*",
    ])
    assert "Traceback" not in out
    lines = (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    (rec,) = [r for r in records if r["kind"] == "workload"]
    assert rec["outcome"] == "failed"
    assert rec["workload"]["name"] == "B" and rec["workload"]["agents"] == ["Research"] * 3
    assert rec["metrics"]["turns_ok"] > 0
    assert "exited" in rec["aborted"]
    assert rec["metrics"]["roles"]["Research"]["turns_ok"] == rec["metrics"]["turns_ok"]


# ---------------------------------------------------------------- a hung server (SIGSTOP)

STALL_S = 5
STOPPED_DURING_WORKFLOW = '''
import os
import signal
import threading
import time


def test_workflow_b(gpucap_server, gpucap_workload):
    pid = gpucap_server.process.pid
    events = []

    def stop():
        os.kill(pid, signal.SIGSTOP)
        events.append(time.monotonic())

    def cont():
        os.kill(pid, signal.SIGCONT)

    timers = [threading.Timer(STOP_AT, stop)] + ([threading.Timer(CONT_AT, cont)] if CONT_AT else [])
    for t in timers:
        t.start()
    try:
        gpucap_workload.workflow("B")
    finally:
        for t in timers:
            t.cancel()
        if events:
            print(f"ended {time.monotonic() - events[0]:.1f} s after SIGSTOP")
'''

STALL_TURNS = f"""
    [profiles.cpu.workload]
    duration_s = 8
    token_scale = 0.02
    stall_s = {STALL_S}
"""


def _stopped_run(capacity_run: CapacityRun, tiny_model: Path, stop_at: float,
                 cont_at: float | None) -> tuple[pytest.RunResult, dict[str, Any]]:
    src = f"STOP_AT = {stop_at}\nCONT_AT = {cont_at}\n" + STOPPED_DURING_WORKFLOW
    result = capacity_run.run(matrix_toml(tiny_model, WORKLOAD_CONFIG, extra=STALL_TURNS),
                              "--gpucap-report", "rep", "-v", "-s", test_src=src)
    lines = (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()
    (rec,) = [r for r in map(json.loads, lines) if r["kind"] == "workload"]
    return result, rec


def test_a_hung_server_fails_the_workload_as_stalled(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """SIGSTOP 4 s into an 8 s window: in-flight turns stall, /health does not answer, and the test
    fails within stall_s + 10 s with that reason; teardown still removes the stopped server
    (``capacity_run`` checks that no process is left)."""
    result, rec = _stopped_run(capacity_run, tiny_model, 4.0, None)
    out = result.stdout.str()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*workload B on cpu-n3-ctx2k-f16 stopped after * turns ok, * failed (all recorded): "
                                 "stalled: * turns, server not answering /health*"])
    after = float(out.split("ended ")[1].split(" s after SIGSTOP")[0])
    print(f"hung server: the test failed {after:.1f} s after SIGSTOP (stall_s {STALL_S} s)")
    assert after <= STALL_S + 10, out
    assert rec["metrics"]["errors"].get("stalled", 0) >= 1, rec["metrics"]["errors"]
    assert rec["workload"]["stall_s"] == STALL_S
    assert "not answering /health" in rec["workload"]["stalls"]
    assert "Traceback" not in out


def test_a_server_continued_before_stall_s_passes(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """SIGSTOP 3 s in, SIGCONT 2 s later (< stall_s): no turn stalls and the run passes."""
    result, rec = _stopped_run(capacity_run, tiny_model, 3.0, 5.0)
    result.assert_outcomes(passed=1)
    assert rec["metrics"]["turns_failed"] == 0 and "stalled" not in rec["metrics"]["errors"]
    assert "stalls" not in rec["workload"] and rec["aborted"] is None and rec["workload"]["stall_s"] == STALL_S
    assert rec["metrics"]["turns_ok"] > 0


# ---------------------------------------------------------------- client processes

SPLIT_RUNS = '''
def test_split(gpucap_workload):
    assert gpucap_workload.procs() == 2
    gpucap_workload.fixed(4, 12, max_tokens=8, name="split")
    gpucap_workload.workflow("B")
    one = gpucap_workload.with_settings()
    one.client_procs = 1
    one.fixed(4, 12, max_tokens=8, name="single")
    one.workflow("B")
'''


def _shape(value: Any) -> Any:
    """The keys of a record, recursively (values and their types left out)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return None


def test_two_client_processes_give_the_record_shape_and_token_counts_of_one(capacity_run: CapacityRun,
                                                                           tiny_model: Path) -> None:
    """``--gpucap-client-procs 2``: a fixed run and a workflow split over two spawned processes make
    records of the same shape as one process, and the fixed run counts exactly the tokens it asked for,
    as the server's own counter does."""
    extra = SMALL_TURNS.replace("duration_s = 60", "duration_s = 4")
    result = capacity_run.run(matrix_toml(tiny_model, WORKLOAD_CONFIG, extra=extra),
                              "--gpucap-report", "rep", "--gpucap-client-procs", "2", test_src=SPLIT_RUNS)
    result.assert_outcomes(passed=1)
    lines = (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()
    recs = {r["workload"]["name"] + str(r["workload"]["client_procs"]): r
            for r in map(json.loads, lines) if r["kind"] == "workload"}
    assert set(recs) == {"split2", "B2", "single1", "B1"}
    for two, one in (("split2", "single1"), ("B2", "B1")):
        a, b = dict(recs[two]), dict(recs[one])
        for r in (a, b):
            r["workload"] = {k: v for k, v in r["workload"].items() if k != "name"}
        assert _shape(a) == _shape(b), (two, one)
    for name in ("split2", "single1"):
        m = recs[name]["metrics"]
        assert m["turns_ok"] == 12 and m["turns_failed"] == 0, m["errors"]
        assert m["completion_tokens"] == 12 * 8 == m["crosscheck"]["server_metrics_tokens"], m["crosscheck"]
    assert recs["B2"]["metrics"]["turns_ok"] > 0 and recs["B2"]["metrics"]["turns_failed"] == 0
    assert recs["B2"]["workload"]["agents"] == ["Research"] * 3


def test_client_procs_auto_and_shares() -> None:
    from pytest_gpucap.workload import procs

    assert procs.shares(7, 3) == [(0, 3), (3, 2), (5, 2)] and procs.shares(2, 4) == [(0, 1), (1, 1)]
    assert procs.resolve_procs(None, 1e6, cores=16) == 1 and procs.resolve_procs(3, None, cores=2) == 3
    assert procs.resolve_procs("auto", 30_000, cores=16) == 5  # 30k tok/s at 7k a process
    assert procs.resolve_procs("auto", 30_000, cores=2) == 1  # one core left to the server
    assert procs.resolve_procs("auto", None, cores=16) == 1


# ---------------------------------------------------------------- HTTP 503 from a loading server

LOADING_SHAPE = ModelShape(name="gpucap-load503", n_layer=6, n_embd=1536, n_head=12, n_head_kv=4, n_ff=4096)
BIGGER_LOADING_SHAPE = ModelShape(name="gpucap-load503-big", n_layer=12, n_embd=1536, n_head=12, n_head_kv=4,
                                  n_ff=4096)


def _first_answer_while_loading(binary: Path, model: Path, log: Path, extra: list[str]) -> RequestRecord:
    """Start llama-server, and the moment its port accepts, send one chat turn."""
    port = free_port()
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
            "--ctx-size", "512", "--cache-ram", "0", "--no-webui", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        async def race() -> RequestRecord:
            # The client exists before the server does, so nothing but the request itself is left to do.
            async with StreamingClient(f"http://127.0.0.1:{port}", 1, timeout_s=30) as client:
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, \
                        f"llama-server exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
                    assert time.monotonic() < deadline, "llama-server never opened its port"
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        await asyncio.sleep(0.01)
                        continue
                    writer.close()
                    break
                rec = RequestRecord(agent=0, role="early", turn=0, scheduled=time.monotonic())
                return await client.chat(rec, [{"role": "user", "content": "hello"}], max_tokens=4)

        return asyncio.run(race())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_http_503_while_the_server_loads_its_model(llama_server_bin: Path, model_cache: Path,
                                                   tmp_path: Path) -> None:
    """HTTP 503 from a real server. llama-server never answers 503 when its slots are full (it
    queues the request until a slot frees up), but it opens its HTTP port before the model is loaded
    and answers every API call with 503 ``{"error": {"message": "Loading model"}}`` until it is
    ready — what agents see from a server that is (re)starting under them. A ~300 MB model read
    without mmap (``--load-mode none``) keeps that window open for most of a second; the request
    goes out as soon as the port accepts, and must be recorded as status 503, error class http_5xx,
    with the server's message kept. Should the window be missed, it retries, then with a bigger model.
    """
    attempts = [(LOADING_SHAPE, ["--load-mode", "none"]), (LOADING_SHAPE, ["--load-mode", "none"]),
                (BIGGER_LOADING_SHAPE, ["--load-mode", "none"])]
    seen = []
    for shape, extra in attempts:
        model = ensure_model(shape, model_cache)
        rec = _first_answer_while_loading(llama_server_bin, model, tmp_path / "server.log", extra)
        if rec.status != 200:
            break
        seen.append(f"{shape.name} {' '.join(extra)}: answered 200, the model was already loaded")
    else:
        pytest.fail("never caught llama-server while loading:\n" + "\n".join(seen))
    assert rec.status == 503, (rec.status, rec.error, rec.detail)
    assert rec.error is ErrorClass.HTTP_5XX
    assert "Loading model" in rec.detail
    assert not rec.ok and rec.first_content is None and rec.completion_tokens is None


# ---------------------------------------------------------------- malformed SSE chunk (stub)

GOOD_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
LAST_CHUNK = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
              b'data: {"choices":[],"usage":{"completion_tokens":2,"prompt_tokens":5,"total_tokens":7}}\n\n')
STUB_STREAMS = {
    "well_formed": GOOD_CHUNK + GOOD_CHUNK + LAST_CHUNK + b"data: [DONE]\n\n",
    "bad_json": GOOD_CHUNK + b"data: {not json\n\n" + b"data: [DONE]\n\n",
    "no_data_prefix": GOOD_CHUNK + b'{"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n' + b"data: [DONE]\n\n",
    "bad_usage_json": GOOD_CHUNK + b'data: {"choices":[],"usage":{"completion_tokens":}}\n\n' + b"data: [DONE]\n\n",
    "no_done": GOOD_CHUNK + GOOD_CHUNK,
}


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = STUB_STREAMS[self.path.strip("/").split("/")[0]]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(0, len(body), 7):  # small writes: the client must reassemble split events
            self.wfile.write(body[i:i + 7])
            self.wfile.flush()
        # HTTP/1.0 without Content-Length: closing the socket ends the body

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sse_stub() -> Iterator[str]:
    """A stdlib HTTP server on 127.0.0.1 that streams canned SSE bodies; stopped in the finalizer."""
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{stub.server_address[1]}"
    finally:
        stub.shutdown()
        stub.server_close()
        thread.join(timeout=10)


def _chat_via_stub(base: str, case: str) -> RequestRecord:
    async def one() -> RequestRecord:
        async with StreamingClient(f"{base}/{case}", 1, timeout_s=10) as client:
            rec = RequestRecord(agent=0, role="stub", turn=0, scheduled=time.monotonic())
            return await client.chat(rec, [{"role": "user", "content": "hi"}], max_tokens=2)
    return asyncio.run(one())


@pytest.mark.parametrize("case, error, detail", [
    ("bad_json", ErrorClass.MALFORMED, "{not json"),
    ("no_data_prefix", ErrorClass.MALFORMED, '{"choices"'),
    ("bad_usage_json", ErrorClass.MALFORMED, '"completion_tokens":}'),
    ("no_done", ErrorClass.STREAM_CUT, "without [DONE]"),
])
def test_malformed_sse_chunk(sse_stub: str, case: str, error: ErrorClass, detail: str) -> None:
    """This stub exists only to inject a fault a real server cannot be made to produce: a broken SSE
    event after a good one (invalid JSON, a line without the ``data: `` prefix, a usage chunk that
    does not parse, a stream that ends without ``[DONE]``). Each is recorded with its class, not raised.
    """
    rec = _chat_via_stub(sse_stub, case)
    assert rec.status == 200
    assert rec.error is error, (rec.error, rec.detail)
    assert detail in rec.detail
    assert rec.first_content is not None  # the good chunk before the fault was seen
    assert not rec.ok


def test_the_stub_itself_streams_a_well_formed_reply(sse_stub: str) -> None:
    """Control for the stub: its framing is fine, so the faults above are the injected ones."""
    rec = _chat_via_stub(sse_stub, "well_formed")
    assert rec.ok, (rec.error, rec.detail)
    assert (rec.completion_tokens, rec.prompt_tokens, rec.finish_reason) == (2, 5, "length")
    assert len(rec.chunk_times) == 4


# ---------------------------------------------------------------- SLO breach through the plugin

SLO_BREACH = '''
import pytest


@pytest.mark.gpucap_slo(min_agg_tps=1e9, p95_s={"Research": 0.001})
def test_workflow_b(gpucap_workload):
    gpucap_workload.workflow("B").assert_slos()
'''


def test_slo_breach_fails_with_one_line_per_breach(capacity_run: CapacityRun, tiny_model: Path) -> None:
    extra = """
        [profiles.cpu.workload]
        duration_s = 60
        token_scale = 0.01
    """
    result = capacity_run.run(matrix_toml(tiny_model, WORKLOAD_CONFIG, extra=extra), "--gpucap-duration", "2",
                              "--gpucap-report", "rep", test_src=SLO_BREACH)
    result.assert_outcomes(failed=1)
    out = result.stdout.str() + result.stderr.str()
    assert "SLO breached for cpu-n3-ctx2k-f16 B:" in out
    result.stdout.fnmatch_lines([
        "*SLO breached for cpu-n3-ctx2k-f16 B:",
        "*Research p95 turn latency: measured * s, budget <= 0.001 s, margin -* s ?BREACH?",
        "*aggregate tokens/s: measured * tok/s, budget >= 1e+09 tok/s, margin -* tok/s ?BREACH?",
    ])
    assert out.count("[BREACH]") == 2
    assert "Traceback" not in out
    for module in ("slo.py", "harness.py", "runner.py", "plugin.py", "client.py"):
        assert f"pytest_gpucap/{module}" not in out and f"{module}:" not in out, module
    # passing figures are recorded next to the breaches
    (rec,) = [json.loads(ln) for ln in (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()]
    assert rec["outcome"] == "failed" and rec["workload"]["duration_s"] == 2
    states = {v["name"]: v for v in rec["verdicts"]}
    assert set(states) >= {"Research p95 turn latency", "aggregate tokens/s"}
    assert rec["metrics"]["turns_ok"] > 0


# ---------------------------------------------------------------- the agent-connection ramp

def test_raise_nofile_reports_the_limits(restore_nofile: None) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft + 16 if hard == resource.RLIM_INFINITY else min(soft + 16, hard)
    got = runner.raise_nofile(target)
    assert got == {"soft_before": soft, "hard": hard, "soft_after": target}
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == target
    assert runner.raise_nofile(8)["soft_after"] == target  # never lowered


def test_ramp_steps() -> None:
    assert runner.ramp_steps(1, 8) == [1, 2, 4, 8]
    assert runner.ramp_steps(1, 2048)[-3:] == [512, 1024, 2048]
    assert runner.ramp_steps(1, 12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("context_tokens", [0, 128], ids=["light", "context-heavy"])
def test_ramp_to_a_ceiling_of_8(server: ServerHandle, cpt: float, restore_nofile: None, context_tokens: int) -> None:
    """N agents at once, each with its own connection, N = 1, 2, 4, 8: all clean on an 8-slot server."""
    settings = Workload(ramp_ceiling=8, ramp_max_tokens=8, ramp_context_tokens=context_tokens, request_timeout_s=60)
    lines: list[str] = []
    ramp = runner.run(ramps.run_ramp(server.url, settings, cpt, lambda: (123.0, None), progress=lines.append))
    steps = ramp["steps"]
    assert [s["n"] for s in steps] == [1, 2, 4, 8]
    for step in steps:
        assert step["ok"] == step["n"] and step["errors"] == 0 and step["breach"] is None, step
        assert step["error_classes"] == {}
        assert 0 < step["create_p50_s"] <= step["ttft_p50_s"] <= step["turn_p50_s"]
        assert step["turn_p50_s"] <= step["turn_p95_s"]
        assert step["server_rss_mib"] == 123.0
    assert ramp["max_clean_n"] == 8 and ramp["aborted"] is None
    nofile = ramp["nofile"]
    assert set(nofile) == {"soft_before", "hard", "soft_after"}
    assert nofile["soft_after"] >= min(2 * 8 + 256, nofile["hard"]) and nofile["soft_after"] >= nofile["soft_before"]
    assert len(lines) == 5 and lines[3].startswith("ramp N=8: ok 8, errors 0")
    assert ramp["limit"] == "none" and lines[-1].startswith("ramp limit: none: none up to 8 agents")


def test_ramp_stops_at_the_first_breach(server: ServerHandle, restore_nofile: None) -> None:
    settings = Workload(ramp_ceiling=8, ramp_max_tokens=8, request_timeout_s=60)
    ramp = runner.run(ramps.run_ramp(server.url, settings, 3.5, lambda: (None, None), p95_budget_s=1e-6))
    (step,) = ramp["steps"]
    assert step["n"] == 1 and step["ok"] == 1
    assert step["breach"].startswith("turn p95 ") and step["breach"].endswith("> budget 0.00 s")
    assert ramp["max_clean_n"] == 0


def test_ramp_stops_when_aborted(server: ServerHandle, restore_nofile: None) -> None:
    settings = Workload(ramp_ceiling=8, ramp_max_tokens=4, request_timeout_s=60)
    calls = iter([None, "server died"])
    ramp = runner.run(ramps.run_ramp(server.url, settings, 3.5, lambda: (None, None), abort=lambda: next(calls)))
    assert [s["n"] for s in ramp["steps"]] == [1]
    assert ramp["aborted"] == "server died" and ramp["max_clean_n"] == 1


# ---------------------------------------------------------------- fixed concurrency, RTT, prefix cache

def test_injected_rtt_adds_to_ttft(server: ServerHandle, cpt: float) -> None:
    """``rtt_s`` delays every request by that much before it is sent; TTFT counts from the schedule,
    so the TTFT p50 of a run with 0.2 s RTT is ~0.2 s above the same run without (margin for noise)."""
    def run(rtt: float) -> tuple[float, list[RequestRecord]]:
        settings = Workload(duration_s=60, rtt_s=rtt, request_timeout_s=60)
        res = runner.run(runner.run_fixed(server.url, 2, 8, 16, 4, cpt, settings))
        m = res.summary()
        assert m["turns_ok"] == 8, m["errors"]
        return m["ttft_s"]["p50"], res.records

    base, _ = run(0.0)
    delayed, records = run(0.2)
    assert all(r.sent - r.scheduled >= 0.2 for r in records)  # the injected delay itself
    assert delayed - base >= 0.2 * 0.75, (base, delayed)
    assert delayed - base < 1.5, (base, delayed)


def test_turns_cut_during_their_rtt_are_cancelled_not_failed() -> None:
    """The deadline falls while every request still waits out its injected RTT: those turns are
    counted as cut at the deadline, not as failures (nothing is listening: none was ever sent)."""
    settings = Workload(duration_s=0.3, rtt_s=5.0, request_timeout_s=10)
    t0 = time.monotonic()
    res = runner.run(runner.run_fixed(f"http://127.0.0.1:{free_port()}", 4, 4, 16, 4, 3.5, settings))
    assert time.monotonic() - t0 < 4
    m = res.summary()
    assert m["cut_at_deadline"] == 4 and m["turns_failed"] == 0 and m["error_rate"] == 0.0
    assert all(r.error is ErrorClass.CANCELLED and r.sent == 0.0 for r in res.records)


def test_fixed_concurrency_with_a_shared_prefix_reports_cache_hits(server: ServerHandle, cpt: float) -> None:
    """Every request starts with the same 200-token system prompt: the slot's cache serves it."""
    settings = Workload(duration_s=60, request_timeout_s=60)
    res = runner.run(runner.run_fixed(server.url, 1, 4, 16, 4, cpt, settings, shared_prefix_tokens=200))
    m = res.summary()
    assert m["turns_ok"] == 4 and m["completion_tokens"] == 16, m["errors"]
    assert m["prefix_cache_hit_rate"] is not None and m["prefix_cache_hit_rate"] > 0.5
    assert res.server_metrics_after["llamacpp:tokens_predicted_total"] - \
        res.server_metrics_before.get("llamacpp:tokens_predicted_total", 0) == 16


def test_poisson_arrivals_are_seeded_and_counted_from_arrival(server: ServerHandle, cpt: float) -> None:
    """Open-loop load: each request is scheduled at its seeded exponential arrival time, not when a
    previous one returned, so the schedules of two runs with one seed agree and latency starts there."""
    settings = Workload(duration_s=60, request_timeout_s=60, seed=3)

    def arrivals(res: runner.RunResult) -> list[float]:
        return [r.scheduled - res.started for r in sorted(res.records, key=lambda r: r.agent)]

    first = runner.run(runner.run_poisson(server.url, 4.0, 8, 16, 4, cpt, settings))
    m = first.summary()
    assert m["turns_ok"] == 8 and m["completion_tokens"] == 32, m["errors"]
    times = arrivals(first)
    assert times == sorted(times) and times[0] > 0 and len(set(times)) == 8
    assert all(r.sent >= r.scheduled and r.ttft_s is not None and r.ttft_s > 0 for r in first.records)
    again = runner.run(runner.run_poisson(server.url, 4.0, 8, 16, 4, cpt, settings))
    assert arrivals(again) == pytest.approx(times, abs=1e-3)


def test_client_procs_option(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_gpucap.options import resolve_settings

    monkeypatch.delenv("GPUCAP_CLIENT_PROCS", raising=False)
    assert resolve_settings(pytester.parseconfig()).client_procs is None
    assert resolve_settings(pytester.parseconfig("--gpucap-client-procs", "3")).client_procs == 3
    monkeypatch.setenv("GPUCAP_CLIENT_PROCS", "AUTO")
    assert resolve_settings(pytester.parseconfig()).client_procs == "auto"
    for bad in ("0", "two", "1.5"):
        with pytest.raises(pytest.UsageError, match="--gpucap-client-procs must be a whole number >= 1 or auto"):
            resolve_settings(pytester.parseconfig("--gpucap-client-procs", bad))
