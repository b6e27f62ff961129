"""The extension hooks users implement: extra record fields, extra write-up sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import CapacityRun, matrix_toml

from pytest_gpucap import records

HOOKS = '''
from pytest_gpucap import ReportSection

def pytest_gpucap_record(record):
    record["site"] = "rack-3"

def pytest_gpucap_report_sections(records):
    ids = sorted({r["config_id"] for r in records})
    return [
        ReportSection("Site notes", "Measured in rack 3: " + ", ".join(ids) + "."),
        ReportSection("Power", "| PSU | W |\\n|---|---:|\\n| A | 450 |\\n", html="<p id='power'>450 W on PSU A</p>"),
    ]
'''


def test_hooks_add_record_fields_and_report_sections(capacity_run: CapacityRun, tiny_model: Path) -> None:
    capacity_run.pytester.makeconftest(HOOKS)
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n")
    result = capacity_run.run(matrix, "--gpucap-report", "rep")
    result.assert_outcomes(passed=1)
    rep = capacity_run.pytester.path / "rep"
    (record,) = records.read_jsonl(rep / "results.jsonl")
    assert record["site"] == "rack-3" and record["kind"] == "ceiling"
    md = (rep / "capacity.md").read_text()
    html = (rep / "capacity.html").read_text()
    assert "## Site notes\n\nMeasured in rack 3: cpu-n1-ctx1k-f16." in md
    assert "| A | 450 |" in md and md.index("## Power") < md.index("## Environment and reproduction")
    assert '<h2 class="extra-section">Site notes</h2>' in html and "Measured in rack 3: cpu-n1-ctx1k-f16." in html
    assert "<p id='power'>450 W on PSU A</p>" in html
    # the sections are saved with the records: a later re-render keeps them
    (rep / "capacity.md").unlink()
    done = subprocess.run([sys.executable, "-m", "pytest_gpucap", "report", str(rep)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "## Site notes" in (rep / "capacity.md").read_text()


def test_a_hook_returning_the_wrong_type_is_named_not_a_traceback(capacity_run: CapacityRun,
                                                                   tiny_model: Path) -> None:
    capacity_run.pytester.makeconftest("def pytest_gpucap_report_sections(records):\n    return ['oops']\n")
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n")
    result = capacity_run.run(matrix, "--gpucap-report", "rep")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*pytest_gpucap_report_sections returned 'oops' (not shown)*ReportSection*"])
    assert "Traceback" not in result.stdout.str()
