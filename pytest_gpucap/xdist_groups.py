"""``--dist loadgroup`` that works: each config's tests on one worker, so its server boots once.

pytest-xdist groups ``xdist_group`` tests by a suffix it writes into each item's private ``_nodeid``
on the workers; pytest 9 derives ``nodeid`` from a structured id instead, so the suffix never
reaches the controller and every test is scheduled on its own (measured: a config's tests ran on
both workers and its server booted twice). Here the workers write ``{nodeid: group}`` to a file the
controller chose, before they report their collection, and the controller's scheduler groups by it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

from .files import write_atomically

GROUPS_DIR_KEY = "gpucap_groups_dir"


def group_of(item: pytest.Item) -> str | None:
    """The item's ``xdist_group`` name(s), joined as pytest-xdist does; None without a mark."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) if names else None


def write_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Worker side: save this worker's collection's groups where the controller reads them."""
    folder = getattr(config, "workerinput", {}).get(GROUPS_DIR_KEY)
    if not folder:
        return
    groups = {item.nodeid: g for item in items if (g := group_of(item)) is not None}
    text = json.dumps(groups)
    worker = config.workerinput.get("workerid", str(os.getpid()))
    write_atomically(Path(folder) / f"{worker}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


class ConfigGroupScheduling(LoadScopeScheduling):
    """Load-scope scheduling whose scope is the test's group (its capacity config), else the test."""

    def __init__(self, config: pytest.Config, log: Any, groups_dir: Path) -> None:
        super().__init__(config, log)
        self.groups_dir = groups_dir
        self._groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:  # first asked in schedule(), after every worker reported its collection
            self._groups = {}
            for path in sorted(self.groups_dir.glob("*.json")):
                self._groups.update(json.loads(path.read_text(encoding="utf-8")))
        group = self._groups.get(nodeid)
        return f"@{group}" if group is not None else nodeid
