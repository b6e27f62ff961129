"""The capacity search on every SLO: the space from the matrix, probes judged on all SLOs, the boundary
and binding SLO, goodput as an SLO, and which known results the all-SLO search may trust.

Pure tests drive the search with a fake ``evaluate`` that fails named verdicts; the real ones boot
llama-server on the tiny generated model (a probe with a short workflow; the shipped suite in a child
session on a matrix with no ``cpu`` profile; goodput failing a test).
"""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucap.backends import LaunchSpec
from pytest_gpucap.matrix import SLO, CapacityConfig, HostProfile, MatrixError, Workload, parse_matrix, slo_from_mapping
from pytest_gpucap.records import SearchRecord, WorkloadMetrics, parse
from pytest_gpucap.report.tables import search_boundary_table
from pytest_gpucap.search import Outcome, SearchSpace, grid_search, search_capacity
from pytest_gpucap.search_boot import boot_and_check
from pytest_gpucap.search_checks import ERROR_PREFIX, probe_checks, run_checks
from pytest_gpucap.search_known import known_outcomes
from pytest_gpucap.verdicts import good_turn, goodput, workload_verdicts
from pytest_gpucap.workload.client import RequestRecord
from pytest_gpucap.workload.roles import roles_from_matrix

from conftest import REPO, CapacityRun, matrix_toml

BASE = CapacityConfig(profile="cpu", n=1, ctx=1024, threads=1, cache_ram_mib=0, flash_attn="on")
SPACE = SearchSpace(ns=(1, 2, 3, 4, 6, 8, 12, 16), ctxs=(1024, 2048, 4096, 8192), cache_types=("f16", "q8_0"))


class Named:
    """A monotone fake with two SLOs: memory (N x ctx <= budget) and a role's latency (N <= max_n)."""

    def __init__(self, budget: int, max_n: int) -> None:
        self.budget, self.max_n, self.calls = budget, max_n, 0

    def __call__(self, cfg: CapacityConfig) -> Outcome:
        self.calls += 1
        failed = tuple(name for name, bad in (("headroom", cfg.n * cfg.ctx > self.budget),
                                              ("Dev p95 turn latency", cfg.n > self.max_n)) if bad)
        return Outcome(not failed, reason="; ".join(failed) or "ok",
                       verdicts=tuple(f"{f}: measured x, budget y [BREACH]" for f in failed), failed=failed)


# ---------------------------------------------------------------- the space from the matrix

def _matrix(search: str, profile: str = "lab") -> Any:
    import tomllib

    return parse_matrix(tomllib.loads(textwrap.dedent(f"""
        [profiles.{profile}]
        model = "generated:tiny"
        [profiles.{profile}.defaults]
        threads = 1
        """) + textwrap.dedent(search)), None)


def test_search_table_in_the_matrix() -> None:
    m = _matrix("""
        [profiles.lab.search]
        ns = [4, 1, 2]
        ctxs = [2048]
        cache_types = ["f16", "q8_0"]
        mmproj = [false, true]
        base = { batch_size = 256 }
        prune = "slo"
        probe = { workflow = "B", duration_s = 2 }
        """)
    decl = m.searches["lab"]
    assert (decl.ns, decl.ctxs, decl.cache_types, decl.mmproj) == ((4, 1, 2), (2048,), ("f16", "q8_0"), (False, True))
    assert decl.base.threads == 1 and decl.base.batch_size == 256 and (decl.base.n, decl.base.ctx) == (1, 2048)
    assert decl.prune == "slo" and decl.probe.workflow == "B" and decl.probe.duration_s == 2.0
    assert decl.grid_size == 12 and decl.boot_budget == 4  # a third of the grid without max_boots
    assert _matrix("").searches == {}


@pytest.mark.parametrize("search, message", [
    ("ns = [1]", "needs ns (slots) and ctxs"),
    ("ns = [0]\nctxs = [1024]", "ns must be a non-empty list of positive integers"),
    ("ns = [1]\nctxs = [1024]\ncache_types = ['f17']", "cache_types must be a non-empty list"),
    ("ns = [1]\nctxs = [1024]\nprune = 'maybe'", "prune must be one of fit, slo, none"),
    ("ns = [1]\nctxs = [1024]\nbase = { n = 2 }", "base sets n, which the search varies"),
    ("ns = [1]\nctxs = [1024]\nprobe = { duration_s = -1 }", "probe.duration_s must be"),
    ("ns = [1]\nctxs = [1024]\nwhatever = 1", "unknown key 'whatever'"),
])
def test_search_table_mistakes_are_one_line(search: str, message: str) -> None:
    with pytest.raises(MatrixError, match=re.escape(message)) as exc:
        _matrix("[profiles.lab.search]\n" + search)
    assert "profiles.lab.search" in str(exc.value) and "\n" not in str(exc.value)


