"""Run-to-run comparison: per-config deltas, direction-aware regressions, and the CI gate's exit codes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_gpucap import records
from pytest_gpucap.compare import CompareError, Row, compare_records, format_table, load
from pytest_gpucap.records import Record
from conftest import CapacityRun, matrix_toml
from test_report import REPO, ceiling, workload


def _run_a() -> list[Record]:
    return [
        ceiling(3, 65536, 21110.0, 2972.0, 10.0),
        ceiling(5, 32768, 20928.0, 3154.0, 10.0),
        workload("4090-n3-ctx128k-q8", 3, 131072, "A", ["TL", "Dev", "QA"], 132.1, 68.6, (96.0, 122.0),
                 1823.0, (39, 0)),
    ]


def _run_b() -> list[Record]:
    """Run A after an upgrade: N3 uses 10% more memory, boots faster; workload A lost 20% TPS."""
    return [
        ceiling(3, 65536, 23221.0, 861.0, 8.0),
        ceiling(5, 32768, 21500.0, 3100.0, 10.2),   # within a 5% threshold
        workload("4090-n3-ctx128k-q8", 3, 131072, "A", ["TL", "Dev", "QA"], 105.68, 70.0, (96.0, 110.0),
                 1823.0, (39, 0)),
        ceiling(7, 32768, 22184.0, 1898.0, 6.0),   # new config
    ]


def _by(rows: list[Row], config_id: str, metric: str) -> Row:
    return next(r for r in rows if r.config_id == config_id and r.metric == metric)


def test_compare_records_deltas_and_directions() -> None:
    rows, regressions = compare_records(_run_a(), _run_b(), threshold_pct=5.0)
    used = _by(rows, "4090-n3-ctx64k-mmproj-q8", "used_after_load_mib")
    assert (used.old, used.new, used.delta) == (21110.0, 23221.0, 2111.0)
    assert used.delta_pct == pytest.approx(10.0) and used.regression and used.marker == "REGRESSION"
    free = _by(rows, "4090-n3-ctx64k-mmproj-q8", "free_mib")
    assert free.delta == -2111.0 and free.regression
    boot = _by(rows, "4090-n3-ctx64k-mmproj-q8", "boot_s")
    assert boot.delta_pct == pytest.approx(-20.0) and not boot.regression and boot.marker == "better"
    small = _by(rows, "4090-n5-ctx32k-mmproj-q8", "used_after_load_mib")
    assert small.worse and not small.regression and small.marker == "worse (within threshold)"
    tps = _by(rows, "4090-n3-ctx128k-q8", "agg_tps")
    assert tps.delta_pct == pytest.approx(-20.0) and tps.regression
    assert _by(rows, "4090-n3-ctx128k-q8", "per_call_tps").marker == "better"
    p95 = _by(rows, "4090-n3-ctx128k-q8", "e2e_p95_s")
    assert (p95.old, p95.new) == (122.0, 110.0) and not p95.worse
    new_only = _by(rows, "4090-n7-ctx32k-mmproj-q8", "free_mib")
    assert new_only.old is None and new_only.marker == "only in new" and not new_only.regression
    assert {(r.config_id, r.metric) for r in regressions} == {
        ("4090-n3-ctx64k-mmproj-q8", "used_after_load_mib"), ("4090-n3-ctx64k-mmproj-q8", "free_mib"),
        ("4090-n3-ctx128k-q8", "agg_tps")}
    _, loose = compare_records(_run_a(), _run_b(), threshold_pct=50.0)  # free fell 71%
    assert {(r.config_id, r.metric) for r in loose} == {("4090-n3-ctx64k-mmproj-q8", "free_mib")}


def test_latency_increase_is_a_regression_and_last_record_wins() -> None:
    old = _run_a()
    slow = workload("4090-n3-ctx128k-q8", 3, 131072, "A", ["TL", "Dev", "QA"], 132.1, 68.6, (96.0, 150.0),
                    1823.0, (39, 0))
    superseded = ceiling(3, 65536, 99999.0, 1.0, 99.0)
    rows, regressions = compare_records(old, [superseded, *_run_a()[:2], slow])
    assert _by(rows, "4090-n3-ctx64k-mmproj-q8", "used_after_load_mib").delta == 0  # later record supersedes
    assert [(r.metric, round(r.delta_pct or 0, 1)) for r in regressions] == [("e2e_p95_s", 23.0)]


def test_zero_baseline_and_missing_values() -> None:
    a = ceiling(3, 65536, 21110.0, 2972.0, 0.0)
    b = ceiling(3, 65536, 21110.0, 2972.0, 1.5)
    b = replace(b, memory=replace(b.memory, free_mib=None))
    rows, regressions = compare_records([a], [b])
    boot = _by(rows, a.config_id, "boot_s")
    assert boot.delta_pct == float("inf") and boot.regression
    assert _by(rows, a.config_id, "free_mib").delta is None
    assert "+∞%" in format_table(rows)
    assert [r.metric for r in regressions] == ["boot_s"]


def test_format_table_marks_regressions_and_escapes_pipes() -> None:
    hostile = ceiling(2, 8192, 5000.0, 4000.0, 1.5, name="a|b")
    worse = ceiling(2, 8192, 6000.0, 3000.0, 1.5, name="a|b")
    text = format_table(compare_records([hostile], [worse])[0])
    lines = text.splitlines()
    assert lines[0].startswith("| kind | config |")
    assert "| ceiling | a\\|b | — | used_after_load_mib ↓ | 5,000.00 | 6,000.00 | +1,000.00 | +20.0% | **REGRESSION** |" \
        in lines


def test_load_accepts_file_or_directory(tmp_path: Path) -> None:
    for r in _run_a():
        records.append_jsonl(tmp_path / "results.jsonl", r)
    assert load(tmp_path) == load(tmp_path / "results.jsonl") and len(load(tmp_path)) == 3
    with pytest.raises(CompareError, match="no such file"):
        load(tmp_path / "nope")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CompareError, match="no result records"):
        load(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- CLI

def _write(directory: Path, recs: list[Record]) -> Path:
    directory.mkdir()
    for r in recs:
        records.append_jsonl(directory / "results.jsonl", r)
    return directory


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_gpucap", "compare", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_cli_compare_and_gate(tmp_path: Path) -> None:
    old, new = _write(tmp_path / "old", _run_a()), _write(tmp_path / "new", _run_b())
    report = _cli(str(old), str(new / "results.jsonl"))
    assert report.returncode == 0, report.stderr
    assert "**REGRESSION**" in report.stdout and "3 regression(s) beyond 5%" in report.stdout

    gated = _cli(str(old), str(new), "--fail-on-regression", "15")
    assert gated.returncode == 1
    assert "regressed by more than 15%" in gated.stderr and "agg_tps -20.0%" in gated.stderr
    assert "used_after_load_mib" not in gated.stderr  # +10% is within a 15% gate

    assert _cli(str(old), str(new), "--fail-on-regression", "80").returncode == 0
    assert _cli(str(old), str(old), "--fail-on-regression", "0").returncode == 0


def test_report_old_new_renders_both_runs_side_by_side(tmp_path: Path) -> None:
    """``report OLD NEW`` writes NEW/compare.html: regressions first, coloured by direction, both runs' maps."""
    import re

    from test_report import external_resources

    old, new = _write(tmp_path / "old", _run_a()), _write(tmp_path / "new", _run_b())
    proc = subprocess.run([sys.executable, "-m", "pytest_gpucap", "report", str(old), str(new)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    page = new / "compare.html"
    assert str(page) in proc.stdout
    html = page.read_text()
    body = re.search(r'<table class="data" id="deltas">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    rows = [re.findall(r"<td(?: class=\"([^\"]*)\")?>([^<]*)</td>", tr) for tr in body.split("</tr>") if "<td" in tr]
    markers = [r[-1][1] for r in rows]
    assert markers[:3] == ["REGRESSION"] * 3 and "REGRESSION" not in markers[3:]
    assert all(r[-1][0] == "bad" for r in rows[:3])
    assert {(r[0][1], r[3][1]) for r in rows[:3]} == {
        ("4090-n3-ctx64k-mmproj-q8", "used_after_load_mib ↓"), ("4090-n3-ctx64k-mmproj-q8", "free_mib ↑"),
        ("4090-n3-ctx128k-q8", "agg_tps ↑")}
    better = next(r for r in rows if r[0][1] == "4090-n3-ctx64k-mmproj-q8" and r[3][1] == "boot_s ↓")
    assert better[-1] == ("ok", "better") and better[6] == ("num ok", "-2.00")
    assert markers.index("worse (within threshold)") < markers.index("better")
    assert '<p id="regressions" class="gate-bad"><strong>3 regressions</strong> beyond 5.0%' in html
    sides = re.findall(r'<div class="side" id="side-(\d)">\n<h2>(Old|New): ([^<]*)</h2>', html)
    assert sides == [("1", "Old", str(old)), ("2", "New", str(new))]
    assert html.count('<table class="capmap">') == 4  # per run: the mmproj ceilings and the text-only workload
    assert external_resources(html) == [] and "<script src" not in html


def test_cli_compare_errors(tmp_path: Path) -> None:
    old = _write(tmp_path / "old", _run_a())
    missing = _cli(str(old), str(tmp_path / "absent"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ")
    assert missing.stderr.strip().count("\n") == 0
    (tmp_path / "empty.jsonl").write_text("\n")
    assert _cli(str(old), str(tmp_path / "empty.jsonl")).returncode == 2
    assert _cli(str(old), str(old), "--fail-on-regression", "-1").returncode == 2
    assert _cli(str(old)).returncode == 2


def test_session_gate_against_a_baseline(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """``--gpucap-baseline``: passing tests, yet the session fails when a tracked figure regressed."""
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n")
    first = capacity_run.run(matrix, "--gpucap-report", "rep")
    first.assert_outcomes(passed=1)
    (record,) = [r for r in records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
                 if r["kind"] != "config-verdict"]
    used = record["memory"]["used_after_load_mib"]
    # a baseline that used half the memory: this run is ~100% worse on a lower-is-better figure
    # (and booted slower, so boot-time noise cannot add a second regression)
    better = {**record, "boot_s": 1e6, "memory": {**record["memory"], "used_after_load_mib": used / 2}}
    records.append_jsonl(capacity_run.pytester.path / "base" / "results.jsonl", better)
    gated = capacity_run.run(matrix, "--gpucap-baseline", "base")
    assert gated.ret == pytest.ExitCode.TESTS_FAILED and gated.parseoutcomes() == {"passed": 1}
    gated.stdout.fnmatch_lines(["*gpucap regression gate*", "*cpu-n1-ctx1k-f16*used_after_load_mib*REGRESSION*",
                                "FAILED: * tracked figure(s) regressed by more than 5%*"])
    loose = capacity_run.run(matrix, "--gpucap-baseline", "base/results.jsonl", "--gpucap-regression-threshold", "400")
    assert loose.ret == 0
    loose.stdout.fnmatch_lines(["no tracked figure regressed by more than 400% against base/results.jsonl"])
    missing = capacity_run.run(matrix, "--gpucap-baseline", "nowhere")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*--gpucap-baseline nowhere: no results.jsonl there*"])
