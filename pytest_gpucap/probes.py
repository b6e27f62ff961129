"""Memory probes behind one interface, and the sampler that records a timeline while a config is up.

A GPU profile reads NVML (``nvidia-ml-py``); a host profile lets the server's resident memory
stand in for device memory against the profile's budget, so the same tests and SLOs run on a
machine without a GPU. Host MemAvailable is always recorded because that is what hangs a host.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory as the profile sees it (capped by the profile budget)."""

    total_mib: float
    used_mib: float
    free_mib: float
    server_mib: float | None = None


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of host and device memory."""

    t: float  # time.monotonic(), the clock request records use
    host_total_mib: float
    host_available_mib: float
    server_rss_mib: float | None
    device: DeviceMemory

    @property
    def free_gib(self) -> float:
        return self.device.free_mib / 1024


class MemoryProbe(Protocol):
    """Reads device memory; ``kind`` is ``nvml`` or ``host``."""

    kind: str

    def device(self, server_pids: Iterable[int]) -> DeviceMemory: ...

    def describe(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def process_tree_rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process and all its children (the server may fork helpers)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def tree_pids(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


class HostProbe:
    """Host memory stands in for device memory: used = the server's RSS, total = the budget."""

    kind = "host"

    def __init__(self, budget_mib: float) -> None:
        self.budget_mib = budget_mib

    def device(self, server_pids: Iterable[int]) -> DeviceMemory:
        used = 0.0
        for pid in server_pids:
            try:
                used += psutil.Process(pid).memory_info().rss / MIB
            except psutil.Error:
                continue
        return DeviceMemory(self.budget_mib, used, self.budget_mib - used, used)

    def describe(self) -> dict[str, str]:
        return {"device": "host", "cpu": platform.processor() or platform.machine(),
                "cpus": str(psutil.cpu_count()), "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}"}

    def close(self) -> None:
        pass


class NvmlError(RuntimeError):
    """NVML is missing or cannot see the requested GPU."""


class NvmlProbe:
    """One GPU through NVML, optionally capped to a smaller budget to emulate a smaller card."""

    kind = "nvml"

    def __init__(self, index: int = 0, budget_mib: float | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise NvmlError(f"nvidia-ml-py is not installed: {exc}") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlError(f"no NVIDIA GPU usable (NVML: {exc})") from None
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NvmlError(f"GPU {index} not found (NVML: {exc})") from None
        self.index = index
        self.budget_mib = budget_mib

    def device(self, server_pids: Iterable[int]) -> DeviceMemory:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        total, used, free = info.total / MIB, info.used / MIB, info.free / MIB
        if self.budget_mib is not None and self.budget_mib < total:
            total = self.budget_mib
            free = min(free, total - used)
        pids = set(server_pids)
        server = None
        if pids:
            try:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                server = sum((p.usedGpuMemory or 0) for p in procs if p.pid in pids) / MIB
            except self._nvml.NVMLError:
                server = None
        return DeviceMemory(total, used, free, server)

    def describe(self) -> dict[str, str]:
        nv = self._nvml
        name = nv.nvmlDeviceGetName(self._handle)
        driver = nv.nvmlSystemGetDriverVersion()
        total = nv.nvmlDeviceGetMemoryInfo(self._handle).total / 2**30
        return {"device": "cuda", "gpu": name if isinstance(name, str) else name.decode(),
                "driver": driver if isinstance(driver, str) else driver.decode(),
                "gpu_index": str(self.index), "gpu_total_gib": f"{total:.1f}"}

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


def take_snapshot(probe: MemoryProbe, server_pid: int | None) -> MemorySnapshot:
    vm = psutil.virtual_memory()
    return MemorySnapshot(
        t=time.monotonic(), host_total_mib=vm.total / MIB, host_available_mib=vm.available / MIB,
        server_rss_mib=process_tree_rss_mib(server_pid), device=probe.device(tree_pids(server_pid)),
    )


@dataclass
class Timeline:
    """Snapshots taken while a config is up, with the extremes that matter."""

    samples: list[MemorySnapshot] = field(default_factory=list)

    def add(self, snap: MemorySnapshot) -> None:
        self.samples.append(snap)

    @property
    def min_free_mib(self) -> float | None:
        return min((s.device.free_mib for s in self.samples), default=None)

    @property
    def peak_used_mib(self) -> float | None:
        return max((s.device.used_mib for s in self.samples), default=None)

    @property
    def min_host_available_mib(self) -> float | None:
        return min((s.host_available_mib for s in self.samples), default=None)

    @property
    def peak_server_rss_mib(self) -> float | None:
        return max((s.server_rss_mib or 0.0 for s in self.samples), default=None)


class Sampler:
    """Background thread: snapshot every ``interval_s`` into a timeline and hand each to observers."""

    def __init__(self, probe: MemoryProbe, pid: Callable[[], int | None], interval_s: float = 0.5,
                 observers: Iterable[Callable[[MemorySnapshot], None]] = ()) -> None:
        self.probe = probe
        self._pid = pid
        self.interval_s = interval_s
        self.observers = list(observers)
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gpucap-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def sample(self) -> MemorySnapshot:
        snap = take_snapshot(self.probe, self._pid())
        with self._lock:
            self.timeline.add(snap)
        for observe in self.observers:
            observe(snap)
        return snap

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a probe hiccup must not kill the watchdog thread
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
