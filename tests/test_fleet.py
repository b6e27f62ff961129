"""A fleet over ssh, for real: an sshd bound to 127.0.0.1 (a free port, a throwaway key and config in
tmp, no other address ever) stands in for a second GPU host, and the cpu matrix runs on it through
pytest-xdist's ``--tx ssh=…`` with ``--dist each``. Records come back naming the host; no server and
no sshd session is left on either side.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from conftest import CEILING_TEST, ONE_CONFIG, REPO, RUN_ENV, CapacityRun, matrix_toml

from pytest_gpucap import records
from pytest_gpucap.backends.process import free_port

REQUIRE_ENV = "GPUCAP_REQUIRE_SSH"
HOST_ALIAS = "gpucap-loopback"


@dataclass
class LoopbackSsh:
    """A running loopback sshd and an ssh_config that reaches it as ``HOST_ALIAS``."""

    config: Path
    log: Path
    pid: int


def _sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set)")
    pytest.skip(f"{reason}; set {REQUIRE_ENV}=1 to fail instead")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpucap-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture
def loopback_ssh(tmp_path: Path) -> Iterator[LoopbackSsh]:
    sshd = _sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        _unavailable("no sshd/ssh here (Debian: apt-get install openssh-server)")
    if not Path("/run/sshd").is_dir():  # sshd's privilege-separation directory (the service makes it)
        if os.geteuid() != 0:
            _unavailable("sshd needs /run/sshd, which only root can create")
        Path("/run/sshd").mkdir(mode=0o755)
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    _keygen(d / "host_key")
    _keygen(d / "user_key")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port, user = free_port(), getpass.getuser()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nAllowUsers {user}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nStrictModes no\nX11Forwarding no\nAllowTcpForwarding no\nLogLevel VERBOSE\n")
    config = d / "ssh_config"
    config.write_text(
        f"Host {HOST_ALIAS}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d / 'user_key'}\n"
        f"  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking accept-new\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n")
    log = d / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    sessions: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not come up on 127.0.0.1:{port}:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        ok = subprocess.run(["ssh", "-F", str(config), HOST_ALIAS, "true"], capture_output=True, text=True,
                            timeout=30)
        assert ok.returncode == 0, f"ssh to the loopback sshd failed: {ok.stderr}\n{log.read_text()}"
        yield LoopbackSsh(config, log, proc.pid)
        sessions = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(sessions, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"ssh sessions left after the run: {[p.pid for p in alive]}"
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


def test_cpu_matrix_over_ssh_comes_back_naming_the_host(capacity_run: CapacityRun, tiny_model: Path,
                                                        loopback_ssh: LoopbackSsh) -> None:
    pytester, here = capacity_run.pytester, capacity_run.pytester.path
    # The remote side is a fresh login: it gets this run's tag (so its servers are found if left) and
    # this checkout on its path; on a real fleet the plugin is installed in the remote venv.
    python = f"env {RUN_ENV}={capacity_run.run_id} PYTHONPATH={REPO} {sys.executable}"
    tx = f"ssh_config={loopback_ssh.config}//ssh={HOST_ALIAS}//python={python}//chdir={here}"
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    pytester.makefile(".toml", gpucap=matrix_toml(tiny_model, ONE_CONFIG))
    pytester.makepyfile(test_capacity=CEILING_TEST)
    os.environ[RUN_ENV] = capacity_run.run_id
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(REPO))  # the controller side: this checkout's plugin too
            # No bare local paths on the command line: xdist rewrites those relative to rsync roots
            # (and rsync is deprecated); "--opt=value" travels as is and the worker runs in chdir.
            result = pytester.runpytest_subprocess(
                "--gpucap-matrix=gpucap.toml", f"--gpucap-server-bin={capacity_run.server_bin}",
                "--gpucap-report=rep", "-p", "no:cacheprovider", "-rs", "--tx", tx, "--dist", "each",
                timeout=300)
    finally:
        os.environ.pop(RUN_ENV, None)
    capacity_run.assert_no_orphans()  # no server tagged with this run, on either side
    result.assert_outcomes(passed=1)
    assert "Accepted publickey" in loopback_ssh.log.read_text(errors="replace"), "the run did not go over ssh"
    recs = records.read_jsonl(here / "rep" / "results.jsonl")
    assert len(recs) == 1
    host = recs[0]["host"]
    assert host["hostname"] == socket.gethostname() and host["device"] == "host"
    assert recs[0]["config_id"] and recs[0]["server"]["up_at"]
    # the fast device readings made it back too: their downsampled timeline holds the minimum
    mem = recs[0]["memory"]
    assert mem["device_samples"] >= len(mem["timeline"]) > 0
    assert mem["free_mib"] <= min(p["free_mib"] for p in mem["timeline"]) + 0.1
    assert mem["server_used_mib"] == mem["used_after_load_mib"] and mem["others_used_mib"] == 0
    # the remote xdist worker (a python under the sshd session) is gone once the run is over
    assert _remote_pythons(loopback_ssh.pid) == []


def _remote_pythons(sshd_pid: int, wait_s: float = 10) -> list[int]:
    """PIDs of python processes still under the sshd, after up to ``wait_s`` for sessions to close."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for child in psutil.Process(sshd_pid).children(recursive=True):
            try:
                if "python" in child.name() and child.status() != psutil.STATUS_ZOMBIE:
                    left.append(child.pid)
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_missing_sshd_skips_with_a_reason_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install openssh-server.*GPUCAP_REQUIRE_SSH=1"):
        _unavailable("no sshd/ssh here (Debian: apt-get install openssh-server)")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="GPUCAP_REQUIRE_SSH is set"):
        _unavailable("no sshd/ssh here")
