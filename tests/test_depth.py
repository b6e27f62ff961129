"""The depth sweep against a real llama-server on the tiny generated model: prompt lengths from the
server's tokenizer, a fresh cache per depth, the record's shape and the depth SLO verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from pytest_gpucap.backends import ServerHandle
from pytest_gpucap.budgets import SLO
from pytest_gpucap.depth import DEPTH_RATIO_VERDICT, depth_sweep, depth_verdicts
from pytest_gpucap.matrix import CapacityConfig
from pytest_gpucap.records import parse, read_jsonl
from pytest_gpucap.record_depth import DepthRecord
from pytest_gpucap.workload.depth import decode_ratio, fit_text, target_tokens

from conftest import CapacityRun, matrix_toml, plugin_server

CTX = 2048


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    cfg = CapacityConfig(profile="cpu", n=1, ctx=CTX, threads=2, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("depth-logs")) as handle:
        yield handle


def test_a_sweep_fills_each_depth_with_what_was_asked_and_no_cached_prefix(server: ServerHandle) -> None:
    records: list[dict] = []
    result = depth_sweep(server, SLO(min_depth_ratio=0.01), "t::depth", records.append, max_tokens=8)
    assert records == [result.record]
    typed = parse(result.record)
    assert isinstance(typed, DepthRecord) and typed.to_dict() == result.record
    assert [p.depth_pct for p in typed.points] == [0, 25, 50, 75, 95]
    for p in typed.points:
        assert p.error is None and p.completion_tokens == 8
        assert p.prompt_tokens is not None and abs(p.prompt_tokens - p.asked_tokens) <= 1, p
        assert (p.cached_tokens or 0) == 0, p  # a fresh fill: prefill measured over the whole prompt
        assert p.prefill_tps and p.decode_tps and p.ttft_s and p.itl_p50_s is not None
    deep = typed.points[-1]
    assert deep.asked_tokens == round(0.95 * CTX) and typed.ctx_slot == typed.swept_ctx == CTX
    assert typed.decode_ratio == pytest.approx(deep.decode_tps / typed.points[0].decode_tps)
    assert [v.name for v in result.verdicts] == [DEPTH_RATIO_VERDICT] and result.verdicts[0].ok


def test_fit_text_hits_the_target_with_a_token_counter() -> None:
    import random

    count = lambda text: len(text.split())  # noqa: E731 - a word tokenizer stands in for the server's
    text, got = fit_text("head ", 300, count, random.Random(1), chars_per_token=4.0, tail=" end")
    assert got == count(text) and abs(got - 300) <= 1 and text.startswith("head ") and text.endswith(" end")
    assert fit_text("a b c ", 1, count, random.Random(1), tail="d")[1] == 4  # the floor: head + tail


def test_target_tokens_leave_room_for_the_reply_and_keep_the_floor() -> None:
    assert target_tokens(95, 1000, 100, 20) == 892
    assert target_tokens(0, 1000, 16, 20) == 20
    assert target_tokens(50, 1000, 16, 20) == 500


def test_the_ratio_and_its_verdicts() -> None:
    pts = [{"depth_pct": 0, "decode_tps": 100.0}, {"depth_pct": 50, "decode_tps": 60.0},
           {"depth_pct": 95, "decode_tps": 25.0}, {"depth_pct": 99, "decode_tps": 1.0, "error": "timeout: x"}]
    assert decode_ratio(pts) == 0.25
    v = depth_verdicts(pts, 0.25, SLO(min_depth_ratio=0.5, min_depth_decode_tps=20))
    assert [(x.name, x.ok) for x in v] == [(DEPTH_RATIO_VERDICT, False), ("decode tok/s at the deepest depth", True)]
    assert depth_verdicts(pts, None, SLO(min_depth_ratio=0.5))[0].measured == 0.0
    assert depth_verdicts(pts, 0.25, SLO()) == []


TOO_SLOW_SUITE = '''
import pytest

def test_ceiling(gpucap_ceiling):
    gpucap_ceiling.assert_slos()

@pytest.mark.gpucap_slo(min_depth_ratio=1000.0)
def test_depth(gpucap_workload):
    gpucap_workload.depth_sweep(depths=(0, 50, 95), max_tokens=4).assert_slos()
'''


def test_a_tight_depth_slo_makes_the_config_fits_too_slow(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Memory passes, the depth ratio cannot reach 1000x: the config reads "fits, too slow" in the
    config-verdict record, the terminal summary and the write-up (not "does not fit")."""
    matrix = matrix_toml(tiny_model, """
        [[profiles.cpu.configs]]
        n = 1
        ctx = 1024
        """, extra="[profiles.cpu.workload]\ndepth_ctx_tokens = 512\n")
    result = capacity_run.run(matrix, "--gpucap-report", "rep", test_src=TOO_SLOW_SUITE)
    result.assert_outcomes(passed=1, failed=1)
    recs = read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    depth = next(r for r in recs if r["kind"] == "depth")
    assert [p["depth_pct"] for p in depth["points"]] == [0, 50, 95] and depth["swept_ctx"] == 512
    assert depth["outcome"] == "failed" and not depth["verdicts"][0]["ok"]
    verdicts = read_jsonl(capacity_run.pytester.path / "rep" / "verdicts.jsonl")
    assert not [r for r in recs if r["kind"] == "config-verdict"]  # results.jsonl: what the tests measured
    assert [(v["config_id"], v["verdict"]) for v in verdicts] == [("cpu-n1-ctx1k-f16", "fits, too slow")]
    assert "depth decode ratio" in verdicts[0]["reasons"][0]
    assert "cpu-n1-ctx1k-f16" in result.stdout.str() and "config-verdict" in result.stdout.str()
    assert any("fits, too slow: depth" in line for line in result.outlines)
    md = (capacity_run.pytester.path / "rep" / "capacity.md").read_text()
    assert "| cpu-n1-ctx1k-f16 | fits, too slow | depth: depth decode ratio" in md
    assert "Fits, too slow" in md  # the capacity map's cell
