"""The config verdict rule, built-in workflows scaled to N, the per-config workflows key and the
allocated-context comparison: pure functions over records and matrices (no server)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pytest_gpucap.capacity_verdict import FITS, NO_FIT, NOT_MEASURED, TOO_SLOW, config_verdict, verdict_records
from pytest_gpucap.matrix import CapacityConfig, MatrixError, parse_matrix
from pytest_gpucap.record_depth import DepthPoint, DepthRecord
from pytest_gpucap.records import RecordConfig, Verdict, parse
from pytest_gpucap.report.depth import allocated_context
from pytest_gpucap.workload.roles import BUILTIN_ROLES, scaled_names, workflow_roles

from test_report import ceiling, unmeasured, workload


def depth(cfg_id: str, n: int, ctx: int, shallow: float, deep: float, verdicts: tuple[Verdict, ...] = ()) -> DepthRecord:
    cfg = CapacityConfig(profile="4090", n=n, ctx=ctx, cache_type_k="q8_0", cache_type_v="q8_0", mmproj=False)
    return DepthRecord.from_dict({"schema": 1, "kind": "depth", "test": "t", "config_id": cfg_id, "profile": "4090",
                               "config": RecordConfig.of(cfg).to_dict(), "host": None, "server": {}, "boot_s": 1.0,
                               "points": [{"depth_pct": 0, "decode_tps": shallow}, {"depth_pct": 95, "decode_tps": deep}],
                               "decode_ratio": deep / shallow, "slo": {}, "outcome": "passed",
                               "verdicts": [v.to_dict() for v in verdicts]})


RATIO_BREACH = Verdict("depth decode ratio (deepest ÷ shallowest)", 0.08, 0.25, "x")


def test_memory_passes_and_a_speed_slo_fails_is_fits_too_slow() -> None:
    c = ceiling(3, 262144, 20000.0, 3000.0, 10.0, mmproj=False)
    cid = c.config_id
    assert config_verdict([c]).verdict == FITS
    slow = replace(depth(cid, 3, 262144, 40.0, 3.2, (RATIO_BREACH,)), config_id=cid)
    v = config_verdict([c, slow])
    assert v.verdict == TOO_SLOW and v.reasons == ("depth: depth decode ratio (deepest ÷ shallowest) 0.08 x below "
                                                   "budget 0.25 x",)
    wl = workload(cid, 3, 262144, "A", ["TL", "Dev", "QA"], 61.0, 20.0, (80.0, 120.0), 3000.0, (30, 0))
    assert config_verdict([c, wl]).verdict == TOO_SLOW  # agg tok/s 61 under its budget of 100
    assert any("aggregate" in r or "agg" in r for r in config_verdict([c, wl]).reasons)


def test_memory_breach_is_does_not_fit_and_no_record_is_not_measured() -> None:
    tight = ceiling(3, 262144, 23000.0, 300.0, 10.0, mmproj=False)  # 0.3 GiB free, budget 1.5
    assert config_verdict([tight, depth(tight.config_id, 3, 262144, 40.0, 3.2, (RATIO_BREACH,))]).verdict == NO_FIT
    boot = unmeasured("ceiling", "4090-n9", "failed", "ServerError: out of memory", "t")
    assert config_verdict([boot]).verdict == NO_FIT
    assert config_verdict([unmeasured("ceiling", "4090-n9", "skipped", "not enough RAM", "t")]).verdict == NOT_MEASURED
    only_depth = config_verdict([depth("x", 3, 65536, 40.0, 30.0)])
    assert only_depth.verdict == NOT_MEASURED and "memory not judged" in only_depth.reasons[0]


def test_one_verdict_record_per_config_round_trips() -> None:
    a, b = ceiling(3, 65536, 20000.0, 3000.0, 10.0), ceiling(5, 32768, 20000.0, 3000.0, 10.0)
    out = verdict_records([a, b, a])
    assert [(r.config_id, r.verdict, r.kind) for r in out] == [(a.config_id, FITS, "config-verdict"),
                                                               (b.config_id, FITS, "config-verdict")]
    assert parse(out[0].to_dict()) == out[0] and out[0].records == 2


@pytest.mark.parametrize("n, names", [
    (1, ("TL",)), (3, ("TL", "Dev", "QA")), (5, ("TL", "Dev", "QA", "Dev", "QA")),
    (7, ("TL", "Dev", "QA", "Dev", "QA", "Dev", "QA"))])
def test_workflow_a_fills_n_slots(n: int, names: tuple[str, ...]) -> None:
    assert scaled_names("A", n) == names
    assert scaled_names("B", n) == ("Research",) * n and scaled_names("ToolStorm", n) == ("ToolStorm",) * n


def test_a_listed_workflow_keeps_its_list_even_under_a_built_in_name() -> None:
    user = {"A": ("Dev", "Dev"), "Team5": ("TL", "Dev", "Dev", "QA", "QA")}
    assert [r.name for r in workflow_roles("A", 7, BUILTIN_ROLES, user)] == ["Dev", "Dev"]
    assert [r.name for r in workflow_roles("Team5", 2, BUILTIN_ROLES, user)] == ["TL", "Dev", "Dev", "QA", "QA"]
    assert len(workflow_roles("B", 7, BUILTIN_ROLES, {})) == 7
    with pytest.raises(KeyError, match="unknown workflow 'Nope'"):
        workflow_roles("Nope", 3, BUILTIN_ROLES, user)


def test_the_workflows_key_names_known_workflows() -> None:
    doc = {"workflows": {"Team5": ["TL", "Dev"]},
           "profiles": {"cpu": {"configs": [{"n": 5, "ctx": 1024, "workflows": ["Team5", "A"]}]}}}
    assert parse_matrix(doc, None).configs[0].workflows == ("Team5", "A")
    doc["profiles"]["cpu"]["configs"][0]["workflows"] = ["Team6"]
    with pytest.raises(MatrixError, match=r"cpu-n5-ctx1k-f16: workflows names \['Team6'\]"):
        parse_matrix(doc, None)
    doc["profiles"]["cpu"]["configs"][0]["workflows"] = "A"
    with pytest.raises(MatrixError, match="workflows must be a list of workflow names"):
        parse_matrix(doc, None)


def test_min_depth_ratio_is_a_matrix_slo() -> None:
    doc = {"profiles": {"cpu": {"slo": {"min_depth_ratio": 0.25}, "workload": {"depth_ctx_tokens": 1024},
                                "configs": [{"n": 1, "ctx": 1024}]}}}
    m = parse_matrix(doc, None)
    assert m.profiles["cpu"].slo.min_depth_ratio == 0.25 and m.profiles["cpu"].workload.depth_ctx_tokens == 1024


def test_allocated_context_alone_is_compared_at_the_shallow_depth() -> None:
    recs = [depth("n3-64k", 3, 65536, 40.0, 30.0), depth("n3-256k", 3, 262144, 20.0, 2.0),
            depth("n5-32k", 5, 32768, 50.0, 45.0)]
    groups = allocated_context(recs)
    assert len(groups) == 1 and "N=3" in groups[0]["label"]
    assert [[c.text for c in row] for row in groups[0]["table"].rows] == [
        ["n3-64k", "64k", "40.0", "1.00"], ["n3-256k", "256k", "20.0", "0.50"]]
    assert groups[0]["answer"].startswith("allocated context alone slows decoding: 0.50×")
    same = allocated_context([depth("a", 3, 65536, 40.0, 30.0), depth("b", 3, 131072, 39.0, 30.0)])
    assert "does not measurably slow" in same[0]["answer"]


def test_the_terminal_line_of_a_verdict_shows_no_test_outcome() -> None:
    """A derived verdict ran no test: its line reads the verdict word, not the outcome column's "None"."""
    from pytest_gpucap.record_config_verdict import ConfigVerdictRecord
    from pytest_gpucap.records import summary_line

    rec = ConfigVerdictRecord.from_dict({"kind": "config-verdict", "test": "", "profile": "cpu",
                                         "config_id": "cpu-n2-ctx8k-f16", "config": {"n": 2, "ctx": 8192},
                                         "verdict": "fits, too slow", "reasons": ["workload A: TPOT p95"]})
    line = summary_line(rec)
    assert "None" not in line and line.endswith("config-verdict  fits, too slow: workload A: TPOT p95"), line
