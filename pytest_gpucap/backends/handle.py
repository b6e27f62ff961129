"""Boot one capacity configuration, keep it observed while tests use it, and tear it down.

A ``ServerHandle`` is what tests receive: the URL, the boot time, memory before/after load, the
sampled timeline, the server's own memory report, and ``hold()`` which samples memory while
checking that the server is alive and the watchdog quiet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..files import DeviceLock
from ..matrix import CapacityConfig, HostProfile
from ..probes import MemoryProbe, MemorySnapshot, Sampler, take_snapshot
from ..safety import Watchdog, post_boot_reason, preflight_reason
from .base import Backend, MemoryReport
from .external import EndpointMismatch, External
from .process import ManagedProcess, ServerError

RECLAIM_TIMEOUT_S = 30.0
RECLAIM_TOLERANCE_MIB = 64.0


class PreflightSkip(Exception):
    """The host cannot hold this config right now; the message is the skip reason."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything resolved to start one config: no lookups happen after this."""

    config: CapacityConfig
    profile: HostProfile
    log_dir: Path
    command: tuple[str, ...] | None = None  # the argv prefix the backend's find_command resolved
    binary_version: str = ""
    model: Path | None = None
    mmproj: Path | None = None
    endpoint: str | None = None
    boot_timeout_s: float = 120.0
    hold_s: float = 2.0
    owner_token: str = ""
    preflight: bool = True
    progress: Callable[[str], None] | None = None  # hears why a slow boot is still waited for
    device_locks: tuple[Path, ...] = ()  # lock files of the devices (shared by xdist workers); none: not exclusive
    device_keys: tuple[str, ...] = ()  # the devices it occupies: host, gpu0, ... (empty: the profile's)
    gpus: tuple[int, ...] = ()  # cards pinned to, as the caller numbers them (pinning.config_gpus)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES for the server; None: left as the caller's

    @property
    def binary(self) -> Path | None:
        """The server executable (the first word of ``command``)."""
        return Path(self.command[0]) if self.command else None

    @property
    def device_key(self) -> str:
        """The device(s) it occupies, one word: ``host``, ``gpu0``, ``gpu0+gpu1``."""
        return "+".join(self.device_keys) or self.profile.device_key


@dataclass
class Teardown:
    """How the server went away and whether memory came back to the pre-boot baseline."""

    stop_s: float = 0.0
    killed: bool = False
    returncode: int | None = None
    temp_leftovers: list[str] = field(default_factory=list)  # what the server left in its TMPDIR (removed)
    reclaim_s: float | None = None
    reclaimed: bool | None = None