def test_min_goodput_is_a_share() -> None:
    assert slo_from_mapping({"min_goodput": 0.9, "tpot_p95_s": 0.5}, "x").min_goodput == 0.9
    with pytest.raises(MatrixError, match="min_goodput is a share of turns"):
        slo_from_mapping({"min_goodput": 90}, "x")


# ---------------------------------------------------------------- boundary and binding SLO

def test_boundary_names_the_binding_slo_on_each_axis() -> None:
    """Latency binds N (fails above N=4), memory binds ctx: the boundary says which failed where."""
    fake = Named(budget=16384, max_n=4)
    grid = grid_search(BASE, SPACE, Named(16384, 4))
    result = search_capacity(BASE, SPACE, fake)
    assert result.knee is not None and result.knee.id == grid.knee.id == "cpu-n4-ctx4k-f16"
    assert result.boots == fake.calls <= SPACE.size / 3, result.table()
    f16 = {b.axis: b for b in result.boundary if b.family == "f16"}
    assert (f16["n"].last_pass, f16["n"].first_fail) == ("cpu-n4-ctx4k-f16", "cpu-n6-ctx4k-f16")
    # N=6 failed latency at 1K (booted), so it fails at 4K too (inferred): latency binds N, memory binds ctx
    assert f16["n"].binding_slo == "Dev p95 turn latency" and f16["n"].first_fail_status == "inferred-fail"
    assert (f16["ctx"].last_pass, f16["ctx"].first_fail) == ("cpu-n4-ctx4k-f16", "cpu-n4-ctx8k-f16")
    assert f16["ctx"].binding_slo == "headroom"
    assert result.binding_slo == f16["n"].binding_slo
    record = parse(SearchRecord.of("t", "cpu", result.as_dict()).to_dict())
    assert record.binding_slo == result.binding_slo and len(record.boundary) == 4
    assert record.boundary[0].failed_verdicts and "bound by" in record.summary_line()
    table = search_boundary_table(record)
    assert len(table.rows) == 4 and "cpu-n6-ctx4k-f16" in str(table.rows)


def test_latency_alone_binds_n() -> None:
    """With memory plentiful, the first fail above the knee on N failed the latency SLO only."""
    space = SearchSpace(ns=(1, 2, 4, 8, 16), ctxs=(1024, 2048))
    result = search_capacity(BASE, space, Named(budget=10**9, max_n=4))
    n_axis = next(b for b in result.boundary if b.axis == "n")
    assert (n_axis.last_pass, n_axis.first_fail, n_axis.binding_slo) == (
        "cpu-n4-ctx2k-f16", "cpu-n8-ctx2k-f16", "Dev p95 turn latency")
    assert result.binding_slo == "Dev p95 turn latency"
    ctx_axis = next(b for b in result.boundary if b.axis == "ctx")
    assert ctx_axis.first_fail is None and ctx_axis.binding_slo is None  # ctx ends at the grid edge


def test_boot_budget_stops_and_says_so() -> None:
    result = search_capacity(BASE, SPACE, Named(10**9, 10**6), max_boots=1)
    assert result.boots == 1 and result.stopped_early and result.as_dict()["max_boots"] == 1
    assert "stopped at the 1-boot budget" in result.table()


# ---------------------------------------------------------------- known results and the all-SLO search

def _ceiling(cid: str, free: float) -> dict[str, Any]:
    return {"kind": "ceiling", "config_id": cid, "memory": {"free_mib": free},
            "verdicts": [{"name": "headroom", "measured": free / 1024, "budget": 0.5, "ok": free >= 512}]}


def _workload(cid: str, name: str, agg_tps: float, good: float) -> dict[str, Any]:
    return {"kind": "workload", "config_id": cid, "workload": {"name": name, "agents": ["Dev"]},
            "metrics": {"agg_tps": agg_tps, "per_call_tps": agg_tps, "turns_ok": 4, "turns_failed": 0,
                        "ttft_s": {}, "e2e_s": {}, "roles": {},
                        "goodput": {"good_turns": 4, "finished_turns": 4, "fraction": good}}}


