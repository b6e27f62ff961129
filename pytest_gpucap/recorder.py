"""The controller-side recorder: result records from test reports to results.jsonl, the write-up,
benchmark entries, the calibration file and the terminal summary (xdist-safe: reports reach it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from . import benchmarks, compare, prediction, provenance, records


def summary_line(rec: dict[str, Any]) -> str:
    """One terminal line per record: the figures and the verdict."""
    head = f"{rec['config_id']:<28} {rec['kind']:<8} {rec['outcome']:<7}"
    if rec.get("reason"):
        return f"{head} {rec['reason']}"
    if rec["kind"] == "ceiling":
        mem = rec["memory"]
        return (f"{head} used {mem['used_after_load_mib']:>8.0f} MiB  free {mem['free_mib']:>8.0f} MiB  "
                f"boot {rec['boot_s']:>5.2f} s  {rec['headroom_class']}")
    if rec["kind"] == "workload":
        m = rec["metrics"]
        roles = "  ".join(f"{r} p50/p95 {v['p50_s'] or 0:.1f}/{v['p95_s'] or 0:.1f} s" for r, v in m["roles"].items())
        return (f"{head} {rec['workload']['name']}: {m['agg_tps']:.1f} tok/s agg, {m['per_call_tps']:.1f} per call, "
                f"turns {m['turns_ok']} ok/{m['turns_failed']} failed  {roles}")
    if rec["kind"] == "ramp":
        return f"{head} max clean N {rec['max_clean_n']}, knee {rec['knee_n'] or '-'} (ceiling {rec['ceiling']})"
    if rec["kind"] == "search":
        return f"{head} knee {rec['knee'] or '-'} with {rec['boots']} boots of a {rec['grid_size']}-config grid"
    return head


class Recorder:
    """Collects result records on the controller (xdist-safe) and writes them as they arrive."""

    def __init__(self, state: Any, config: pytest.Config) -> None:
        self.state = state
        self.config = config
        self.rendered: list[Path] = []
        self.render_error: str | None = None
        self.results_path = state.settings.report_dir / "results.jsonl" if state.settings.report_dir else None
        self.regressions: list[compare.Row] | None = None
        self.baseline_error: str | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        out = self.results_path
        if out is not None and out.exists() and out.stat().st_size:
            # The earlier run's records stay readable: the capacity search reuses its measurements.
            self.state.previous_records = records.read_jsonl(out)
            out.rename(out.with_name(f"results-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A test skipped or failed in setup has no call phase: its setup report carries the record.
        if not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        reason = next((v for k, v in report.user_properties if k == records.REASON_KEY), None)
        for key, value in report.user_properties:
            if key != records.PROPERTY_KEY or not isinstance(value, dict):
                continue
            record = {**value, "outcome": report.outcome}
            if reason and not report.passed and not record.get("reason"):
                record["reason"] = reason
            self.state.records.append(record)
            if self.results_path is not None:
                records.append_jsonl(self.results_path, record)
            benchmarks.add_record(self.config, record)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report_dir = self.state.settings.report_dir
        if report_dir is not None:
            provenance.write_session(report_dir / "session.json", session.config, self.state.binary_version)
            if self.state.records:
                from .report import render_report

                try:
                    self.rendered = render_report(report_dir)
                except Exception as exc:  # the records are safe on disk; say why rendering failed
                    self.render_error = f"{type(exc).__name__}: {exc}"
        provenance.github_step_summary(self.state.records, report_dir if self.rendered else None)
        self._save_calibration()
        self._gate(session)

    def _gate(self, session: pytest.Session) -> None:
        """With ``--gpucap-baseline``: fail the session when a tracked figure regressed past the threshold."""
        settings = self.state.settings
        if settings.baseline_path is None:
            return
        try:
            baseline = compare.load(settings.baseline_path)
        except compare.CompareError as exc:
            self.baseline_error = str(exc)
            return
        _, self.regressions = compare.compare_records(baseline, self.state.records,
                                                      settings.regression_threshold_pct)
        if self.regressions and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _save_calibration(self) -> None:
        path = self.state.settings.calibration_path
        ceilings = [r for r in self.state.records if r.get("kind") == "ceiling" and r.get("memory")]
        if path is None or not ceilings:
            return
        learned = prediction.calibrate(ceilings)
        prediction.save_calibration(self.state.calibration.merged(learned), path)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        if state.swept:
            terminalreporter.write_line(f"gpucap: removed leftover servers of an earlier session: {state.swept}")
        self._gate_summary(terminalreporter)
        if not state.records:
            return
        terminalreporter.section("gpucap capacity")
        for rec in state.records:
            terminalreporter.write_line(summary_line(rec))
        if self.results_path is not None:
            terminalreporter.write_line(f"results: {self.results_path}")
        for path in self.rendered:
            terminalreporter.write_line(f"report: {path}")
        if self.render_error:
            terminalreporter.write_line(f"gpucap: report not rendered ({self.render_error}); "
                                        f"re-render with: python -m pytest_gpucap report {self.state.settings.report_dir}")


    def _gate_summary(self, terminalreporter: Any) -> None:
        settings = self.state.settings
        if settings.baseline_path is None:
            return
        terminalreporter.section("gpucap regression gate")
        if self.baseline_error:
            terminalreporter.write_line(f"gpucap: baseline not compared: {self.baseline_error}")
        elif not self.regressions:
            terminalreporter.write_line(f"no tracked figure regressed by more than "
                                        f"{settings.regression_threshold_pct:g}% against {settings.baseline_path}")
        else:
            terminalreporter.write_line(compare.format_table(self.regressions))
            terminalreporter.write_line(f"FAILED: {len(self.regressions)} tracked figure(s) regressed by more than "
                                        f"{settings.regression_threshold_pct:g}% against {settings.baseline_path}",
                                        red=True)
