"""``--gpucap-repeat K``: K runs per workload recorded once (median + spread), and a gate that judges a
change against the larger of the threshold and that measured spread."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpucap import records
from pytest_gpucap.compare import compare_records, spread_note
from pytest_gpucap.records import WorkloadRecord
from pytest_gpucap.repeat import combine
from pytest_gpucap.report.timeline import memory_timelines
from conftest import CapacityRun, matrix_toml
from test_report import REPO, workload

CID = "4090-n3-ctx128k-q8"


def _run(agg: float, p95: float = 110.0) -> WorkloadRecord:
    return workload(CID, 3, 131072, "A", ["TL", "Dev", "QA"], agg, 68.6, (96.0, p95), 1823.0, (39, 0))


def _row(old: list[records.Record], new: list[records.Record], metric: str = "agg_tps",
         threshold: float = 5.0) -> object:
    rows, _ = compare_records(old, new, threshold)
    return next(r for r in rows if r.config_id == CID and r.metric == metric)


def test_combine_keeps_the_median_run_and_the_spread() -> None:
    runs = [_run(120.0, 100.0), _run(80.0, 140.0), _run(100.0, 120.0)]
    rec = combine(runs)
    assert rec.metrics.agg_tps == 100.0 and rec.repeat is not None and rec.repeat.runs == 3
    assert rec.repeat.median_run == 2
    agg = rec.repeat.figures["agg_tps"]
    assert (agg.median, agg.min, agg.max, agg.values) == (100.0, 80.0, 120.0, [120.0, 80.0, 100.0])
    assert agg.spread_pct == pytest.approx(40.0)
    assert rec.repeat.figures["e2e_p95_s"].median == 120.0
    data = json.loads(json.dumps(rec.to_dict()))
    back = records.parse(data)
    assert back.to_dict() == data and back.repeat == rec.repeat and records.headline(back)["agg_tps"] == 100.0


def test_a_change_within_the_spread_is_not_flagged_one_beyond_it_is() -> None:
    """Old runs 80/100/120 tok/s (spread 40% of the median): a 15% drop is noise on this host, a 50% drop is not;
    the same 15% drop between single runs is a regression at the 5% threshold."""
    old = [combine([_run(120.0), _run(80.0), _run(100.0)])]
    within = _row(old, [combine([_run(86.0), _run(84.0), _run(85.0)])])
    assert within.delta_pct == pytest.approx(-15.0) and within.worse
    assert within.spread_pct == pytest.approx(40.0) and within.tolerance_pct == pytest.approx(40.0)
    assert not within.regression and within.marker == "worse (within spread 40.0%)"
    beyond = _row(old, [combine([_run(50.0), _run(49.0), _run(51.0)])])
    assert beyond.regression and beyond.marker == "REGRESSION (beyond spread 40.0%)"
    single = _row([_run(100.0)], [_run(85.0)])
    assert single.spread_pct is None and single.regression and single.marker == "REGRESSION"
    tight = _row([combine([_run(100.0), _run(101.0)])], [combine([_run(85.0), _run(86.0)])])
    assert tight.tolerance_pct == 5.0 and tight.regression  # a 1% spread: the threshold binds
    rows, _ = compare_records(old, [combine([_run(86.0), _run(84.0), _run(85.0)])], 5.0)
    assert "judged beyond the larger of the threshold and its measured spread (up to 40.0%)" in spread_note(rows)
    assert spread_note(compare_records([_run(100.0)], [_run(85.0)])[0]) == ""


def test_cli_gate_says_it_used_the_spread(tmp_path: Path) -> None:
    for name, runs in (("old", [120.0, 80.0, 100.0]), ("new", [86.0, 84.0, 85.0])):
        records.append_jsonl(tmp_path / name / "results.jsonl", combine([_run(a) for a in runs]))
    out = subprocess.run([sys.executable, "-m", "pytest_gpucap", "compare", str(tmp_path / "old"),
                          str(tmp_path / "new"), "--fail-on-regression", "5"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "worse (within spread 40.0%)" in out.stdout and "--gpucap-repeat" in out.stdout
    page = subprocess.run([sys.executable, "-m", "pytest_gpucap", "compare", str(tmp_path / "old"),
                           str(tmp_path / "new"), "--html", str(tmp_path / "compare.html")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    html = (tmp_path / "compare.html").read_text()
    assert page.returncode == 0 and '<p id="spread-note"' in html and "worse (within spread 40.0%)" in html


REPEATED = '''
def test_ceiling(gpucap_ceiling):
    pass


def test_fixed(gpucap_workload):
    gpucap_workload.fixed(2, 16, max_tokens=32)
'''


def test_repeat_2_on_a_real_server_records_median_and_spread(capacity_run: CapacityRun, tiny_model: Path) -> None:
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 2\nctx = 1024\n")
    result = capacity_run.run(matrix, "--gpucap-repeat", "2", "--gpucap-report", "rep", test_src=REPEATED)
    result.assert_outcomes(passed=2)
    rep_dir = capacity_run.pytester.path / "rep"
    (rec,) = [r for r in records.read_jsonl(rep_dir / "results.jsonl") if r["kind"] == "workload"]
    rep = rec["repeat"]
    assert rep["runs"] == 2 and rep["median_run"] in (0, 1)
    agg = rep["figures"]["agg_tps"]
    assert len(agg["values"]) == 2 and agg["min"] == min(agg["values"]) and agg["max"] == max(agg["values"])
    assert agg["median"] == pytest.approx(statistics.median(agg["values"]), abs=1e-3)
    assert rec["metrics"]["agg_tps"] == agg["values"][rep["median_run"]]
    assert rep["figures"]["turns_ok"]["values"] == [16, 16]
    timeline = rec["memory"]["timeline"]  # both runs' device readings, on the server's time axis
    assert timeline and [p["t"] for p in timeline] == sorted(p["t"] for p in timeline) and timeline[0]["t"] > 0
    # the write-up: the spread table, and one memory-over-time chart with boot, hold and the workload
    (chart,) = memory_timelines(records.read_records(rep_dir / "results.jsonl"))
    assert [s.label.split(" ")[0] for s in chart.spans] == ["boot", "load", "workload", "workload"]
    assert [s.label for s in chart.spans[2:]] == ["workload fixed-c2 run 1", "workload fixed-c2 run 2"]
    assert chart.spans[1].x1 <= chart.spans[2].x0 <= chart.spans[2].x1 <= chart.spans[3].x0
    md = (rep_dir / "capacity.md").read_text()
    assert "### Repeated runs" in md and "## Memory over time" in md and (rep_dir / "charts" / chart.filename).is_file()
    bad = capacity_run.run(matrix, "--gpucap-repeat", "0", test_src=REPEATED)
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--gpucap-repeat must be a whole number >= 1, got '0'*"])


def test_session_gate_judges_a_repeated_figure_against_its_spread(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """``--gpucap-baseline`` with ``--gpucap-repeat``: the baseline's agg tok/s runs spread 100% around a median
    3× this run's, so this run is 67% slower: beyond the 50% threshold, within the spread. Not flagged, and the
    gate says why. (Every other gated figure of the baseline is set far worse, so host noise cannot fail it.)"""
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 2\nctx = 1024\n")
    first = capacity_run.run(matrix, "--gpucap-repeat", "2", "--gpucap-report", "rep", test_src=REPEATED)
    first.assert_outcomes(passed=2)
    for r in records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl"):
        if r["kind"] == "ceiling":
            r = {**r, "boot_s": 1e6, "memory": {**r["memory"], "used_after_load_mib": 1e9, "free_mib": 0.0}}
        elif r["kind"] == "workload":
            agg = r["repeat"]["figures"]["agg_tps"]["median"]
            figures = {"agg_tps": {"median": 3 * agg, "min": 1.5 * agg, "max": 4.5 * agg, "values": [1.5 * agg]},
                       "per_call_tps": {"median": 0.0}, "e2e_p95_s": {"median": 1e6}}
            r = {**r, "repeat": {**r["repeat"], "figures": figures}}
        records.append_jsonl(capacity_run.pytester.path / "base" / "results.jsonl", r)
    gated = capacity_run.run(matrix, "--gpucap-repeat", "2", "--gpucap-baseline", "base",
                             "--gpucap-regression-threshold", "50", test_src=REPEATED)
    assert gated.ret == 0, gated.stdout.str()
    gated.stdout.fnmatch_lines([
        "*gpucap regression gate*",
        # agg tok/s (100%); this session's own two runs may add a figure of theirs under CPU contention
        "* figure(s) measured over repeated runs (--gpucap-repeat) spread wider than 50%: each is judged beyond "
        "the larger of the threshold and its measured spread (up to *%).",
        "no tracked figure regressed by more than 50% against base*"])
