"""Stopping production services before a capacity session and starting them again after it.

A state file records each service (and how to start it) *before* its stop command runs, so a
session that dies where no finalizer runs (SIGKILL, power) leaves behind what the next session, or
``python -m pytest_gpucap restore DIR``, needs to put the host back as it was found. The file is
removed only once every service it names answers its health check again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import httpx

from .files import write_atomically
from .hostspec import Health, ServiceSpec

STATE_NAME = "gpucap-services.json"
#: Device memory counts as settled after a stop when two readings a second apart differ by less.
SETTLE_MIB = 64.0


class ServiceError(Exception):
    """A stop or start command failed; the message names the service and carries the command output."""


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed at the timeout
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        how = f"timed out after {self.seconds:.0f} s" if self.returncode is None else f"exited {self.returncode}"
        tail = "\n".join(self.output.rstrip().splitlines()[-20:])
        return f"`{' '.join(self.argv)}` {how}" + (f":\n{tail}" if tail else " (no output)")


def run_command(argv: Sequence[str], timeout_s: float) -> CommandResult:
    """Run a stop/start/health command in its own session (a Ctrl-C meant for pytest does not reach
    it) with its output in a file, not a pipe: a daemon it leaves behind keeps a pipe open forever."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            return CommandResult(tuple(argv), 127, f"cannot run {argv[0]}: {exc}", 0.0)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            code = None
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return CommandResult(tuple(argv), code, text, time.monotonic() - t0)


def is_up(health: Health, timeout_s: float = 5.0) -> bool:
    """One health check: the URL answers 200, or the command exits 0."""
    if health.url:
        try:
            return httpx.get(health.url, timeout=min(timeout_s, 2.0)).status_code == 200
        except httpx.HTTPError:
            return False
    return run_command(health.argv, timeout_s).ok


def wait_health(health: Health, up: bool, timeout_s: float) -> float | None:
    """Seconds until the check reads ``up`` (None: not within ``timeout_s``)."""
    t0 = time.monotonic()
    while True:
        if is_up(health, timeout_s) == up:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return None
        time.sleep(0.2)


def wait_settled(used_mib: Callable[[], float], timeout_s: float) -> float:
    """Poll memory in use until it stops falling (a stopped service's memory is back), up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = used_mib()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = used_mib()
        if abs(now - last) < SETTLE_MIB:
            return now
        last = now
    return last


# ---------------------------------------------------------------- state file

@dataclass(frozen=True)
class StoppedService:
    """One stopped service as the state file keeps it: enough to start it again without the matrix."""

    name: str
    start: tuple[str, ...]
    health_url: str | None
    health_argv: tuple[str, ...]
    timeout_s: float
    used_before_mib: float | None = None
    used_after_mib: float | None = None  # None until its stop was verified

    @classmethod
    def of(cls, spec: ServiceSpec, used_before_mib: float | None) -> "StoppedService":
        health = spec.health or Health()
        return cls(spec.name, spec.start, health.url, health.argv, spec.timeout_s, used_before_mib)

    @property
    def health(self) -> Health | None:
        return Health(self.health_url, self.health_argv) if self.health_url or self.health_argv else None


def read_state(path: Path) -> list[StoppedService]:
    """The services an earlier session stopped and did not restore (none when there is no file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [StoppedService(**{**e, "start": tuple(e["start"]), "health_argv": tuple(e["health_argv"])})
                for e in data["services"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServiceError(f"{path}: unreadable service state ({exc}); start the services named there by hand "
                           "and delete the file") from None


def state_owner(path: Path) -> int | None:
    """The pid of the session that wrote the state file (None without a readable one)."""
    try:
        pid = json.loads(path.read_text(encoding="utf-8")).get("written_by_pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def write_state(path: Path, stopped: Sequence[StoppedService]) -> None:
    data = {"written_by_pid": os.getpid(), "written_at": time.time(), "services": [asdict(s) for s in stopped]}
    text = json.dumps(data, indent=1)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- stop and restore

@dataclass(frozen=True)
class Restored:
    """How one restore went: the line the summary and the write-up show."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""

    def line(self) -> str:
        if self.ok:
            return f"restored: {self.name} (healthy after {self.seconds:.1f} s)"
        return f"RESTORE FAILED: {self.name}: {self.detail}"


def stop_services(specs: Sequence[ServiceSpec], state_path: Path, used_mib: Callable[[], float],
                  stopped: list[StoppedService]) -> list[StoppedService]:
    """Stop each running service, adding it to ``stopped`` and the state file before its stop command runs
    (so a Ctrl-C meanwhile still restores it).

    A service whose health check says it is down is not touched. On a failed stop every service in
    ``stopped`` is started again, the list emptied and the state file removed (everything as found),
    then ``ServiceError`` says which stop failed and why.
    """
    for spec in specs:
        if spec.health is not None and not is_up(spec.health):
            continue
        entry = StoppedService.of(spec, used_mib())
        stopped.append(entry)  # its start command may also be needed to undo a half-done stop
        write_state(state_path, stopped)
        result = run_command(spec.stop, spec.timeout_s)
        error = None if result.ok else f"stop command {result.describe()}"
        if error is None and spec.health is not None and wait_health(spec.health, False, spec.timeout_s) is None:
            error = f"still answers {spec.health.describe()} {spec.timeout_s:.0f} s after its stop command"
        if error is not None:
            undone = restore_services(stopped, state_path)
            stopped.clear()
            undo = "; ".join(r.line() for r in undone)
            raise ServiceError(f"service {spec.name!r}: {error}\nnothing was booted; {undo}")
        stopped[-1] = replace(entry, used_after_mib=wait_settled(used_mib, min(spec.timeout_s, 30.0)))
        write_state(state_path, stopped)
    return stopped


def restore_services(stopped: Sequence[StoppedService], state_path: Path) -> list[Restored]:
    """Start the services again in reverse order and check their health. The state file goes once
    all are healthy; after a failure it stays, naming the ones still down, for the next session."""
    results = []
    for entry in reversed(stopped):
        t0 = time.monotonic()
        result = run_command(entry.start, entry.timeout_s)
        if not result.ok:
            results.append(Restored(entry.name, False, result.seconds, f"start command {result.describe()}"))
            continue
        health = entry.health
        waited = 0.0 if health is None else wait_health(health, True, entry.timeout_s)
        if waited is None:
            results.append(Restored(entry.name, False, time.monotonic() - t0,
                                    f"not healthy at {health.describe() if health else ''} "
                                    f"{entry.timeout_s:.0f} s after its start command"))
        else:
            results.append(Restored(entry.name, True, time.monotonic() - t0))
    down = {r.name for r in results if not r.ok}
    if down:
        write_state(state_path, [s for s in stopped if s.name in down])
    else:
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
    return results
