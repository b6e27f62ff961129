"""What the plugin's fixtures and report hooks share: putting a record on a test report, the progress
line, the server-error boundary and the record of a config test that ended before measuring."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest

from . import records
from .backends import ServerError
from .matrix import CapacityConfig


@contextlib.contextmanager
def as_test_failure() -> Iterator[None]:
    """The fixture and test boundary: a server error fails the test with its message, no traceback."""
    try:
        yield
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)


def attach(node: pytest.Item, record: records.Record | dict[str, Any]) -> None:
    """Put a record on the test report (reaches the xdist controller) plus flat JUnit properties.

    It travels as its JSON dict. User hooks (``pytest_gpucap_record``) see it first and may add fields."""
    if isinstance(record, records.Record):
        record = record.to_dict()
    node.config.hook.pytest_gpucap_record(record=record)
    node.user_properties.append((records.PROPERTY_KEY, record))
    prefix = records.record_name(record)
    for key, value in records.headline(record).items():
        node.user_properties.append((f"gpucap:{prefix}:{key}", round(value, 4)))


def progress_sink(config: pytest.Config) -> Callable[[str], None] | None:
    """One updating line per running config on a terminal; plain lines otherwise."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or config.get_verbosity() < 0:
        return None
    tty = bool(getattr(reporter, "isatty", False))
    capman = config.pluginmanager.get_plugin("capturemanager")

    def sink(line: str) -> None:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            if tty:
                reporter.write(f"\r{line:<110}", flush=True)
            else:
                reporter.write_line(f"gpucap: {line}")
    return sink


def junit_headline_only(report: pytest.TestReport) -> None:
    """JUnit writes the teardown report's properties: there, the headline figures (``gpucap:...``) and the
    reason only, not the whole record (the recorder reads that from the setup and call reports)."""
    report.user_properties = [(k, v) for k, v in report.user_properties if k != records.PROPERTY_KEY]



def record_outcome(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport) -> None:
    """Say why a config test did not pass, and keep a record for a config that never got measured.

    The reason travels on the report (so it reaches the xdist controller); a test that ended before
    attaching a record gets one with the config and the reason, so the write-up lists it.
    """
    cfg = getattr(item, "callspec", None) and item.callspec.params.get("gpucap_config")
    if not isinstance(cfg, CapacityConfig):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = records.one_line(str(report.longrepr[2]).removeprefix("Skipped: "))
    elif call.excinfo is not None:
        reason = records.one_line(call.excinfo.exconly())
    else:
        reason = report.outcome
    report.user_properties.append((records.REASON_KEY, reason))
    if any(key == records.PROPERTY_KEY for key, _ in report.user_properties):
        return
    kind = "ceiling" if "gpucap_ceiling" in getattr(item, "fixturenames", ()) else "unmeasured"
    record = records.outcome_record(cfg, item.nodeid, kind, reason).to_dict()
    item.config.hook.pytest_gpucap_record(record=record)
    report.user_properties.append((records.PROPERTY_KEY, record))
