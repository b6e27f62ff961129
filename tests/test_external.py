"""The external backend: the same capacity tests against a llama-server that already runs (no boot)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import CapacityRun, matrix_toml, own_server, tagged_processes
from pytest_gpucap.backends.process import OWNER_ENV, free_port


@pytest.fixture
def running_server(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real llama-server started by the test itself: 2 slots x 1024 tokens, always killed afterwards."""
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    with own_server(llama_server_bin, tiny_model, tmp_path / "external.log", "-np", "2", "-c", "2048",
                    "--no-kv-unified", "-fit", "off", "--threads", "1", "--cache-ram", "0", "--metrics",
                    "--slots", "--no-webui", env=env) as (proc, url):
        yield url, proc


class TaggedWatcher:
    """Polls in the background for processes the plugin spawned during one pytester run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.seen.update(p.pid for p in tagged_processes(self.run_id))

    def __enter__(self) -> "TaggedWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


CONFIGS = """
    [[profiles.cpu.configs]]
    n = 2
    ctx = 1024
    [[profiles.cpu.configs]]
    n = 3
    ctx = 1024
"""


def test_endpoint_runs_the_suite_without_booting(capacity_run: CapacityRun, tiny_model: Path,
                                                 running_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    """``--gpucap-endpoint``: the matching config passes against the running server, the other skips."""
    url, proc = running_server
    log_dir = capacity_run.pytester.path / "server-logs"
    with TaggedWatcher(capacity_run.run_id) as watcher:
        result = capacity_run.run(matrix_toml(tiny_model, CONFIGS), "-v", "--gpucap-endpoint", url,
                                  "--gpucap-log-dir", str(log_dir))
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines_random([
        "*test_ceiling?cpu-n2-ctx1k-f16? PASSED*",
        "*test_ceiling?cpu-n3-ctx1k-f16? SKIPPED*",
        f"SKIPPED *endpoint {url} does not run cpu-n3-ctx1k-f16: /props total_slots = 2, config asks n = 3*",
        "cpu-n2-ctx1k-f16 *passed*used*MiB*",
    ])
    assert not watcher.seen, f"the plugin started servers although an endpoint was given: {watcher.seen}"
    assert not log_dir.exists() or not any(log_dir.iterdir())
    assert proc.poll() is None, "the plugin stopped a server it did not start"
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_unreachable_endpoint_fails_clearly(capacity_run: CapacityRun, tiny_model: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configs = """
        [[profiles.cpu.configs]]
        n = 2
        ctx = 1024
    """
    result = capacity_run.run(matrix_toml(tiny_model, configs), "--gpucap-endpoint", url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*endpoint {url} unreachable:*"])
    assert "Traceback" not in result.stdout.str()
