"""Typed, versioned records: every kind round-trips through its dict exactly, unknown keys survive, a
file of another schema version is migrated or refused in one line, and one list of tracked figures
feeds both the headline figures and the regression gate. Also the judgements in ``verdicts``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucap import compare, records, verdicts
from pytest_gpucap.matrix import SLO
from pytest_gpucap.records import (
    CeilingRecord, OtherRecord, SchemaError, SearchRecord, UnmeasuredRecord, WorkloadRecord,
)
from test_report import (
    REPO, _checked, ceiling, ramp, study_records, unmeasured, vllm_ceiling, with_metrics, with_prediction, workload,
)


def _search() -> SearchRecord:
    return SearchRecord.of("t::test_search", "4090", {
        "knee": "4090-n5-ctx32k-mmproj-q8", "boots": 2, "grid_size": 4, "boot_fraction": 0.5, "known_used": 0,
        "assumption": "monotone in N and ctx", "seconds": 1.0,
        "probes": [{"config_id": "4090-n5-ctx32k-mmproj-q8", "n": 5, "ctx": 32768, "cache_type": "q8_0",
                    "mmproj": True, "status": "booted-pass", "reason": "free", "boot_order": 1,
                    "predicted_free_mib": 3100.0}]})


def every_kind() -> list[records.Record]:
    wl = _checked(workload("4090-n3-ctx64k-q8", 3, 65536, "A", ["TL", "Dev", "QA"], 142.3, 69.7, (93.0, 114.0),
                           2972.0, (42, 0)))
    return [
        ceiling(3, 65536, 21110.0, 2972.0, 10.0, predicted=1024.0),
        with_prediction(ceiling(2, 8192, 0.0, 20000.0, 1.0, mmproj=False), 1.03),
        vllm_ceiling(4, 32768, 12.5, 600.0),
        wl, with_metrics(wl, roofline_tps=200.0, efficiency=0.7),
        ramp(), _search(),
        unmeasured("ceiling", "n7-big", "skipped", "not enough RAM", "t::test_ceiling[n7-big]"),
        unmeasured("unmeasured", "n7-big", "skipped", "not enough RAM", "t::test_workflow[n7-big-A]"),
    ]


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("rec", every_kind(), ids=lambda r: f"{type(r).__name__}-{r.config_id}")
def test_every_kind_round_trips_through_json(rec: records.Record) -> None:
    d = json.loads(json.dumps(rec.to_dict()))  # as results.jsonl holds it
    parsed = records.parse(d)
    assert type(parsed) is type(rec)
    assert parsed.to_dict() == d
    assert json.dumps(parsed.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)


def test_parse_gives_the_kind_and_keeps_unknown_keys_at_every_level() -> None:
    d = json.loads(json.dumps(workload("c", 3, 65536, "A", ["Dev"], 1.0, 1.0, (1.0, 2.0), 1.0, (3, 0)).to_dict()))
    d["added_by_a_hook"] = {"ci_job": 42}
    d["metrics"]["tpot_s"] = {"p50": 0.01}
    d["metrics"]["roles"]["Dev"]["p999_s"] = 9.0
    d["workload"]["concurrency"] = 8
    d["server"]["pid"] = 1234
    rec = records.parse(d)
    assert isinstance(rec, WorkloadRecord) and rec.metrics.roles["Dev"].p95_s == 2.0
    assert rec.extra == {"added_by_a_hook": {"ci_job": 42}} and rec.workload.extra == {"concurrency": 8}
    assert rec.to_dict() == d


def test_a_record_written_with_fewer_keys_writes_back_only_those() -> None:
    """Older writers left keys out (a ramp had no verdicts, a workload no slo): absent stays absent."""
    d = {"schema": 1, "kind": "workload", "test": "t", "config_id": "c", "metrics": {"agg_tps": 5.0}}
    rec = records.parse(d)
    assert isinstance(rec, WorkloadRecord) and rec.metrics.agg_tps == 5.0
    assert rec.metrics.ttft_s.p95 is None and rec.server.absent and rec.workload.name is None
    assert rec.to_dict() == d
    assert replace(rec, outcome="passed").to_dict() == d | {"outcome": "passed"}


def test_a_section_of_the_wrong_shape_is_kept_verbatim() -> None:
    d = {"schema": 1, "kind": "ceiling", "test": "t", "config_id": "c", "profile": "p",
         "memory": {"free_mib": 1.0, "server_report": "not a dict", "kv_headroom": [1]},
         "verdicts": [{"name": "x", "measured": "lots", "budget": 1}, "junk"]}
    rec = records.parse(d)
    assert isinstance(rec, CeilingRecord) and rec.verdicts == () and rec.memory.kv_headroom is None
    assert rec.memory.server_report.model_mib is None
    assert rec.to_dict() == d


def test_kinds_without_figures_and_unknown_kinds() -> None:
    assert isinstance(records.parse({"kind": "ceiling", "memory": None}), UnmeasuredRecord)
    assert isinstance(records.parse({"kind": "workload", "config_id": "c"}), UnmeasuredRecord)
    other = records.parse({"schema": 1, "kind": "mystery", "config_id": "c", "x": [1]})
    assert isinstance(other, OtherRecord) and not other.measured and other.to_dict()["x"] == [1]
    assert records.parse(ceiling(3, 65536, 21110.0, 2972.0, 10.0).to_dict()).measured


def test_records_the_plugin_builds_have_todays_keys() -> None:
    """The JSON layout is unchanged: the keys ``header`` and each builder wrote before the typed records."""
    top = {"schema", "kind", "test", "config_id", "config", "profile", "host", "server", "boot_s"}
    assert set(ceiling(3, 65536, 21110.0, 2972.0, 10.0).to_dict()) == top | {
        "memory", "slo", "verdicts", "headroom_class", "outcome"}
    assert set(workload("c", 3, 65536, "A", ["Dev"], 1.0, 1.0, (1.0, 2.0), 1.0, (3, 0)).to_dict()) == top | {
        "workload", "metrics", "memory", "aborted", "tokens_from", "slo", "verdicts", "outcome"}
    assert set(ramp().to_dict()) >= top | {"steps", "max_clean_n", "knee_n", "ceiling", "slo"}
    assert set(_search().to_dict()) == {"schema", "kind", "test", "config_id", "profile", "knee", "boots",
                                        "grid_size", "boot_fraction", "known_used", "assumption", "seconds",
                                        "probes"}
    out = unmeasured("ceiling", "n7", "skipped", "why", "t").to_dict()
    assert set(out) == {"schema", "kind", "test", "config_id", "config", "profile", "outcome", "reason"}
    assert set(records.SloBudgets(headroom_gib=1.0).to_dict()) == {"headroom_gib"}
    assert set(records.SloBudgets.of(SLO()).to_dict()) == {"headroom_gib", "p95_s", "min_agg_tps", "max_error_rate",
                                                          "ttft_p95_s", "ramp_p95_s", "queue_p95_s"}


# ---------------------------------------------------------------- schema versions

def _write(path: Path, *recs: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("found, words", [
    (999, "schema version 999 is newer than this pytest-gpucap reads schema 1; upgrade pytest-gpucap"),
    (0, "schema version 0 is not one pytest-gpucap writes"),
    ("1.0", "schema version '1.0' is not one pytest-gpucap writes"),
    (None, "schema version None is not one pytest-gpucap writes"),
])
def test_another_schema_version_is_refused_in_one_line(tmp_path: Path, found: Any, words: str) -> None:
    rec = ceiling(3, 65536, 21110.0, 2972.0, 10.0).to_dict()
    bad = rec | {"schema": found} if found is not None else {k: v for k, v in rec.items() if k != "schema"}
    path = _write(tmp_path / "results.jsonl", rec, bad)
    with pytest.raises(SchemaError) as info:
        records.read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 2: ") and words in message and "\n" not in message
    assert "re-run the tests" in message or "upgrade" in message


def test_an_older_schema_is_migrated_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(records, "MIGRATIONS", {1: lambda r: r | {"schema": 2, "one": 1},
                                                2: lambda r: r | {"schema": 3, "two": 2}})
    path = _write(tmp_path / "results.jsonl", {"schema": 1, "kind": "mystery"}, {"schema": 2, "kind": "mystery"})
    assert records.read_jsonl(path) == [{"schema": 3, "kind": "mystery", "one": 1, "two": 2},
                                        {"schema": 3, "kind": "mystery", "two": 2}]
    monkeypatch.setattr(records, "MIGRATIONS", {2: lambda r: r | {"schema": 3}})
    with pytest.raises(SchemaError, match=r"line 1: schema version 1 is older than this pytest-gpucap reads schema 3 "
                                          r"and cannot be migrated; re-run the tests"):
        records.read_jsonl(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_gpucap", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_report_and_compare_refuse_a_newer_schema_in_one_line(tmp_path: Path) -> None:
    good = [r.to_dict() for r in study_records()]
    path = _write(tmp_path / "new" / "results.jsonl", *good[:3], good[3] | {"schema": 999})
    proc = _cli("report", str(path.parent))
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "schema version 999" in proc.stderr
    assert not (path.parent / "capacity.md").exists()
    old = _write(tmp_path / "old" / "results.jsonl", *good)
    proc = _cli("compare", str(old.parent), str(path.parent))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "schema version 999" in proc.stderr


def test_session_does_not_reuse_results_of_another_schema(pytester: pytest.Pytester) -> None:
    _write(pytester.path / "rep" / "results.jsonl", {"schema": 999, "kind": "ceiling"})
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gpucap-report", "rep")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["gpucap: earlier results not reused: *results.jsonl line 1: schema version 999*"])
    assert list((pytester.path / "rep").glob("results-*.jsonl"))  # renamed, never overwritten


# ---------------------------------------------------------------- tracked figures

def test_one_list_of_tracked_figures_feeds_headline_and_the_gate() -> None:
    ceil, wl, rmp = ceiling(3, 65536, 21110.0, 2972.0, 10.0), study_records()[5], ramp()
    assert records.headline(ceil) == {"used_after_load_mib": 21110.0, "free_mib": 2972.0, "boot_s": 10.0,
                                      "kv_per_slot_mib": 1088.0}
    assert records.headline(wl) == {"agg_tps": 142.3, "per_call_tps": 69.7, "e2e_p95_s": 114.0, "ttft_p95_s": 1.37,
                                    "turns_ok": 42.0, "turns_failed": 0.0, "Dev_p95_s": 114.0}
    assert records.headline(rmp) == {"max_clean_n": 5.0, "knee_n": 4.0}
    assert records.headline(ceil.to_dict()) == records.headline(ceil)
    assert compare.GATED == tuple(f for f in records.TRACKED if f.gated)
    gated = {(f.kind, f.name) for f in compare.GATED}
    assert gated == {("ceiling", "used_after_load_mib"), ("ceiling", "free_mib"), ("ceiling", "boot_s"),
                     ("workload", "agg_tps"), ("workload", "per_call_tps"), ("workload", "e2e_p95_s"),
                     ("ramp", "max_clean_n")}
    for rec in (ceil, wl, rmp):
        rows, _ = compare.compare_records([rec], [rec])
        assert {r.metric for r in rows} <= set(records.headline(rec))
    assert records.headline(unmeasured("ceiling", "n7", "skipped", "why", "t")) == {}


def test_summary_line_per_kind() -> None:
    lines = [records.summary_line(r) for r in (study_records()[0], study_records()[5], ramp(), _search())]
    assert lines[0].split() == ["4090-n3-ctx128k-mmproj-q8", "ceiling", "passed", "used", "22980", "MiB", "free",
                                "1102", "MiB", "boot", "20.00", "s", "Risky"]
    assert lines[1].endswith("A: 142.3 tok/s agg, 69.7 per call, turns 42 ok/0 failed  TL p50/p95 0.0/0.0 s  "
                             "Dev p50/p95 93.0/114.0 s  QA p50/p95 0.0/0.0 s")
    assert lines[2].endswith("max clean N 5, knee 4 (ceiling 6)")
    assert lines[3].endswith("knee 4090-n5-ctx32k-mmproj-q8 with 2 boots of a 4-config grid")
    assert records.summary_line(unmeasured("ceiling", "n7", "skipped", "no RAM", "t")).endswith("skipped no RAM")


# ---------------------------------------------------------------- verdicts

def test_headroom_classes_and_the_2x_rule() -> None:
    slo = SLO(headroom_gib=1.5)
    assert [verdicts.headroom_class(g, slo) for g in (3.0, 2.99, 1.5, 1.49)] == [
        "Comfortable", "Marginal", "Marginal", "Risky"]
    bands = verdicts.headroom_bands(1.5)
    assert bands == (("Comfortable", 3.0), ("Marginal", 1.5), ("Risky", None))
    for (name, least), (below, _) in zip(bands, bands[1:]):  # the stated rule is the one applied
        assert verdicts.headroom_class(least, slo) == name and verdicts.headroom_class(least - 1e-9, slo) == below
    assert verdicts.HEADROOM_RULE == "Comfortable ≥ 2× the headroom SLO, Marginal ≥ the SLO, Risky below"


def test_ceiling_verdict_is_kv_capacity_when_the_backend_reports_one() -> None:
    slo = SLO(headroom_gib=1.5)
    (free,) = verdicts.ceiling_verdicts(600.0, slo, None, 4)
    assert free.name == verdicts.FREE_MEMORY_VERDICT and not free.ok
    (kv,) = verdicts.ceiling_verdicts(600.0, slo, {"kv_capacity_sequences": 12.5}, 4)
    assert kv.name == verdicts.KV_CAPACITY_VERDICT and kv.ok and kv.margin == 8.5
    (unknown,) = verdicts.ceiling_verdicts(600.0, slo, {"kv_capacity_sequences": None}, 4)
    assert unknown.name == verdicts.FREE_MEMORY_VERDICT  # no pool size reported: free memory is the verdict


def test_counted_breaches_drop_free_memory_only_where_kv_capacity_judges() -> None:
    vllm = vllm_ceiling(16, 32768, 12.5, 600.0)
    both = replace(vllm, verdicts=(verdicts.headroom(600.0, SLO(headroom_gib=1.5)), *vllm.verdicts))
    assert [v.name for v in verdicts.counted_breaches(both)] == [verdicts.KV_CAPACITY_VERDICT]
    risky = ceiling(3, 131072, 22980.0, 1102.0, 20.0)
    assert [v.name for v in verdicts.counted_breaches(risky)] == [verdicts.FREE_MEMORY_VERDICT]
    assert verdicts.judged_by_kv_capacity(vllm) and not verdicts.judged_by_kv_capacity(risky)


def test_workload_verdicts_read_typed_metrics_and_the_server_queue() -> None:
    rec = with_metrics(study_records()[5], server=records.ServerView(
        samples=3, scrape_errors=0, queue_time_s=records.QueueTimes(p95=2.5)))
    slo = SLO(p95_s=(("Dev", 100.0),), min_agg_tps=100.0, queue_p95_s=1.0)
    by_name = {v.name: v for v in verdicts.workload_verdicts(rec.metrics, slo)}
    assert set(by_name) == {"Dev p95 turn latency", "aggregate tokens/s", "server queue time p95"}
    assert not by_name["Dev p95 turn latency"].ok and not by_name["server queue time p95"].ok
    assert verdicts.workload_verdicts(rec.to_dict()["metrics"], slo) == list(by_name.values())


def test_result_objects_keep_the_json_record_and_give_the_typed_one() -> None:
    from pytest_gpucap.ceiling import Ceiling

    rec = ceiling(3, 65536, 21110.0, 2972.0, 10.0)
    found = Ceiling(rec.to_dict(), list(rec.verdicts))
    assert found.typed == rec and found.record["memory"]["free_mib"] == 2972.0
