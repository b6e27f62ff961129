"""CI surfaces of a real capacity run (llama-server on the generated tiny model): JUnit properties hold the
headline figures only, and $GITHUB_STEP_SUMMARY holds the verdict paragraph, the gate and the capacity map."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import CapacityRun, matrix_toml

from pytest_gpucap import records

TWO_CONFIGS = """
    [[profiles.cpu.configs]]
    n = 1
    ctx = 1024
    [[profiles.cpu.configs]]
    n = 2
    ctx = 1024
"""


def test_junit_has_headline_figures_and_step_summary_the_answer(capacity_run: CapacityRun, tiny_model: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    summary = capacity_run.pytester.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this checkout's plugin
    result = capacity_run.run(matrix_toml(tiny_model, TWO_CONFIGS), "--junitxml", "junit.xml",
                              "--gpucap-report", "rep")
    result.assert_outcomes(passed=2)
    saved = {r["config_id"]: r for r in records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
             if r["kind"] != "config-verdict"}  # one verdict record per config, written at session end
    assert sorted(saved) == ["cpu-n1-ctx1k-f16", "cpu-n2-ctx1k-f16"]

    cases = ET.parse(capacity_run.pytester.path / "junit.xml").getroot().iter("testcase")
    props = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases}
    for cid, rec in saved.items():
        got = props[f"test_ceiling[{cid}]"]
        want = {f"gpucap:{cid}::ceiling:{k}": str(round(v, 4)) for k, v in records.headline(rec).items()}
        assert got == want  # the headline figures, nothing else
        assert {"gpucap:" + cid + "::ceiling:free_mib", "gpucap:" + cid + "::ceiling:boot_s"} <= set(got)
        assert not any(value.startswith("{") or len(value) > 40 for value in got.values())  # no whole record

    text = summary.read_text()
    paragraph = text.split("\n\n")[1]
    assert "memory ceiling only" in paragraph and "is the pick" in paragraph
    assert f"**Gate: {'passed' if all(r['outcome'] == 'passed' for r in saved.values()) else 'failed'}**" in text
    assert "| N \\\\ ctx/slot | 1k |" in text and "| N=1 |" in text and "| N=2 |" in text
    assert "](charts/" not in text and "## Phase 1" not in text

    # The write-up of the real run: the verdict paragraph first, then the gate, then the map as the first table;
    # every number in the paragraph is a field of results.jsonl.
    from test_report_answer import untraceable

    md = (capacity_run.pytester.path / "rep" / "capacity.md").read_text()
    blocks = [b for b in md.split("\n\n") if b.strip()]
    assert blocks[0].startswith("# Capacity report") and "is the pick" in blocks[1]
    assert blocks[2].startswith("**Gate: ")
    assert next(b for b in blocks if b.startswith("|")).startswith("| N \\\\ ctx/slot | 1k |")
    assert untraceable(blocks[1], capacity_run.pytester.path / "rep" / "results.jsonl") == []
    json.dumps(saved)  # records stay plain JSON
