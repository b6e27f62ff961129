"""Records survive: written as each config finishes, through xdist workers, and after a hard crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CEILING_TEST, RUN_ENV, THREE_CONFIGS, CapacityRun, matrix_toml, tagged_processes

def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_records_from_two_xdist_workers_end_up_in_one_results_file(capacity_run: CapacityRun,
                                                                     tiny_model: Path) -> None:
    result = capacity_run.run(matrix_toml(tiny_model, THREE_CONFIGS), "-n", "2", "--dist", "loadgroup",
                              "--gpucap-report", "rep")
    result.assert_outcomes(passed=3)
    lines = _lines(capacity_run.pytester.path / "rep" / "results.jsonl")
    records = [r for r in lines if r["kind"] != "config-verdict"]
    assert sorted(r["config_id"] for r in records) == ["cpu-n1-ctx1k-f16", "cpu-n2-ctx1k-f16", "cpu-n3-ctx1k-f16"]
    verdicts = _lines(capacity_run.pytester.path / "rep" / "verdicts.jsonl")
    assert sorted((r["config_id"], r["verdict"]) for r in verdicts if r["kind"] == "config-verdict") == [
        ("cpu-n1-ctx1k-f16", "fits"), ("cpu-n2-ctx1k-f16", "fits"), ("cpu-n3-ctx1k-f16", "fits")]  # one per config
    assert all(r["kind"] == "ceiling" and r["outcome"] == "passed" for r in records)
    session = json.loads((capacity_run.pytester.path / "rep" / "session.json").read_text())
    assert "--gpucap-report" in session["command"] and session["versions"]["pytest-gpucap"]


def test_killed_session_keeps_finished_configs(pytester: pytest.Pytester, llama_server_bin: Path,
                                               tiny_model: Path) -> None:
    """SIGKILL the pytest process after the second config: both records are on disk, and the server it
    had up dies with it (PR_SET_PDEATHSIG) instead of becoming an orphan."""
    matrix = matrix_toml(tiny_model, THREE_CONFIGS).replace("hold_s = 0.5", "hold_s = 3")
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    pytester.makefile(".toml", gpucap=matrix)
    pytester.makepyfile(test_capacity=CEILING_TEST)
    results = pytester.path / "rep" / "results.jsonl"
    run_id = f"kill-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--gpucap-matrix", "gpucap.toml",
         "--gpucap-server-bin", str(llama_server_bin), "--gpucap-report", "rep"],
        cwd=pytester.path, env={**os.environ, RUN_ENV: run_id}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_lines(results)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_lines(results)) == 2, "the session did not record two configs in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    records = _lines(results)
    assert [r["config_id"] for r in records] == ["cpu-n1-ctx1k-f16", "cpu-n2-ctx1k-f16"]
    end = time.monotonic() + 15
    while tagged_processes(run_id) and time.monotonic() < end:
        time.sleep(0.1)
    left = tagged_processes(run_id)
    for p in left:
        p.kill()
    assert not left, "a server outlived its killed pytest session"
    out = subprocess.run([sys.executable, "-m", "pytest_gpucap", "report", str(results.parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    html = (results.parent / "capacity.html").read_text()
    assert "cpu-n1-ctx1k-f16" in html and "cpu-n2-ctx1k-f16" in html and "cpu-n3-ctx1k-f16" not in html
