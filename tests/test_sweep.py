"""The leftover sweep: servers tagged by a dead pytest-gpucap session are removed, live ones are not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import ONE_CONFIG, CapacityRun, matrix_toml, own_server
from pytest_gpucap.backends.process import OWNER_ENV



def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    assert not psutil.pid_exists(child.pid)
    return child.pid


class Servers:
    """Real llama-servers started by this test with a chosen owner tag; all killed at the end."""

    def __init__(self, binary: Path, model: Path, log_dir: Path) -> None:
        self.binary, self.model, self.log_dir = binary, model, log_dir
        self.stack = contextlib.ExitStack()

    def start(self, owner_tag: str) -> subprocess.Popen[bytes]:
        proc, _ = self.stack.enter_context(own_server(
            self.binary, self.model, self.log_dir / f"server-{owner_tag.replace(':', '-')}.log", "-np", "1",
            "-c", "1024", "-fit", "off", "--threads", "1", "--cache-ram", "0", "--no-webui",
            env={**os.environ, OWNER_ENV: owner_tag}))
        return proc

    def kill_all(self) -> None:
        self.stack.close()


@pytest.fixture
def servers(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> Iterator[Servers]:
    own = Servers(llama_server_bin, tiny_model, tmp_path)
    try:
        yield own
    finally:
        own.kill_all()


def test_sweep_removes_only_servers_of_dead_sessions(capacity_run: CapacityRun, tiny_model: Path,
                                                     servers: Servers) -> None:
    """A capacity session kills servers whose owner process is gone and leaves a live owner's alone."""
    live = servers.start(f"{os.getpid()}:y")
    orphan = servers.start(f"{_dead_pid()}:x")
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG))
    result.assert_outcomes(passed=1)
    try:
        code = orphan.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the leftover server of a dead session was not swept")
    assert code == -signal.SIGKILL
    assert live.poll() is None, "the sweep killed a server whose owner is alive"
    result.stdout.fnmatch_lines([f"gpucap: removed leftover servers of an earlier session: [[]*{orphan.pid}*]"])


def test_no_sweep_option_leaves_leftovers(capacity_run: CapacityRun, tiny_model: Path, servers: Servers) -> None:
    orphan = servers.start(f"{_dead_pid()}:x")
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "--gpucap-no-sweep")
    result.assert_outcomes(passed=1)
    assert orphan.poll() is None
    result.stdout.no_fnmatch_line("*removed leftover servers*")
