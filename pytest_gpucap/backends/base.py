"""What every inference server backend provides, and the boot sequence they share.

A backend owns everything about *its* server: how to find the command, the argv and environment
for a config, when the server counts as ready and whether it runs what was asked, how to read its
log and ``/metrics``, the names of its counters, and its headroom rule. The handle (``handle.py``)
drives the lifecycle through this interface and never asks which backend it holds, so a new
server is one module plus one line in the registry (``backends/__init__.py``).
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ..matrix import CapacityConfig
from ..pinning import VISIBLE_ENV
from .process import ManagedProcess, Readiness, ServerError, free_port, wait_healthy

if TYPE_CHECKING:
    from .handle import LaunchSpec, ServerHandle


@dataclass(frozen=True)
class CommandLookup:
    """The argv prefix that starts a server, where it came from, or why none was found.

    ``python`` is the interpreter that runs it when it is a Python server (vLLM), so model
    generation can borrow that interpreter's libraries.
    """

    argv: tuple[str, ...] | None
    source: str
    python: str | None = None
    version: str = ""

    @property
    def found(self) -> bool:
        return self.argv is not None


@dataclass(frozen=True)
class MetricNames:
    """The server's own names for what the workload reads from ``/metrics``.

    ``generated_tokens`` is the counter the client's token count is checked against; ``scalars``
    and ``histograms`` map the server's gauges, counters and latency histograms to the keys the
    metrics poller reports (empty: the server is not polled during runs); ``error_counter`` is
    ``(name, label, value)`` of requests that finished with an error; ``info`` is an info-style
    gauge whose labels describe the server's cache configuration.
    """

    generated_tokens: str | None = None
    scalars: Mapping[str, str] = field(default_factory=dict)
    histograms: Mapping[str, str] = field(default_factory=dict)
    error_counter: tuple[str, str, str] | None = None
    info: str | None = None

    @property
    def polled(self) -> bool:
        return bool(self.scalars or self.histograms)


class MemoryReport(ABC):
    """The server's own account of its memory (parsed from its log or endpoints)."""

    n_ctx_slot: int | None

    @abstractmethod
    def kv_per_slot_mib(self, n: int) -> float | None:
        """KV cache per slot as the server reports it (None when it does not say)."""

    @abstractmethod
    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, kept in the ceiling record as ``memory.server_report``."""


@dataclass(frozen=True)
class EmptyReport(MemoryReport):
    """A server that reports nothing about its memory (an external endpoint)."""

    n_ctx_slot: int | None = None

    def kv_per_slot_mib(self, n: int) -> float | None:
        return None

    def as_dict(self) -> dict[str, Any]:
        return {}


class Backend(ABC):
    """One inference server. Subclasses are stateless; per-server state lives on the handle."""

    #: ``backend = "…"`` in the matrix.
    name: ClassVar[str]
    #: What messages call the server.
    server_name: ClassVar[str]
    #: The model the server loads: ``"gguf"`` (a file), ``"hf"`` (a Hugging Face directory), or None.
    model_format: ClassVar[str | None] = None
    #: Whether configs with ``mmproj = true`` get a vision projector file.
    loads_mmproj: ClassVar[bool] = False
    #: Whether the memory model can predict this server's memory before boot.
    predicted: ClassVar[bool] = False
    #: The settings attribute (options.Settings) that names its command, if any.
    command_option: ClassVar[str | None] = None
    metrics: ClassVar[MetricNames] = MetricNames()

    # ------------------------------------------------------------------ finding and starting

    def find_command(self, explicit: str | None) -> CommandLookup:
        """The command that starts this server (option, then environment, then PATH, ...)."""
        return CommandLookup(None, f"{self.server_name} needs no command")

    def readiness(self, spec: "LaunchSpec") -> Readiness:
        """When a booting server counts as too slow: by default the profile's boot timeout."""
        return Readiness(spec.boot_timeout_s)

    @abstractmethod
    def argv(self, handle: "ServerHandle", port: int) -> list[str]:
        """The full argv for the handle's config on ``port`` (127.0.0.1 only)."""

    def env(self, handle: "ServerHandle", base: Mapping[str, str]) -> dict[str, str]:
        """The server's complete environment, from ``base`` (the caller's)."""
        return {**base, **dict(handle.config.env)}

    def launch_env(self, handle: "ServerHandle") -> dict[str, str]:
        """``env`` from this process's environment with the pin applied: the server (and any helper run
        for it) sees exactly its cards, whatever the config's env says."""
        env = self.env(handle, dict(os.environ))
        if handle.spec.visible_devices is not None:
            env[VISIBLE_ENV] = handle.spec.visible_devices
        return env

    def prepare(self, handle: "ServerHandle") -> None:
        """Set up what the server needs before it starts (e.g. a private temp dir)."""

    def start(self, handle: "ServerHandle") -> None:
        """Port, argv, process, readiness, verification: the sequence every spawned server shares."""
        spec = handle.spec
        port = free_port()
        handle.url = f"http://127.0.0.1:{port}"
        self.prepare(handle)
        handle.argv = self.argv(handle, port)
        env = self.launch_env(handle)
        handle.process = ManagedProcess(handle.argv, fresh_log_path(spec.log_dir, handle.config.id), env=env,
                                        owner_token=spec.owner_token)
        handle.process.start()
        handle.boot_s = wait_healthy(
            handle.process, f"{handle.url}/health", self.readiness(spec),
            abort=lambda: handle.watchdog.tripped if handle.watchdog else None,
            what=f"{self.server_name} for {handle.config.id}", progress=spec.progress)
        self.verify(handle)

    @abstractmethod
    def verify(self, handle: "ServerHandle") -> None:
        """After readiness: check that what runs is what was asked (raise ``ServerError`` if not),
        and fill ``handle.props`` and ``handle.report``."""

    def after_stop(self, handle: "ServerHandle") -> list[str]:
        """After the process is gone: read what only the final log holds, remove what ``prepare``
        made. Returns leftover files the server left behind (for the record)."""
        return []

    # ------------------------------------------------------------------ while up

    def api_key(self, cfg: CapacityConfig) -> str | None:
        """The key clients must send, if the server wants one."""
        return None

    def client_options(self, handle: "ServerHandle") -> dict[str, Any]:
        """What the workload client must add to each request (model name, API key)."""
        return {}

    def tokenize_request(self, handle: "ServerHandle", text: str) -> tuple[str, dict[str, Any]] | None:
        """``(path, JSON body)`` that counts the tokens of ``text`` on this server, or None."""
        return None

    def host_reserve(self, cfg: CapacityConfig) -> tuple[float, str]:
        """Host RAM (MiB, and what it is) the server may claim beyond what it holds after load,
        e.g. a prompt cache; preflight counts it against MemAvailable."""
        return 0.0, ""

    # ------------------------------------------------------------------ judging

    def empty_report(self) -> MemoryReport:
        return EmptyReport()

    def headroom(self, report: MemoryReport, cfg: CapacityConfig) -> dict[str, Any] | None:
        """The backend's own headroom rule, or None when free device memory after load is the rule.

        A server that pre-allocates its KV pool returns the pool's capacity in concurrent
        full-length sequences (``kv_capacity_sequences``) to be judged against N.
        """
        return None


def fresh_log_path(log_dir: Path, config_id: str) -> Path:
    """A log file no other boot uses: xdist workers (or a re-boot of the same config in the same
    second) sharing a log dir would otherwise append to one file, and the memory report parsed from
    it would count every server's KV cache."""
    stem = f"{config_id}-{int(time.time())}-{os.getpid()}"
    path, n = log_dir / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{stem}-{n}.log"
    return path


__all__ = ["Backend", "CommandLookup", "EmptyReport", "MemoryReport", "MetricNames", "ServerError",
           "fresh_log_path"]
