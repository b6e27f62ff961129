"""Boot one capacity configuration, keep it observed while tests use it, and tear it down.

A ``ServerHandle`` is what tests receive: the URL, the boot time, memory before/after load, the
sampled timeline, the server's own memory report, and ``hold()`` which samples memory while
checking that the server is alive and the watchdog quiet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from ..matrix import CapacityConfig, HostProfile
from ..probes import MemoryProbe, MemorySnapshot, Sampler, take_snapshot
from ..safety import Watchdog, post_boot_reason, preflight_reason
from . import llamacpp, vllm
from .process import ManagedProcess, ServerError, free_port, wait_healthy

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
    binary: Path | None = None
    command: tuple[str, ...] | None = None  # vLLM: argv prefix from vllm.find_command
    binary_version: str = ""
    model: Path | None = None
    mmproj: Path | None = None
    endpoint: str | None = None
    boot_timeout_s: float = 120.0
    hold_s: float = 2.0
    owner_token: str = ""
    preflight: bool = True


@dataclass
class Teardown:
    """How the server went away and whether memory came back to the pre-boot baseline."""

    stop_s: float = 0.0
    killed: bool = False
    returncode: int | None = None
    temp_leftovers: list[str] = field(default_factory=list)  # what vLLM left in its TMPDIR (removed)
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
    report: llamacpp.ServerMemoryReport | vllm.VllmMemoryReport = field(default_factory=llamacpp.ServerMemoryReport)
    props: dict[str, Any] = field(default_factory=dict)
    teardown: Teardown | None = None
    external_pid: int | None = None
    tmp_dir: Path | None = None  # vLLM: its own TMPDIR, removed at teardown
    prediction: Any = None  # memory_model.Prediction made before boot, when the model could be read

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
        return {"vllm": "vLLM", "external": "endpoint"}.get(self.config.backend, "llama-server")

    @property
    def api_key(self) -> str | None:
        return vllm.api_key(self.config) if self.config.backend == "vllm" else None

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path if self.process else None

    # ------------------------------------------------------------------ boot

    def boot(self) -> "ServerHandle":
        """Preflight, spawn, wait for health, verify, capture memory. Call ``stop()`` on any error."""
        cfg = self.config
        self.baseline = take_snapshot(self.probe, None)
        if self.spec.preflight:
            reason = preflight_reason(self.profile, cfg, self.baseline, self.is_gpu)
            if reason:
                raise PreflightSkip(reason)
        self.watchdog = Watchdog(self.profile, self.is_gpu, self._on_watchdog)
        self.sampler = Sampler(self.probe, lambda: self.pid, self.profile.watchdog.interval_s,
                               [self.watchdog.observe])
        self.sampler.start()
        if cfg.backend == "external" or self.spec.endpoint:
            self._attach_external()
        elif cfg.backend == "vllm":
            self._spawn_vllm()
        else:
            self._spawn_llamacpp()
        self.after_load = self.sampler.sample()
        self._check_watchdog()
        return self

    def _spawn_llamacpp(self) -> None:
        spec, cfg = self.spec, self.config
        assert spec.binary is not None and spec.model is not None
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.argv = llamacpp.build_argv(spec.binary, cfg, spec.model, port, spec.mmproj)
        env = llamacpp.server_env(cfg, cuda=self.is_gpu)
        log = _fresh_log_path(spec.log_dir, cfg.id)
        self.process = ManagedProcess(self.argv, log, env={**_base_env(), **env},
                                      owner_token=spec.owner_token)
        self.process.start()
        self.boot_s = wait_healthy(self.process, f"{self.url}/health", spec.boot_timeout_s,
                                   abort=lambda: self.watchdog.tripped if self.watchdog else None,
                                   what=f"llama-server for {cfg.id}")
        self.props, slots = self._fetch_state()
        problems = llamacpp.verify_running(cfg, self.props, slots)
        if problems:
            raise ServerError(f"llama-server for {cfg.id} does not run the requested config: "
                              + "; ".join(problems))
        self.report = llamacpp.parse_memory_report(self.process.log_text())

    def _spawn_vllm(self) -> None:
        """vLLM: own TMPDIR, health, /v1/models + log verification, then one request that must
        produce usage (/health says 200 before an engine that cannot run has run a step)."""
        spec, cfg = self.spec, self.config
        assert spec.command is not None and spec.model is not None
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.argv = vllm.build_argv(spec.command, cfg, spec.model, port, cpu=not self.is_gpu)
        self.tmp_dir = vllm.make_tmp_dir(cfg.id)
        try:
            env = vllm.child_env(cfg, self.tmp_dir, _base_env())
        except vllm.MissingApiKey as exc:
            raise ServerError(f"vLLM for {cfg.id}: {exc}") from None
        log = _fresh_log_path(spec.log_dir, cfg.id)
        self.process = ManagedProcess(self.argv, log, env=env, owner_token=spec.owner_token)
        self.process.start()
        self.boot_s = wait_healthy(self.process, f"{self.url}/health", spec.boot_timeout_s,
                                   abort=lambda: self.watchdog.tripped if self.watchdog else None,
                                   what=f"vLLM for {cfg.id}")
        served = cfg.served_model_name or vllm.DEFAULT_SERVED_NAME
        key = self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(timeout=10.0, headers=headers) as client:
            models = client.get(f"{self.url}/v1/models")
            models.raise_for_status()
            metrics = client.get(f"{self.url}/metrics").text
        problems = vllm.verify_running(cfg, models.json(), self.process.log_text() + "\n" + metrics, served)
        if problems:
            raise ServerError(f"vLLM for {cfg.id} does not run the requested config: " + "; ".join(problems))
        problem = vllm.smoke_check(self.url, served, key, timeout_s=max(60.0, spec.boot_timeout_s / 2))
        if problem:
            cause = vllm.engine_failure(self.process.log_text())
            raise ServerError(f"vLLM for {cfg.id} answers /health but cannot serve: {problem}"
                              + (f"\ncause: {cause}" if cause else "") + f"\n(log {self.process.log_path})")
        self.report = vllm.parse_memory_log(self.process.log_text(), metrics)
        self.props = {"total_slots": self.report.max_num_seqs, "max_model_len": self.report.max_model_len,
                      "served_model_name": served, "cache_config": vllm.cache_config_info(metrics)}

    def _attach_external(self) -> None:
        cfg = self.config
        self.url = (self.spec.endpoint or cfg.endpoint or "").rstrip("/")
        if not self.url:
            raise ServerError(f"{cfg.id}: the external backend needs --gpucap-endpoint URL or endpoint = \"...\"")
        t0 = time.monotonic()
        try:
            with httpx.Client(timeout=10.0) as client:
                health = client.get(f"{self.url}/health")
        except httpx.HTTPError as exc:
            raise ServerError(f"endpoint {self.url} unreachable: {exc}") from None
        if health.status_code != 200:
            raise ServerError(f"endpoint {self.url}/health answered {health.status_code}")
        self.boot_s = time.monotonic() - t0
        self.external_pid = _pid_listening_on(self.url)
        try:
            self.props, slots = self._fetch_state()
        except (httpx.HTTPError, ValueError):
            return  # not a llama-server: nothing to verify
        problems = llamacpp.verify_running(cfg, self.props, slots)
        if problems:
            raise PreflightSkip(f"endpoint {self.url} does not run {cfg.id}: " + "; ".join(problems))

    def _fetch_state(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with httpx.Client(timeout=10.0) as client:
            props = client.get(f"{self.url}/props")
            props.raise_for_status()
            slots = client.get(f"{self.url}/slots")
            slots.raise_for_status()
            return props.json(), slots.json()

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
        if self.sampler is not None:
            self.sampler.stop()
        if self.process is not None:
            stop = self.process.stop()
            info.stop_s, info.killed, info.returncode = stop.seconds, stop.killed, stop.returncode
            if self.config.backend == "llamacpp":
                final = llamacpp.parse_memory_report(self.process.log_text())
                if final.breakdown:
                    self.report = final
        if self.tmp_dir is not None:
            info.temp_leftovers = vllm.remove_tmp_dir(self.tmp_dir)
        if self.process is not None:
            if self.baseline is not None:
                info.reclaim_s, info.reclaimed = self._wait_reclaim(self.baseline)
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


def _fresh_log_path(log_dir: Path, config_id: str) -> Path:
    """A log file no other boot uses: xdist workers (or a re-boot of the same config in the same
    second) sharing a log dir would otherwise append to one file, and the memory report parsed from
    it would count every server's KV cache."""
    import os

    stem = f"{config_id}-{int(time.time())}-{os.getpid()}"
    path, n = log_dir / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{stem}-{n}.log"
    return path


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _pid_listening_on(url: str) -> int | None:
    """PID of the local process listening on the endpoint's port, if it is ours to see."""
    port = httpx.URL(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        return None
    return None