def test_headroom_only_passes_are_not_trusted_by_the_all_slo_search() -> None:
    slo = SLO(headroom_gib=0.5, min_agg_tps=10, min_goodput=0.9)
    records = [_ceiling("a", 2048), _ceiling("b", 100), _ceiling("c", 2048), _workload("c", "A", 50, 1.0),
               _ceiling("d", 2048), _workload("d", "A", 50, 0.5), _ceiling("e", 2048), _workload("e", "B", 50, 1.0)]
    headroom_only = known_outcomes(records, slo=slo)
    assert headroom_only["a"].passed and headroom_only["e"].passed
    every = known_outcomes(records, slo=slo, needs_workload="A")
    assert "a" not in every and "e" not in every  # a pass on headroom (or another workflow) alone: boot it
    assert not every["b"].passed and every["b"].failed == ("headroom",)  # a fail is a fail on every SLO
    assert every["c"].passed
    assert not every["d"].passed and every["d"].failed == ("goodput",)  # re-judged against min_goodput
    old = _workload("f", "A", 50, 1.0)
    del old["metrics"]["goodput"]  # recorded before goodput was: no evidence for or against min_goodput
    assert "f" not in known_outcomes([_ceiling("f", 2048), old], slo=slo, needs_workload="A")


# ---------------------------------------------------------------- goodput as an SLO

def _turn(role: str, e2e: float, ttft: float, tokens: int = 11, error: Any = None) -> RequestRecord:
    return RequestRecord(agent=0, role=role, turn=0, scheduled=0.0, sent=0.0, first_content=ttft, end=e2e,
                         completion_tokens=tokens, error=error)


def test_goodput_counts_turns_within_ttft_tpot_and_e2e() -> None:
    slo = SLO(p95_s=(("Dev", 10.0),), ttft_p95_s=1.0, tpot_p95_s=0.2, min_goodput=0.75)
    turns = [_turn("Dev", 3.0, 0.5),    # tpot (3 - 0.5) / 10 = 0.25 > 0.2: not good
             _turn("Dev", 2.0, 0.5),    # good
             _turn("Dev", 12.0, 0.5, tokens=200),  # E2E over the role budget
             _turn("QA", 1.5, 1.2)]     # TTFT over budget
    assert [good_turn(t, slo) for t in turns] == [False, True, False, False]
    g = goodput(turns, slo)
    assert (g["good_turns"], g["finished_turns"], g["fraction"]) == (1, 4, 0.25)
    metrics = WorkloadMetrics.from_dict({"agg_tps": 1.0, "per_call_tps": 1.0, "turns_ok": 4, "turns_failed": 0,
                                         "ttft_s": {}, "e2e_s": {}, "roles": {}, "goodput": g})
    verdict = next(v for v in workload_verdicts(metrics, slo) if v.name == "goodput")
    assert not verdict.ok and verdict.measured == 0.25 and verdict.budget == 0.75
    assert next(v for v in workload_verdicts(metrics, replace(slo, min_goodput=0.25)) if v.name == "goodput").ok
    assert not any(v.name == "goodput" for v in workload_verdicts(metrics, replace(slo, min_goodput=None)))


GOODPUT_TEST = '''
import pytest

@pytest.mark.gpucap_slo(ttft_p95_s=0.000001, min_goodput=0.5)
def test_goodput_gate(gpucap_workload):
    result = gpucap_workload.fixed(concurrency=1, n_requests=3, max_tokens=4)
    assert result.metrics["turns_ok"] == 3
    result.assert_slos()
'''