@dataclass
class ServerHandle:
    """A running (or external) server for one config."""

    spec: LaunchSpec
    probe: MemoryProbe
    url: str = ""
    process: ManagedProcess | None = None
    argv: list[str] = field(default_factory=list)
    boot_s: float | None = None
    baseline: MemorySnapshot | None = None
    after_load: MemorySnapshot | None = None
    sampler: Sampler | None = None
    watchdog: Watchdog | None = None
    backend: Backend = None  # type: ignore[assignment]  # resolved from the config in __post_init__
    report: MemoryReport | None = None
    props: dict[str, Any] = field(default_factory=dict)
    teardown: Teardown | None = None
    external_pid: int | None = None
    tmp_dir: Path | None = None  # a private TMPDIR (vLLM), removed at teardown
    prediction: Any = None  # prediction.Prediction made before boot, when the model could be read
    locks: list[DeviceLock] = field(default_factory=list)
    device_wait_s: float | None = None  # how long boot waited for the device (not in any figure)
    up_at: float | None = None  # wall-clock time this server took the device
    projection: Any = None  # fit_params.Projection: llama.cpp's own projection, made before boot

    def __post_init__(self) -> None:
        if self.spec.endpoint:
            self.backend = External()  # an endpoint given for any config is attached to, not started
        elif self.backend is None:
            from . import backend_for

            self.backend = backend_for(self.config.backend)
        if self.report is None:
            self.report = self.backend.empty_report()

    @property
    def config(self) -> CapacityConfig:
        return self.spec.config

    @property
    def profile(self) -> HostProfile:
        return self.spec.profile

    @property
    def is_gpu(self) -> bool:
        return self.probe.kind == "nvml"

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid if self.process.alive() else None
        return self.external_pid

    @property
    def server_name(self) -> str:
        return self.backend.server_name

    @property
    def api_key(self) -> str | None:
        return self.backend.api_key(self.config)

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path if self.process else None

    # ------------------------------------------------------------------ boot

    def boot(self) -> "ServerHandle":
        """Take the device, preflight, start, wait for readiness, verify, capture memory. Call
        ``stop()`` on any error."""
        self._take_device()
        self.baseline = take_snapshot(self.probe, None)
        if self.spec.preflight:
            reason = preflight_reason(self.profile, self.baseline, self.is_gpu, self.backend.host_reserve(self.config))
            if reason:
                raise PreflightSkip(reason)
        self.watchdog = Watchdog(self.profile, self.is_gpu, self._on_watchdog)
        self.sampler = Sampler(self.probe, lambda: self.pid, self.profile.watchdog.interval_s,
                               [self.watchdog.observe])
        self.sampler.start()
        try:
            self.backend.start(self)
        except EndpointMismatch as exc:
            raise PreflightSkip(str(exc)) from None
        self.after_load = self.sampler.sample()
        self._check_watchdog()
        return self

    def _take_device(self) -> None:
        """Wait until no other server (another xdist worker's) holds this profile's device; the wait
        comes before the baseline and the boot clock, so it is in no figure."""
        if self.spec.device_locks and not self.locks:
            progress = self.spec.progress
            key = self.spec.device_key

            def note(waited: float) -> None:
                if progress is not None:
                    progress(f"{self.config.id}: waiting {waited:.0f} s for device {key} (another worker's "
                             "server is on it; set exclusive = false on the profile to share it)")
            waited = 0.0
            for path in sorted(self.spec.device_locks):  # one order everywhere: two multi-card configs cannot deadlock
                lock = DeviceLock(path)
                self.locks.append(lock)
                waited += lock.acquire(note)
            self.device_wait_s = waited
        self.up_at = time.time()

    # ------------------------------------------------------------------ while up

    def _on_watchdog(self, reason: str) -> None:
        if self.process is not None:
            self.process.stop(grace_s=5.0)

    def _check_watchdog(self) -> None:
        if self.watchdog and self.watchdog.tripped:
            raise ServerError(self.watchdog.tripped)

    def check_alive(self) -> None:
        """Fail with the log tail when the server died or the watchdog stopped it."""
        dead = self.process is not None and not self.process.alive()
        self._check_watchdog()  # after reading liveness: a server the watchdog ended is reported as such
        if dead and self.process is not None:
            if self.process.stop_info is not None and self.teardown is not None:
                raise ServerError(f"server for {self.config.id} was already torn down")
            raise ServerError(
                f"{self.server_name} for {self.config.id} exited with code {self.process.exit_code()} "
                f"while tests were using it (log {self.process.log_path}):\n{self.process.log_tail()}")

    def hold(self, seconds: float | None = None) -> None:
        """Keep the server up for ``seconds`` while sampling memory; fail if it dies meanwhile."""
        assert self.sampler is not None
        end = time.monotonic() + (self.spec.hold_s if seconds is None else seconds)
        while True:
            self.check_alive()
            self.sampler.sample()
            if time.monotonic() >= end:
                break
            time.sleep(min(self.profile.watchdog.interval_s, max(0.0, end - time.monotonic())))
        self.check_alive()

    def post_boot_skip_reason(self) -> str | None:
        """Why a workload must not run on this server (free memory under the post-boot floor)."""
        assert self.after_load is not None
        return post_boot_reason(self.profile, self.after_load)

    # ------------------------------------------------------------------ teardown

    def stop(self) -> Teardown:
        """Idempotent: stop sampling, stop the process group, wait for memory to come back."""
        if self.teardown is not None:
            return self.teardown
        info = Teardown()
        try:
            if self.sampler is not None:
                self.sampler.stop()
            if self.process is not None:
                stop = self.process.stop()
                info.stop_s, info.killed, info.returncode = stop.seconds, stop.killed, stop.returncode
            info.temp_leftovers = self.backend.after_stop(self)
            if self.process is not None:
                if self.baseline is not None:
                    info.reclaim_s, info.reclaimed = self._wait_reclaim(self.baseline)
        finally:
            for lock in reversed(self.locks):
                lock.release()  # after reclaim: the next server's baseline is clean
        self.teardown = info
        return info

    def _wait_reclaim(self, baseline: MemorySnapshot) -> tuple[float, bool]:
        """Poll until device (or host) memory is back at the pre-boot baseline."""
        t0 = time.monotonic()
        while True:
            snap = take_snapshot(self.probe, None)
            if self.is_gpu:
                back = snap.device.used_mib <= baseline.device.used_mib + RECLAIM_TOLERANCE_MIB
            else:
                # The stand-in device memory is the server's RSS: it is back once the group is gone.
                # Machine-wide MemAvailable moves with other processes, so it only informs.
                back = not (self.process and self.process.group_alive())
            elapsed = time.monotonic() - t0
            if back or elapsed > RECLAIM_TIMEOUT_S:
                return elapsed, back
            time.sleep(0.1)
