"""``--gpucap-strict``: a GPU gate that is not green when nothing was measured.

Without it a run on a runner with no GPU, no server or no model skips every config and exits 0.
With it the controller (xdist-safe: it reads the test reports) fails the session when a selected
config never had its server booted, printing one line per config and the reason, and when the
selection held no capacity config at all.
"""

from __future__ import annotations

from typing import Any

import pytest

from .matrix import CapacityConfig
from .records import REASON_KEY

CONFIG_KEY = "gpucap:config"  # (config id, whether this test ran on its booted server)


def tag(item: pytest.Item, report: pytest.TestReport) -> None:
    """Worker side: mark a config test's setup and call reports with its config and whether it measured it
    (its call phase ran with the config's server booted). Not the teardown report: JUnit writes that one's
    properties, which hold the headline figures only."""
    cfg = getattr(item, "callspec", None) and item.callspec.params.get("gpucap_config")
    if isinstance(cfg, CapacityConfig) and report.when != "teardown":
        booted = report.when == "call" and "gpucap_server" in getattr(item, "funcargs", {})
        report.user_properties.append((CONFIG_KEY, [cfg.id, booted]))


class StrictGate:
    """Controller side: collects which selected configs were measured and fails the session otherwise."""

    def __init__(self) -> None:
        self.selected: dict[str, str | None] = {}  # config id → why not measured (None: measured)
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key != CONFIG_KEY:
                continue
            config_id, booted = value
            current = self.selected.get(config_id, "")  # None: measured (stays so); "": no reason yet
            if booted or current is None:
                self.selected[config_id] = None
            elif not current:
                self.selected[config_id] = self._reason(report)

    @staticmethod
    def _reason(report: pytest.TestReport) -> str:
        if report.passed:
            return ""  # decided later: no test of it booted the server
        return next((str(v) for k, v in report.user_properties if k == REASON_KEY), report.outcome)

    def unmeasured(self) -> list[str]:
        """One line per selected config that was not measured, or one line for an empty selection."""
        if not self.selected:
            return ["no capacity configuration was selected (check -m and the matrix's profile names)"]
        return [f"{cid} not measured: {why or 'no test of it booted its server'}"
                for cid, why in self.selected.items() if why is not None]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        config = session.config
        if config.getoption("gpucap_predict") or config.getoption("collectonly"):
            return
        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            return
        self.lines = self.unmeasured()
        if self.lines and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.lines:
            return
        terminalreporter.section("gpucap strict gate")
        for line in self.lines:
            terminalreporter.write_line(f"gpucap strict: {line}", red=True)
        terminalreporter.write_line(f"FAILED (--gpucap-strict): {len(self.lines)} line(s) above", red=True)
