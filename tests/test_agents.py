"""Agents as agents, against real llama-server instances on generated models: each agent's history
holds the reply the server sent, so the next turn's prompt shares the prefix the server cached; the
per-turn cache table, per-role TTFT/TPOT/ITL, and thinking turns split into first reasoning / content.

The reply decoder and the per-turn table are also checked pure, on llama-server-shaped chunks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from conftest import plugin_server

from pytest_gpucap.backends import ServerHandle
from pytest_gpucap.backends.llamacpp import build_argv
from pytest_gpucap.matrix import CapacityConfig, MatrixError, Workload, config_from_mapping
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.record_sections import WorkloadMetrics
from pytest_gpucap.workload import runner
from pytest_gpucap.workload.client import RequestRecord, decode_text
from pytest_gpucap.workload.metrics import MAX_TURN_ROWS, cache_turns, summarize
from pytest_gpucap.workload.prompts import calibrate
from pytest_gpucap.workload.roles import Role

SETTINGS = Workload(duration_s=60, max_turns=3, request_timeout_s=60, stall_s=30)
THINK_KW = '{"enable_thinking":true}'


@pytest.fixture(scope="module")
def chat_server(llama_server_bin: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Two slots of 2,048 tokens: one per agent, no host prompt cache (the slot's own cache only)."""
    cfg = CapacityConfig(profile="cpu", n=2, ctx=2048, threads=2, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("agents-logs")) as handle:
        yield handle


