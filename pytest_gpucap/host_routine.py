"""The study's host routine around a capacity session: stop the production services, run the
co-tenants, measure them, and put everything back as it was found.

It wraps the test loop on the controller (the only process under plain pytest): before the first
config boots, services an earlier killed session left stopped are restored, running services are
stopped (``--gpucap-stop-services``), down co-tenants started; after the loop, whether it ended
normally, with failures, Ctrl-C, SIGTERM or an internal error, the servers are stopped, the
co-tenants it started stopped, and the services started again in reverse order. A failed restore
is loud and makes the exit code non-zero. Every process (xdist workers too) adds the co-tenants'
memory to each measured record and skips the configs of a profile whose service is up without
the flag.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from .backends.process import ServerError
from .cotenants import Cotenant, bring_up
from .hookspec import ReportSection
from .matrix import HostProfile, Matrix
from .options import Settings
from .probes import MIB, MemoryProbe, NvmlError, NvmlProbe
from .services import (
    STATE_NAME, Restored, ServiceError, StoppedService, is_up, read_state, restore_services, state_owner,
    stop_services,
)

FLAG = "--gpucap-stop-services"


def state_path(config: pytest.Config, settings: Settings) -> Path:
    """The state file: in the report directory, else the pytest cache, else the rootdir."""
    if settings.report_dir is not None:
        return settings.report_dir / STATE_NAME
    cache = getattr(config, "cache", None)
    return (Path(cache.mkdir("gpucap")) if cache else Path(str(config.rootpath))) / STATE_NAME


class HostRoutine:
    """The plugin object that owns services and co-tenants for one session (see the module doc)."""

    def __init__(self, config: pytest.Config, matrix: Matrix, settings: Settings, owner_token: str,
                 stop_servers: Callable[[], None], log_dir: Callable[[], Path]) -> None:
        self.config, self.matrix, self.settings = config, matrix, settings
        self.owner_token, self.stop_servers, self.log_dir = owner_token, stop_servers, log_dir
        self._path: Path | None = None
        self.stopped: list[StoppedService] = []
        self.cotenants: dict[str, list[Cotenant]] = {}
        self.baseline: dict[str, list[dict[str, Any]]] = {}
        self.prior: list[Restored] = []
        self.restores: list[Restored] = []
        self.error: str | None = None
        self._probes: dict[str, MemoryProbe | None] = {}
        self._skips: dict[str, str | None] = {}
        self._finished = False

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = state_path(self.config, self.settings)
        return self._path

    # ------------------------------------------------------------ the loop

    def _active(self) -> bool:
        if hasattr(self.config, "workerinput") or self.config.getoption("gpucap_predict"):
            return False
        return any(p.services or p.cotenants for p in self.matrix.profiles.values()) or self.path.exists()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Iterator[None]:
        if not self._active():
            return (yield)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._prepare(self._profiles(session))
            return (yield)
        finally:
            self._finish()
            signal.signal(signal.SIGTERM, previous)

    def _profiles(self, session: pytest.Session) -> list[HostProfile]:
        """The profiles this session boots: those of the selected configs (every declared one on an
        xdist controller, which does not collect)."""
        names = {item.callspec.params["gpucap_config"].profile for item in session.items
                 if hasattr(item, "callspec") and "gpucap_config" in item.callspec.params}
        if not session.items and getattr(self.config.option, "numprocesses", None):
            names = {c.profile for c in self.matrix.configs}
        return [p for name, p in self.matrix.profiles.items() if name in names]

    def _prepare(self, profiles: list[HostProfile]) -> None:
        owner = state_owner(self.path)
        if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
            self._abort(f"services: {self.path} belongs to a running session (pid {owner}); nothing was booted")
        try:
            leftover = read_state(self.path)
        except ServiceError as exc:
            self._abort(str(exc))
        if leftover:
            self.prior = restore_services(leftover, self.path)
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            for r in self.prior if reporter is not None else ():
                reporter.write_line(f"gpucap: restored first (left stopped by an earlier session, {self.path}): "
                                    f"{r.line()}", red=not r.ok)
            if not all(r.ok for r in self.prior):
                self._abort("services an earlier session stopped could not be restored (state file kept: "
                            f"{self.path}); nothing was booted:\n" + "\n".join(r.line() for r in self.prior))
        if self.settings.stop_services:
            for profile in profiles:
                try:
                    stop_services(profile.services, self.path, self._used(profile), self.stopped)
                except ServiceError as exc:
                    self._abort(f"services: {exc}")
        for profile in profiles:
            if self.skip_reason(profile.name):
                continue  # its configs skip: its co-tenants are not needed
            up = self.cotenants.setdefault(profile.name, [])
            for spec in profile.cotenants:
                try:
                    up.append(bring_up(spec, self.log_dir(), self.owner_token))
                except ServerError as exc:
                    self._abort(f"co-tenant: {exc}")
            self.baseline[profile.name] = [c.memory(self._probe(profile)) for c in up]

    def _abort(self, message: str) -> None:
        self.error = message
        pytest.exit(f"gpucap: {message}", returncode=pytest.ExitCode.USAGE_ERROR)

    def _finish(self) -> None:
        """Servers, then the co-tenants this session started, then the services, last stopped first.
        SIGINT and SIGTERM wait meanwhile: every command here has a timeout."""
        if self._finished:
            return
        self._finished = True
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                self.stop_servers()
            finally:
                try:
                    for cotenants in self.cotenants.values():
                        for cotenant in reversed(cotenants):
                            cotenant.stop()
                finally:
                    if self.stopped:
                        self.restores = restore_services(self.stopped, self.path)
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def pytest_unconfigure(self) -> None:
        for probe in self._probes.values():
            if probe is not None:
                probe.close()

    # ------------------------------------------------------------ every process

    def skip_reason(self, profile_name: str) -> str | None:
        """Without the flag, a profile whose service is up does not run (a service without a health
        check counts as up: nothing says otherwise)."""
        if self.settings.stop_services:
            return None
        if profile_name not in self._skips:
            running = [s for s in self.matrix.profile(profile_name).services if s.health is None or is_up(s.health)]
            self._skips[profile_name] = None if not running else (
                f"profile {profile_name!r}: production service {running[0].name!r} is running "
                f"({running[0].health.describe() if running[0].health else 'no health check'}); pass {FLAG} "
                "to stop it for the session and restore it afterwards")
        return self._skips[profile_name]

    def _probe(self, profile: HostProfile) -> MemoryProbe | None:
        if profile.name not in self._probes:
            probe = None
            if profile.device == "cuda":
                try:
                    probe = NvmlProbe(profile.gpu_index)
                except NvmlError:
                    probe = None
            self._probes[profile.name] = probe
        return self._probes[profile.name]

    def _used(self, profile: HostProfile) -> Callable[[], float]:
        """Memory in use where the profile measures: the GPU's, else the host's."""
        probe = self._probe(profile)
        if probe is not None:
            return lambda: probe.device(()).used_mib
        return lambda: (psutil.virtual_memory().total - psutil.virtual_memory().available) / MIB

    def pytest_gpucap_record(self, record: dict[str, Any]) -> None:
        """The co-tenants' memory with every measured config."""
        profile = self.matrix.profiles.get(str(record.get("profile")))
        if profile is None or not profile.cotenants or "memory" not in record:
            return
        # Under xdist the worker does not hold the controller's co-tenants: it finds them by port
        # (their state, found or started, is in the baseline the controller took).
        mine = {c.spec.name: c for c in self.cotenants.get(profile.name, [])}
        record["cotenants"] = [{k: v for k, v in (mine.get(spec.name) or Cotenant(spec)).memory(
            self._probe(profile)).items() if k != "state"} for spec in profile.cotenants]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        failed = [r for r in (*self.prior, *self.restores) if not r.ok]
        if failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def lines(self) -> list[tuple[str, bool]]:
        """(line, loud) for the terminal and the write-up."""
        out = [(f"restored first (left stopped by an earlier session, {self.path}): {r.line()}", not r.ok)
               for r in self.prior]
        for s in self.stopped:
            freed = "" if s.used_before_mib is None or s.used_after_mib is None else \
                f" (memory in use {s.used_before_mib:.0f} -> {s.used_after_mib:.0f} MiB)"
            out.append((f"stopped: {s.name}{freed}", False))
        out += [(r.line(), not r.ok) for r in self.restores]
        for cotenants in self.cotenants.values():
            for c in cotenants:
                how = f"started by gpucap (healthy after {c.boot_s:.1f} s), stopped at the end" if c.started \
                    else "found running, left alone"
                out.append((f"co-tenant {c.spec.name}: {how}", False))
        if self.error:
            out.append((self.error, True))
        return out

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.lines()
        if lines:
            terminalreporter.section("gpucap host routine")
        for line, loud in lines:
            terminalreporter.write_line(f"gpucap: {line}", red=loud, bold=loud)

    def pytest_gpucap_report_sections(self, records: list[dict[str, Any]]) -> list[ReportSection] | None:
        from .host_section import host_section

        return host_section(self.lines(), self.baseline, records)


