"""The controller-side recorder: result records from test reports to results.jsonl, the write-up,
benchmark entries, the calibration file and the terminal summary (xdist-safe: reports reach it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from . import benchmarks, compare, prediction, provenance, record_calibration, records

#: The session's derived per-config verdicts, beside results.jsonl.
VERDICTS_NAME = "verdicts.jsonl"


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
        self.spread_note = ""  # the gate's line on figures judged against their --gpucap-repeat spread
        self.previous_error: str | None = None
        self.section_errors: list[str] = []

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        out = self.results_path
        if out is not None and out.exists() and out.stat().st_size:
            # The earlier run's records stay readable: the capacity search reuses its measurements
            # (not those of another schema version: the search boots those configs again).
            try:
                self.state.previous_records = records.read_jsonl(out)
            except records.SchemaError as exc:
                self.previous_error = str(exc)
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
        self._write_verdicts()
        report_dir = self.state.settings.report_dir
        if report_dir is not None:
            provenance.write_session(report_dir / "session.json", session.config, self.state.binary_version)
            self._save_sections(report_dir, session.config)
            if self.state.records:
                from .report import render_report

                try:
                    self.rendered = render_report(report_dir)
                except Exception as exc:  # the records are safe on disk; say why rendering failed
                    self.render_error = f"{type(exc).__name__}: {exc}"
        provenance.github_step_summary(self.state.records, report_dir if self.rendered else None)
        self._save_calibration()
        self._gate(session)

    def _write_verdicts(self) -> None:
        """One ``config-verdict`` record per config measured this session (capacity_verdict), in
        ``verdicts.jsonl`` beside results.jsonl: they are derived from the measured records (results.jsonl
        holds what each test measured, one record per test), and the terminal summary and the write-up
        read the same word."""
        from .capacity_verdict import verdict_records

        derived = [typed.to_dict() for typed in verdict_records(list(self.state.records))]  # parsed there
        self.state.records.extend(derived)
        if self.results_path is not None and derived:
            path = self.results_path.with_name(VERDICTS_NAME)
            path.unlink(missing_ok=True)
            for record in derived:
                records.append_jsonl(path, record)

    def _save_sections(self, report_dir: Path, config: pytest.Config) -> None:
        """Sections from ``pytest_gpucap_report_sections`` hooks, saved beside results.jsonl so the
        write-up (and a later ``python -m pytest_gpucap report DIR``) shows them."""
        from .hookspec import ReportSection
        from .report.render import SECTIONS_NAME

        sections = []
        for returned in config.hook.pytest_gpucap_report_sections(records=list(self.state.records)):
            for item in returned or ():
                if not isinstance(item, ReportSection):
                    self.section_errors.append(f"pytest_gpucap_report_sections returned {item!r} (not shown): "
                                               "return a list of pytest_gpucap.ReportSection(title, markdown, html=None)")
                    continue
                sections.append({"title": item.title, "markdown": item.markdown, "html": item.html})
        path = report_dir / SECTIONS_NAME
        if sections:
            from .files import write_atomically

            text = json.dumps(sections, indent=1)
            write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        elif path.exists():
            path.unlink()

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
        rows, self.regressions = compare.compare_records(baseline, self.state.records,
                                                         settings.regression_threshold_pct)
        self.spread_note = compare.spread_note(rows)  # --gpucap-repeat: figures judged against their spread
        if self.regressions and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _save_calibration(self) -> None:
        path = self.state.settings.calibration_path
        # The calibration sits below the records layer: record_calibration turns the ceilings into its samples.
        ceilings = [r for r in self.state.records if isinstance(records.parse(r), records.CeilingRecord)]
        if path is None or not ceilings:
            return
        learned = record_calibration.calibrate_from(ceilings)
        prediction.save_calibration(self.state.calibration.merged(learned), path)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        if state.swept:
            terminalreporter.write_line(f"gpucap: removed leftover servers of an earlier session: {state.swept}")
        if self.previous_error:
            terminalreporter.write_line(f"gpucap: earlier results not reused: {self.previous_error}")
        self._gate_summary(terminalreporter)
        for line in self.section_errors:
            terminalreporter.write_line(f"gpucap: {line}", red=True)
        if not state.records:
            return
        terminalreporter.section("gpucap capacity")
        for rec in state.records:
            terminalreporter.write_line(records.summary_line(rec))
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
            return
        if self.spread_note:
            terminalreporter.write_line(self.spread_note)
        if not self.regressions:
            terminalreporter.write_line(f"no tracked figure regressed by more than "
                                        f"{settings.regression_threshold_pct:g}% against {settings.baseline_path}")
        else:
            terminalreporter.write_line(compare.format_table(self.regressions))
            terminalreporter.write_line(f"FAILED: {len(self.regressions)} tracked figure(s) regressed by more than "
                                        f"{settings.regression_threshold_pct:g}% against {settings.baseline_path}",
                                        red=True)
