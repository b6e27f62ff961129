"""The managed-process core every backend shares.

A server runs in its own session (so TERM/KILL reach its whole process tree), logs to a file, and
carries an owner tag in its environment so a later session can sweep servers an earlier crashed
run left behind — and only those. ``stop()`` is idempotent: it is the one cleanup routine used on
start-up failure, in finalizers and on Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import httpx
import psutil

#: Environment variable that marks a process as started by pytest-gpucap: "OWNER_PID:TOKEN".
OWNER_ENV = "GPUCAP_OWNER"

_PR_SET_PDEATHSIG = 1


class ServerError(Exception):
    """A server failed to boot, died, or does not run what was asked.

    The message (with the log tail) is what the user needs, not our stack: the plugin turns it
    into a test failure without a traceback at the fixture and test boundary.
    """


@dataclass(frozen=True)
class Readiness:
    """How long a booting server may take before it counts as hung.

    ``timeout_s`` is the deadline a quiet server gets. With ``extend_while_busy`` a server whose
    log is still growing or whose process tree is still using CPU keeps its boot alive until it
    has been idle for ``idle_s``, up to ``hard_cap_s``: a first boot that compiles bytecode or
    warms caches is slow but not stuck.
    """

    timeout_s: float
    extend_while_busy: bool = False
    idle_s: float = 30.0
    hard_cap_s: float = 600.0


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up once in the parent: the child of a threaded parent (the sampler runs while the next
# config boots) should do as little as possible between fork and exec — no dlopen there.
_PRCTL = _load_prctl()


def _child_setup() -> None:
    """Runs in the child before exec: new session, and SIGTERM if the parent dies (Linux)."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class StopInfo:
    """How a stop went: useful in reports and for spotting slow shutdowns."""

    returncode: int | None
    seconds: float
    killed: bool


class ManagedProcess:
    """One server process tree with a log file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 owner_token: str = "") -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.env[OWNER_ENV] = f"{os.getpid()}:{owner_token}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self.stop_info: StopInfo | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self.env, preexec_fn=_child_setup, close_fds=True,
                )
            except OSError as exc:
                raise ServerError(f"cannot start {self.argv[0]}: {exc}") from None
        self.pgid = self.proc.pid

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exit_code(self) -> int | None:
        """None while running."""
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                tail = deque(fh, maxlen=lines)
        except OSError:
            return "(no log)"
        return b"".join(tail).decode("utf-8", "replace").rstrip()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def group_alive(self) -> bool:
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        if self.pgid is None:
            return
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_s: float = 10.0) -> StopInfo:
        """SIGTERM the process group, SIGKILL after ``grace_s``, wait until the group is gone."""
        if self.stop_info is not None:
            return self.stop_info
        if self.proc is None:
            self.stop_info = StopInfo(None, 0.0, False)
            return self.stop_info
        t0 = time.monotonic()
        killed = False
        self._signal_group(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)  # a stopped (SIGSTOPped, hung) server acts on SIGTERM only once continued
        deadline = t0 + grace_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.group_alive():
                break
            time.sleep(0.05)
        else:
            killed = True
            self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < end:
            self._signal_group(signal.SIGKILL)
            time.sleep(0.05)
        self.stop_info = StopInfo(self.proc.returncode, time.monotonic() - t0, killed)
        return self.stop_info

    def kill_leader(self) -> None:
        """SIGKILL only the leader: how tests simulate a crash."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by a process and its children (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_healthy(proc: ManagedProcess, url: str, readiness: Readiness | float,
                 abort: Callable[[], str | None] = lambda: None, what: str = "server",
                 progress: Callable[[str], None] | None = None) -> float:
    """Poll ``url`` until it answers 200; fail fast when the child exits. Returns boot seconds.

    Past ``readiness.timeout_s`` a busy server (log growing, CPU in use) keeps waiting while
    ``readiness.extend_while_busy`` allows it; ``progress`` hears why the boot is still waited for.
    """
    rule = readiness if isinstance(readiness, Readiness) else Readiness(float(readiness))
    t0 = time.monotonic()
    last_busy = t0
    last_size, last_cpu = _log_size(proc.log_path), _tree_cpu_s(proc.pid)
    next_note = t0 + rule.timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = proc.exit_code()
            # Read after the exit code: an abort (the watchdog) that ended the child is named as such.
            reason = abort()
            if reason:
                raise ServerError(f"{reason} (during boot; log {proc.log_path})")
            if code is not None:
                raise ServerError(
                    f"{what} exited with code {code} during boot (log {proc.log_path}):\n{proc.log_tail()}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if rule.extend_while_busy:
                size, cpu = _log_size(proc.log_path), _tree_cpu_s(proc.pid)
                if size != last_size or cpu - last_cpu > 0.05:
                    last_busy = now
                last_size, last_cpu = size, cpu
            elapsed = now - t0
            busy = rule.extend_while_busy and now - last_busy < rule.idle_s
            if elapsed > rule.timeout_s and (not busy or elapsed > rule.hard_cap_s):
                cap = (f", still busy at the {rule.hard_cap_s:.0f} s cap" if busy else
                       f", idle for {now - last_busy:.0f} s" if rule.extend_while_busy else "")
                raise ServerError(
                    f"{what} not healthy after {elapsed:.0f} s{cap} (raise boot_timeout_s or "
                    f"--gpucap-boot-timeout; log {proc.log_path}):\n{proc.log_tail()}")
            if busy and elapsed > rule.timeout_s and now >= next_note and progress is not None:
                progress(f"{what}: not healthy after {elapsed:.0f} s but still starting (log or CPU busy); "
                         f"waiting up to {rule.hard_cap_s:.0f} s")
                next_note = now + 15.0
            time.sleep(0.2)


def _owner_of(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(OWNER_ENV)
    except (psutil.Error, OSError):
        return None


def sweep_leftovers() -> list[int]:
    """Kill servers tagged by a pytest-gpucap session whose owner process is gone.

    Servers of a live session (another xdist worker, another terminal) are left alone.
    """
    swept: list[int] = []
    killed: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid"]):
        tag = _owner_of(proc)
        if not tag:
            continue
        owner = tag.split(":", 1)[0]
        if owner.isdigit() and psutil.pid_exists(int(owner)):
            continue
        try:
            pgid = os.getpgid(proc.pid)
            if pgid == proc.pid:
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.kill()
            swept.append(proc.pid)
            killed.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    _wait_gone(killed, timeout_s=10.0)
    return swept


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    """Wait until killed processes have exited (zombies count as gone: their memory is freed), so
    the next baseline and preflight do not count a dying leftover's memory as in use."""
    deadline = time.monotonic() + timeout_s
    while procs and time.monotonic() < deadline:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        procs = alive
        if procs:
            time.sleep(0.05)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