PLUGIN_NAME = "gpucap-host-routine"


def register_host_routine(config: pytest.Config, state: Any) -> None:
    """Register the routine for the session's ``State`` (plugin.py): it stops that state's servers
    before restoring the services."""
    settings = state.settings

    def log_dir() -> Path:
        if settings.log_dir is not None:
            return settings.log_dir
        return settings.report_dir / "logs" if settings.report_dir else Path(tempfile.mkdtemp(prefix="gpucap-cotenants-"))

    def stop_servers() -> None:
        for handle in state.handles:
            handle.stop()

    config.pluginmanager.register(HostRoutine(config, state.matrix, settings, state.owner_token, stop_servers,
                                              log_dir), PLUGIN_NAME)


def skip_if_service_up(config: pytest.Config, profile: str) -> None:
    """The fixture boundary: skip a config whose profile's production service is up without the flag."""
    routine = config.pluginmanager.get_plugin(PLUGIN_NAME)
    reason = routine.skip_reason(profile) if isinstance(routine, HostRoutine) else None
    if reason:
        pytest.skip(reason)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the session like Ctrl-C does (exit code 2, interrupted, so the terminal summary
    still says what was restored): servers stop and services come back."""
    pytest.exit("gpucap: SIGTERM: stopping the servers and restoring the services",
                returncode=pytest.ExitCode.INTERRUPTED)


def restore_main(directory: Path) -> int:
    """``python -m pytest_gpucap restore [DIR]``: start what a killed session left stopped."""
    candidates = [directory / STATE_NAME, directory / ".pytest_cache" / "d" / "gpucap" / STATE_NAME]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        print(f"nothing to restore: no {STATE_NAME} in {directory} (or its .pytest_cache)")
        return 0
    owner = state_owner(path)
    if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
        print(f"error: {path} belongs to a running session (pid {owner}); it restores them itself")
        return 2
    try:
        results = restore_services(read_state(path), path)
    except ServiceError as exc:
        print(f"error: {exc}")
        return 2
    for r in results:
        print(r.line())
    return 0 if all(r.ok for r in results) else 1