@pytest.fixture(scope="module")
def thinking_server(llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The tiny model with the thinking chat template, booted with the study's server flag."""
    model = ensure_model(ModelShape(name="gpucap-think", chat_template="thinking"), tmp_path_factory.mktemp("m"))
    cfg = CapacityConfig(profile="cpu", n=2, ctx=1024, threads=2, cache_ram_mib=0, chat_template_kwargs=THINK_KW)
    with plugin_server(llama_server_bin, model, cfg, tmp_path_factory.mktemp("think-logs")) as handle:
        yield handle


def _agents(handle: ServerHandle, roles: list[Role]) -> runner.RunResult:
    cpt = calibrate(handle.url)[0]
    return runner.run(runner.run_agents(handle.url, roles, SETTINGS, handle.config.ctx, cpt))


# ---------------------------------------------------------------- pure

def _chunk(delta: dict) -> bytes:
    return json.dumps({"choices": [{"index": 0, "finish_reason": None, "delta": delta}]}).encode()


def test_decode_text_joins_content_and_reasoning_and_marks_their_first_chunks() -> None:
    rec = RequestRecord(agent=0, role="Dev", turn=0, scheduled=0.0, chunk_times=[1.0, 2.0, 3.0, 4.0, 5.0])
    payloads = [_chunk({"role": "assistant", "content": None}), _chunk({"reasoning_content": "th\u00e9"}),
                _chunk({"reasoning_content": "ink"}), _chunk({"content": "a\"b"}), _chunk({"content": "\n"})]
    decode_text(payloads, rec)
    assert (rec.text, rec.reasoning_text) == ('a"b\n', "th\u00e9ink")
    assert (rec.first_reasoning, rec.first_text) == (2.0, 4.0)
    assert rec.reasoning_tokens == 2  # no usage figure: reasoning chunks counted


def test_cache_turns_aggregates_by_turn_and_caps_the_rows() -> None:
    recs = [RequestRecord(agent=a, role="Dev", turn=t, scheduled=0.0, prompt_tokens=100, cached_tokens=50 * (t > 0))
            for a in range(2) for t in range(MAX_TURN_ROWS + 5)]
    recs[3].compactions = 2
    recs.append(RequestRecord(agent=9, role="Dev", turn=1, scheduled=0.0))  # failed before usage
    rows = cache_turns(recs)
    assert len(rows) == MAX_TURN_ROWS and rows[-1]["n"] == 2 * 6
    assert rows[0] == {"turn": 0, "n": 2, "prompt_tokens": 200, "cached_tokens": 0, "compactions": 0, "hit_rate": 0.0}
    assert rows[1]["n"] == 2 and rows[1]["hit_rate"] == 0.5
    assert rows[3]["compactions"] == 2
    parsed = WorkloadMetrics.from_dict({"agg_tps": 1.0, "per_call_tps": 1.0, "turns_ok": 1, "turns_failed": 0,
                                        "ttft_s": {}, "e2e_s": {}, "roles": {}, "cache_turns": rows})
    assert [t.turn for t in parsed.cache_turns] == list(range(MAX_TURN_ROWS))
    assert parsed.to_dict()["cache_turns"] == rows


def test_chat_template_kwargs_is_a_table_passed_to_llama_server() -> None:
    cfg = config_from_mapping("cpu", {"n": 1, "ctx": 512, "chat_template_kwargs": {"enable_thinking": True}}, "m")
    assert cfg.chat_template_kwargs == THINK_KW
    argv = build_argv(Path("llama-server"), cfg, Path("m.gguf"), 8080, None)
    assert argv[argv.index("--chat-template-kwargs") + 1] == THINK_KW
    with pytest.raises(MatrixError, match="chat_template_kwargs must be a table"):
        config_from_mapping("cpu", {"n": 1, "ctx": 512, "chat_template_kwargs": "on"}, "m")


# ---------------------------------------------------------------- real servers

def test_history_holds_the_servers_reply_so_the_next_turn_hits_its_cache(chat_server: ServerHandle) -> None:
    """Turn t+1's prompt starts with turn t's prompt *and reply*: the server serves all of turn t's prompt
    and some of the reply from the slot's cache. With filler in place of the reply, only turn t's prompt
    would be cached.

    One agent at a time: llama-server skips an empty slot when it picks one by prompt similarity (over
    0.1), so a second agent whose request does not overlap the first's lands in the first agent's slot
    on the shared system prompt and evicts its cache (seen in its log: "selected slot by LCP similarity"
    while the other slot was empty). That is the server's policy, measured as it is in real runs; here
    it would make the test depend on request timing."""
    runs = [_agents(chat_server, [Role(f"Dev{i}", None, 48, 64, thinking=False)]) for i in range(2)]
    for res in runs:
        assert all(r.ok for r in res.records), [(r.error, r.detail) for r in res.records if not r.ok]
        assert sorted(r.turn for r in res.records) == [0, 1, 2]
    by = {(i, r.turn): r for i, res in enumerate(runs) for r in res.records}
    # (cached tokens of turn t+1, prompt tokens of turn t): the reply re-tokenizes differently from how
    # the random model sampled it, so the cache reaches only a few tokens into it; filler reaches none
    pairs = [(by[(a, t + 1)].cached_tokens or 0, by[(a, t)].prompt_tokens or 0) for a in range(2) for t in range(2)]
    print("cached vs previous prompt tokens:", pairs)
    assert all(cached >= prompt > 0 for cached, prompt in pairs), pairs
    assert sum(cached > prompt for cached, prompt in pairs) >= len(pairs) // 2, pairs
    summary = summarize([r for res in runs for r in res.records])
    rows = summary["cache_turns"]
    assert [r["turn"] for r in rows] == [0, 1, 2] and all(r["n"] == 2 for r in rows)
    for t in (1, 2):  # the table's rate is the turns' own, and covers at least the whole previous prompt
        cached, prompt = (sum(by[(a, t)].cached_tokens or 0 for a in range(2)),
                          sum(by[(a, t)].prompt_tokens or 0 for a in range(2)))
        previous = sum(by[(a, t - 1)].prompt_tokens or 0 for a in range(2))
        assert rows[t]["hit_rate"] == pytest.approx(cached / prompt) and rows[t]["hit_rate"] >= previous / prompt
    for role in ("Dev0", "Dev1"):
        m = summary["roles"][role]
        assert m["ttft_s"]["n"] == 3 and m["tpot_s"]["n"] == 3 and m["itl_s"]["n"] > 3
        assert m["ttft_s"]["p50"] <= m["ttft_s"]["p95"] <= m["ttft_s"]["p99"]
        assert "ttft_reasoning_s" not in m  # thinking off: no split
    assert all(r.text is None for res in runs for r in res.records)  # the reply lives in the history


def test_thinking_turns_split_ttft_into_first_reasoning_and_first_content(thinking_server: ServerHandle) -> None:
    """On a template that opens ``<think>``, llama-server streams the random reply as reasoning: the
    first reasoning token is set and the first content token is None; thinking off gives plain content.
    One agent at a time, for the slot-selection reason in the history test above."""
    assert THINK_KW in thinking_server.argv
    think = _agents(thinking_server, [Role("Research", None, 24, 48, thinking=True)]).records
    plain = _agents(thinking_server, [Role("ToolStorm", None, 24, 48, thinking=False)]).records
    assert all(r.ok for r in think + plain), [(r.error, r.detail) for r in think + plain if not r.ok]
    think, plain = sorted(think, key=lambda r: r.turn), sorted(plain, key=lambda r: r.turn)
    assert len(think) == len(plain) == 3
    assert all(r.first_reasoning is not None and r.first_text is None and r.reasoning_tokens for r in think)
    assert all(r.first_text is not None and r.first_reasoning is None and r.reasoning_tokens is None for r in plain)
    # the reasoning went back into the history, so the next thinking turn hits the cache past it
    pairs = [(b.cached_tokens or 0, a.prompt_tokens or 0) for a, b in zip(think, think[1:])]
    assert all(cached >= prompt > 0 for cached, prompt in pairs) and any(c > p for c, p in pairs), pairs
    m = WorkloadMetrics.from_dict(summarize(think + plain)).roles
    assert m["Research"].ttft_reasoning_s.n == 3 and m["Research"].ttft_content_s.n == 0
    assert m["Research"].ttft_content_s.p95 is None and m["Research"].reasoning_tokens >= 3
    assert m["ToolStorm"].ttft_reasoning_s is None and m["ToolStorm"].ttft_s.n == 3