def test_goodput_fails_a_test(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """A real short load with an impossible TTFT budget: every turn finishes, none is good, the test fails
    on goodput (and its record holds the goodput verdict)."""
    result = capacity_run.run(matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n"),
                              "--gpucap-report", "rep", test_src=GOODPUT_TEST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*goodput*measured 0*"])
    import json

    recs = [json.loads(line) for line in (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()]
    work = next(r for r in recs if r["kind"] == "workload")
    assert work["metrics"]["goodput"]["fraction"] == 0 and work["slo"]["min_goodput"] == 0.5
    assert any(v["name"] == "goodput" and not v["ok"] for v in work["verdicts"])


# ---------------------------------------------------------------- real probes

PROFILE = HostProfile(name="cpu", memory_gib=2.0, hold_s=0.2, boot_timeout_s=60,
                      workload=Workload(duration_s=2, token_scale=0.01, cadence_scale=0.02, max_turns=2))


def test_a_probe_is_judged_on_every_slo(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A real probe fits (headroom passes) but runs workflow A too slowly for a throughput SLO: it fails,
    its failed verdict is named, and the probe's workload record went to the sink."""
    def spec(cfg: CapacityConfig) -> LaunchSpec:
        return LaunchSpec(config=cfg, profile=PROFILE, log_dir=tmp_path, command=(str(llama_server_bin),),
                          model=tiny_model, boot_timeout_s=60, hold_s=0.2)

    sink: list[dict[str, Any]] = []
    checks = probe_checks("A", 2.0, PROFILE.workload, roles_from_matrix({}), {}, "t", sink.append)
    slo = SLO(headroom_gib=0.1, min_agg_tps=1e9)
    outcome = boot_and_check(BASE, spec, checks=checks, slo=slo)
    assert not outcome.passed and outcome.failed == ("aggregate tokens/s",), outcome.reason
    assert [v.endswith("[ok]") for v in outcome.verdicts if v.startswith("headroom")] == [True]  # it fits
    assert [r["kind"] for r in sink] == ["workload"] and sink[0]["workload"]["name"] == "A"
    relaxed = boot_and_check(BASE, spec, checks=checks, slo=replace(slo, min_agg_tps=None, min_goodput=0.0))
    assert relaxed.passed and any(v.startswith("goodput") for v in relaxed.verdicts), relaxed.reason


def test_a_check_that_raises_fails_the_probe_with_its_name() -> None:
    def boom(handle: Any, slo: SLO) -> list[Any]:
        raise RuntimeError("server went away")

    verdicts = run_checks([boom], None, SLO())  # type: ignore[arg-type]
    assert len(verdicts) == 1 and not verdicts[0].ok
    assert verdicts[0].name.startswith(f"{ERROR_PREFIX} (boom): server went away")


LAB = """
    [profiles.lab.workload]
    duration_s = 2
    token_scale = 0.01
    cadence_scale = 0.02
    max_turns = 2
    [[profiles.lab.configs]]
    n = 1
    ctx = 1024
    [profiles.lab.search]
    ns = [1, 2, 4]
    ctxs = [1024, 2048]
    max_boots = 2
    probe = { workflow = "A", duration_s = 2 }
"""


def test_shipped_suite_runs_on_a_matrix_without_cpu(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """``pytest capacity_tests --gpucap-matrix OTHER.toml -m lab``: the shipped suite collects on a matrix
    whose only profile is ``lab`` (it used to stop at collection on ``@pytest.mark.cpu``), runs the
    search the matrix declares, and records it with its boot count and binding SLO."""
    suite = capacity_run.pytester.path / "capacity_tests"
    suite.mkdir()
    for src in (REPO / "capacity_tests").glob("*.py"):
        shutil.copy(src, suite / src.name)
    matrix = matrix_toml(tiny_model, LAB, profile="lab")
    result = capacity_run.run(matrix, "capacity_tests", "-m", "lab", "--gpucap-report", "rep", "-v", timeout=300)
    out = result.stdout.str()
    assert "not found in `markers`" not in out and "error" not in result.parseoutcomes(), out[-3000:]
    result.stdout.fnmatch_lines(["*test_ceiling.py::test_ceiling?lab-n1-ctx1k-f16? PASSED*"])
    result.stdout.fnmatch_lines(["*test_search.py::test_capacity_knee?lab-search? PASSED*"])
    import json

    recs = [json.loads(line) for line in (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()]
    search = next(r for r in recs if r["kind"] == "search")
    assert search["profile"] == "lab" and 1 <= search["boots"] <= 2 and search["max_boots"] == 2
    assert search["probe_workload"] == {"workflow": "A", "duration_s": 2.0}
    assert "binding_slo" in search and len(search["boundary"]) == 2
    probes = [r for r in recs if r.get("search_probe")]
    assert {r["kind"] for r in probes} == {"ceiling", "workload"}


MARKED_SEARCH = '''
import pytest

@pytest.mark.gpucap_slo(min_agg_tps=1e9)
def test_knee(gpucap_search):
    result = gpucap_search.run()
    assert result.knee is None, result.table()
'''


def test_a_gpucap_slo_marker_reaches_the_search_probes(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """A search test's ``gpucap_slo`` marker is part of the SLO its probes are judged on: with an
    impossible throughput budget on the marker (the matrix sets none), the first probe fits but fails on
    aggregate tokens/s, so the search finds no knee and names that SLO."""
    matrix = matrix_toml(tiny_model, LAB, profile="lab")
    result = capacity_run.run(matrix, "-m", "lab", "--gpucap-report", "rep", test_src=MARKED_SEARCH, timeout=300)
    result.assert_outcomes(passed=1)
    import json

    recs = [json.loads(line) for line in (capacity_run.pytester.path / "rep" / "results.jsonl").read_text().splitlines()]
    search = next(r for r in recs if r["kind"] == "search")
    assert search["knee"] is None and search["boots"] >= 1
    work = [r for r in recs if r.get("search_probe") and r["kind"] == "workload"]
    assert work and all(r["slo"]["min_agg_tps"] == 1e9 for r in work)
    assert any(v["name"] == "aggregate tokens/s" and not v["ok"] for r in work for v in r["verdicts"])
