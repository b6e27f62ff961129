"""Hooks a capacity suite's conftest.py (or another plugin) can implement.

Registered through ``pytest_addhooks``. Example (``capacity_tests/conftest.py`` ships one)::

    def pytest_gpucap_record(record):
        record["site"] = "rack-3"

    def pytest_gpucap_report_sections(records):
        from pytest_gpucap import ReportSection
        return [ReportSection("Site", f"{len(records)} records from rack 3.")]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any



@dataclass(frozen=True)
class ReportSection:
    """One extra section of the write-up: a title, its Markdown body, and optionally its HTML body
    (without it the HTML page shows the Markdown text as preformatted text)."""

    title: str
    markdown: str
    html: str | None = None


def pytest_gpucap_record(record: dict[str, Any]) -> None:
    """Called with each result record (its JSON form) before it is attached to the test report and
    saved to ``results.jsonl``; add or change fields in place. Keys the write-up does not know are
    kept in the file."""


def pytest_gpucap_report_sections(records: list[dict[str, Any]]) -> list[ReportSection] | None:
    """Return extra sections for the write-up (capacity.md and capacity.html), rendered after the
    built-in ones from this session's records. Every implementation's sections are shown, in
    plugin order."""
