"""The capacity suite runs with the pytest-gpucap plugin (installed via its pytest11 entry point).

Matrix: capacity_tests/gpucap.toml (override with --gpucap-matrix).

The two hooks below are examples of the plugin's extension hooks (see the README's "Extension
hooks"): copy and change them for your own suite.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from pytest_gpucap import ReportSection


def pytest_gpucap_record(record: dict[str, Any]) -> None:
    """Tag every record with the CI run that made it (empty outside CI), so results.jsonl files from
    several runners can be told apart."""
    record["ci_run"] = os.environ.get("GITHUB_RUN_ID", "")


def pytest_gpucap_report_sections(records: list[dict[str, Any]]) -> list[ReportSection]:
    """A small "Records" section: how many records of each kind this session wrote."""
    kinds = Counter(str(r.get("kind")) for r in records)
    rows = "\n".join(f"| {kind} | {count} |" for kind, count in sorted(kinds.items()))
    return [ReportSection("Records in this run", f"| kind | records |\n|---|---|\n{rows}\n")]
